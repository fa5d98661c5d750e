"""Compression plans and the policies that choose them (Krul's preemptive strategy selector).

A policy is a small dataclass with one method, `select(SelectionInput) -> CompressionPlan`, registered
by name in `SELECTORS` so configs can name it (kvpress-style). Policies:

- `KrulSelector` ("krul", "krul-no-preempt"): per conversation, protect input-sensitive layers
  (boundary attention mass < tau), then pair the remaining layers greedily by ascending attention
  distance, any two layers, until the target ratio or byte budget (arXiv 2507.08045, Sec. 3.1-3.2).
- `FixedPairsSelector` ("fixed", "krul-fix", "kvsharer"): one plan for every conversation,
  calibrated offline with `calibrate_fixed_pairs` (Krul(Fix) ablation; KVSharer, Yang et al. 2024,
  which shares the most DISsimilar layers and uses plain sharing).
- `MiniCacheSelector` ("minicache"): adjacent pairs in the deeper half of the model (Liu et al. 2024).
- `NoCompressionSelector` ("none"): the full-KV baselines.

The selector never touches caches or models; it sees only the similarity statistics.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # selector may depend on similarity, never the other way
    from krul.similarity import SimilarityStats

PLAN_METHODS = ("merge", "share", "svd")
PAIR_ORDERS = ("ascending", "descending")


@dataclass(frozen=True)
class CompressionPlan:
    """Which layer pairs of one conversation are stored compressed, and how.

    Attributes
    ----------
    pairs : tuple of (a, b) with a < b; each layer appears at most once.
    sensitive : layers protected by the preemptive rule (never compressed).
    method : "merge" (MiniCache merge) or "share" (KVSharer-style sharing).
    n_layers : number of layers of the model.
    """

    pairs: tuple[tuple[int, int], ...] = ()
    sensitive: tuple[int, ...] = ()
    method: str = "merge"
    n_layers: int = 0

    def __post_init__(self) -> None:
        pairs = tuple((int(a), int(b)) for a, b in self.pairs)
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "sensitive", tuple(int(l) for l in self.sensitive))
        if self.method not in PLAN_METHODS:
            raise ValueError(f"unknown method '{self.method}'; known: {', '.join(PLAN_METHODS)}")
        seen: set[int] = set()
        for a, b in pairs:
            if not a < b:
                raise ValueError(f"pair ({a}, {b}) must have a < b")
            if a in seen or b in seen:
                raise ValueError(f"layer used twice in pairs {pairs}")
            seen.update((a, b))
            if a < 0 or (self.n_layers and b >= self.n_layers):
                raise ValueError(f"pair ({a}, {b}) out of range for {self.n_layers} layers")
        clash = seen.intersection(self.sensitive)
        if clash:
            raise ValueError(f"sensitive layers {sorted(clash)} appear in pairs {pairs}")

    @property
    def nominal_ratio(self) -> float:
        """Full KV layers / stored layer-equivalents, n_layers / (n_layers - len(pairs)).

        Ignores the merge extras (norms, retained tokens); 1.0 for an empty plan.
        """
        if self.n_layers == 0:
            return 1.0
        return self.n_layers / (self.n_layers - len(self.pairs))

    @property
    def compressed_layers(self) -> tuple[int, ...]:
        return tuple(sorted(l for pair in self.pairs for l in pair))

    def partner(self, layer_idx: int) -> int | None:
        """The other layer of `layer_idx`'s pair, or None if it is stored in full."""
        for a, b in self.pairs:
            if layer_idx == a:
                return b
            if layer_idx == b:
                return a
        return None

    def to_dict(self) -> dict:
        """JSON-able dict (lists, not tuples)."""
        return {"pairs": [list(p) for p in self.pairs], "sensitive": list(self.sensitive),
                "method": self.method, "n_layers": self.n_layers}

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionPlan":
        return cls(pairs=tuple(tuple(p) for p in d.get("pairs", ())),
                   sensitive=tuple(d.get("sensitive", ())), method=d.get("method", "merge"),
                   n_layers=int(d.get("n_layers", 0)))


def pair_ratio(n_layers: int, n_pairs: int, pair_layer_equiv: float = 1.0) -> float:
    """Nominal compression of `n_pairs` pairs that each store `pair_layer_equiv` layers' worth:
    n_layers / (n_layers - (2 - pair_layer_equiv) * n_pairs); the inverse of `n_pairs_for_ratio`."""
    return n_layers / (n_layers - (2.0 - pair_layer_equiv) * n_pairs)


def n_pairs_for_ratio(n_layers: int, target_ratio: float, pair_layer_equiv: float = 1.0) -> int:
    """Smallest k with n_layers / (n_layers - 2k + k * pair_layer_equiv) >= target_ratio, capped at
    n_layers // 2 (a pair stores `pair_layer_equiv` layers' worth: 1 -> n_layers / (n_layers - k))."""
    if n_layers <= 0:
        return 0
    for k in range(n_layers // 2 + 1):
        if pair_ratio(n_layers, k, pair_layer_equiv) >= target_ratio - 1e-12:
            return k
    return n_layers // 2


def sensitive_layers(boundary_ratio: Tensor, tau: float) -> tuple[int, ...]:
    """Input-sensitive layers: those whose boundary attention mass is below tau.

    Krul's preemptive rule (arXiv 2507.08045, Sec. 3.2): a layer that puts little attention on the
    first and last 10% of the sequence depends on content a later turn may need, so it is never
    compressed.

    Parameters
    ----------
    boundary_ratio : (n_layers,)  mean edge attention mass per layer (`SimilarityStats.boundary_ratio`)
    tau : float  threshold in [0, 1]
    """
    br = torch.as_tensor(boundary_ratio).reshape(-1).tolist()
    return tuple(l for l, x in enumerate(br) if x < tau)


def _pair_inputs(distances: Tensor, allowed, order: str) -> tuple[list, list[int]]:
    """Checked inputs of a pairing: the distances as nested floats and the sorted allowed layers."""
    if order not in PAIR_ORDERS:
        raise ValueError(f"unknown order '{order}'; known: {', '.join(PAIR_ORDERS)}")
    d = torch.as_tensor(distances, dtype=torch.float64).cpu()
    layers = sorted(set(int(l) for l in allowed))
    bad = [l for l in layers if not 0 <= l < d.shape[0]]
    if bad:
        raise ValueError(f"allowed layers {bad} out of range for {d.shape[0]} layers")
    return d.tolist(), layers


def greedy_pairs(distances: Tensor, allowed: list[int] | tuple[int, ...], n_pairs: int,
                 order: str = "ascending") -> tuple[tuple[int, int], ...]:
    """Greedy disjoint pairing of `allowed` layers by attention distance.

    All pairs (a < b) of allowed layers, not only adjacent ones, are sorted by distance ("ascending":
    most similar first, Krul; "descending": most dissimilar first, KVSharer), ties broken by (a, b);
    a pair is taken when neither layer is used yet, until `n_pairs` are taken or none is left.
    Pairs with a NaN distance are never taken.

    Parameters
    ----------
    distances : (n_layers, n_layers)  symmetric layer-pair distances
    allowed : layer indices that may be compressed
    n_pairs : how many pairs to take at most
    order : "ascending" | "descending"
    """
    dl, layers = _pair_inputs(distances, allowed, order)
    cands = [(dl[a][b], a, b) for i, a in enumerate(layers) for b in layers[i + 1:]
             if not math.isnan(dl[a][b])]
    sign = 1.0 if order == "ascending" else -1.0
    cands.sort(key=lambda c: (sign * c[0], c[1], c[2]))
    used: set[int] = set()
    out: list[tuple[int, int]] = []
    for _, a, b in cands:
        if len(out) >= n_pairs:
            break
        if a in used or b in used:
            continue
        used.update((a, b))
        out.append((a, b))
    return tuple(out)


def matching_pairs(distances: Tensor, allowed: list[int] | tuple[int, ...], n_pairs: int,
                   order: str = "ascending") -> tuple[tuple[int, int], ...]:
    """The `n_pairs` disjoint pairs of `allowed` layers of least total distance (most, for
    "descending"): exact, unlike `greedy_pairs`, whose last pairs are whatever the first leave.

    A minimum-weight perfect matching (Edmonds' blossom, networkx) on the allowed layers plus
    |allowed| - 2 n_pairs dummy nodes joined to every layer at weight 0: the layers a dummy takes are
    left unpaired, so exactly `n_pairs` real pairs remain and their total is minimal. Pairs with a
    NaN distance are never taken (fewer pairs come back if the rest cannot be paired otherwise).
    Same arguments as `greedy_pairs`; pairs come back sorted by distance, then (a, b).
    """
    import networkx as nx

    dl, layers = _pair_inputs(distances, allowed, order)
    k = min(int(n_pairs), len(layers) // 2)
    if k <= 0:
        return ()
    edges = [(a, b, dl[a][b]) for i, a in enumerate(layers) for b in layers[i + 1:] if not math.isnan(dl[a][b])]
    if not edges:
        return ()
    sign = 1.0 if order == "ascending" else -1.0
    # min_weight_matching takes the cheapest of the maximum-cardinality matchings; with the dummies
    # that is a perfect one, holding exactly k real pairs whenever k disjoint scored pairs exist
    g = nx.Graph()
    g.add_weighted_edges_from((a, b, sign * w) for a, b, w in edges)
    dummies = [("dummy", i) for i in range(len(layers) - 2 * k)]
    g.add_weighted_edges_from((x, l, 0.0) for x in dummies for l in layers)
    matching = nx.min_weight_matching(g)
    pairs = [tuple(sorted(e)) for e in matching if not any(isinstance(v, tuple) for v in e)]
    pairs.sort(key=lambda p: (sign * dl[p[0]][p[1]], p[0], p[1]))
    pairs = pairs[:k]  # NaN-sparse scores can leave a dummy unmatched: never more than asked
    return tuple(pairs)


PAIRINGS = {"greedy": greedy_pairs, "matching": matching_pairs}


@dataclass(frozen=True)
class SelectionInput:
    """What a selector sees of one conversation.

    Attributes
    ----------
    distances : (n_layers, n_layers) layer-pair attention distances
    boundary_ratio : (n_layers,) mean edge attention mass per layer, in [0, 1]
    n_layers : int
    layer_bytes_per_token : bytes of one layer's K+V per token (needed for byte budgets)
    """

    distances: Tensor
    boundary_ratio: Tensor
    n_layers: int
    layer_bytes_per_token: float | None = None

    @classmethod
    def from_stats(cls, stats: "SimilarityStats", head_reduce: str = "mean", normalize: bool = False,
                   layer_bytes_per_token: float | None = None) -> "SelectionInput":
        """Build from a conversation's `SimilarityStats` (moved to the CPU)."""
        return cls(distances=stats.distances(head_reduce, normalize=normalize).cpu(),
                   boundary_ratio=stats.boundary_ratio().cpu(), n_layers=stats.n_layers,
                   layer_bytes_per_token=layer_bytes_per_token)


class Selector:
    """A policy: `select(stats) -> CompressionPlan`. Subclasses are small dataclasses."""

    def select(self, stats: SelectionInput) -> CompressionPlan:  # pragma: no cover - interface
        raise NotImplementedError

    def to_dict(self) -> dict:
        return asdict(self) if hasattr(self, "__dataclass_fields__") else {}


@dataclass
class NoCompressionSelector(Selector):
    """Full KV for every layer (full-recompute / full-load / partial-recompute baselines)."""

    def select(self, stats: SelectionInput) -> CompressionPlan:
        return CompressionPlan((), (), "merge", stats.n_layers)


@dataclass
class KrulSelector(Selector):
    """Krul's per-conversation plan (arXiv 2507.08045, Sec. 3.1-3.2).

    1. Preemptive rule: layers with boundary mass < tau are input-sensitive and never compressed
       (skipped when `preempt` is False: the krul-no-preempt ablation).
    2. Layers below `min_layer` are never compressed (Krul's "input-robust" layer range).
    3. The rest are paired greedily by ascending distance (`greedy_pairs`), any two layers, until the
       nominal `target_ratio` (`n_pairs_for_ratio`) or, if `budget_bytes_per_token` is set, until the
       stored bytes per token fit the budget. If too few layers are allowed, the plan takes all the
       pairs it can and falls short of the target (its `nominal_ratio` says by how much).

    Attributes
    ----------
    tau : float  boundary-mass threshold (not reported by the paper; calibrate and report)
    target_ratio : float  nominal compression ratio n_layers / (n_layers - 2 n_pairs + n_pairs * e),
        e = pair_layer_equiv
    budget_bytes_per_token : float | None  overrides target_ratio when set
    method : "merge" | "share" | "svd"
    preempt : bool
    min_layer : int
    pair_layer_equiv : float
        Stored size of one compressed pair in layer-equivalents, for the target ratio and the byte
        budget: 1.0 for "share" and nominally for "merge" (1 + 2/head_dim + 2*retain_ratio counts the
        merge extras); 2 * rank_ratio for "svd".
    order : "ascending" (the paper) | "descending"
    pairing : "greedy" (the paper: `greedy_pairs`) | "matching" (beyond the paper: the exact
        least-total-distance pairs, `matching_pairs`)
    """

    tau: float = 0.3
    target_ratio: float = 1.5
    budget_bytes_per_token: float | None = None
    method: str = "merge"
    preempt: bool = True
    min_layer: int = 0
    pair_layer_equiv: float = 1.0
    order: str = "ascending"
    pairing: str = "greedy"

    def n_pairs(self, n_layers: int, layer_bytes_per_token: float | None) -> int:
        """Pairs wanted for the target ratio or the byte budget (before layer availability)."""
        if self.budget_bytes_per_token is None:
            return n_pairs_for_ratio(n_layers, self.target_ratio, self.pair_layer_equiv)
        if layer_bytes_per_token is None:
            raise ValueError("budget_bytes_per_token needs SelectionInput.layer_bytes_per_token "
                             "(bytes of one layer's K+V per token)")
        for k in range(n_layers // 2 + 1):
            stored = (n_layers - 2 * k + k * self.pair_layer_equiv) * layer_bytes_per_token
            if stored <= self.budget_bytes_per_token * (1 + 1e-12):
                return k
        return n_layers // 2

    def select(self, stats: SelectionInput) -> CompressionPlan:
        n_layers = stats.n_layers
        sensitive = sensitive_layers(stats.boundary_ratio, self.tau) if self.preempt else ()
        blocked = set(sensitive)
        allowed = [l for l in range(n_layers) if l >= self.min_layer and l not in blocked]
        n_pairs = self.n_pairs(n_layers, stats.layer_bytes_per_token)
        if self.pairing not in PAIRINGS:
            raise ValueError(f"unknown pairing {self.pairing!r}; known: {', '.join(PAIRINGS)}")
        pairs = PAIRINGS[self.pairing](stats.distances, allowed, n_pairs, self.order)
        return CompressionPlan(pairs, sensitive, self.method, n_layers)


@dataclass
class KrulNoPreemptSelector(KrulSelector):
    """Krul without the preemptive rule (ablation): every layer >= min_layer may be compressed."""

    preempt: bool = False


@dataclass
class FixedPairsSelector(Selector):
    """One plan for every conversation: the given pairs (the first `n_pairs` of them if set).

    Used for Krul(Fix) (pairs from `calibrate_fixed_pairs`, ascending, over Krul's layer range) and,
    via `KVSharerSelector`, for KVSharer (Yang et al. 2024: calibrated dissimilar-first, shared).
    """

    pairs: tuple = ()
    method: str = "merge"
    n_pairs: int | None = None

    def __post_init__(self) -> None:
        self.pairs = tuple((int(a), int(b)) for a, b in self.pairs)

    def select(self, stats: SelectionInput) -> CompressionPlan:
        pairs = self.pairs if self.n_pairs is None else self.pairs[: self.n_pairs]
        return CompressionPlan(pairs, (), self.method, stats.n_layers)


@dataclass
class KVSharerSelector(FixedPairsSelector):
    """KVSharer (Yang et al. 2024): calibrated fixed pairs, plain sharing."""

    method: str = "share"


@dataclass
class MiniCacheSelector(Selector):
    """MiniCache (Liu et al., NeurIPS'24): merge adjacent layers from the deep end of the model.

    For L layers the candidates are (L-2, L-1), (L-4, L-3), ... with first layer >= L // 2 (the
    deeper half), deepest first; the plan takes `n_pairs_for_ratio(L, target_ratio)` of them.
    """

    target_ratio: float = 1.5
    method: str = "merge"

    @staticmethod
    def candidates(n_layers: int) -> tuple[tuple[int, int], ...]:
        return tuple((a, a + 1) for a in range(n_layers - 2, n_layers // 2 - 1, -2))

    def select(self, stats: SelectionInput) -> CompressionPlan:
        n = n_pairs_for_ratio(stats.n_layers, self.target_ratio)
        return CompressionPlan(self.candidates(stats.n_layers)[:n], (), self.method, stats.n_layers)


SELECTORS: dict[str, type] = {
    "none": NoCompressionSelector,
    "krul": KrulSelector,
    "krul-no-preempt": KrulNoPreemptSelector,
    "fixed": FixedPairsSelector,
    "krul-fix": FixedPairsSelector,
    "kvsharer": KVSharerSelector,
    "minicache": MiniCacheSelector,
}


def make_selector(name: str, **params) -> Selector:
    """Instantiate the registered policy `name` with `params` (its dataclass fields)."""
    try:
        cls = SELECTORS[name]
    except KeyError:
        raise ValueError(f"unknown selector '{name}'; known: {', '.join(sorted(SELECTORS))}") from None
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"selector '{name}' has no parameters {unknown}; known: {', '.join(sorted(fields))}")
    return cls(**params)


def calibrate_fixed_pairs(stats_list: list[SelectionInput], n_pairs: int, order: str = "ascending",
                          tau: float | None = None, min_layer: int = 0,
                          pairing: str = "greedy") -> tuple[tuple[int, int], ...]:
    """The single plan best on average over calibration conversations.

    Averages the distance matrices (and boundary ratios) over the conversations, drops layers below
    `min_layer` and, if `tau` is given, the layers sensitive on average, then pairs them
    (`pairing`: greedily as the paper, or by exact matching). Used for Krul(Fix) (order
    "ascending", with tau) and KVSharer (order "descending", tau None). Distances from
    conversations of different lengths are best made comparable first
    (`SimilarityStats.distances(normalize=True)`).
    """
    if not stats_list:
        raise ValueError("calibrate_fixed_pairs needs at least one SelectionInput")
    n_layers = stats_list[0].n_layers
    if any(s.n_layers != n_layers for s in stats_list):
        raise ValueError("all calibration inputs must have the same n_layers")
    dist = torch.stack([torch.as_tensor(s.distances, dtype=torch.float64).cpu() for s in stats_list]).mean(0)
    blocked: set[int] = set()
    if tau is not None:
        br = torch.stack([torch.as_tensor(s.boundary_ratio, dtype=torch.float64).cpu()
                          for s in stats_list]).mean(0)
        blocked = set(sensitive_layers(br, tau))
    allowed = [l for l in range(n_layers) if l >= min_layer and l not in blocked]
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; known: {', '.join(PAIRINGS)}")
    return PAIRINGS[pairing](dist, allowed, n_pairs, order)
