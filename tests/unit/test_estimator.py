"""The attention-similarity estimator (krul.estimator) on a tiny random Llama (3 layers, GQA 4/2).

The reference is brute force: one eager forward with `output_attentions=True` over the whole
sequence, every map kept, distances and boundary mass computed directly from their definitions.
"""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from krul.adapter import ModelAdapter
from krul.estimator import AttentionEstimator

N_LAYERS, N_HEADS, N_KV_HEADS = 3, 4, 2
VOCAB = 128


def tiny_adapter(device="cpu", seed=0):
    """A random 3-layer Llama whose attention is peaky (q/k weights scaled up), fp32, sdpa."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                      num_key_value_heads=N_KV_HEADS, max_position_embeddings=256,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # near-uniform attention would make every layer pair look alike
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    return ModelAdapter(model.to(device), None, "tiny-llama")


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter()


def token_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


def run_turn(adapter, estimator, history, prompt, n_decode=3, conversation_id="c"):
    """Plain prefill of `history` (not estimated), estimated prefill of `prompt`, greedy decode.

    Returns (all token ids fed (1, N), logits of the estimated prefill, [logits of each decode step]).
    """
    cache = DynamicCache()
    if history.shape[1]:
        adapter.forward(history, cache)
    logits = estimator.forward(conversation_id, prompt, cache)
    ids = [history, prompt]
    step_logits = []
    nxt = int(logits[0, -1].argmax())
    for _ in range(n_decode):
        tok = torch.tensor([[nxt]])
        ids.append(tok)
        out = estimator.forward(conversation_id, tok, cache, logits_to_keep=1)
        step_logits.append(out)
        nxt = int(out[0, -1].argmax())
    return torch.cat(ids, dim=1), logits, step_logits


def brute_force(adapter, ids, first_pos, edge_ratio=0.1):
    """Eager forward over all of `ids` keeping every map; sums over the query rows first_pos.. .

    Returns (sq_dist (L, L, H), boundary (L, H), n_queries), float64, from the definitions.
    """
    model = adapter.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids.to(adapter.device), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    maps = torch.stack([a[0] for a in out.attentions]).double().cpu()  # (L, H, N, N)
    rows = maps[:, :, first_pos:, :]
    n_layers, n_heads = rows.shape[:2]
    sq = torch.zeros(n_layers, n_layers, n_heads, dtype=torch.float64)
    for i in range(n_layers):
        for j in range(n_layers):
            sq[i, j] = ((rows[i] - rows[j]) ** 2).sum(dim=(1, 2))
    boundary = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for r in range(rows.shape[2]):
        n_vis = first_pos + r + 1
        edge = max(1, round(edge_ratio * n_vis))
        keys = sorted(set(range(edge)) | set(range(n_vis - edge, n_vis)))
        boundary += rows[:, :, r, keys].sum(-1)
    return sq, boundary, rows.shape[2]


def test_logits_equal_eager_and_sdpa(adapter):
    """The estimator's forward returns the logits of the plain eager and sdpa forwards (1e-5)."""
    history, prompt = token_ids(10, 1), token_ids(20, 2)
    for block_size in (64, 6):
        est = AttentionEstimator(adapter, block_size=block_size)
        ids, logits, steps = run_turn(adapter, est, history, prompt)
        for impl in ("eager", "sdpa"):
            with adapter.attention_implementation(impl):
                cache = DynamicCache()
                adapter.forward(history, cache)
                ref = adapter.forward(prompt, cache)
                torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
                for k, step in enumerate(steps):
                    ref_step = adapter.forward(ids[:, 30 + k:31 + k], cache, logits_to_keep=1)
                    torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=1e-5)


def test_model_runs_sdpa_outside_forward(adapter):
    """Attention capture is on only inside `forward`: the model is back on sdpa afterwards."""
    est = AttentionEstimator(adapter, block_size=4)
    est.forward("c", token_ids(9, 3), DynamicCache())
    assert adapter.attn_implementation == "sdpa"
    assert not ModelAdapter._capture_observers


def test_stats_equal_brute_force(adapter):
    """Prefill over a cache + 3 decode steps: the sums equal brute force on all maps (rtol 1e-5)."""
    history, prompt = token_ids(10, 4), token_ids(20, 5)
    est = AttentionEstimator(adapter, edge_ratio=0.1, block_size=8)
    ids, _, _ = run_turn(adapter, est, history, prompt, n_decode=3)
    stats = est.stats("c")
    sq, boundary, n_q = brute_force(adapter, ids, first_pos=10, edge_ratio=0.1)
    assert stats.n_queries == n_q == 23
    assert stats.device.type == "cpu"
    torch.testing.assert_close(stats.sq_dist, sq, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats.boundary, boundary, rtol=1e-5, atol=1e-9)
    off = stats.distances()[~torch.eye(N_LAYERS, dtype=torch.bool)]
    assert off.min() > 0  # the random layers really differ: the comparison is not vacuous


def test_block_size_does_not_change_stats(adapter):
    """Prefill in blocks smaller than the prompt gives the sums of one block (chunked prefill is exact)."""
    history, prompt = token_ids(5, 6), token_ids(37, 7)
    results = []
    for block_size in (256, 37, 10, 1):
        est = AttentionEstimator(adapter, block_size=block_size)
        run_turn(adapter, est, history, prompt, n_decode=2)
        results.append(est.stats("c"))
    for other in results[1:]:
        assert other.n_queries == results[0].n_queries == 39
        torch.testing.assert_close(other.sq_dist, results[0].sq_dist, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(other.boundary, results[0].boundary, rtol=1e-5, atol=1e-9)


def test_peak_map_bytes_bounded_by_block(adapter):
    """The peak of maps held is one block's (n_layers, heads, block, k) float32, not the prompt's."""
    history, prompt = token_ids(10, 8), token_ids(40, 9)
    peaks = {}
    for block_size in (40, 8):
        est = AttentionEstimator(adapter, block_size=block_size)
        run_turn(adapter, est, history, prompt, n_decode=2)
        # the largest block: q tokens over k = 10 + (its end) keys
        blocks = [(min(40, q0 + block_size) - q0, 10 + min(40, q0 + block_size))
                  for q0 in range(0, 40, block_size)]
        want = max(q * k for q, k in blocks) * N_LAYERS * N_HEADS * 4
        assert est.peak_map_bytes == want
        peaks[block_size] = est.peak_map_bytes
    assert peaks[8] < peaks[40] / 4


def test_host_buffer_is_reused_and_kept_only_when_small(adapter):
    """On a CPU model the prefill blocks share one host buffer (sized for the forward's largest
    block), kept for the next forward only up to keep_host_buffer_bytes; sums are unchanged."""
    history, prompt = token_ids(10, 8), token_ids(40, 9)
    largest = 8 * (10 + 40) * N_LAYERS * N_HEADS * 4  # the last 8-query block over 50 keys
    kept = AttentionEstimator(adapter, block_size=8)
    run_turn(adapter, kept, history, prompt, n_decode=0)
    flat = kept._host_flat
    assert flat is not None and flat.numel() * 4 == largest
    run_turn(adapter, kept, history, prompt, n_decode=0, conversation_id="d")
    assert kept._host_flat is flat  # the same memory served the second forward's blocks
    freed = AttentionEstimator(adapter, block_size=8, keep_host_buffer_bytes=largest - 1)
    run_turn(adapter, freed, history, prompt, n_decode=0)
    assert freed._host_flat is None
    for other in (kept.stats("d"), freed.stats("c")):
        torch.testing.assert_close(other.sq_dist, kept.stats("c").sq_dist, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(other.boundary, kept.stats("c").boundary, rtol=1e-5, atol=1e-9)


def test_logits_to_keep_across_blocks(adapter):
    """Asking for the last n logits when they span several blocks returns exactly those n rows."""
    prompt = token_ids(23, 10)
    est = AttentionEstimator(adapter, block_size=5)
    full = adapter.forward(prompt, DynamicCache())
    for n in (1, 4, 5, 12, 23, 40):
        got = est.forward("c", prompt, DynamicCache(), logits_to_keep=n)
        assert got.shape == (1, min(n, 23), VOCAB)
        torch.testing.assert_close(got, full[:, -min(n, 23):], rtol=1e-5, atol=1e-5)


def test_missing_mask_falls_back_to_causal(adapter):
    """With no mask passed, the capturing attention masks causally from q/k lengths, as eager with its mask."""
    from transformers.masking_utils import causal_mask_function, eager_mask

    attn = adapter.model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, N_HEADS, 5, 16, generator=g)
    k = torch.randn(1, N_KV_HEADS, 12, 16, generator=g)
    v = torch.randn(1, N_KV_HEADS, 12, 16, generator=g)
    mask = eager_mask(batch_size=1, q_length=5, kv_length=12, q_offset=7,
                      mask_function=causal_mask_function, dtype=torch.float32)
    out_mask, w_mask = ModelAdapter._capture_attention_forward(attn, q, k, v, mask, scaling=0.25)
    out_none, w_none = ModelAdapter._capture_attention_forward(attn, q, k, v, None, scaling=0.25)
    out_bool, w_bool = ModelAdapter._capture_attention_forward(attn, q, k, v, mask == 0, scaling=0.25)
    for out, w in ((out_none, w_none), (out_bool, w_bool)):
        torch.testing.assert_close(w, w_mask, rtol=0, atol=0)
        torch.testing.assert_close(out, out_mask, rtol=0, atol=0)
    assert torch.all(w_none[..., 0, 8:] == 0)  # query at position 7 sees keys 0..7 only


def test_stats_reset_and_unknown(adapter):
    """Unknown or reset conversations have no stats; the sums are plain tensors a caller may update."""
    est = AttentionEstimator(adapter, block_size=8)
    assert est.stats("x") is None
    est.forward("x", token_ids(6, 11), DynamicCache())
    stats = est.stats("x")
    assert stats.n_queries == 6 and not stats.sq_dist.is_inference()
    stats.sq_dist += 1.0  # outside inference mode: no error
    est.reset("x")
    assert est.stats("x") is None


def test_bad_arguments_are_explained(adapter):
    """Wrong inputs raise errors that say what to pass."""
    with pytest.raises(ValueError, match="block_size"):
        AttentionEstimator(adapter, block_size=0)
    with pytest.raises(ValueError, match="edge_ratio"):
        AttentionEstimator(adapter, edge_ratio=0.7)
    est = AttentionEstimator(adapter)
    with pytest.raises(ValueError, match="DynamicCache"):
        est.forward("c", token_ids(3, 0), None)
    with pytest.raises(ValueError, match=r"\(1, q\)"):
        est.forward("c", torch.zeros(2, 3, dtype=torch.long), DynamicCache())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_host_buffers", [2, 7])
def test_cuda_pinned_prefill_and_device_decode_equal_brute_force(n_host_buffers):
    """On CUDA (pinned side-stream copies + host worker for prefill, device decode) the sums equal brute force."""
    gpu = tiny_adapter("cuda")
    history, prompt = token_ids(10, 12), token_ids(50, 13)
    est = AttentionEstimator(gpu, block_size=8, n_host_buffers=n_host_buffers)
    ids, _, _ = run_turn(gpu, est, history, prompt, n_decode=5)
    stats = est.stats("c")
    sq, boundary, n_q = brute_force(gpu, ids, first_pos=10)
    assert stats.n_queries == n_q == 55 and stats.device.type == "cpu"
    torch.testing.assert_close(stats.sq_dist, sq, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats.boundary, boundary, rtol=1e-5, atol=1e-9)
    assert est._device["c"].device.type == "cuda"  # the decode part stayed on the device
    t = est.time_s
    assert t["prefill_cpu"] > 0 and t["decode_device"] > 0
    # n_host_buffers blocks at most: those reduced on the host while the next is copied
    assert est.peak_map_bytes <= n_host_buffers * N_LAYERS * N_HEADS * 8 * 60 * 4
    est.close()


@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_capturing_attention_computes_eager_values(dtype, mask_dtype):
    """The capturing attention (grouped queries, scores scaled and masked in place) returns what
    transformers' eager attention returns, for an additive mask of the scores' dtype or a wider one."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    n_q, n_k, head_dim = 5, 9, 8
    query = torch.randn(1, N_HEADS, n_q, head_dim, generator=g).to(dtype)
    key, value = (torch.randn(1, N_KV_HEADS, n_k, head_dim, generator=g).to(dtype) for _ in range(2))
    causal = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    mask = torch.where(causal, 0.0, torch.finfo(mask_dtype).min).to(mask_dtype)[None, None]
    module = SimpleNamespace(num_key_value_groups=N_HEADS // N_KV_HEADS, training=False,
                             config=SimpleNamespace(), layer_idx=0)
    got_out, got_w = ModelAdapter._capture_attention_forward(module, query, key, value, mask, 0.35)
    want_out, want_w = eager_attention_forward(module, query, key, value, mask, 0.35)
    assert got_out.dtype == want_out.dtype and got_w.dtype == want_w.dtype
    torch.testing.assert_close(got_w, want_w)
    torch.testing.assert_close(got_out, want_out)
