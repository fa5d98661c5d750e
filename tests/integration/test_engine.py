"""The engine on the real SmolLM2: lossless restores and clear errors."""
import json
import subprocess
import sys

import pytest
import torch

from krul.engine import Engine, EngineError
from krul.store import StoreError, make_store

pytestmark = pytest.mark.integration
N_NEW = 8


def _reference(adapter, messages, n_new):
    """Greedy tokens of plain `model.generate` over the full rendered history."""
    ids = adapter.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                return_dict=True, return_tensors="pt")["input_ids"]
    out = adapter.model.generate(ids, max_new_tokens=n_new, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def references(smollm, short_test_conversations):
    refs = {}
    for conv in short_test_conversations:
        users = conv.user_turn_indices()[:3]
        refs[conv.id] = [_reference(smollm, conv.messages[: i + 1], N_NEW) for i in users]
    return refs


@pytest.mark.parametrize("policy,tier", [("full-load", "pageable"), ("full-load", "disk"),
                                         ("full-recompute", "pageable"), ("full-recompute", "disk")])
def test_lossless_policies_match_plain_generate(smollm, short_test_conversations, references, policy, tier, tmp_path):
    """full-load and full-recompute give the same greedy tokens as generate over the full history."""
    assert len(short_test_conversations) == 3
    store = make_store(tier, tmp_path) if tier == "disk" else make_store(tier)
    engine = Engine(smollm, policy, store, max_new_tokens=N_NEW)
    for conv in short_test_conversations:
        results = list(engine.replay(conv, max_turns=3))
        assert len(results) == 3
        for result, ref in zip(results, references[conv.id]):
            # generate stops at EOS too: compare the common length, which must be the whole answer
            assert result.generated_ids == ref[: len(result.generated_ids)]
            assert len(result.generated_ids) == len(ref)
        assert results[1].history_tokens > 0 and results[2].history_tokens > results[1].history_tokens
        if policy == "full-load":
            assert results[1].stored_bytes >= results[1].full_kv_bytes
        else:
            assert results[1].stored_bytes < results[1].full_kv_bytes / 100


def test_history_is_a_token_prefix_of_the_next_turn(smollm, short_test_conversations):
    """The stored history equals the first tokens of the next turn's rendered context (no re-tokenisation)."""
    engine = Engine(smollm, "full-load", make_store("pageable"), max_new_tokens=2)
    conv = short_test_conversations[0]
    results = list(engine.replay(conv, max_turns=3))
    users = conv.user_turn_indices()
    for result, i in zip(results[1:], users[1:3]):
        full = engine.render(conv.messages[: i + 1], add_generation_prompt=True)
        before = engine.render(conv.messages[:i], add_generation_prompt=False)
        assert full[: len(before)] == before
        assert result.history_tokens == len(before)
        assert result.history_tokens + result.new_input_tokens == len(full)


def test_empty_message_and_missing_state_errors(smollm):
    """An empty user message is a clear error; a turn with no stored history recomputes it (warned)."""
    from krul.engine import StateFallbackWarning

    engine = Engine(smollm, "full-load", make_store("pageable"), max_new_tokens=2)
    with pytest.raises(EngineError, match="empty user message"):
        engine.turn("c", 0, [], {"role": "user", "content": "  "})
    with pytest.warns(StateFallbackWarning, match="no stored state"):
        result = engine.turn("c", 1, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                             {"role": "user", "content": "c"})
    assert engine.fallbacks == 1 and "MissingStateError" in result.fallback and result.generated_tokens


def test_too_long_conversation_names_both_lengths(smollm):
    """A context longer than the model's names both lengths."""
    engine = Engine(smollm, "full-load", make_store("pageable"), max_new_tokens=2)
    with pytest.raises(EngineError, match=r"needs \d+ tokens .* context of 8192"):
        engine.turn("c", 0, [], {"role": "user", "content": "word " * 9000})


def test_corrupted_disk_state_is_an_integrity_error(smollm, tmp_path):
    """A damaged state file on disk is never restored: the turn recomputes the history instead (the
    same greedy tokens as an intact restore) and says so."""
    from krul.engine import StateFallbackWarning

    store = make_store("disk", tmp_path)
    engine = Engine(smollm, "full-load", store, max_new_tokens=2)
    msgs = [{"role": "user", "content": "Hi there"}]
    r0 = engine.turn("c", 0, [], msgs[0], reply="Hello!")
    path = store.path("c")
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x55
    path.write_bytes(bytes(blob))
    args = ("c", 1, msgs + [{"role": "assistant", "content": "Hello!"}], {"role": "user", "content": "How are you?"})
    with pytest.warns(StateFallbackWarning, match="corrupted|checksum"):
        damaged = engine.turn(*args)
    assert r0.offloaded_bytes > 0 and damaged.fallback and damaged.history_tokens == 0
    intact = Engine(smollm, "full-load", make_store("pageable"), max_new_tokens=2)
    intact.turn("c", 0, [], msgs[0], reply="Hello!")
    assert intact.turn(*args).generated_ids == damaged.generated_ids


def _krul(*args):
    return subprocess.run([sys.executable, "-m", "krul", *args], capture_output=True, text=True, timeout=600)


def test_cli_replay_json_and_models_path():
    """`krul replay --json` prints one JSON row per turn; `krul models --path` prints a model folder."""
    out = _krul("replay", "--model", "smollm2-135m", "--policy", "full-load", "--conversations", "sharegpt",
                "--split", "test", "--limit", "2", "--max-turns", "2", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4
    for key in ("conversation_id", "turn_idx", "history_tokens", "new_input_tokens", "generated_tokens",
                "policy", "ttft_s", "restore_s", "stored_bytes", "generated_text"):
        assert key in rows[0]
    path = _krul("models", "--path", "smollm2-135m")
    assert path.returncode == 0 and (__import__("pathlib").Path(path.stdout.strip()) / "config.json").exists()


def test_cli_errors_are_one_line_with_status_2(tmp_path):
    """Unknown model, malformed JSONL and pinned-without-CUDA exit 2 with a message saying what to do."""
    bad = _krul("replay", "--model", "nope")
    assert bad.returncode == 2 and "known: smollm2-135m" in bad.stderr
    f = tmp_path / "c.jsonl"
    f.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n{broken\n')
    bad = _krul("replay", "--conversations", str(f))
    assert bad.returncode == 2 and f"{f}:2" in bad.stderr
    if not torch.cuda.is_available():
        bad = _krul("replay", "--tier", "pinned", "--device", "cpu")
        assert bad.returncode != 0 and "CUDA" in bad.stderr
