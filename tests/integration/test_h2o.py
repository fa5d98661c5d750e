"""H2O eviction on the real SmolLM2 (GQA: 9 query heads, 3 KV heads, 30 layers): budget 1 is full-load,
a smaller budget is met to one token-layer through the calibration replay path, and the restore of a
history with positions left out is a forward attending to the kept tokens only, at their true positions."""
import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from krul import h2o
from krul.engine import Engine
from krul.policies import get_policy, with_budget
from krul.pricing import state_storage_bytes
from krul.restore import restore_cache
from krul.store import make_store

pytestmark = pytest.mark.integration
N_NEW = 8
_REF = "krul_test_h2o_reference_integration"
_KEPT: dict = {}


def _reference_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa with causal masking and, per KV head, the history tokens the state dropped masked out."""
    kept = _KEPT[module.layer_idx]
    visible = torch.ones(query.shape[1], key.shape[-2], dtype=torch.bool)
    visible[:, :kept.shape[1]] = kept.repeat_interleave(query.shape[1] // kept.shape[0], dim=0)
    q, k = query.shape[-2], key.shape[-2]
    mask = visible[None, :, None, :] & torch.ones(q, k, dtype=torch.bool).tril(diagonal=k - q)[None, None]
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _reference_cache(state, n_kv_heads):
    """The stored kept K/V scattered to their positions, noise at the dropped ones; and the kept masks."""
    noise = torch.Generator().manual_seed(0)
    layers, kept = [], {}
    for item in sorted(state.items, key=lambda it: it.layers):
        p = item.payload
        pos = p.positions.long().expand(n_kv_heads, -1)
        shape = p.keys.shape[:2] + (state.n_tokens,) + p.keys.shape[3:]
        pair = []
        for stored in (p.keys, p.values):
            full = 100 * torch.randn(shape, generator=noise, dtype=stored.dtype)
            full[0].scatter_(1, pos[..., None].expand(-1, -1, shape[-1]), stored[0])
            pair.append(full)
        layers.append(tuple(pair))
        kept[item.layers[0]] = torch.zeros(n_kv_heads, state.n_tokens, dtype=torch.bool).scatter_(1, pos, True)
    return DynamicCache(ddp_cache_data=layers), kept


def _replay(adapter, policy, conversations, store=None):
    engine = Engine(adapter, policy, store or make_store("pageable"), max_new_tokens=N_NEW)
    return {conv.id: list(engine.replay(conv, max_turns=3)) for conv in conversations}


def test_full_budget_is_full_load(smollm, short_test_conversations):
    """h2o at budget 1 gives full-load's greedy tokens and reply nll exactly on three conversations."""
    ref = _replay(smollm, "full-load", short_test_conversations)
    got = _replay(smollm, with_budget(get_policy("h2o"), 1.0), short_test_conversations)
    for conv_id, rows in ref.items():
        assert [r.generated_ids for r in got[conv_id]] == [r.generated_ids for r in rows]
        assert [r.reply_token_nll for r in got[conv_id]] == [r.reply_token_nll for r in rows]


def test_budget_through_the_calibration_replay(smollm, short_test_conversations):
    """Through calibrate.replay_with (the curves' path) at budget 0.5: every restored state is within one
    token-layer under its budget, the meter's storage ratio is 2 to within that, later turns restore a
    history and their reply nll is finite."""
    from krul.calibrate import StorageMeter, replay_with

    policy = with_budget(get_policy("h2o", recompute_ratio=0.0), 0.5)
    states = []

    class Recording(StorageMeter):
        def get(self, key):
            state = super().get(key)
            states.append(state)
            return state

    meter = Recording(make_store("pageable"))
    rows = replay_with(smollm, policy, short_test_conversations, None, max_turns=3, meter=meter)
    assert len(states) == 2 * len(short_test_conversations)
    per = h2o.token_layer_nbytes(smollm.n_kv_heads, smollm.head_dim)
    for state in states:
        budget = h2o.budget_nbytes(0.5, state.n_tokens, smollm.n_layers, smollm.n_kv_heads, smollm.head_dim)
        assert state_storage_bytes(state) <= budget < state_storage_bytes(state) + per
    assert 2.0 <= meter.ratio < 2.0 * (1 + 1e-3)
    later = [r for r in rows if r.turn_idx >= 1]
    assert all(r.history_tokens > 0 and r.reply_tokens > 0 for r in later)
    assert all(torch.isfinite(torch.tensor(r.reply_nll_sum)) for r in later)


def test_restore_with_left_out_positions_is_masked_attention(smollm, short_test_conversations):
    """The third turn's state at budget 0.3 restored: the next input's logits and 6 greedy steps equal a
    plain forward over the kept K/V at their true positions with the dropped ones masked per layer and KV
    head (noise in their place)."""
    conv = short_test_conversations[0]
    store = make_store("pageable")
    engine = Engine(smollm, with_budget(get_policy("h2o"), 0.3), store, max_new_tokens=N_NEW)
    list(engine.replay(conv, max_turns=3, keep_state=True))
    state = store.get(conv.id)
    assert h2o.holds_evicted(state)
    new_ids = torch.tensor([smollm.tokenizer.encode("<|im_start|>user\nCan you summarise that?<|im_end|>\n"
                                                    "<|im_start|>assistant\n")])
    cache, _ = restore_cache(smollm, state, extra_tokens=32, grow=True)
    full, kept = _reference_cache(state, smollm.n_kv_heads)
    AttentionInterface.register(_REF, _reference_attention)
    AttentionMaskInterface.register(_REF, sdpa_mask)
    _KEPT.clear()
    _KEPT.update(kept)

    def greedy(cache_):
        logits = [smollm.forward(new_ids, cache_)[0]]
        for _ in range(6):
            logits.append(smollm.forward(torch.tensor([[int(logits[-1][-1].argmax())]]), cache_)[0])
        return logits

    got = greedy(cache)
    with smollm.attention_implementation(_REF):
        ref = greedy(full)
    assert [int(x[-1].argmax()) for x in got] == [int(x[-1].argmax()) for x in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
