"""Unit-tier fixtures: a tiny random chat model with a real (byte-level) tokenizer and chat template,
so that the engine and the CLI run end to end in milliseconds without the prepared SmolLM2."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run single-threaded (shared CI cores spin otherwise); use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_chat_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges) with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                         "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def tiny_chat_adapter(max_positions: int = 1024, seed: int = 0):
    """A random 4-layer llama over `tiny_chat_tokenizer` (fp32, CPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from krul.adapter import ModelAdapter

    tok = tiny_chat_tokenizer()
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=max_positions,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return ModelAdapter(model, tok, "tiny-chat")


@pytest.fixture(scope="session")
def tiny_chat():
    """One tiny chat adapter per session (the engine never changes its weights)."""
    return tiny_chat_adapter()


@pytest.fixture(scope="session")
def make_tiny_chat():
    """`tiny_chat_adapter` itself (tests that need their own model, e.g. a short context)."""
    return tiny_chat_adapter


@pytest.fixture(scope="session")
def forge_header():
    """`forge(blob, edit)`: the state file `blob` with its JSON header changed by `edit(header)` and
    checksummed again (a bug, not a bit flip), for tests that the schema still refuses it."""
    import hashlib
    import json

    from krul.store import MAGIC, PREFIX_NBYTES

    def forge(blob: bytes, edit) -> bytes:
        n = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "little")
        h = json.loads(blob[PREFIX_NBYTES:PREFIX_NBYTES + n])
        edit(h)
        new = json.dumps(h).encode()
        head = MAGIC + len(new).to_bytes(8, "little")
        return head + hashlib.sha256(head + new).digest() + new + blob[PREFIX_NBYTES + n:]
    return forge
