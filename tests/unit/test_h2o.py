"""H2O eviction (policy "h2o", `krul.h2o`) on a tiny random chat model (CPU): the budget and its byte
accounting, the selection, the restore of a history with positions left out (against a full-KV forward
that masks the dropped tokens per layer and KV head), re-eviction over turns, and the engine's refusals."""
import contextlib

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from krul import h2o
from krul.adapter import BufferCache
from krul.engine import Engine, EngineError
from krul.estimator import AttentionEstimator
from krul.policies import PolicyError, get_policy, with_budget
from krul.pricing import evicted_nbytes, full_storage_bytes, state_storage_bytes, storage_nbytes, storage_ratio
from krul.restore import restore_cache
from krul.store import (CorruptStateError, DiskStore, MemoryStore, TieredStore,
                        deserialize, make_store, serialize)

pytestmark = pytest.mark.usefixtures("one_thread")

TURNS = [("Hello there, who are you?", "I am a small model."),
         ("Tell me about the sea.", "It is large and wet."),
         ("And the sky?", "Blue, mostly."),
         ("Thanks!", "You are welcome.")]
N_NEW = 5


def _run(engine, conv_id="c", turns=TURNS, states=None):
    """Teacher-forced turns; `states` (a list) collects the stored state after each turn."""
    history, out = [], []
    for i, (user, reply) in enumerate(turns):
        msg = {"role": "user", "content": user}
        out.append(engine.turn(conv_id, i, history, msg, reply=reply))
        if states is not None:
            states.append(engine.store.get(conv_id))
        history = history + [msg, {"role": "assistant", "content": reply}]
    return out


def _h2o(budget, **params):
    return with_budget(get_policy("h2o"), budget).with_params(**params)


# -- bytes and budget ----------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [3, 1])
def test_evicted_nbytes_equals_storage_nbytes(groups):
    """pricing.evicted_nbytes counts an EvictedLayer exactly as storage_nbytes does (KV at 2 bytes,
    int32 positions at 4, scores at 2), in fp32 and bf16 alike."""
    for dtype in (torch.float32, torch.bfloat16):
        payload = h2o.EvictedLayer(torch.zeros(1, 3, 17, 8, dtype=dtype), torch.zeros(1, 3, 17, 8, dtype=dtype),
                                   torch.zeros(groups, 17, dtype=torch.int32), torch.zeros(groups, 17, dtype=dtype))
        assert storage_nbytes(payload) == evicted_nbytes(17, 3, 8, groups=groups)
    assert evicted_nbytes(17, 3, 8, groups=groups) == 2 * 3 * 17 * 8 * 2 + groups * 17 * (4 + 2)


@pytest.mark.parametrize("score_heads", ["kv", "layer"])
def test_allocation_is_within_one_token_layer_of_the_budget(score_heads):
    """For any budget below the full KV, the kept token-layers cost at most the budget and less than one
    token-layer under it; layers differ by at most one token."""
    heads, dim, layers = 2, 16, 5
    per = h2o.token_layer_nbytes(heads, dim, score_heads)
    for n in (1, 7, 100, 333):
        full = full_storage_bytes(n, layers, heads, dim)
        for ratio in (0.01, 0.1, 0.33, 0.5, 0.77, 0.99):
            budget = h2o.budget_nbytes(ratio, n, layers, heads, dim)
            kept = h2o.allocate(budget, n, layers, heads, dim, score_heads)
            cost = sum(evicted_nbytes(k, heads, dim, groups=heads if score_heads == "kv" else 1) for k in kept)
            assert cost <= budget < cost + per and budget < full
            assert max(kept) - min(kept) <= 1 and max(kept) <= n


def test_select_keeps_the_recent_half_and_the_heaviest_rest():
    """select: the round(recent_ratio * k) newest positions, then the highest scores of the others,
    per group, sorted by position."""
    positions = torch.tensor([[5, 0, 1, 2, 3, 4, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]])
    scores = torch.tensor([[9., 8., 0., 7., 1., 2., 0., 0.], [0., 1., 0., 3., 2., 0., 0., 5.]])
    idx = h2o.select(positions, scores, 4, recent_ratio=0.5)
    assert positions.gather(1, idx).tolist() == [[0, 5, 6, 7], [3, 4, 6, 7]]  # group 1: heavy 7 is recent
    assert h2o.select(positions, scores, 8).tolist() == positions.argsort(dim=1).tolist()
    assert positions.gather(1, h2o.select(positions, scores, 2, recent_ratio=0.0)).tolist() == [[0, 5], [3, 7]]


def test_attention_scores_sum_what_the_queries_gave(tiny_chat):
    """AttentionScores: a prefill of q queries gives each KV head q * (query heads per KV head) in total
    (every attention row sums to one), a decode step adds one row per query head; slots rewritten after a
    crop keep only what the new queries gave them; carried scores seed the sums of a restored history."""
    n_rep = tiny_chat.n_heads // tiny_chat.n_kv_heads
    ids = torch.tensor([tiny_chat.tokenizer.encode("hello there, how are you today?")])
    q = ids.shape[1]
    scorer = h2o.AttentionScores(tiny_chat, block_size=8)  # several blocks
    cache = BufferCache.for_adapter(tiny_chat, 64, grow=True)
    scorer.begin("a", cache)
    scorer.forward("a", ids, cache, logits_to_keep=1)
    for sums in scorer.scores("a", cache):
        torch.testing.assert_close(sums.sum(dim=1), torch.full((tiny_chat.n_kv_heads,), float(q * n_rep)))
    scorer.forward("a", ids[:, :1], cache)
    assert all(abs(float(s.sum()) - (q + 1) * n_rep * tiny_chat.n_kv_heads) < 1e-3 for s in scorer.scores("a", cache))
    tiny_chat.crop(cache, q - 2)
    tail = torch.tensor([[5, 6]])
    scorer.forward("a", tail, cache)
    fresh = BufferCache.for_adapter(tiny_chat, 64, grow=True)
    scorer.begin("b", fresh)
    scorer.forward("b", ids[:, :q - 2], fresh)
    scorer.forward("b", tail, fresh)
    for got, ref in zip(scorer.scores("a", cache), scorer.scores("b", fresh)):
        torch.testing.assert_close(got[:, q - 2:], ref[:, q - 2:])
    restored = BufferCache.for_adapter(tiny_chat, 16)
    restored.layers[0].hold_evicted(9, torch.tensor([[1, 4, 8], [0, 2, 8]]), torch.tensor([[3., 2., 1.], [1., 1., 5.]]))
    scorer.begin("c", restored)
    assert scorer.scores("c", restored)[0].tolist() == [[3., 2., 1.], [1., 1., 5.]]


# -- the engine --------------------------------------------------------------------------------
def test_full_budget_is_full_load(tiny_chat):
    """budget_ratio = 1 keeps everything: the same generated tokens and reply nll, bit for bit, as
    full-load over four turns, and the same stored bytes."""
    ref = _run(Engine(tiny_chat, "full-load", make_store("pageable"), max_new_tokens=N_NEW))
    got = _run(Engine(tiny_chat, _h2o(1.0), make_store("pageable"), max_new_tokens=N_NEW))
    assert [r.generated_ids for r in got] == [r.generated_ids for r in ref]
    assert [r.reply_token_nll for r in got] == [r.reply_token_nll for r in ref]
    assert [r.offloaded_bytes for r in got] == [r.offloaded_bytes for r in ref]


@pytest.fixture(scope="module")
def evicted_runs(tiny_chat):
    """budget -> (results, stored states) of four turns of h2o (per KV head) and h2o-layer at 0.4."""
    out = {}
    for key, policy in {"kv": _h2o(0.4), "layer": _h2o(0.4, score_heads="layer"), "small": _h2o(0.15)}.items():
        states = []
        results = _run(Engine(tiny_chat, policy, make_store("pageable"), max_new_tokens=N_NEW), states=states)
        out[key] = (policy, results, states)
    return out


@pytest.mark.parametrize("key", ["kv", "layer", "small"])
def test_stored_bytes_within_budget_and_counted_exactly(tiny_chat, evicted_runs, key):
    """Every stored state costs at most budget_ratio of its history's full KV and less than one
    token-layer under it (storage bytes, index and scores counted); state_storage_bytes equals the
    per-layer formula and storage_ratio is full / stored; layers differ by at most one token."""
    policy, _, states = evicted_runs[key]
    heads, dim, layers = tiny_chat.n_kv_heads, tiny_chat.head_dim, tiny_chat.n_layers
    groups = heads if policy.score_heads == "kv" else 1
    per = h2o.token_layer_nbytes(heads, dim, policy.score_heads)
    for state in states:
        budget = h2o.budget_nbytes(policy.budget_ratio, state.n_tokens, layers, heads, dim)
        kept = [item.payload.n_tokens() for item in sorted(state.items, key=lambda it: it.layers)]
        stored = state_storage_bytes(state)
        assert stored == sum(evicted_nbytes(k, heads, dim, groups=groups) for k in kept)
        assert stored <= budget < stored + per
        assert max(kept) - min(kept) <= 1
        assert storage_ratio(state) == full_storage_bytes(state.n_tokens, layers, heads, dim) / stored
        for item in state.items:
            assert item.payload.positions.dtype == torch.int32 and item.payload.positions.shape[0] == groups
            assert state.kv_bytes() == sum(it.payload.nbytes() for it in state.items)


def test_later_turns_re_evict_the_union(evicted_runs):
    """Each turn's kept positions come from the previous turn's kept positions or the new turn's tokens,
    the newest tokens are kept (the recent half), and every layer keeps its allocation."""
    _, results, states = evicted_runs["kv"]
    for prev, state in zip(states, states[1:]):
        for item_prev, item in zip(sorted(prev.items, key=lambda it: it.layers),
                                   sorted(state.items, key=lambda it: it.layers)):
            old = item_prev.payload.positions.long()
            for g, row in enumerate(item.payload.positions.long()):
                allowed = set(old[g].tolist()) | set(range(prev.n_tokens, state.n_tokens))
                assert set(row.tolist()) <= allowed
                assert row.tolist() == sorted(row.tolist())
                assert state.n_tokens - 1 in row.tolist()
    assert all(r.history_tokens > 0 for r in results[1:]) and not any(r.fallback for r in results)


def test_offload_from_a_dynamic_cache(tiny_chat):
    """The figures' path (`figures.common`): a history prefilled through the engine's forward into a
    DynamicCache and offloaded by the policy is evicted within its budget, then a turn restores it."""
    policy = _h2o(0.4)
    engine = Engine(tiny_chat, policy, make_store("pageable"), max_new_tokens=2)
    before = [{"role": "user", "content": TURNS[0][0]}, {"role": "assistant", "content": TURNS[0][1]}]
    user = {"role": "user", "content": TURNS[1][0]}
    hist = engine.render(before + [user], add_generation_prompt=True)[:-3]
    cache = DynamicCache()
    engine._forward("d", torch.tensor([hist]), cache, logits_to_keep=1)
    engine.policy.offload(engine, "d", hist, cache, None)
    state = engine.store.get("d")
    heads, dim, layers = tiny_chat.n_kv_heads, tiny_chat.head_dim, tiny_chat.n_layers
    budget = h2o.budget_nbytes(0.4, len(hist), layers, heads, dim)
    assert state_storage_bytes(state) <= budget < state_storage_bytes(state) + h2o.token_layer_nbytes(heads, dim)
    result = engine.turn("d", 1, before, user, TURNS[1][1])
    assert result.history_tokens == len(hist) and not result.fallback and result.reply_tokens > 0


def test_a_turn_leaving_an_evicted_history_early_recomputes_it(tiny_chat):
    """When a turn's tokens leave the stored history before its end (the history's reply edited), an
    evicted history cannot be cropped there: the turn recomputes it (a fallback, warned) and gives the
    full recompute's tokens."""
    import warnings

    from krul.engine import StateFallbackWarning

    user0, user1 = ({"role": "user", "content": u} for u, _ in TURNS[:2])
    edited = [user0, {"role": "assistant", "content": "Something else entirely."}]
    ref = Engine(tiny_chat, "full-recompute", make_store("pageable"), max_new_tokens=N_NEW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StateFallbackWarning)  # full-recompute stores nothing to restore
        expected = ref.turn("r", 1, edited, user1, reply=TURNS[1][1])
    engine = Engine(tiny_chat, _h2o(0.4), make_store("pageable"), max_new_tokens=N_NEW)
    engine.turn("e", 0, [], user0, reply=TURNS[0][1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = engine.turn("e", 1, edited, user1, reply=TURNS[1][1])
    assert got.fallback and "evicted" in got.fallback and got.history_tokens == 0
    assert any(issubclass(w.category, StateFallbackWarning) for w in caught)
    assert got.generated_ids == expected.generated_ids


# -- restore with positions left out, against masked full-KV attention --------------------------
_REF = "krul_test_h2o_reference"
_KEPT: dict = {}  # layer_idx -> (kv_heads, n_history) bool: history tokens the reference may attend to


def _reference_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa over the full KV with the history tokens the state dropped masked out, per KV head."""
    kept = _KEPT[module.layer_idx]
    n_rep = query.shape[1] // kept.shape[0]
    visible = torch.ones(query.shape[1], key.shape[-2], dtype=torch.bool)
    visible[:, :kept.shape[1]] = kept.repeat_interleave(n_rep, dim=0)
    q, k = query.shape[-2], key.shape[-2]
    causal = torch.ones(q, k, dtype=torch.bool).tril(diagonal=k - q)
    mask = visible[None, :, None, :] & causal[None, None]
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _reference_cache(state, n_kv_heads: int) -> DynamicCache:
    """The history's KV at its true positions as the state stores it: each kept token's stored K/V at its
    position (per KV head), every dropped position filled with large noise (the mask must hide it)."""
    noise = torch.Generator().manual_seed(0)
    layers = []
    for item in sorted(state.items, key=lambda it: it.layers):
        p = item.payload
        pos = p.positions.long().expand(n_kv_heads, -1)
        shape = p.keys.shape[:2] + (state.n_tokens,) + p.keys.shape[3:]
        kv = []
        for stored in (p.keys, p.values):
            full = 100 * torch.randn(shape, generator=noise, dtype=stored.dtype)
            full[0].scatter_(1, pos[..., None].expand(-1, -1, shape[-1]), stored[0])
            kv.append(full)
        layers.append(tuple(kv))
    return DynamicCache(ddp_cache_data=layers)


def _kept_masks(state) -> dict:
    out = {}
    for item in state.items:
        pos = item.payload.positions.long()
        mask = torch.zeros(pos.shape[0], state.n_tokens, dtype=torch.bool)
        mask.scatter_(1, pos, True)
        out[item.layers[0]] = mask
    return out


def _greedy(adapter, cache, ids, steps):
    logits = [adapter.forward(ids, cache)[0]]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        logits.append(adapter.forward(torch.tensor([[tokens[-1]]]), cache)[0])
    return tokens, logits


@pytest.mark.parametrize("key", ["kv", "layer", "small"])
@pytest.mark.parametrize("turn", [0, 2])
def test_restore_with_left_out_positions_is_masked_attention(tiny_chat, evicted_runs, key, turn):
    """The next turn's prefill over a restored evicted state, and 8 greedy steps after it, give the logits
    of a plain forward over the history's KV at its true positions (the stored tokens scattered there,
    noise at the dropped ones) whose attention masks exactly the dropped tokens per layer and KV head;
    the whole history recomputed gives other logits (the eviction matters)."""
    _, _, states = evicted_runs[key]
    state = states[turn]
    adapter, n = tiny_chat, states[turn].n_tokens
    new_ids = torch.tensor([tiny_chat.tokenizer.encode("<|im_start|>user\nWhat now, then?<|im_end|>\n")])
    cache, _ = restore_cache(adapter, state, extra_tokens=64, grow=True)
    assert cache.evicted and {layer.get_seq_length() for layer in cache.layers} == {n}
    tokens, logits = _greedy(adapter, cache, new_ids, 8)
    assert all(layer.get_seq_length() == n + new_ids.shape[1] + 8 for layer in cache.layers)

    with _masked_reference(adapter, state) as full:
        ref_tokens, ref_logits = _greedy(adapter, full, new_ids, 8)
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    recomputed = DynamicCache()  # the whole history, nothing evicted: the eviction changes the logits
    adapter.forward(state.token_ids[None], recomputed)
    assert (logits[0] - adapter.forward(new_ids, recomputed)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_forward_evicted_is_masked_attention_for_each_family(kind):
    """For both supported families, a BufferCache holding per layer a different number of the history's
    positions (random subsets per KV head) continues, over 6 new tokens and 3 decode steps, exactly as a
    forward over the whole history's KV with the other positions masked per layer and KV head."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from krul.adapter import ModelAdapter

    cls = LlamaConfig if kind == "llama" else Qwen2Config
    cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    adapter = ModelAdapter(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval(), name=kind)
    gen = torch.Generator().manual_seed(1)
    n = 30
    full = DynamicCache()
    adapter.forward(torch.randint(0, 128, (1, n), generator=gen), full)
    cache = BufferCache.for_adapter(adapter, 64)
    _KEPT.clear()
    for layer_idx, (keys, values) in enumerate(adapter.kv_from_cache(full)):
        kept = 20 - 3 * layer_idx
        pos = torch.stack([torch.randperm(n, generator=gen)[:kept].sort().values for _ in range(2)])
        k_buf, v_buf = cache.buffers(layer_idx)
        k_buf[:, :, :kept] = keys[0].gather(1, pos[..., None].expand(-1, -1, keys.shape[-1]))[None]
        v_buf[:, :, :kept] = values[0].gather(1, pos[..., None].expand(-1, -1, keys.shape[-1]))[None]
        cache.layers[layer_idx].hold_evicted(n, pos)
        _KEPT[layer_idx] = torch.zeros(2, n, dtype=torch.bool).scatter_(1, pos, True)
    cache.set_length(n)
    new_ids = torch.randint(0, 128, (1, 6), generator=gen)
    AttentionInterface.register(_REF, _reference_attention)
    AttentionMaskInterface.register(_REF, sdpa_mask)
    tokens, logits = _greedy(adapter, cache, new_ids, 3)
    with adapter.attention_implementation(_REF):
        ref_tokens, ref_logits = _greedy(adapter, full, new_ids, 3)
    assert tokens == ref_tokens and [layer.length for layer in cache.layers] == [29, 26, 23, 20]
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_engine_next_turn_matches_masked_attention(tiny_chat, evicted_runs):
    """Through the engine (restore, prefill, teacher-forced reply, attention captured): turn 3's reply
    nll equals the masked reference's on the same tokens."""
    policy, results, states = evicted_runs["kv"]
    engine = Engine(tiny_chat, policy, make_store("pageable"), max_new_tokens=1)
    history = [m for u, r in TURNS[:3] for m in ({"role": "user", "content": u}, {"role": "assistant", "content": r})]
    ctx = engine.render(history + [{"role": "user", "content": TURNS[3][0]}], add_generation_prompt=True)
    end = engine.render(history + [{"role": "user", "content": TURNS[3][0]},
                                   {"role": "assistant", "content": TURNS[3][1]}], add_generation_prompt=False)
    state = states[2]
    assert ctx[:state.n_tokens] == state.token_ids.tolist()
    with _masked_reference(tiny_chat, state) as full:
        logits = tiny_chat.forward(torch.tensor([end[state.n_tokens:]]), full)[0]
    logp = torch.log_softmax(logits[len(ctx) - state.n_tokens - 1:-1], dim=-1)
    reply = torch.tensor(end[len(ctx):])
    nll = -logp.gather(1, reply[:, None])[:, 0]
    assert results[3].reply_tokens == len(reply)
    torch.testing.assert_close(torch.tensor(results[3].reply_token_nll), nll, atol=1e-4, rtol=1e-4)


# -- the cache and the engine's limits ---------------------------------------------------------
def test_evicted_layer_positions_and_crop(tiny_chat):
    """A layer holding s of H history positions reports H + new positions seen, kv_offset H - s, slot
    positions (held history, then H, H+1, ...), crops by position, and refuses to crop inside the history."""
    cache = BufferCache.for_adapter(tiny_chat, 32)
    layer = cache.layers[0]
    layer.hold_evicted(10, torch.tensor([[0, 3, 7], [1, 2, 9]]))
    layer.length = 5
    assert layer.get_seq_length() == 12 and layer.get_mask_sizes(4) == (9, 7) and cache.evicted
    assert layer.positions().tolist() == [[0, 3, 7, 10, 11], [1, 2, 9, 10, 11]]
    tiny_chat.crop(cache, 11)
    assert layer.length == 4 and layer.get_seq_length() == 11
    with pytest.raises(ValueError, match="inside an evicted history"):
        layer.crop(9)
    cache.set_length(10)
    assert layer.length == 3 and cache.layers[1].length == 10


@pytest.mark.parametrize("tier", ["disk", "packed"])
def test_disk_and_packed_tiers_restore_what_pageable_does(tiny_chat, evicted_runs, tier, tmp_path):
    """h2o on the disk tier (state files streamed and verified) and on a packed store (one blob per item,
    as the pinned tier) gives the pageable run's tokens and reply nll, and stores the same bytes."""
    policy, ref, _ = evicted_runs["kv"]
    store = DiskStore(tmp_path) if tier == "disk" else MemoryStore(pack=True)
    got = _run(Engine(tiny_chat, policy, store, max_new_tokens=N_NEW))
    assert [r.generated_ids for r in got] == [r.generated_ids for r in ref]
    torch.testing.assert_close([r.reply_nll_sum for r in got], [r.reply_nll_sum for r in ref], atol=1e-5, rtol=0)
    assert [r.offloaded_bytes for r in got] == [r.offloaded_bytes for r in ref]



@contextlib.contextmanager
def _masked_reference(adapter, state):
    """The full-KV reference of an evicted `state` (`_reference_cache`) and, inside the block, the
    adapter's attention masking each layer's and KV head's dropped positions (`_kept_masks`)."""
    full = _reference_cache(state, adapter.n_kv_heads)
    AttentionInterface.register(_REF, _reference_attention)
    AttentionMaskInterface.register(_REF, sdpa_mask)
    _KEPT.clear()
    _KEPT.update(_kept_masks(state))
    with adapter.attention_implementation(_REF):
        yield full


def test_evicted_state_file_round_trips_and_its_schema_is_checked(evicted_runs, forge_header):
    """An evicted state serializes and deserializes to the same tensors; a header edited (and re-checksummed)
    to give positions another dtype, scores another shape, two layers or more kept tokens than its range
    is refused as corrupt."""
    state = evicted_runs["kv"][2][2]
    blob = serialize(state)
    back = deserialize(blob)
    for a, b in zip(state.items, back.items):
        assert (a.layers, a.start, a.end) == (b.layers, b.start, b.end)
        for name, t in a.payload.tensors().items():
            assert torch.equal(t, b.payload.tensors()[name])

    def retype(h):
        e = h["tensors"]["0.positions"]
        e.update(dtype="float32")

    def reshape(h):
        e = h["tensors"]["0.scores"]
        e.update(shape=[e["shape"][1], e["shape"][0]])

    for edit in (retype, reshape, lambda h: h["items"][0].update(layers=[0, 1]),
                 lambda h: h["items"][0].update(end=1), lambda h: h["items"][0].update(keys=["keys", "values"])):
        with pytest.raises(CorruptStateError):
            deserialize(forge_header(blob, edit))


def test_engine_refuses_what_cannot_hold_evicted_states(tiny_chat, tmp_path):
    """h2o below a full budget is refused with a tiered store (its active tier would keep the unevicted
    cache) and with the attention estimator (captures do not nest); a recompute split is refused."""
    with pytest.raises(EngineError, match="active"):
        Engine(tiny_chat, _h2o(0.5), TieredStore.__new__(TieredStore))
    with pytest.raises(EngineError, match="estimator"):
        Engine(tiny_chat, _h2o(0.5), make_store("pageable"), estimator=AttentionEstimator(tiny_chat))
    Engine(tiny_chat, _h2o(1.0), make_store("pageable"), estimator=AttentionEstimator(tiny_chat))  # no capture
    with pytest.raises(PolicyError, match="budget_ratio"):
        with_budget(get_policy("h2o"), 0.0)
    with pytest.raises(PolicyError, match="one of"):
        with_budget(get_policy("h2o"), 0.5, storage_ratio=2.0)
    assert with_budget(get_policy("h2o"), storage_ratio=4.0).budget_ratio == 0.25
    with pytest.raises(PolicyError, match="recompute"):
        _run(Engine(tiny_chat, get_policy("h2o", recompute_ratio=0.3), make_store("pageable")), turns=TURNS[:1])
