"""What a plan stores, in bytes, exactly as the store counts them (`StoredState.kv_bytes()`).

The scheduler, the bench's bound and the reports price a plan by its payloads' real bytes. Those are
not linear in the tokens: an svd pair's rank depends on its segment's length (`compression.svd_rank`)
and its basis is paid once per segment, a merge or svd pair keeps `ceil(retain_ratio * tokens)`
tokens exact plus the sink tokens, and every kept token costs a 4-byte index. So a pair is priced by
`pair_nbytes(method, n_tokens, ...)`, which mirrors the compression functions tensor by tensor (the
unit tests check it equals `CompressedPair.nbytes()` for every method and segment length), and a
split by `PlanPricing.layer_bytes(lengths)`: each layer's share of the bytes its items load.

This module knows nothing about models, stores or devices: geometry and parameters come in as
numbers. It imports only `krul.compression` (for `svd_rank`) and `krul.quant` (quantized tensors).

Storage bytes (issue 19): `storage_nbytes` counts a payload as a bf16 deployment stores it, whatever
dtype the model computes in (fp32 on the CPU): 2 bytes per floating element (scales and zero points
of quantized payloads included), integer tensors (packed codes, indices) at their real size.
`storage_ratio(state)` = the history's full KV at 2 bytes per element / the state's stored KV
counted the same way: a compression ratio that does not depend on the compute dtype. An H2O layer
(`h2o.EvictedLayer`) counts its kept K and V, its int32 kept positions and its carried scores
(`evicted_nbytes`, the formula its byte budget is allocated by).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from krul.compression import METHODS, svd_rank
from krul.quant import GROUP_AXIS, float_names, quantized_nbytes

_INDEX_BYTES = 4  # retain_idx is int32


def _n_exact(n_tokens: int, n_sink: int, retain_ratio: float, fit_tokens: int) -> int:
    """Tokens kept exact: the sinks plus ceil(retain_ratio * fit_tokens) (`compression._exact_tokens`)."""
    n_retain = min(fit_tokens, math.ceil(retain_ratio * fit_tokens - 1e-9))
    return min(n_tokens, n_sink + n_retain)


def exact_nbytes(n_tokens: int, n_kv_heads: int, head_dim: int, elem_bytes: int, batch: int = 1) -> int:
    """Bytes of one layer's exact K and V over `n_tokens` (`store.ExactLayer.nbytes()`)."""
    return 2 * batch * n_kv_heads * max(0, int(n_tokens)) * head_dim * elem_bytes


def pair_nbytes(method: str, n_tokens: int, n_kv_heads: int, head_dim: int, elem_bytes: int,
                batch: int = 1, offset: int = 0, rank_ratio: float = 0.625, sink_tokens: int | None = None,
                retain_ratio: float = 0.0, value_share: float = 0.5, **_ignored) -> int:
    """Bytes of one compressed pair over a segment of `n_tokens` starting at position `offset`.

    Mirrors `compression.share_pair` / `merge_pair` / `svd_pair` (with uniform ranks: the default
    `rank_alloc="uniform"`; the other allocations store at most this). Parameters not used by a
    method are ignored (share takes none); defaults are the compression functions' own
    (`sink_tokens`: 1 for svd, 0 for merge).

    - share: K and V of one layer: 2 b h n d e.
    - merge: directions 2 b h n d e, per-layer K and V norms 4 b h n e, and x = n_sink +
      ceil(retain_ratio n) exact tokens: 4 b h x d e values + 4 x index bytes.
    - svd: for K and for V at rank r = svd_rank(n - n_sink, w, rank_ratio * share) with
      w = 2 h d: coefficients b n r e + basis b r w e; exact tokens as merge with the fit tokens
      n - n_sink in place of n.
    """
    if method not in METHODS:
        raise ValueError(f"unknown compression method '{method}'; known: {', '.join(METHODS)}")
    n = max(0, int(n_tokens))
    h, d, e, b = int(n_kv_heads), int(head_dim), int(elem_bytes), int(batch)
    if method == "share":
        return exact_nbytes(n, h, d, e, b)
    if sink_tokens is None:
        sink_tokens = 1 if method == "svd" else 0
    n_sink = max(0, min(n, int(sink_tokens) - int(offset)))
    if method == "merge":
        x = _n_exact(n, n_sink, retain_ratio, n)
        return 2 * b * h * n * d * e + 4 * b * h * n * e + 4 * b * h * x * d * e + _INDEX_BYTES * x
    width = 2 * h * d
    fit = n - n_sink
    total = 0
    for which in ("k", "v"):
        share = 2.0 * (value_share if which == "v" else 1.0 - value_share)
        r = svd_rank(fit, width, min(1.0, rank_ratio * share))
        total += b * r * (n + width) * e
    x = _n_exact(n, n_sink, retain_ratio, fit)
    return total + 4 * b * h * x * d * e + _INDEX_BYTES * x


STORAGE_ELEM_BYTES = 2  # a bf16 deployment's bytes per unquantized element


def storage_nbytes(payload, elem_bytes: int = STORAGE_ELEM_BYTES) -> int:
    """Bytes of `payload` as a bf16 deployment stores it: `elem_bytes` per floating element (KV,
    directions, norms, coefficients, scales, zero points), integer tensors (quantized codes, token
    indices) at their real size. Equals `payload.nbytes()` for a payload held in bf16."""
    total = 0
    for t in payload.tensors().values():
        total += t.numel() * (int(elem_bytes) if t.is_floating_point() else t.element_size())
    return total


def state_storage_bytes(state, elem_bytes: int = STORAGE_ELEM_BYTES) -> int:
    """`storage_nbytes` of every item of a `StoredState` (its KV only, as `kv_bytes()`)."""
    return sum(storage_nbytes(item.payload, elem_bytes) for item in state.items)


def full_storage_bytes(n_tokens: int, n_layers: int, n_kv_heads: int, head_dim: int,
                       elem_bytes: int = STORAGE_ELEM_BYTES) -> int:
    """Bytes of a history's whole uncompressed KV (every layer, every token) at `elem_bytes`."""
    return int(n_layers) * exact_nbytes(n_tokens, n_kv_heads, head_dim, elem_bytes)


def state_geometry(state) -> tuple[int, int]:
    """(kv_heads, head_dim) of a state: from its fingerprint, else from one of its payloads."""
    fp = state.fingerprint or {}
    if "kv_heads" in fp and "head_dim" in fp:
        return int(fp["kv_heads"]), int(fp["head_dim"])
    four_d = {"exact": "keys", "share": "k", "merge": "k_dir", "svd": "k_ret_a"}  # (b, heads, n, head_dim)
    for item in state.items:
        p = item.payload
        if p.method == "quant":
            shape = p.shapes[four_d[p.inner]]
        else:
            shape = p.tensors()[four_d[p.method]].shape
        return int(shape[1]), int(shape[3])
    raise ValueError("the state has neither a fingerprint with kv_heads/head_dim nor a stored item")


def storage_ratio(state, elem_bytes: int = STORAGE_ELEM_BYTES) -> float:
    """Full KV of the state's history (all layers and tokens) / its stored KV, both at `elem_bytes`
    per unquantized element: independent of the compute dtype. Recomputed tokens count as not
    stored; a state storing nothing is inf."""
    heads, head_dim = state_geometry(state)
    full = full_storage_bytes(state.n_tokens, state.n_layers, heads, head_dim, elem_bytes)
    stored = state_storage_bytes(state, elem_bytes)
    return full / stored if stored else math.inf


def pair_shapes(method: str, n_tokens: int, n_kv_heads: int, head_dim: int, batch: int = 1, offset: int = 0,
                rank_ratio: float = 0.625, sink_tokens: int | None = None, retain_ratio: float = 0.0,
                value_share: float = 0.5, **_ignored) -> dict[str, tuple[int, ...]]:
    """Shapes of every floating tensor of a compressed pair (as `pair_nbytes` counts them), and under
    "retain_idx" the (n_exact,) index shape (merge and svd)."""
    n = max(0, int(n_tokens))
    h, d, b = int(n_kv_heads), int(head_dim), int(batch)
    if method == "share":
        return {"k": (b, h, n, d), "v": (b, h, n, d)}
    if sink_tokens is None:
        sink_tokens = 1 if method == "svd" else 0
    n_sink = max(0, min(n, int(sink_tokens) - int(offset)))
    if method == "merge":
        x = _n_exact(n, n_sink, retain_ratio, n)
        out = {f"{kv}_dir": (b, h, n, d) for kv in "kv"}
        out.update({f"{kv}_norm_{s}": (b, h, n) for kv in "kv" for s in "ab"})
    elif method == "svd":
        width, fit = 2 * h * d, n - n_sink
        x = _n_exact(n, n_sink, retain_ratio, fit)
        out = {}
        for kv in "kv":
            share = 2.0 * (value_share if kv == "v" else 1.0 - value_share)
            r = svd_rank(fit, width, min(1.0, rank_ratio * share))
            out[f"{kv}_coef"], out[f"{kv}_basis"] = (b, n, r), (b, r, width)
    else:
        raise ValueError(f"unknown compression method '{method}'; known: {', '.join(METHODS)}")
    out.update({f"{kv}_ret_{s}": (b, h, x, d) for kv in "kv" for s in "ab"})
    out["retain_idx"] = (x,)
    return out


def quantized_payload_nbytes(method: str, shapes: dict, bits: int, group: int, scale_bytes: int) -> int:
    """Bytes of a `quant.QuantizedPayload` of inner `method` whose tensors have `shapes` (`pair_shapes`,
    or {"keys": s, "values": s} for "exact"): packed codes, a scale and a zero per group
    (`scale_bytes` each), and the int32 indices."""
    total = sum(quantized_nbytes(shapes[n], GROUP_AXIS[method][n], bits, group, scale_bytes)
                for n in float_names(method))
    if "retain_idx" in shapes:
        total += _INDEX_BYTES * math.prod(shapes["retain_idx"])
    return total


@dataclass(frozen=True)
class PlanPricing:
    """The bytes a plan stores and loads for a history of `n_tokens`, per layer and in total.

    A pair (a, b) is stored as one item over tokens [min(L_a, L_b), N) (`store.build_state`), loaded
    whole unless both layers recompute all of it; its bytes are split evenly over its two layers.
    Every other layer l stores exact tokens [L_l, N). `total_bytes(lengths)` equals
    `StoredState.kv_bytes()` of the single-turn state that `build_state` makes for that split.

    Attributes
    ----------
    n_tokens : N
    n_layers, n_kv_heads, head_dim, elem_bytes : the KV geometry (elem_bytes: of the stored dtype)
    pairs : the plan's layer pairs; () prices uncompressed storage
    method : the pairs' compression method
    params : the method's compression parameters (`pair_nbytes`' keywords)
    codec : None, or a storage codec {"bits": b, "group": g} (`quant.codec_fn`): every item is then
        priced as its `quant.QuantizedPayload` (scales and zeros at `elem_bytes`)
    """

    n_tokens: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    elem_bytes: int
    pairs: tuple[tuple[int, int], ...] = ()
    method: str = "merge"
    params: dict = field(default_factory=dict)
    codec: dict | None = None

    @classmethod
    def for_adapter(cls, adapter, n_tokens: int, plan=None, params: dict | None = None,
                    elem_bytes: int | None = None) -> "PlanPricing":
        """Pricing of `plan` (a `CompressionPlan` or None) on an adapter's geometry and dtype;
        a "codec" entry of `params` (a policy's compress_params) becomes the pricing's codec."""
        import torch

        e = elem_bytes or torch.finfo(adapter.dtype).bits // 8
        pairs = tuple(plan.pairs) if plan is not None else ()
        method = plan.method if plan is not None else "merge"
        params = dict(params or {})
        codec = params.pop("codec", None)
        return cls(int(n_tokens), adapter.n_layers, adapter.n_kv_heads, adapter.head_dim, int(e), pairs,
                   method, params if method != "share" else {}, dict(codec) if codec else None)

    def _memo(self, key: tuple, compute) -> int:
        """`compute()` once per `key` for this pricing (its bytes are pure in their arguments, and
        the scheduler prices about a thousand candidate splits per offload over a few segments)."""
        memo = self.__dict__.setdefault("_bytes_memo", {})  # not a field: eq, hash and repr ignore it
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def pair_bytes(self, n_segment: int, offset: int = 0) -> int:
        return self._memo(("pair", int(n_segment), int(offset)), lambda: self._pair_bytes(int(n_segment), int(offset)))

    def _pair_bytes(self, n_segment: int, offset: int) -> int:
        if self.codec:
            shapes = pair_shapes(self.method, n_segment, self.n_kv_heads, self.head_dim, offset=offset,
                                 **self.params)
            return quantized_payload_nbytes(self.method, shapes, int(self.codec["bits"]),
                                            int(self.codec.get("group", 64)), self.elem_bytes)
        return pair_nbytes(self.method, n_segment, self.n_kv_heads, self.head_dim, self.elem_bytes,
                           offset=offset, **self.params)

    def exact_bytes(self, n_segment: int) -> int:
        """Bytes of one layer's exact K and V over `n_segment` tokens (quantized under the codec)."""
        if self.codec and n_segment > 0:
            shape = (1, self.n_kv_heads, int(n_segment), self.head_dim)
            return self._memo(("exact", int(n_segment)), lambda: quantized_payload_nbytes(
                "exact", {"keys": shape, "values": shape}, int(self.codec["bits"]),
                int(self.codec.get("group", 64)), self.elem_bytes))
        return exact_nbytes(n_segment, self.n_kv_heads, self.head_dim, self.elem_bytes)

    def layer_bytes(self, lengths: Sequence[int]) -> np.ndarray:
        """(L,) bytes each layer loads under the split `lengths` (a pair's split over its two)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (self.n_layers,):
            raise ValueError(f"lengths need one entry per layer ({self.n_layers}); got {lengths.shape}")
        n = self.n_tokens
        if self.codec:
            out = np.array([float(self.exact_bytes(n - int(x))) for x in lengths.tolist()])
        else:  # exact K and V are linear in the tokens: every layer at once
            out = np.maximum(n - lengths, 0).astype(np.float64) * exact_nbytes(1, self.n_kv_heads, self.head_dim,
                                                                              self.elem_bytes)
        for a, b in self.pairs:  # a paired layer loads its pairs' halves, nothing exact
            out[a] = out[b] = 0.0
        for a, b in self.pairs:
            start = int(min(lengths[a], lengths[b]))
            if start < n:
                half = self.pair_bytes(n - start, offset=start) / 2
                out[a] += half
                out[b] += half
        return out

    def total_bytes(self, lengths: Sequence[int] | None = None) -> int:
        """Bytes stored for the split `lengths` (all loaded: None or zeros = the whole history)."""
        lengths = np.zeros(self.n_layers, dtype=np.int64) if lengths is None else lengths
        return int(round(float(self.layer_bytes(lengths).sum())))

    def bytes_per_token(self) -> float:
        """The whole history's stored bytes per token (all layers): the bound's b."""
        return self.total_bytes() / self.n_tokens if self.n_tokens else 0.0


def evicted_nbytes(n_kept: int, n_kv_heads: int, head_dim: int, groups: int | None = None,
                   elem_bytes: int = STORAGE_ELEM_BYTES, index_bytes: int = 4) -> int:
    """Storage bytes of one H2O layer (`h2o.EvictedLayer`) keeping `n_kept` tokens per KV head:
    K and V (2 h n d `elem_bytes`), the kept positions (g n `index_bytes`: int32) and their carried
    scores (g n `elem_bytes`), with g = `groups` (h when every KV head keeps its own tokens, 1 when
    the layer keeps one set; default h). Equals `storage_nbytes` of the payload."""
    h, n = int(n_kv_heads), max(0, int(n_kept))
    g = h if groups is None else int(groups)
    return 2 * h * n * int(head_dim) * int(elem_bytes) + g * n * (int(index_bytes) + int(elem_bytes))
