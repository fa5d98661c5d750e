"""Choosing among candidate plans by what each does to the conversation's own next-token predictions.

Beyond the paper. At offload time the end of the new segment (the last `n_tokens` of the history:
the end of the assistant's answer) is known; how a candidate state changes the model's
predictions there, with everything before them restored from that state, is a direct per-
conversation measure of what storing it costs, where the estimator's attention distances and the
svd losses are proxies. A policy with `validate_tokens > 0` (`policies.RestorePolicy`) builds the
state of each candidate plan (its own selection and the dev plan), scores it here, and stores the
one of lowest divergence.

Cost per candidate: one restore of the candidate state and one forward of `n_tokens` tokens over
the rest of the history; the reference is one forward over the exact KV.
"""
from __future__ import annotations

from typing import Sequence

import torch

from krul.restore import restore
from krul.store import StoredState

KV = tuple[torch.Tensor, torch.Tensor]


def window(n_history: int, n_segment: int, n_tokens: int) -> int:
    """How many of the history's last tokens to validate on: `n_tokens`, at most half the new
    segment (so at least as many segment tokens are compressed before them as are validated)."""
    if n_tokens < 0:
        raise ValueError(f"validate_tokens must be >= 0, got {n_tokens}")
    return max(0, min(n_tokens, n_segment // 2, n_history - 1))


@torch.inference_mode()
def next_token_logprobs(adapter, token_ids: Sequence[int], layers_kv: Sequence[KV], n_window: int
                        ) -> torch.Tensor:
    """(n_window, vocab) float32 log-probabilities of the model at the history's last `n_window`
    positions, over the first n - n_window tokens' KV taken from `layers_kv` (per layer (keys,
    values), each (1, kv_heads, >= n - n_window, head_dim); not modified)."""
    n = len(token_ids)
    cut = n - n_window
    cache = adapter.cache_from_kv([(k[:, :, :cut], v[:, :, :cut]) for k, v in layers_kv])
    ids = torch.tensor([list(token_ids[cut:])], dtype=torch.long)
    logits = adapter.forward(ids, cache)[0]
    return torch.log_softmax(logits.float(), dim=-1)


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over positions of KL(reference || candidate); both (positions, vocab) log-probabilities."""
    if reference.shape != candidate.shape:
        raise ValueError(f"log-probabilities of shapes {tuple(reference.shape)} and {tuple(candidate.shape)}")
    p = reference.exp()
    return float((p * (reference - candidate)).sum(-1).mean())


def state_divergence(adapter, state: StoredState, reference: torch.Tensor) -> float:
    """KL of the predictions at the history's last positions with the history restored from
    `state` against `reference` (`next_token_logprobs` over the exact KV)."""
    layers, _ = restore(adapter, state, overlap=False)
    candidate = next_token_logprobs(adapter, state.token_ids.tolist(), layers, reference.shape[0])
    return kl_divergence(reference.to(candidate.device), candidate)
