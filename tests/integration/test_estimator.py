"""The attention-similarity estimator on the real SmolLM2-135M over a 2-turn chat (CPU, fp32)."""
import pytest
import torch
from transformers import DynamicCache

from krul.estimator import AttentionEstimator

pytestmark = pytest.mark.integration

MESSAGES = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
    {"role": "assistant", "content": "The capital of France is Paris, on the river Seine."},
    {"role": "user", "content": "And which river flows through Rome?"},
]
N_DECODE = 6


def render(tokenizer, messages, add_generation_prompt):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def eager_rows(adapter, ids, first_pos):
    """(L, H, len(ids) - first_pos, len(ids)) float64: eager maps of the rows first_pos.., one forward."""
    model = adapter.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    return [a[0, :, first_pos:, :].double() for a in out.attentions]


def direct_sums(rows_per_layer, first_pos, edge_ratio):
    """Squared distances (L, L, H) and boundary mass (L, H) of the rows, from the definitions."""
    n_layers = len(rows_per_layer)
    n_heads, n_rows = rows_per_layer[0].shape[:2]
    sq = torch.zeros(n_layers, n_layers, n_heads, dtype=torch.float64)
    for i in range(n_layers):
        for j in range(i + 1, n_layers):
            sq[i, j] = sq[j, i] = ((rows_per_layer[i] - rows_per_layer[j]) ** 2).sum(dim=(1, 2))
    maps = torch.stack(rows_per_layer)  # (L, H, rows, k)
    boundary = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for r in range(n_rows):
        n_vis = first_pos + r + 1
        edge = max(1, round(edge_ratio * n_vis))
        keys = sorted(set(range(edge)) | set(range(n_vis - edge, n_vis)))
        boundary += maps[:, :, r, keys].sum(-1)
    return sq, boundary, n_rows


def test_estimator_equals_brute_force_on_a_real_chat(smollm):
    """Over a 2-turn chat (prefill, decode, teacher-forced reply) the sums equal brute force (rtol 1e-4)."""
    adapter, tok = smollm, smollm.tokenizer
    est = AttentionEstimator(adapter, edge_ratio=0.1, block_size=16)
    cache = DynamicCache()
    segments = []  # (token ids of the sequence the segment's queries saw, its first query position)

    def decode(ctx_ids):
        logits = est.forward("chat", torch.tensor([ctx_ids[cache.get_seq_length():]]), cache,
                             logits_to_keep=1)
        fed = []
        nxt = int(logits[0, -1].argmax())
        for _ in range(N_DECODE):
            fed.append(nxt)
            nxt = int(est.forward("chat", torch.tensor([[nxt]]), cache, logits_to_keep=1)[0, -1].argmax())
        return fed

    # turn 1: prefill of the user message and decode of the model's answer
    ctx1 = render(tok, MESSAGES[:1], add_generation_prompt=True)
    fed1 = decode(ctx1)
    segments.append((ctx1 + fed1, 0))
    # teacher-forced prefill of the real reply over the context (the answer is cropped away)
    adapter.crop(cache, len(ctx1))
    end1 = render(tok, MESSAGES[:2], add_generation_prompt=False)
    assert end1[:len(ctx1)] == ctx1
    est.forward("chat", torch.tensor([end1[len(ctx1):]]), cache)
    segments.append((end1, len(ctx1)))
    # turn 2 over the restored history
    ctx2 = render(tok, MESSAGES, add_generation_prompt=True)
    assert ctx2[:len(end1)] == end1 and cache.get_seq_length() == len(end1)
    fed2 = decode(ctx2)
    segments.append((ctx2 + fed2, len(end1)))

    stats = est.stats("chat")
    sq = torch.zeros_like(stats.sq_dist)
    boundary = torch.zeros_like(stats.boundary)
    n_q = 0
    for ids, first in segments:
        s, b, n = direct_sums(eager_rows(adapter, ids, first), first, 0.1)
        sq, boundary, n_q = sq + s, boundary + b, n_q + n
    assert stats.n_queries == n_q
    assert n_q > 2 * 16  # several prefill blocks were used
    torch.testing.assert_close(stats.sq_dist, sq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.boundary, boundary, rtol=1e-4, atol=1e-6)

    # sanity: real layers differ, and not all by the same amount
    off = stats.distances()[~torch.eye(adapter.n_layers, dtype=torch.bool)]
    assert off.min() > 0 and off.std() > 0.05 * off.mean()
    ratio = stats.boundary_ratio()
    assert torch.all((ratio > 0) & (ratio <= 1))
