"""H2O: heavy-hitter eviction of the stored KV (Zhang et al., NeurIPS'23, arXiv 2306.14048).

H2O keeps, per layer and per KV head, a budget of tokens: the most recent ones and the "heavy
hitters", the tokens that received the most accumulated attention; the rest is dropped for good
(nothing is recomputed: the restore loads what was kept and the model attends to those tokens only).
As a restore policy (`policies.H2OPolicy`, registry name "h2o") it evicts the history's KV at each
offload down to a byte budget.

What this module holds:
- `EvictedLayer`: the stored payload of one layer (method "evicted"): the kept K and V, the kept
  positions (int32, per KV head) and their accumulated scores (carried to the next turn's eviction).
  Keys are stored rotated at their true positions; the restore writes the kept tokens into the
  first slots of the layer's buffer (`BufferLayer.hold_evicted`) and the next tokens get positions
  history length + i (`ModelAdapter.forward_evicted`).
- `AttentionScores`: the accumulated attention each held token receives, per layer and KV head
  (summed over the queries and the query heads of the KV group), from every forward of the turn
  (the new input's prefill, decoding, the teacher-forced reply), observed through
  `ModelAdapter.capture_attention` in query blocks; seeded at the restore with the scores the state
  carried, so a token's score accumulates over the whole conversation as in H2O.
- `allocate` and `evict_state`: the budget in token-layers and the eviction itself.

Budget: `budget_ratio` of the history's full KV bytes, counted as `pricing.storage_nbytes` counts
them (2 bytes per floating element, the int32 positions at 4). One token-layer (one token of one
layer, every KV head) costs `pricing.evicted_nbytes(1, ...)`: its K and V plus its positions and
scores. T = floor(budget / that) token-layers are kept, T // L per layer and one more on the first
T % L layers, so the stored bytes are at most the budget and within one token-layer of it. Layers
therefore hold different numbers of tokens (by one at most).

Multi-turn: at each offload the union of the previously kept tokens (restored) and the new turn's
tokens is re-scored (carried scores + this turn's attention) and evicted to the budget of the new
history length. The stored item is rebuilt each turn: the named exception to the store's rule that
a stored item is never compressed again (nothing is lost by it: the kept tokens were restored
exact; eviction only drops tokens).

Parameters that are not the paper's fixed choices: `recent_ratio` (H2O: half recent, half heavy),
`score_heads` ("kv": per KV head, H2O's per-head eviction for GQA models with the group's query heads
summed; "layer": one set per layer, scores summed over all heads).

This module knows nothing about conversations, stores or the engine's loop (it does not import the
store, which reads and validates "evicted" payloads: `store.payload_from_tensors`, `store.parse_header`;
`policies.H2OPolicy` wraps the evicted layers into a `StoredState`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from krul.pricing import evicted_nbytes, full_storage_bytes

METHOD = "evicted"
SCORE_HEADS = ("kv", "layer")


@dataclass
class EvictedLayer:
    """One layer's kept tokens after H2O eviction, out of the item's token range [start, end).

    keys, values : (1, kv_heads, n_kept, head_dim), rotated at their true positions.
    positions : (groups, n_kept) int32, each kept slot's position (groups = kv_heads, or 1 when
        every head keeps the same tokens); sorted per group.
    scores : (groups, n_kept), the kept tokens' accumulated attention (carried to the next eviction).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    method: str = METHOD

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def n_tokens(self) -> int:
        """Slots held (kept tokens per KV head), not the positions the item covers."""
        return self.keys.shape[-2]

    def expand(self) -> tuple:
        return ((self.keys, self.values),)

    def crop_left(self, start: int) -> "EvictedLayer":
        if start == 0:
            return self
        raise ValueError("an evicted (h2o) layer cannot be partly recomputed: h2o loads what it keeps")

    def to(self, device, non_blocking: bool = False) -> "EvictedLayer":
        return EvictedLayer(*(t.to(device, non_blocking=non_blocking) for t in
                              (self.keys, self.values, self.positions, self.scores)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "positions": self.positions, "scores": self.scores}

    def meta(self) -> dict:
        return {}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "EvictedLayer":
        return cls(tensors["keys"], tensors["values"], tensors["positions"], tensors["scores"])

    def place(self, outs, skips) -> None:
        """Write the kept tokens into the first slots of the layer's buffer views `outs[0]`
        ((keys, values) over the item's whole range); `BufferLayer.hold_evicted` declares them."""
        if any(skips):
            raise ValueError("an evicted (h2o) layer cannot be partly recomputed")
        out = outs[0]
        if out is None:
            return
        n = self.keys.shape[-2]
        out[0][:, :, :n].copy_(self.keys)
        out[1][:, :, :n].copy_(self.values)


def is_evicted(payload) -> bool:
    return getattr(payload, "method", None) == METHOD


# =============================================================================================
# Scores: accumulated attention per held slot
# =============================================================================================
class AttentionScores:
    """Per conversation, per layer, the attention each held KV slot received: (kv_heads, slots)
    float32 on the model's device, slot j = the cache's j-th token of that layer.

    Parameters
    ----------
    adapter : krul.adapter.ModelAdapter
    block_size : query tokens per prefill block (bounds the maps held: heads * block * keys floats).

    `begin` seeds the sums from a restored cache (the scores its evicted history carried; zeros
    otherwise); `forward` runs a forward with attention captured and adds each query's attention
    to the slots it reads (slots written by this forward start from zero: a slot that held a token
    cropped away, e.g. a decoded token replaced by the real reply, does not keep its sums);
    `scores` reads them for the cache's current lengths.
    """

    def __init__(self, adapter, block_size: int = 512):
        self.adapter = adapter
        self.block_size = int(block_size)
        self.n_kv_heads = adapter.n_kv_heads
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._current: str | None = None

    def begin(self, conversation_id: str, cache) -> None:
        """Start the turn's sums from `cache` (a restored `BufferCache`, a fresh one, or any transformers
        cache: a `DynamicCache` may have no layers yet)."""
        sums = []
        for layer_idx in range(self.adapter.n_layers):
            layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
            held = layer.get_seq_length() if layer is not None else 0
            cap = max(1, getattr(layer, "capacity", 0) or held)
            acc = torch.zeros(self.n_kv_heads, cap, dtype=torch.float32, device=self.adapter.device)
            carried = getattr(layer, "history_scores", None)
            if carried is not None:
                s = carried.shape[-1]
                # scores carried per layer (one group) are the sum over the KV heads: split evenly
                acc[:, :s] = carried if carried.shape[0] == self.n_kv_heads else carried / self.n_kv_heads
            sums.append(acc)
        self._sums[conversation_id] = sums

    def reset(self, conversation_id: str) -> None:
        self._sums.pop(conversation_id, None)

    def scores(self, conversation_id: str, cache) -> list[torch.Tensor]:
        """Per layer (kv_heads, length) float32: the sums of the slots each layer holds now."""
        sums = self._sums.get(conversation_id)
        if sums is None:
            raise ValueError(f"no attention scores for conversation {conversation_id!r}: run its "
                             "forwards through AttentionScores.forward")
        out = []
        for acc, layer in zip(sums, cache.layers):
            n = layer.keys.shape[-2]
            if acc.shape[1] < n:
                raise ValueError(f"scores for {acc.shape[1]} slots, the layer holds {n}")
            out.append(acc[:, :n])
        return out

    @torch.inference_mode()
    def forward(self, conversation_id: str, input_ids: torch.Tensor, cache, logits_to_keep: int = 0) -> torch.Tensor:
        """`ModelAdapter.forward` in query blocks, with each block's attention added to the sums.

        input_ids : (1, q) ; returns logits (1, q or min(q, logits_to_keep), vocab) float32.
        """
        if conversation_id not in self._sums:
            self.begin(conversation_id, cache)
        n_q = int(input_ids.shape[1])
        outs = []
        self._current = conversation_id
        try:
            with self.adapter.capture_attention(self._observe):
                for q0 in range(0, n_q, self.block_size):
                    q1 = min(n_q, q0 + self.block_size)
                    keep = 0 if logits_to_keep == 0 else min(q1 - q0, logits_to_keep - (n_q - q1))
                    if logits_to_keep and keep <= 0:
                        self.adapter.forward(input_ids[:, q0:q1], cache, logits_to_keep=1)
                        continue
                    outs.append(self.adapter.forward(input_ids[:, q0:q1], cache, logits_to_keep=keep))
        finally:
            self._current = None
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _observe(self, layer_idx: int, probs: torch.Tensor) -> None:
        """probs : (1, heads, q, k) float32; the new queries' keys are the last q slots."""
        sums = self._sums[self._current]
        _, n_heads, n_q, n_k = probs.shape
        received = probs[0].sum(dim=1).view(self.n_kv_heads, n_heads // self.n_kv_heads, n_k).sum(dim=1)
        acc = sums[layer_idx]
        if acc.shape[1] < n_k:  # the cache grew past its capacity
            grown = acc.new_zeros(acc.shape[0], max(n_k, acc.shape[1] + acc.shape[1] // 2))
            grown[:, :acc.shape[1]] = acc
            sums[layer_idx] = acc = grown
        acc[:, n_k - n_q:n_k] = 0.0  # slots written by this forward start afresh
        acc[:, :n_k] += received


# =============================================================================================
# Budget and eviction
# =============================================================================================
def token_layer_nbytes(n_kv_heads: int, head_dim: int, score_heads: str = "kv") -> int:
    """Storage bytes of one kept token-layer (`pricing.evicted_nbytes` of one slot)."""
    return evicted_nbytes(1, n_kv_heads, head_dim, groups=_groups(score_heads, n_kv_heads))


def _groups(score_heads: str, n_kv_heads: int) -> int:
    if score_heads not in SCORE_HEADS:
        raise ValueError(f"score_heads must be one of {SCORE_HEADS}; got {score_heads!r}")
    return n_kv_heads if score_heads == "kv" else 1


def budget_nbytes(budget_ratio: float, n_tokens: int, n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    """The storage budget: `budget_ratio` of the history's full KV (`pricing.full_storage_bytes`)."""
    return int(budget_ratio * full_storage_bytes(n_tokens, n_layers, n_kv_heads, head_dim))


def allocate(budget_bytes: int, n_tokens: int, n_layers: int, n_kv_heads: int, head_dim: int,
             score_heads: str = "kv") -> list[int]:
    """Kept tokens per layer: T = floor(budget / token-layer bytes) token-layers, T // L per layer
    and one more on the first T % L layers, at most `n_tokens` each."""
    per = token_layer_nbytes(n_kv_heads, head_dim, score_heads)
    total = max(0, int(budget_bytes)) // per
    base, extra = divmod(total, n_layers)
    return [min(n_tokens, base + (1 if layer_idx < extra else 0)) for layer_idx in range(n_layers)]


def select(positions: torch.Tensor, scores: torch.Tensor, n_keep: int, recent_ratio: float = 0.5) -> torch.Tensor:
    """The slots to keep: the `round(recent_ratio * n_keep)` most recent, then the heaviest of the rest.

    positions : (groups, n) the slots' positions ; scores : (groups, n) their accumulated attention.
    Returns (groups, min(n_keep, n)) int64 slot indices, sorted by position.
    """
    groups, n = scores.shape
    n_keep = min(int(n_keep), n)
    if n_keep == n:
        idx = torch.arange(n, device=scores.device)[None].expand(groups, n)
    else:
        n_recent = min(n_keep, int(round(recent_ratio * n_keep)))
        recent = positions.topk(n_recent, dim=1).indices if n_recent else positions[:, :0].long()
        rest = scores.float().scatter(1, recent, float("-inf"))
        heavy = rest.topk(n_keep - n_recent, dim=1).indices
        idx = torch.cat([recent, heavy], dim=1)
    order = positions.gather(1, idx).argsort(dim=1)
    return idx.gather(1, order)


def evict_layer(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
                n_keep: int, recent_ratio: float = 0.5, score_heads: str = "kv") -> EvictedLayer:
    """One layer's `EvictedLayer` keeping `n_keep` slots (per KV head, or per layer).

    keys, values : (1, kv_heads, n, head_dim) ; positions : (1 or kv_heads, n) ; scores : (kv_heads, n).
    """
    heads, n, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    positions = positions.expand(heads, n)
    if score_heads == "layer":
        positions, scores = positions[:1], scores.sum(dim=0, keepdim=True)
    idx = select(positions, scores, n_keep, recent_ratio)
    full = idx.expand(heads, -1)
    gather = full[..., None].expand(heads, full.shape[1], dim)
    kept_k = keys[0].gather(1, gather)[None]
    kept_v = values[0].gather(1, gather)[None]
    return EvictedLayer(kept_k, kept_v, positions.gather(1, idx).to(torch.int32),
                        scores.gather(1, idx).to(keys.dtype))


def evict_layers(n_tokens: int, cache, scores, budget_ratio: float, recent_ratio: float = 0.5,
                 score_heads: str = "kv") -> tuple[list[EvictedLayer], dict]:
    """Per layer the `EvictedLayer` keeping, out of a history of `n_tokens` positions held by `cache` (a
    `BufferCache`: its layers' slots and their positions, `BufferLayer.positions`), the layer's
    `allocate`d share of `budget_ratio` of the full KV; and what was decided (budget, kept counts).

    scores : per layer (kv_heads, slots) accumulated attention (`AttentionScores.scores`).
    """
    if not 0.0 < budget_ratio < 1.0:
        raise ValueError(f"budget_ratio must be in (0, 1) to evict; got {budget_ratio}")
    n = int(n_tokens)
    layers = cache.layers
    _, heads, _, dim = layers[0].keys.shape
    budget = budget_nbytes(budget_ratio, n, len(layers), heads, dim)
    kept = allocate(budget, n, len(layers), heads, dim, score_heads)
    out = []
    for layer_idx, (layer, layer_scores, n_keep) in enumerate(zip(layers, scores, kept)):
        if hasattr(layer, "positions"):  # a BufferLayer (possibly holding an evicted history)
            positions = layer.positions()
        else:  # any other cache layer holds every position in order
            positions = torch.arange(layer.keys.shape[-2], device=layer.keys.device)[None]
        if positions.shape[-1] and int(positions.max()) >= n:
            raise ValueError(f"layer {layer_idx} holds position {int(positions.max())} beyond the history of {n}")
        out.append(evict_layer(layer.keys, layer.values, positions, layer_scores, n_keep, recent_ratio, score_heads))
    info = {"budget_ratio": budget_ratio, "budget_bytes": budget, "kept": [p.n_tokens() for p in out],
            "recent_ratio": recent_ratio, "score_heads": score_heads}
    return out, info


def check_header(keys: list, table: dict, n_range: int) -> str | None:
    """What is wrong with an evicted item's tensor table (`store.parse_header`), or None: K and V of one
    4D shape (1, kv_heads, n_kept, head_dim), int32 positions and floating scores of one (groups, n_kept)
    shape with groups 1 or kv_heads, n_kept at most the item's range."""
    if keys != sorted(EvictedLayer.__dataclass_fields__.keys() - {"method"}):
        return f"tensors {keys!r}, expected keys, positions, scores, values"
    k, v, pos, sc = (table[name] for name in ("keys", "values", "positions", "scores"))
    if len(k["shape"]) != 4 or k["shape"] != v["shape"] or k["dtype"] != v["dtype"]:
        return f"keys/values shapes {k['shape']}/{v['shape']} are not one (1, heads, kept, head_dim)"
    heads, kept = k["shape"][1], k["shape"][2]
    if pos["dtype"] != "int32" or len(pos["shape"]) != 2 or pos["shape"][0] not in (1, heads) \
            or pos["shape"][1] != kept or sc["shape"] != pos["shape"]:
        return f"positions {pos['shape']} ({pos['dtype']}) / scores {sc['shape']} do not index {kept} kept tokens"
    if kept > n_range:
        return f"{kept} kept tokens out of a range of {n_range}"
    return None


def holds_evicted(state) -> bool:
    """Whether a state stores evicted (h2o) layers."""
    return any(is_evicted(item.payload) for item in state.items)
