"""Token-wise attention-similarity statistics: the estimator math of Krul (arXiv 2507.08045, Sec. 3.3).

Krul picks, per conversation, the layer pairs whose attention patterns are most alike, measured as
the Euclidean distance between the layers' attention maps over the conversation's own prefill and
decode tokens, and it protects "input-sensitive" layers whose attention mass on the first and last
10% of the sequence is below a threshold. Keeping every map on the GPU does not fit, so the paper
accumulates the distances token-wise: prefill maps once (on the CPU, overlapped with decoding), each
decode step's 1 x n rows at once on the GPU; the partial sums are added at the end of the turn.

This module holds only that arithmetic, as running sums that can be split across devices and merged:

- `layer_pair_sq_distances`: per head, sum over queries and keys of (A_i - A_j)^2 for every layer pair.
- `boundary_mass`: per layer and head, the attention mass on the leading and trailing edge of each
  query's causal window.
- `SimilarityStats`: the per-conversation running sums, carried across turns.

It knows nothing about models, hooks, or where the maps come from (the estimator captures them), and
does no I/O. Attention maps are `(n_layers, heads, q, k)` probabilities of the SAME q query tokens over
the SAME k keys in every layer (k >= the causal window of every query; keys beyond it are zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

HEAD_REDUCTIONS = ("mean", "sum", "max")

# Float32 elements per chunk of the Gram accumulation (per layer and head together): bounds the
# temporary copy when the maps are bf16/fp16, and bounds the float32 rounding error per partial sum.
_CHUNK_ELEMENTS = 1 << 24


def _check_maps(maps: Tensor) -> None:
    if maps.dim() != 4:
        raise ValueError(
            f"attention maps must be (n_layers, heads, q, k); got shape {tuple(maps.shape)}"
        )


def layer_pair_sq_distances(maps: Tensor, chunk_elements: int = _CHUNK_ELEMENTS) -> Tensor:
    """Squared Euclidean distance between every pair of layers' attention maps, per head.

    Uses the Gram identity ||a - b||^2 = ||a||^2 + ||b||^2 - 2<a, b> per head, so the cost is one
    batched (heads, L, m) x (heads, m, L) product per chunk of m = (queries in chunk) x k entries.
    Each chunk is computed in float32 and accumulated in float64; the result is clamped at 0 (the
    identity can go slightly negative by rounding for near-identical layers).

    Parameters
    ----------
    maps : (n_layers, heads, q, k)
        Attention probabilities of the same q queries over the same k keys in every layer; any float
        dtype, CPU or CUDA.
    chunk_elements : int
        Upper bound on n_layers * heads * (queries per chunk) * k float32 elements per chunk.

    Returns
    -------
    (n_layers, n_layers, heads) float64 on `maps.device`
        Symmetric in the first two axes, exactly zero on the diagonal.
    """
    _check_maps(maps)
    n_layers, n_heads, n_q, n_k = maps.shape
    gram = torch.zeros(n_heads, n_layers, n_layers, dtype=torch.float64, device=maps.device)
    if n_q > 0 and n_k > 0:
        q_chunk = max(1, chunk_elements // max(1, n_layers * n_heads * n_k))
        for q0 in range(0, n_q, q_chunk):
            # (L, H, c, k) -> (H, L, c*k): one row per layer, per head.
            x = maps[:, :, q0:q0 + q_chunk, :].to(torch.float32).transpose(0, 1)
            x = x.reshape(n_heads, n_layers, -1)
            gram += torch.bmm(x, x.transpose(1, 2)).to(torch.float64)
    gram = 0.5 * (gram + gram.transpose(1, 2))  # bmm need not be bit-symmetric
    sq_norm = torch.diagonal(gram, dim1=1, dim2=2)  # (H, L)
    # Invariant: d(i, i) = g + g - 2g is exactly 0 in floating point, so the diagonal is exact.
    sq = sq_norm[:, :, None] + sq_norm[:, None, :] - 2.0 * gram  # (H, L, L)
    return sq.clamp_min(0.0).permute(1, 2, 0).contiguous()


def _boundary_mask(query_positions: Tensor, n_keys: int, edge_ratio: float) -> Tensor:
    """(q, k) bool: key j is on the leading or trailing edge of query i's causal window."""
    n_vis = query_positions.to(torch.float64) + 1.0  # (q,)
    edge = torch.clamp(torch.round(edge_ratio * n_vis), min=1.0)  # half-to-even, like round()
    keys = torch.arange(n_keys, device=query_positions.device, dtype=torch.float64)[None, :]
    head = keys < edge[:, None]
    tail = (keys >= (n_vis - edge)[:, None]) & (keys < n_vis[:, None])
    return head | tail  # a union: keys on both edges are counted once


def boundary_mass(maps: Tensor, query_positions: Tensor, edge_ratio: float = 0.1,
                  chunk_elements: int = _CHUNK_ELEMENTS) -> Tensor:
    """Attention mass each layer and head puts on the edges of each query's causal window, summed.

    Krul's preemptive selector (arXiv 2507.08045, Sec. 3.2) marks a layer input-sensitive when its
    average attention on the first and last 10% of the sequence is below a threshold tau. For a query
    at absolute position p the visible keys are 0..p (n_vis = p + 1); its edge width is
    edge = max(1, round(edge_ratio * n_vis)) and its mass is the attention on keys
    [0, edge) union [n_vis - edge, n_vis), each key counted once where the two overlap.

    Parameters
    ----------
    maps : (n_layers, heads, q, k)
        Attention probabilities (see `layer_pair_sq_distances`).
    query_positions : (q,) int
        Absolute position of each query; every p + 1 must be <= k.
    edge_ratio : float
        Fraction of the window counted on each edge, in (0, 0.5].

    Returns
    -------
    (n_layers, heads) float64 on `maps.device`
        Sum over the q queries of the edge mass (each term in [0, 1] for normalised rows).
    """
    _check_maps(maps)
    if not 0.0 < edge_ratio <= 0.5:
        raise ValueError(f"edge_ratio must be in (0, 0.5]; got {edge_ratio}")
    n_layers, n_heads, n_q, n_k = maps.shape
    query_positions = torch.as_tensor(query_positions, device=maps.device).reshape(-1)
    if query_positions.numel() != n_q:
        raise ValueError(
            f"query_positions has {query_positions.numel()} entries for {n_q} queries in the maps"
        )
    # Host-side check only where it costs no device sync (the decode path runs on CUDA every step).
    if query_positions.device.type == "cpu" and n_q > 0:
        lo, hi = int(query_positions.min()), int(query_positions.max())
        if lo < 0 or hi + 1 > n_k:
            raise ValueError(
                f"query positions must lie in [0, k-1] = [0, {n_k - 1}]; got [{lo}, {hi}]"
            )
    out = torch.zeros(n_layers, n_heads, dtype=torch.float64, device=maps.device)
    if n_q == 0 or n_k == 0:
        return out
    q_chunk = max(1, chunk_elements // max(1, n_layers * n_heads * n_k))
    for q0 in range(0, n_q, q_chunk):
        mask = _boundary_mask(query_positions[q0:q0 + q_chunk], n_k, edge_ratio)
        x = maps[:, :, q0:q0 + q_chunk, :].to(torch.float32)
        # each query row's edge mass as one float32 dot over its keys (a batched product: no
        # (L, H, q, k) temporary), the rows summed in float64
        out += torch.einsum("lhqk,qk->lhq", x, mask.to(torch.float32)).to(torch.float64).sum(dim=2)
    return out


@dataclass
class SimilarityStats:
    """Running similarity sums of one conversation, carried across its turns.

    Attributes
    ----------
    n_layers, n_heads : int
    sq_dist : (n_layers, n_layers, n_heads) float64
        Sum over every query seen of the squared attention-map difference per layer pair and head.
    boundary : (n_layers, n_heads) float64
        Sum over every query seen of the edge attention mass (see `boundary_mass`).
    n_queries : int
        Number of query rows accumulated.

    The sums are additive, so a CPU part (prefill maps) and a GPU part (decode rows) are accumulated
    separately and `merge`d at the end of the turn, as in the paper's heterogeneous estimator.
    """

    n_layers: int
    n_heads: int
    sq_dist: Tensor
    boundary: Tensor
    n_queries: int = 0

    def __post_init__(self) -> None:
        want_sq = (self.n_layers, self.n_layers, self.n_heads)
        if tuple(self.sq_dist.shape) != want_sq:
            raise ValueError(f"sq_dist must have shape {want_sq}; got {tuple(self.sq_dist.shape)}")
        if tuple(self.boundary.shape) != (self.n_layers, self.n_heads):
            raise ValueError(
                f"boundary must have shape {(self.n_layers, self.n_heads)}; "
                f"got {tuple(self.boundary.shape)}"
            )

    @property
    def device(self) -> torch.device:
        return self.sq_dist.device

    @classmethod
    def zeros(cls, n_layers: int, n_heads: int, device: str | torch.device = "cpu") -> "SimilarityStats":
        """Empty sums for a model with `n_layers` layers of `n_heads` attention heads."""
        return cls(
            n_layers=n_layers,
            n_heads=n_heads,
            sq_dist=torch.zeros(n_layers, n_layers, n_heads, dtype=torch.float64, device=device),
            boundary=torch.zeros(n_layers, n_heads, dtype=torch.float64, device=device),
            n_queries=0,
        )

    def update(self, maps: Tensor, query_positions: Tensor, edge_ratio: float = 0.1) -> None:
        """Add the sums of a block of query rows.

        Parameters
        ----------
        maps : (n_layers, n_heads, q, k)
            Attention probabilities of q new queries (a prefill block or one decode step).
        query_positions : (q,)
            Absolute positions of those queries.
        edge_ratio : float
            See `boundary_mass`.
        """
        _check_maps(maps)
        if tuple(maps.shape[:2]) != (self.n_layers, self.n_heads):
            raise ValueError(
                f"maps have (layers, heads) = {tuple(maps.shape[:2])}; these stats are for "
                f"{(self.n_layers, self.n_heads)}"
            )
        self.sq_dist += layer_pair_sq_distances(maps).to(self.sq_dist.device)
        self.boundary += boundary_mass(maps, query_positions, edge_ratio).to(self.boundary.device)
        self.n_queries += int(maps.shape[2])

    def merge(self, other: "SimilarityStats") -> "SimilarityStats":
        """New stats holding the sums of both (other is moved to self's device); inputs untouched."""
        if (self.n_layers, self.n_heads) != (other.n_layers, other.n_heads):
            raise ValueError(
                f"cannot merge stats for (layers, heads) = {(other.n_layers, other.n_heads)} into "
                f"{(self.n_layers, self.n_heads)}"
            )
        return SimilarityStats(
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            sq_dist=self.sq_dist + other.sq_dist.to(self.device),
            boundary=self.boundary + other.boundary.to(self.device),
            n_queries=self.n_queries + other.n_queries,
        )

    def to(self, device: str | torch.device) -> "SimilarityStats":
        """A copy on `device` (shares storage if already there)."""
        return SimilarityStats(self.n_layers, self.n_heads, self.sq_dist.to(device),
                               self.boundary.to(device), self.n_queries)

    def distances(self, head_reduce: str = "mean", normalize: bool = False) -> Tensor:
        """Layer-pair attention distance (Krul's similarity, smaller = more alike).

        Parameters
        ----------
        head_reduce : {"mean", "sum", "max"}
            How per-head distances combine (the paper does not say; "mean" is our default):
            "mean" = mean over heads of sqrt(per-head sum); "sum" = sqrt of the sum over heads (the
            distance of the maps flattened over heads too); "max" = max over heads of sqrt.
        normalize : bool
            Divide the squared sums by n_queries first (a per-query RMS distance), so conversations of
            different lengths are comparable when distances are averaged across them.

        Returns
        -------
        (n_layers, n_layers) float64
            Symmetric, zero diagonal.
        """
        sq = self.sq_dist
        if normalize:
            sq = sq / max(1, self.n_queries)
        if head_reduce == "mean":
            dist = sq.sqrt().mean(dim=2)
        elif head_reduce == "sum":
            dist = sq.sum(dim=2).sqrt()
        elif head_reduce == "max":
            dist = sq.sqrt().amax(dim=2) if self.n_heads > 0 else sq.sum(dim=2)
        else:
            raise ValueError(f"unknown head_reduce '{head_reduce}'; known: {', '.join(HEAD_REDUCTIONS)}")
        dist = 0.5 * (dist + dist.T)
        dist.fill_diagonal_(0.0)
        return dist

    def boundary_ratio(self) -> Tensor:
        """(n_layers,) float64 in [0, 1]: mean over heads and queries of the edge attention mass.

        With no queries seen it is all zeros, so every layer counts as input-sensitive (the safe side
        of the preemptive rule).
        """
        if self.n_queries == 0 or self.n_heads == 0:
            return torch.zeros(self.n_layers, dtype=torch.float64, device=self.device)
        return (self.boundary.sum(dim=1) / (self.n_heads * self.n_queries)).clamp(0.0, 1.0)

    def state_dict(self) -> dict:
        """Plain dict (CPU float64 tensors + ints) for saving with results."""
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_queries": self.n_queries,
            "sq_dist": self.sq_dist.detach().to("cpu", torch.float64).clone(),
            "boundary": self.boundary.detach().to("cpu", torch.float64).clone(),
        }

    @classmethod
    def from_state_dict(cls, d: dict, device: str | torch.device = "cpu") -> "SimilarityStats":
        """Inverse of `state_dict` (tensors or nested lists accepted)."""
        return cls(
            n_layers=int(d["n_layers"]),
            n_heads=int(d["n_heads"]),
            sq_dist=torch.as_tensor(d["sq_dist"], dtype=torch.float64).to(device).clone(),
            boundary=torch.as_tensor(d["boundary"], dtype=torch.float64).to(device).clone(),
            n_queries=int(d["n_queries"]),
        )
