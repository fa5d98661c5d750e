"""Cross-layer compression of one layer pair's KV over a token range.

Krul (arXiv 2507.08045, Sec. 3.1) compresses the KV of the layer pairs it selects for a conversation
following MiniCache: K and V of the two layers are merged into one direction tensor, per-token
magnitudes are kept per layer, and the tokens on which the layers disagree most are kept exact. Plain
sharing (layer b reuses layer a's KV, as in KVSharer) is the simpler ablation. `svd` goes beyond
the paper: one low-rank token tensor serves both layers through per-layer bases (xKV-style joint SVD),
with the attention-sink tokens kept exact.

A `CompressedPair` is exactly what is stored for layers (a, b) and one token segment; `nbytes()` counts
every stored tensor. This module knows nothing about which pairs to compress (the selector), where the
bytes live (the kv store), or models. KV tensors are `(batch, kv_heads, tokens, head_dim)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("share", "merge", "svd")

# Tensor names stored per method (the order is the serialisation order).
_SHARE_NAMES = ("k", "v")
_MERGE_NAMES = ("k_dir", "v_dir", "k_norm_a", "k_norm_b", "v_norm_a", "v_norm_b",
                "retain_idx", "k_ret_a", "v_ret_a", "k_ret_b", "v_ret_b")
_SVD_NAMES = ("k_coef", "v_coef", "k_basis", "v_basis",
              "retain_idx", "k_ret_a", "v_ret_a", "k_ret_b", "v_ret_b")
_RETAINED = ("k_ret_a", "v_ret_a", "k_ret_b", "v_ret_b")

# Below this angle (radians) SLERP's 1/sin(omega) is ill-conditioned: use the normalised lerp.
_SLERP_MIN_ANGLE = 1e-4
_EPS = 1e-12


@dataclass
class CompressedPair:
    """The stored form of layers (layer_a, layer_b)'s KV for one token segment.

    Attributes
    ----------
    method : {"share", "merge", "svd"}
    layer_a, layer_b : int
    data : dict[str, Tensor]
        "share": `k`, `v` (batch, kv_heads, tokens, head_dim) = layer a's KV.
        "svd": `k_coef`, `v_coef` (batch, tokens, rank) token coefficients shared by both layers;
        `k_basis`, `v_basis` (batch, rank, 2 * kv_heads * head_dim) orthonormal rows, layer a's
        features first; `retain_idx` and `k_ret_a` ... `v_ret_b` as for "merge".
        "merge": `k_dir`, `v_dir` (batch, kv_heads, tokens, head_dim) merged unit directions;
        `k_norm_a`, `k_norm_b`, `v_norm_a`, `v_norm_b` (batch, kv_heads, tokens) per-layer magnitudes;
        `retain_idx` (n_retained,) int32 ascending token indices kept exact; `k_ret_a`, `v_ret_a`,
        `k_ret_b`, `v_ret_b` (batch, kv_heads, n_retained, head_dim) their exact vectors.
        All float tensors are in the KV dtype.
    t : float
        SLERP interpolation weight used by "merge" (metadata only).
    """

    method: str
    layer_a: int
    layer_b: int
    data: dict[str, Tensor] = field(repr=False)
    t: float = 0.5

    def __post_init__(self) -> None:
        names = _names(self.method)
        missing = [n for n in names if n not in self.data]
        if missing:
            raise ValueError(f"{self.method} pair is missing tensors {missing}; needs {list(names)}")

    # -- accounting ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Exact bytes of every stored tensor (directions, norms, indices, retained tokens)."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def n_tokens(self) -> int:
        """Number of tokens in the segment."""
        if self.method == "svd":
            return int(self.data["k_coef"].shape[1])
        return int(self.data[self._main].shape[2])

    @property
    def _main(self) -> str:
        return {"share": "k", "merge": "k_dir", "svd": "k_coef"}[self.method]

    @property
    def n_retained(self) -> int:
        return 0 if self.method == "share" else int(self.data["retain_idx"].numel())

    @property
    def rank(self) -> int:
        """Rank of the shared token tensor ("svd" only; 0 otherwise)."""
        return int(self.data["k_coef"].shape[2]) if self.method == "svd" else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.data[self._main].dtype

    @property
    def device(self) -> torch.device:
        return self.data[self._main].device

    # -- restore ------------------------------------------------------------------------------
    def expand(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Reconstruct both layers' KV (`place_pair` into fresh tensors).

        Returns
        -------
        ((k_a, v_a), (k_b, v_b)), each (batch, kv_heads, tokens, head_dim) in the KV dtype; fresh
        contiguous tensors that alias neither the stored data nor each other.
        """
        outs = tuple((self._empty("k"), self._empty("v")) for _ in range(2))
        place_pair(self, outs, (0, 0))
        return outs[0], outs[1]

    def place(self, outs, skips) -> None:
        """Write the reconstruction of tokens [skip:] straight into per-layer views (`place_pair`)."""
        place_pair(self, outs, skips)

    def kv_shape(self, kv: str) -> tuple[int, int, int, int]:
        """(batch, kv_heads, tokens, head_dim) of either layer's K (`kv="k"`) or V (`"v"`)."""
        d = self.data
        if self.method == "share":
            return tuple(d[kv].shape)
        like = d[f"{kv}_dir"] if self.method == "merge" else d[f"{kv}_ret_a"]  # carries the head shape
        b, h, _, hd = like.shape
        return b, h, self.n_tokens(), hd

    def _empty(self, kv: str) -> Tensor:
        return torch.empty(self.kv_shape(kv), dtype=self.dtype, device=self.device)

    def crop_left(self, start: int) -> "CompressedPair":
        """Keep tokens [start:] only (leading tokens are recomputed instead of loaded).

        Retained-token indices are re-based to the new first token. The result owns fresh storage.
        """
        n = self.n_tokens()
        if not 0 <= start <= n:
            raise ValueError(f"crop start must be in [0, {n}]; got {start}")
        d = self.data
        if self.method == "share":
            return CompressedPair(self.method, self.layer_a, self.layer_b,
                                  {name: d[name][:, :, start:].clone() for name in _SHARE_NAMES}, self.t)
        if self.method == "svd":  # the bases serve every token: they stay whole
            new = {"k_coef": d["k_coef"][:, start:].clone(), "v_coef": d["v_coef"][:, start:].clone(),
                   "k_basis": d["k_basis"].clone(), "v_basis": d["v_basis"].clone()}
        else:
            new = {name: d[name][:, :, start:].clone()
                   for name in ("k_dir", "v_dir", "k_norm_a", "k_norm_b", "v_norm_a", "v_norm_b")}
        keep = d["retain_idx"] >= start
        new["retain_idx"] = (d["retain_idx"][keep] - start).to(torch.int32)
        for name in _RETAINED:
            new[name] = d[name][:, :, keep].clone()
        return CompressedPair(self.method, self.layer_a, self.layer_b, new, self.t)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "CompressedPair":
        """All tensors moved to `device` (a copy of the dict; tensors already there are shared)."""
        new = {k: v.to(device, non_blocking=non_blocking) for k, v in self.data.items()}
        return CompressedPair(self.method, self.layer_a, self.layer_b, new, self.t)

    # -- serialisation ------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor dict of everything stored (the tensors themselves, not copies)."""
        return {name: self.data[name] for name in _names(self.method)}

    def meta(self) -> dict[str, str | int | float]:
        """Small JSON-able dict that, with `tensors()`, rebuilds the pair."""
        return {"method": self.method, "layer_a": self.layer_a, "layer_b": self.layer_b, "t": self.t}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> "CompressedPair":
        """Inverse of (`tensors()`, `meta()`); values in `meta` may be strings (safetensors metadata)."""
        method = str(meta["method"])
        return cls(method, int(meta["layer_a"]), int(meta["layer_b"]),
                   {name: tensors[name] for name in _names(method)}, float(meta.get("t", 0.5)))


def _names(method: str) -> tuple[str, ...]:
    if method == "share":
        return _SHARE_NAMES
    if method == "merge":
        return _MERGE_NAMES
    if method == "svd":
        return _SVD_NAMES
    raise ValueError(f"unknown compression method '{method}'; known: {', '.join(METHODS)}")


def _check_kv(kv_a: tuple[Tensor, Tensor], kv_b: tuple[Tensor, Tensor]) -> None:
    (k_a, v_a), (k_b, v_b) = kv_a, kv_b
    for name, x in (("k_a", k_a), ("v_a", v_a), ("k_b", k_b), ("v_b", v_b)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (batch, kv_heads, tokens, head_dim); got {tuple(x.shape)}")
    if k_a.shape != k_b.shape or v_a.shape != v_b.shape or k_a.shape[:3] != v_a.shape[:3]:
        raise ValueError(
            f"layer pair KV shapes differ: k_a {tuple(k_a.shape)}, v_a {tuple(v_a.shape)}, "
            f"k_b {tuple(k_b.shape)}, v_b {tuple(v_b.shape)}"
        )
    if len({k_a.dtype, v_a.dtype, k_b.dtype, v_b.dtype}) != 1:
        raise ValueError("layer pair KV must share one dtype")


def share_pair(kv_a: tuple[Tensor, Tensor], kv_b: tuple[Tensor, Tensor],
               layer_a: int, layer_b: int) -> CompressedPair:
    """KVSharer-style sharing (Yang et al. 2024): store layer a's KV only; b reuses it on expand.

    Parameters
    ----------
    kv_a, kv_b : (keys, values), each (batch, kv_heads, tokens, head_dim)
        kv_b is only checked for shape; nothing of it is stored.
    """
    _check_kv(kv_a, kv_b)
    k_a, v_a = kv_a
    return CompressedPair("share", layer_a, layer_b, {"k": k_a.detach().clone(), "v": v_a.detach().clone()})


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """(unit directions, norms) along the last axis; zero vectors get a zero direction."""
    norm = torch.linalg.vector_norm(x, dim=-1)
    return x / norm.clamp_min(_EPS).unsqueeze(-1), norm


def _slerp(u_a: Tensor, u_b: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """SLERP between unit vectors along the last axis, and their angle.

    Returns (e, omega): e unit-norm (batch, heads, tokens, dim); omega (batch, heads, tokens) in [0, pi].
    Where omega is ~0 the normalised lerp is used (SLERP's limit); where the lerp vanishes (antipodal
    or zero inputs) e falls back to u_a (or stays 0 for zero inputs).
    """
    cos = (u_a * u_b).sum(-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = omega > _SLERP_MIN_ANGLE
    safe &= sin > _SLERP_MIN_ANGLE
    sin_safe = torch.where(safe, sin, torch.ones_like(sin))
    w_a = torch.where(safe, torch.sin((1.0 - t) * omega) / sin_safe, torch.full_like(sin, 1.0 - t))
    w_b = torch.where(safe, torch.sin(t * omega) / sin_safe, torch.full_like(sin, t))
    e = w_a.unsqueeze(-1) * u_a + w_b.unsqueeze(-1) * u_b
    e_norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    degenerate = e_norm < 1e-6
    e = torch.where(degenerate, u_a, e / e_norm.clamp_min(_EPS))
    return e, omega


def merge_pair(kv_a: tuple[Tensor, Tensor], kv_b: tuple[Tensor, Tensor], layer_a: int, layer_b: int,
               retain_ratio: float = 0.05, t: float = 0.5, sink_tokens: int = 0,
               offset: int = 0) -> CompressedPair:
    """MiniCache-style merge of two layers' KV (Liu et al., NeurIPS'24, Sec. 3.2-3.3).

    For K and for V separately, per token and head: magnitudes n_a = ||x_a||, n_b = ||x_b|| are kept
    per layer, unit directions u_a, u_b are merged into e = SLERP(u_a, u_b, t) (normalised lerp where
    the angle is ~0), and only e is stored. Retention: each token's angular distance between the
    layers, averaged over batch, heads, K and V; the ceil(retain_ratio * tokens) tokens with the
    largest distance are stored exact for both layers. Expansion gives x = e * n per layer, then the
    retained tokens are overwritten with their exact vectors.

    For a non-retained token with angle omega between the layers, the reconstruction error is exactly
    ||x_a|| * 2 sin(t omega / 2) for layer a and ||x_b|| * 2 sin((1 - t) omega / 2) for layer b (plus
    rounding to the KV dtype), so the relative error of a layer is at most that factor at the largest
    non-retained angle. (Exception: a token whose directions are antipodal to within 1e-4 rad takes
    a's direction, so b's error there is 2 ||x_b||; such tokens have the largest angle and are the
    first retained.)

    Parameters
    ----------
    kv_a, kv_b : (keys, values), each (batch, kv_heads, tokens, head_dim), same shape and dtype
    layer_a, layer_b : int
    retain_ratio : float in [0, 1]
        Fraction of tokens kept exact (MiniCache's retention threshold, as a fraction).
    t : float in [0, 1]
        SLERP weight (0 -> a's direction, 1 -> b's; MiniCache uses 0.5).
    sink_tokens : int >= 0
        Tokens at absolute positions < sink_tokens are kept exact as well, beside the
        retain_ratio ones (an addition to MiniCache: the first tokens are attention sinks).
    offset : int >= 0
        Absolute position of the segment's first token (for `sink_tokens`).

    Returns
    -------
    CompressedPair with method "merge"; an empty token range gives empty tensors.
    """
    if not 0.0 <= retain_ratio <= 1.0:
        raise ValueError(f"retain_ratio must be in [0, 1]; got {retain_ratio}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1]; got {t}")
    _check_kv(kv_a, kv_b)
    dtype = kv_a[0].dtype
    # Arithmetic in float32 (float64 stays float64); the stored tensors go back to the KV dtype.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n_tokens = kv_a[0].shape[2]
    data: dict[str, Tensor] = {}
    angles = []
    for kv, x_a, x_b in (("k", kv_a[0], kv_b[0]), ("v", kv_a[1], kv_b[1])):
        u_a, n_a = _unit(x_a.detach().to(work))
        u_b, n_b = _unit(x_b.detach().to(work))
        e, omega = _slerp(u_a, u_b, t)
        data[f"{kv}_dir"] = e.to(dtype)
        data[f"{kv}_norm_a"] = n_a.to(dtype)
        data[f"{kv}_norm_b"] = n_b.to(dtype)
        angles.append(omega.mean(dim=(0, 1)))  # (tokens,)
    if sink_tokens < 0 or offset < 0:
        raise ValueError(f"sink_tokens and offset must be >= 0; got {sink_tokens}, {offset}")
    n_retain = min(n_tokens, math.ceil(retain_ratio * n_tokens - 1e-9))
    n_sink = max(0, min(n_tokens, sink_tokens - offset))
    score = 0.5 * (angles[0] + angles[1]) if n_tokens else torch.zeros(0)
    # the sinks are forced in, on top of the n_retain largest angles
    idx = _exact_tokens(score, n_sink, n_retain, kv_a[0].device)
    data["retain_idx"] = idx.to(torch.int32)
    for side, (k, v) in (("a", kv_a), ("b", kv_b)):
        data[f"k_ret_{side}"] = k.detach().index_select(2, idx).clone()
        data[f"v_ret_{side}"] = v.detach().index_select(2, idx).clone()
    return CompressedPair("merge", layer_a, layer_b, data, float(t))


def svd_rank(n_tokens: int, width: int, rank_ratio: float) -> int:
    """Rank whose coefficients + basis take at most `rank_ratio` of the exact pair's elements.

    A rank-r pair stores n_tokens * r coefficients and r * width basis entries against
    n_tokens * width exact values (width = 2 * kv_heads * head_dim), so
    r = floor(rank_ratio * n_tokens * width / (n_tokens + width)), at least 1 for a non-empty
    segment and at most min(n_tokens, width). Short segments pay relatively more for their basis.
    """
    if n_tokens <= 0 or width <= 0:
        return 0
    r = math.floor(rank_ratio * n_tokens * width / (n_tokens + width) + 1e-9)
    return max(1, min(r, n_tokens, width))


def _flat(x: Tensor) -> Tensor:
    """(batch, kv_heads, tokens, head_dim) -> (batch, tokens, kv_heads * head_dim)."""
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


def svd_pair(kv_a: tuple[Tensor, Tensor], kv_b: tuple[Tensor, Tensor], layer_a: int, layer_b: int,
             rank_ratio: float = 0.625, sink_tokens: int = 1, retain_ratio: float = 0.0,
             offset: int = 0, value_share: float = 0.5, retain_by: str = "relative",
             ranks: tuple[int, int] | None = None,
             basis_weights: tuple[float, float] | None = None) -> CompressedPair:
    """Cross-layer joint low-rank compression (after xKV, Chang et al. 2025, arXiv 2503.18893).

    For K and for V separately, each token's vectors of both layers (all heads) are concatenated
    into one row of X (batch, tokens, 2 * kv_heads * head_dim). The top `r` right singular vectors
    of X (the sink and retained rows left out of the fit) form the stored basis B (batch, r, width);
    the stored coefficients are C = X B^T (batch, tokens, r), one tensor serving both layers, and
    expansion is C B split back into the two layers. Layers whose token vectors are near-orthogonal
    (where a MiniCache merge loses ~77%) still share their dominant token subspace, which is what
    this exploits. `r = svd_rank(tokens, width, rank_ratio)`, so coefficients plus basis take at
    most `rank_ratio` of the pair's exact bytes; the exact tokens come on top.

    Exact tokens: those at absolute positions < `sink_tokens` (the attention sink: its KV lies
    outside the other tokens' subspace, and a small error on it costs much more nll than elsewhere),
    plus the ceil(retain_ratio * tokens) tokens with the largest relative reconstruction error
    (averaged over K and V). The reconstruction error of every other token is its distance to the
    basis' span, so the segment's relative Frobenius error is at most the tail singular-value mass.

    Parameters
    ----------
    kv_a, kv_b : (keys, values), each (batch, kv_heads, tokens, head_dim), same shape and dtype
    rank_ratio : float in (0, 1]  stored fraction of the pair's exact elements (before exact tokens)
    sink_tokens : int >= 0  leading absolute positions kept exact
    retain_ratio : float in [0, 1]  fraction of worst-reconstructed tokens kept exact
    offset : int >= 0  absolute position of the segment's first token
    value_share : float in (0, 1)  V's share of the K+V rank budget (0.5: equal ranks)
    retain_by : "relative" | "absolute"  retention score: relative or absolute squared residual
    ranks : (K rank, V rank) to use instead of `svd_rank`'s (beyond the paper: `allocate_svd_ranks`
        spreads a segment's rank budget over its pairs); each clipped to [0, min(fit tokens, width)]
    basis_weights : (w_a, w_b) or None. When given, the basis minimises w_a e_a + w_b e_b, with e_l
        layer l's relative squared error, instead of the pair's joint error: each layer's columns are
        scaled by sqrt(w_l / ||X_l||^2) before the SVD and the stored basis is unscaled (its rows are
        then not orthonormal); expansion is unchanged
    """
    if not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"rank_ratio must be in (0, 1]; got {rank_ratio}")
    if not 0.0 <= retain_ratio <= 1.0:
        raise ValueError(f"retain_ratio must be in [0, 1]; got {retain_ratio}")
    if sink_tokens < 0 or offset < 0:
        raise ValueError(f"sink_tokens and offset must be >= 0; got {sink_tokens}, {offset}")
    _check_kv(kv_a, kv_b)
    dtype = kv_a[0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n_tokens = kv_a[0].shape[2]
    n_sink = max(0, min(n_tokens, sink_tokens - offset))
    data: dict[str, Tensor] = {}
    errors = []
    if not 0.0 < value_share < 1.0:
        raise ValueError(f"value_share must be in (0, 1); got {value_share}")
    if retain_by not in ("relative", "absolute"):
        raise ValueError(f"retain_by must be 'relative' or 'absolute'; got {retain_by!r}")
    for i, (kv, x_a, x_b) in enumerate((("k", kv_a[0], kv_b[0]), ("v", kv_a[1], kv_b[1]))):
        x, scale = _svd_matrix(x_a, x_b, n_sink, basis_weights, work)
        width = x.shape[-1]
        share = 2.0 * (value_share if kv == "v" else 1.0 - value_share)  # of the K+V budget
        rank = svd_rank(n_tokens - n_sink, width, min(1.0, rank_ratio * share))
        if ranks is not None:
            rank = max(0, min(int(ranks[i]), n_tokens - n_sink, width))
        xs = x * scale if basis_weights is not None else x  # the weighted fit (x itself without weights)
        fit = xs[:, n_sink:]
        if rank:
            basis = torch.linalg.svd(fit, full_matrices=False).Vh[:, :rank]  # (batch, r, width)
        else:
            basis = x.new_zeros(x.shape[0], 0, width)
        coef = xs @ basis.transpose(1, 2)
        if basis_weights is not None:
            basis = basis / scale  # the scaled fit's basis, unscaled: coef @ basis approximates x
        resid = (x - coef @ basis).pow(2).sum(-1)
        if retain_by == "relative":
            resid = resid / x.pow(2).sum(-1).clamp_min(_EPS)
        errors.append(resid.mean(0))  # (tokens,)
        data[f"{kv}_coef"] = coef.to(dtype)
        data[f"{kv}_basis"] = basis.to(dtype)
    n_retain = min(n_tokens - n_sink, math.ceil(retain_ratio * (n_tokens - n_sink) - 1e-9))
    idx = _exact_tokens(0.5 * (errors[0] + errors[1]) if n_tokens else torch.zeros(0), n_sink, n_retain,
                        kv_a[0].device)
    data["retain_idx"] = idx.to(torch.int32)
    for side, (k, v) in (("a", kv_a), ("b", kv_b)):
        data[f"k_ret_{side}"] = k.detach().index_select(2, idx).clone()
        data[f"v_ret_{side}"] = v.detach().index_select(2, idx).clone()
    return CompressedPair("svd", layer_a, layer_b, data)


def _svd_matrix(x_a: Tensor, x_b: Tensor, n_sink: int, basis_weights, work) -> tuple[Tensor, Tensor]:
    """X = [X_a | X_b] (batch, tokens, width) in `work` dtype, and the column scale (width,) that
    turns the joint squared error into w_a e_a + w_b e_b (ones without `basis_weights`)."""
    x = torch.cat([_flat(x_a.detach().to(work)), _flat(x_b.detach().to(work))], dim=-1)
    half = x.shape[-1] // 2
    scale = x.new_ones(x.shape[-1])
    if basis_weights is not None:
        for j, w in enumerate(basis_weights):
            if not w >= 0.0:
                raise ValueError(f"basis_weights must be >= 0; got {tuple(basis_weights)}")
            energy = x[:, n_sink:, j * half:(j + 1) * half].pow(2).sum()
            scale[j * half:(j + 1) * half] = math.sqrt(max(float(w), _EPS) / max(float(energy), _EPS))
    return x, scale


def allocate_svd_ranks(jobs, rank_ratio: float = 0.625, sink_tokens: int = 1,
                       value_share: float = 0.5, split_kv: bool = False) -> list[tuple[int, int]]:
    """Per pair (K rank, V rank) spreading one segment's svd budget where it loses least.

    Beyond the paper (and xKV, which gives every pair the same rank). The budget is what the pairs
    would store at `svd_rank`'s uniform ranks: sum over pairs and K/V of r * (tokens + width)
    elements. Adding one rank to a pair's K or V removes the next singular value^2 of its (weighted,
    see `svd_pair`'s `basis_weights`) fit from the error and costs tokens + width elements; the
    singular values of each matrix descend, so taking the units of largest gain per element first,
    as long as they fit in the budget, gives each matrix a prefix of its spectrum (the greedy of
    the fractional problem). Every matrix keeps rank >= 1. The result never stores more than the
    uniform ranks.

    Parameters
    ----------
    jobs : list of (kv_a, kv_b, offset, basis_weights or None): each pair's segment KV, each
        (batch, kv_heads, tokens, head_dim), its absolute start and its `svd_pair` weights
    rank_ratio, sink_tokens, value_share : as in `svd_pair`
    split_kv : keep K's and V's budgets apart (allocate only across pairs) instead of one budget

    Returns
    -------
    list of (K rank, V rank), one per job, to pass to `svd_pair(..., ranks=...)`
    """
    budgets = [0.0, 0.0]
    ranks: list[list[int]] = []
    units = [([], [], []), ([], [], [])]  # per budget: gains, costs, owners
    for j, (kv_a, kv_b, offset, weights) in enumerate(jobs):
        _check_kv(kv_a, kv_b)
        work = torch.float64 if kv_a[0].dtype == torch.float64 else torch.float32
        n_tokens = kv_a[0].shape[2]
        n_sink = max(0, min(n_tokens, sink_tokens - offset))
        ranks.append([0, 0])
        for i, (x_a, x_b) in enumerate(((kv_a[0], kv_b[0]), (kv_a[1], kv_b[1]))):
            x, scale = _svd_matrix(x_a, x_b, n_sink, weights, work)
            width, n_fit = x.shape[-1], n_tokens - n_sink
            share = 2.0 * (value_share if i == 1 else 1.0 - value_share)
            cost = float(n_tokens + width)
            uniform = svd_rank(n_fit, width, min(1.0, rank_ratio * share))
            if not uniform:
                continue
            b = i if split_kv else 0
            budgets[b] += uniform * cost - cost  # rank 1 is given below
            ranks[j][i] = 1
            sv2 = torch.linalg.svdvals((x * scale)[:, n_sink:]).pow(2).sum(0).double()  # (min(fit, width),)
            gains, costs, owners = units[b]
            gains.append(sv2[1:] / cost)
            costs.append(torch.full((sv2.numel() - 1,), cost, dtype=torch.float64))
            owners += [(j, i)] * (sv2.numel() - 1)
    for budget, (gains, costs, owners) in zip(budgets, units):
        if not gains:
            continue
        gain, cost = torch.cat(gains), torch.cat(costs)
        order = torch.argsort(gain, descending=True, stable=True)
        taken = int((torch.cumsum(cost[order], 0) <= budget + 1e-6).sum())
        for u in order[:taken].tolist():
            j, i = owners[u]
            ranks[j][i] += 1
    return [tuple(r) for r in ranks]


def svd_pair_losses(kvs: list[tuple[Tensor, Tensor]], rank_ratio: float = 0.625, sink_tokens: int = 1,
                    offset: int = 0, value_share: float = 0.5, layers=None, basis_dim: int | None = None,
                    reduce: str = "joint", chunk: int = 32) -> Tensor:
    """What `svd_pair` would lose on every pair of layers, from the joint spectra (nothing stored).

    For a pair (a, b) and for K and V separately, X = [X_a | X_b] (fit tokens: the segment without
    its sink positions) is what `svd_pair` factors at rank r = `svd_rank(tokens, width, ...)`; by
    Eckart-Young its relative squared Frobenius error is the tail of the eigenvalues of X^T X
    beyond r over their sum ("joint"). A layer with a small norm can hide behind its partner in
    that fraction, so `reduce="none"` gives each layer's own relative error under the same basis
    B = [B_a; B_b] (the top-r eigenvectors, eigenvalues l_i),
    ||X_a - X B B_a^T||^2 = ||X_a||^2 - sum_i l_i ||B_a[:, i]||^2, in entry [a, b] (layer a's error
    when paired with b: not symmetric), and `reduce="layers"` the mean of the two. Every loss is the
    mean over K and V (and the batch). Retained exact tokens (`retain_ratio`) are not modelled: they
    only lower the real error.

    Cost: each layer's X_l is first rotated onto its own principal axes, P_l = X_l V_l (tokens, k),
    keeping the top `basis_dim` = k of its w = kv_heads * head_dim axes (default all: exact); one
    product P^T P of all layers then gives every pair's (2k x 2k) Gram, one eigvalsh each. With
    k < w the captured energy can only be underestimated, so the loss is an upper bound of the
    exact one (tight when the layers' spectra beyond k are small).

    Parameters
    ----------
    kvs : per layer (keys, values), each (batch, kv_heads, tokens, head_dim): one segment
    rank_ratio, sink_tokens, offset, value_share : as in `svd_pair`
    layers : layer indices whose pairs to score (default all); other entries are NaN
    basis_dim : principal axes kept per layer (None or >= w: exact)
    reduce : "joint" (the pair's relative error) | "layers" (mean of the two layers' relative errors)
        | "none" (each layer's relative error, [a, b] for layer a)
    chunk : pairs per batched eigendecomposition

    Returns
    -------
    (n_layers, n_layers) float64, symmetric unless `reduce="none"`; NaN on the diagonal, off
    `layers`, and for segments with no fit tokens.
    """
    if reduce not in ("joint", "layers", "none"):
        raise ValueError(f"reduce must be 'joint', 'layers' or 'none'; got {reduce!r}")
    n_layers = len(kvs)
    out = torch.full((n_layers, n_layers), float("nan"), dtype=torch.float64)
    layers = sorted(set(range(n_layers) if layers is None else (int(l) for l in layers)))
    if any(not 0 <= l < n_layers for l in layers):
        raise ValueError(f"layers {layers} out of range for {n_layers} layers")
    pairs = [(a, b) for i, a in enumerate(layers) for b in layers[i + 1:]]
    if not pairs:
        return out
    batch, heads, n_tokens, head_dim = kvs[0][0].shape
    n_sink = max(0, min(n_tokens, sink_tokens - offset))
    n_fit = n_tokens - n_sink
    if n_fit <= 0:
        return out
    w = heads * head_dim
    k = w if basis_dim is None else max(1, min(int(basis_dim), w))
    pos = {l: i for i, l in enumerate(layers)}
    loss = torch.zeros(len(pairs), 2, dtype=torch.float64)  # per pair: layer a's, layer b's share
    for which in (0, 1):  # K, then V
        share = 2.0 * (value_share if which == 1 else 1.0 - value_share)
        rank = svd_rank(n_fit, 2 * w, min(1.0, rank_ratio * share))
        for bi in range(batch):
            proj, energy = [], []
            for l in layers:
                x = _flat(kvs[l][which][bi:bi + 1, :, n_sink:].detach().double())[0]  # (fit, w)
                vecs = torch.linalg.eigh(x.T @ x).eigenvectors[:, w - k:]  # top-k axes, (w, k)
                proj.append(x @ vecs)
                energy.append(x.pow(2).sum())
            p = torch.cat(proj, -1)
            gram = (p.T @ p).reshape(len(layers), k, len(layers), k)
            energy = torch.stack(energy)
            for c in range(0, len(pairs), chunk):
                part = pairs[c:c + chunk]
                ia = torch.tensor([pos[a] for a, _ in part])
                ib = torch.tensor([pos[b] for _, b in part])
                m = torch.cat([torch.cat([gram[ia, :, ia], gram[ia, :, ib]], -1),
                               torch.cat([gram[ib, :, ia], gram[ib, :, ib]], -1)], -2)
                top = max(0, 2 * k - rank)
                if reduce == "joint":
                    ev = torch.linalg.eigvalsh(m).clamp_min(0.0)  # ascending, (chunk, 2k)
                    total = energy[ia] + energy[ib]
                    frac = (total - ev[:, top:].sum(-1)).clamp_min(0.0) / total.clamp_min(_EPS)
                    frac = torch.stack([frac, frac], -1)
                else:
                    ev, vec = torch.linalg.eigh(m)
                    ev, vec = ev[:, top:].clamp_min(0.0), vec[:, :, top:]  # (chunk, r), (chunk, 2k, r)
                    frac = torch.stack([(e - (vec[:, rows].pow(2).sum(1) * ev).sum(-1)).clamp_min(0.0)
                                        / e.clamp_min(_EPS)
                                        for e, rows in ((energy[ia], slice(0, k)), (energy[ib], slice(k, 2 * k)))], -1)
                loss[c:c + len(part)] += frac / (2 * batch)
    for (a, b), (xa, xb) in zip(pairs, loss.tolist()):
        if reduce == "none":
            out[a, b], out[b, a] = xa, xb
        else:
            out[a, b] = out[b, a] = 0.5 * (xa + xb)
    return out


def _exact_tokens(score: Tensor, n_sink: int, n_retain: int, device) -> Tensor:
    """Ascending indices of the first `n_sink` tokens plus the `n_retain` others of largest score."""
    if n_sink:
        score = score.clone()
        score[:n_sink] = float("inf")
    n_keep = min(int(score.numel()), n_sink + n_retain)
    if n_keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.topk(score, n_keep, sorted=False).indices.sort().values.to(device)


def place_pair(pair: CompressedPair, outs, skips) -> None:
    """Write a pair's reconstruction straight into per-layer destination views (restore's placement).

    Layer a (`outs[0]`) and layer b (`outs[1]`) each receive the segment's tokens [skip:], in the
    payload's dtype and on its device, as plain torch ops that write with `out=` into the views:

    - "share": one `copy_` of the stored KV per layer (both layers read the one payload);
    - "merge": `mul(dir[..., skip:, :], norm[..., skip:, None], out=view)` per layer and K/V, in the KV
      dtype (the product of two KV-dtype values rounds once, exactly as the fp32 product did);
    - "svd": per layer, batch element and K/V one `bmm` over the heads:
      coef[skip:] (expanded over heads, no copy) @ the layer's basis columns viewed (heads, r, head_dim),
      `out=` the view as (heads, tokens, head_dim) (its batch stride is the buffer's head stride);
      the matmul runs in the KV dtype (the CPU BLAS and cuBLAS accumulate in fp32 and round once;
      no fp32 tensor is materialised). Tensor-core shapes: when the rank r is not a multiple of 8
      the factors are zero-padded (`F.pad`) to r8 = ceil(r / 8) * 8 in temporaries of the KV dtype,
      the loaded coefficients (batch, n_loaded, r8) and the basis (batch, r8, width): together
      (n_loaded + width) * r8 elements, about the stored bytes, and with the retained-row
      temporaries below the only new tensors. The matmul's inner dimension and every leading
      dimension are then multiples of 8 (16-byte aligned rows in bf16). Stored ranks that are
      multiples of 8 need no pad: the stored tensors are read where they lie;
    - then the retained exact tokens at positions >= skip overwrite their rows (`index_copy_`).
      Nothing is synchronised with the host: with skip > 0 the retained tokens before the view
      (recomputed instead) are redirected to row 0 carrying row 0's final value, so duplicate
      writes agree.

    Only loaded rows are computed; nothing outside the views is written.

    Cost against the copy it follows. An svd pair of n tokens, width w = 2 * kv_heads * head_dim,
    rank r stores r (n + w) elements per K (and per V) and expands them in 2 n r w FLOP, i.e.
    2 n r w / (2 r (n + w)) = n w / (n + w) FLOP per stored byte at 2-byte elements, independent of
    r (retained tokens only add bytes). At n = 4000, w = 8192 that is 2688 FLOP/B: hiding it behind
    a 55 GB/s PCIe copy needs ~148 TFLOP/s, which bf16 tensor cores sustain (H200: ~790 measured) and
    fp32 CUDA cores cannot (~67 peak), hence the KV-dtype matmul and the aligned shapes (padding adds a
    factor r8 / r). "merge" stores kv_heads n (head_dim + 2) elements per K and does one multiply per
    output element of each layer, 2 kv_heads n head_dim FLOP: head_dim / (head_dim + 2) ~ 1 FLOP per
    stored byte, while writing 2 head_dim / (head_dim + 2) ~ 2 bytes per stored byte; "share" does 0
    FLOP and writes 2 bytes per stored byte. Both are bound by device-memory writes (~110 GB/s to
    follow a 55 GB/s copy; HBM gives ~4.8 TB/s). Measured on an H200 (bf16, one pair's K and V,
    n = 3964, w = 8192, 40 retained tokens; the stored bytes take 1.5 ms at 55 GB/s): svd at rank
    1669 0.46-0.67 ms (the pads ~0.1-0.2 of it), at 1664 or 1672 0.41-0.48 ms, where expanding in
    fp32 and copying took 5.2-5.5 ms; merge 0.21-0.23 ms (was 0.71). A CPU without bf16 matrix units
    runs bf16 matmuls far slower than fp32 ones (~100x on a 2-core EPYC): CPU runs use fp32 models.

    Parameters
    ----------
    pair : CompressedPair on the device of the views
    outs : per layer (a, b): (k_view, v_view), each (batch, kv_heads, tokens - skip, head_dim) and
        typically a non-contiguous view of a (batch, kv_heads, capacity, head_dim) buffer; or None
        when that layer loads nothing. A view of another dtype or device is filled through a
        temporary and one `copy_` (not the restore path: the buffers hold the KV dtype).
    skips : per layer, the number of leading segment tokens not loaded (recomputed), in [0, tokens]
    """
    if len(outs) != 2 or len(skips) != 2:
        raise ValueError(f"place_pair needs one out and one skip per layer of the pair; got "
                         f"{len(outs)} and {len(skips)}")
    n = pair.n_tokens()
    targets, skips, pending = [], [int(s) for s in skips], []
    for side, (out, skip) in enumerate(zip(outs, skips)):
        if not 0 <= skip <= n:
            raise ValueError(f"skip must be in [0, {n}]; got {skip} for layer {side}")
        if out is None or skip == n:
            targets.append(None)
            continue
        direct = []
        for kv, view in zip(("k", "v"), out):
            b, h, _, hd = pair.kv_shape(kv)
            if tuple(view.shape) != (b, h, n - skip, hd):
                raise ValueError(f"layer {side} {kv} view is {tuple(view.shape)}; expected "
                                 f"{(b, h, n - skip, hd)}")
            if view.dtype != pair.dtype or view.device != pair.device:
                tmp = torch.empty(view.shape, dtype=pair.dtype, device=pair.device)
                pending.append((view, tmp))
                view = tmp
            direct.append(view)
        targets.append(tuple(direct))
    if all(t is None for t in targets):
        return
    if pair.method == "share":
        _place_share(pair.data, targets, skips)
    elif pair.method == "merge":
        _place_merge(pair.data, targets, skips)
    else:
        _place_svd(pair.data, targets, skips)
    if pair.method != "share":
        _place_retained(pair.data, targets, skips)
    for view, tmp in pending:
        view.copy_(tmp)


def _place_share(d: dict[str, Tensor], outs, skips) -> None:
    """Both layers' views <- layer a's stored KV (one payload, no clone)."""
    for out, skip in zip(outs, skips):
        if out is not None:
            for kv, view in zip(("k", "v"), out):
                view.copy_(d[kv][:, :, skip:])


def _place_merge(d: dict[str, Tensor], outs, skips) -> None:
    """view = direction * the layer's norm, computed in the KV dtype straight into the view."""
    for side, out, skip in zip(("a", "b"), outs, skips):
        if out is not None:
            for kv, view in zip(("k", "v"), out):
                torch.mul(d[f"{kv}_dir"][:, :, skip:], d[f"{kv}_norm_{side}"][:, :, skip:, None], out=view)


def _place_svd(d: dict[str, Tensor], outs, skips) -> None:
    """view = (coef @ basis)[rows skip:, the layer's half], one bmm over heads per batch element."""
    for j, kv in enumerate(("k", "v")):
        sides = [(s, out[j], skip) for s, (out, skip) in enumerate(zip(outs, skips)) if out is not None]
        if not sides:
            continue
        first = min(skip for _, _, skip in sides)
        coef, basis = _padded_factors(d[f"{kv}_coef"][:, first:], d[f"{kv}_basis"])
        heads, head_dim = sides[0][1].shape[1], sides[0][1].shape[3]
        half = heads * head_dim
        for s, view, skip in sides:
            # (batch, r8, heads, head_dim) -> (batch, heads, r8, head_dim): a view of the basis
            layer_basis = basis[:, :, s * half:(s + 1) * half].unflatten(-1, (heads, head_dim)).transpose(1, 2)
            for bi in range(view.shape[0]):
                rows = coef[bi, skip - first:]  # (n_loaded, r8)
                torch.bmm(rows.expand(heads, *rows.shape), layer_basis[bi], out=view[bi])


def _padded_factors(coef: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """(coef, basis) with the rank zero-padded to a multiple of 8 (the inputs themselves when it is).

    coef (batch, n, r), basis (batch, r, width) -> (batch, n, r8), (batch, r8, width); the padded
    columns and rows are zero, so coef @ basis is unchanged.
    """
    pad = -coef.shape[-1] % 8
    if not pad:
        return coef, basis
    return F.pad(coef, (0, pad)), F.pad(basis, (0, 0, 0, pad))


def _place_retained(d: dict[str, Tensor], outs, skips) -> None:
    """Overwrite the retained tokens' rows (those >= skip) with their exact vectors."""
    idx = d["retain_idx"]
    if not idx.numel():
        return
    idx = idx.long()
    for side, out, skip in zip(("a", "b"), outs, skips):
        if out is not None:
            for kv, view in zip(("k", "v"), out):
                _write_rows(view, idx, d[f"{kv}_ret_{side}"], skip)


def _write_rows(view: Tensor, idx: Tensor, rows: Tensor, skip: int) -> None:
    """view[:, :, idx - skip] = rows for the idx >= skip, without a host sync (no masking).

    view (batch, heads, n - skip, head_dim); idx (n_ret,) ascending segment positions; rows
    (batch, heads, n_ret, head_dim). Invariant: every index written carries the value its row must
    end with; positions before the view are sent to row 0 with row 0's final value.
    """
    if skip == 0:
        view.index_copy_(2, idx, rows)
        return
    pos = idx - skip
    loaded = pos >= 0
    pos = pos.clamp_min(0)
    at_zero = pos.eq(0) & loaded  # at most one: is row 0 itself retained?
    retained0 = rows.index_select(2, at_zero.int().argmax().view(1))
    row0 = torch.where(at_zero.any(), retained0, view[:, :, :1])  # (batch, heads, 1, head_dim)
    view.index_copy_(2, pos, torch.where(loaded[:, None], rows, row0))


def compress_pair(method: str, kv_a: tuple[Tensor, Tensor], kv_b: tuple[Tensor, Tensor],
                  layer_a: int, layer_b: int, **kwargs) -> CompressedPair:
    """Compress one layer pair with `method` ("share", "merge" or "svd"); kwargs go to the method."""
    if method == "share":
        if kwargs:
            raise ValueError(f"share takes no options; got {sorted(kwargs)}")
        return share_pair(kv_a, kv_b, layer_a, layer_b)
    if method == "merge":
        return merge_pair(kv_a, kv_b, layer_a, layer_b, **kwargs)
    if method == "svd":
        return svd_pair(kv_a, kv_b, layer_a, layer_b, **kwargs)
    raise ValueError(f"unknown compression method '{method}'; known: {', '.join(METHODS)}")


RANK_ALLOCATIONS = ("uniform", "segment", "pairs")


def compress_pairs(method: str, jobs, rank_alloc: str = "uniform", basis_weights=None,
                   **kwargs) -> list[CompressedPair]:
    """Compress one segment's layer pairs with `method`; kwargs go to the method.

    jobs : list of (layer_a, layer_b, kv_a, kv_b, offset), KV each (batch, kv_heads, tokens, head_dim)
    rank_alloc : "uniform" (every svd pair at `svd_rank`'s rank, as xKV) | "segment" (beyond the
        paper: `allocate_svd_ranks` spreads the same budget over the segment's pairs and K/V) |
        "pairs" (the same, but K's and V's budgets kept apart: spread over the pairs only)
    basis_weights : per model layer, the nll cost of a unit of relative squared error (dev
        sensitivity) or None (the joint absolute error, as xKV); svd only: with it each pair's
        basis, and the allocation, minimise the weighted sum of its two layers' relative errors

    Both are off by default (REPRODUCE.md, Deviations: `rank_alloc`). On 16 out-of-sample smollm2
    dev conversations, at the same bytes, "pairs" lowered reply nll at 8 / 12 / 15 pairs; "segment"
    (which moves rank from V to K) and every relative-error weighting raised it.
    """
    if rank_alloc not in RANK_ALLOCATIONS:
        raise ValueError(f"rank_alloc must be one of {RANK_ALLOCATIONS}; got {rank_alloc!r}")
    if method != "svd":
        if rank_alloc != "uniform" or basis_weights is not None:
            raise ValueError(f"rank_alloc and basis_weights are svd options; method is {method!r}")
        return [compress_pair(method, kv_a, kv_b, a, b, **({**kwargs, "offset": off} if method != "share"
                                                            else kwargs))
                for a, b, kv_a, kv_b, off in jobs]
    weights = [None] * len(jobs)
    if basis_weights is not None:
        weights = [(float(basis_weights[a]), float(basis_weights[b])) for a, b, *_ in jobs]
    ranks = [None] * len(jobs)
    if rank_alloc != "uniform" and jobs:
        keys = ("rank_ratio", "sink_tokens", "value_share")
        ranks = allocate_svd_ranks([(kv_a, kv_b, off, wt) for (_, _, kv_a, kv_b, off), wt in zip(jobs, weights)],
                                   split_kv=rank_alloc == "pairs",
                                   **{k: v for k, v in kwargs.items() if k in keys})
    return [svd_pair(kv_a, kv_b, a, b, **{**kwargs, "offset": off, "ranks": r, "basis_weights": wt})
            for (a, b, kv_a, kv_b, off), r, wt in zip(jobs, ranks, weights)]


def layer_angles(kvs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Mean angle between every two layers' KV vectors: what a merge has to bridge.

    For layers i, j: the angle between their K vectors of the same token and head, averaged over
    batch, heads and tokens, and likewise for V; the result is the mean of the two. A merged pair
    reconstructs each layer with relative error 2 sin(omega / 4) at t = 0.5 (see `merge_pair`), so a
    mean angle near pi/2 (orthogonal KV) means about 0.77 relative error on non-retained tokens.

    Parameters
    ----------
    kvs : per layer (keys, values), each (batch, kv_heads, tokens, head_dim), same shapes

    Returns
    -------
    (n_layers, n_layers) float64 tensor in radians, symmetric, zero diagonal.
    """
    if not kvs:
        raise ValueError("layer_angles needs at least one layer's KV")
    n = len(kvs)
    out = torch.zeros(n, n, dtype=torch.float64)
    for which in (0, 1):
        units = [_unit(kv[which].detach().to(torch.float64))[0] for kv in kvs]
        for i in range(n):
            for j in range(i + 1, n):
                cos = (units[i] * units[j]).sum(-1).clamp(-1.0, 1.0)
                out[i, j] += 0.5 * float(torch.arccos(cos).mean())
    return out + out.T


def full_nbytes(kv: tuple[Tensor, Tensor]) -> int:
    """Bytes of one layer's uncompressed K and V."""
    return sum(x.numel() * x.element_size() for x in kv)
