"""Bubble-free restoration scheduler: how many history tokens each layer recomputes vs loads.

Restoring N history tokens over L layers (Krul, arXiv 2507.08045, Sec. 3.4): layer l recomputes its
first L_l tokens and loads the KV of the rest, the two on independent streams, so restoration takes
max(T_recompute, T_load). Pyramid layout: L_l is non-increasing with depth (shallow layers recompute
more, deeper layers, which hold the compressed pairs, load more); recomputing layer l needs layer
l-1's hidden states of tokens [0:L_l], which exist because L_{l-1} >= L_l. Compression makes the
per-layer load sizes unequal, so a fixed split leaves one stream idle ("bubbles"); the recompute
ratio r_c is chosen so the two stream times are as close as possible (the paper's Eq. 1), here by
minimising max(T_recompute, T_load) over r_c under a measured linear cost model.

This module is only the cost model and the plan: it issues no CUDA calls, and its rates are measured
on the running machine by the caller (`RestoreRates`), never constants baked in here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class RestoreRates:
    """Linear cost model of the two restoration streams, measured on the running machine.

    Recompute of layer l over L_l tokens (if L_l > 0):
        recompute_s_per_layer + recompute_s_per_token * L_l + recompute_s_per_token_sq * L_l**2,
    plus recompute_s_fixed once if anything is recomputed (embedding, setup).
    Load of layer l's remaining bytes B_l (if B_l > 0):
        load_s_per_layer + B_l / load_bytes_per_s, plus load_s_fixed once if anything is loaded.
    """

    recompute_s_per_token: float
    recompute_s_per_token_sq: float = 0.0
    recompute_s_per_layer: float = 0.0
    recompute_s_fixed: float = 0.0
    load_bytes_per_s: float = 1e10
    load_s_per_layer: float = 0.0
    load_s_fixed: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RestoreRates":
        return cls(**{k: float(v) for k, v in d.items()})


@dataclass(frozen=True)
class RestoreSplit:
    """Per-layer recompute lengths of one restoration.

    Attributes
    ----------
    lengths : L_l per layer: layer l recomputes tokens [0:L_l] and loads [L_l:N]; non-increasing.
    n_tokens : N, the history length.
    t_recompute_s, t_load_s : predicted stream times, when the split came from `choose_split`.
    """

    lengths: tuple[int, ...]
    n_tokens: int
    t_recompute_s: float | None = None
    t_load_s: float | None = None

    def __post_init__(self) -> None:
        lengths = tuple(int(x) for x in self.lengths)
        object.__setattr__(self, "lengths", lengths)
        if any(not 0 <= x <= self.n_tokens for x in lengths):
            raise ValueError(f"lengths must lie in [0, {self.n_tokens}]; got {lengths}")
        if any(a < b for a, b in zip(lengths, lengths[1:])):
            raise ValueError(f"lengths must be non-increasing with depth; got {lengths}")

    @property
    def n_layers(self) -> int:
        return len(self.lengths)

    @property
    def recompute_ratio(self) -> float:
        """sum(L_l) / (L * N): the fraction of (layer, token) KV entries recomputed."""
        total = self.n_layers * self.n_tokens
        return sum(self.lengths) / total if total else 0.0

    @property
    def t_restore_s(self) -> float | None:
        if self.t_recompute_s is None or self.t_load_s is None:
            return None
        return max(self.t_recompute_s, self.t_load_s)

    def n_loaded(self, layer_idx: int) -> int:
        """Tokens of layer `layer_idx` that are loaded rather than recomputed."""
        return self.n_tokens - self.lengths[layer_idx]

    def to_dict(self) -> dict:
        return {"lengths": list(self.lengths), "n_tokens": self.n_tokens,
                "t_recompute_s": self.t_recompute_s, "t_load_s": self.t_load_s}

    @classmethod
    def from_dict(cls, d: dict) -> "RestoreSplit":
        return cls(tuple(d["lengths"]), int(d["n_tokens"]), d.get("t_recompute_s"), d.get("t_load_s"))


def _depth_weights(n_layers: int, slope: float) -> np.ndarray:
    """s_l = 1 + slope * (1 - 2 l / (L - 1)), mean 1, non-increasing for slope >= 0."""
    if n_layers == 1:
        return np.ones(1)
    l = np.arange(n_layers, dtype=np.float64)
    return 1.0 + slope * (1.0 - 2.0 * l / (n_layers - 1))


def pyramid_lengths(n_tokens: int, n_layers: int, recompute_ratio: float,
                    slope: float = 1.0) -> tuple[int, ...]:
    """Pyramid layout of Krul (Sec. 3.4): recompute lengths linear in depth, shallow layers first.

    The ideal is L_l = N * r * s_l with s_l = 1 + slope * (1 - 2l / (L - 1)) (mean 1); slope = 0 is the
    flat fixed-ratio split (Cake/Pensieve-style). Clipping to [0, N] loses mass at the ends, so the
    lengths are clip(N r s_l + c, 0, N) with the one shift c that makes their sum round(r N L) (the
    slope is kept where unclipped), rounded to integers by largest remainder (ties to shallower
    layers), which keeps them non-increasing and the sum exact. r = 0 gives all zeros, r = 1 all N.

    Parameters
    ----------
    n_tokens : N history tokens
    n_layers : L layers
    recompute_ratio : r in [0, 1]
    slope : >= 0; 1 means the shallowest layer wants 2 N r and the deepest 0

    Returns
    -------
    (L,) ints, non-increasing, in [0, N], summing to round(r * N * L)
    """
    if not 0.0 <= recompute_ratio <= 1.0:
        raise ValueError(f"recompute_ratio must be in [0, 1]; got {recompute_ratio}")
    if slope < 0:
        raise ValueError(f"slope must be >= 0 (shallow layers recompute more); got {slope}")
    if n_tokens < 0 or n_layers < 0:
        raise ValueError(f"n_tokens and n_layers must be >= 0; got {n_tokens}, {n_layers}")
    n, big_l = int(n_tokens), int(n_layers)
    total = int(round(recompute_ratio * n * big_l))
    if big_l == 0:
        return ()
    if total <= 0:
        return (0,) * big_l
    if total >= n * big_l:
        return (n,) * big_l
    y = n * recompute_ratio * _depth_weights(big_l, slope)
    # g(c) = sum(clip(y + c, 0, N)) is piecewise linear and non-decreasing: solve g(c) = total exactly
    # on the segment between consecutive breakpoints.
    bp = np.unique(np.concatenate([-y, n - y]))
    g = np.clip(y[None, :] + bp[:, None], 0, n).sum(axis=1)
    j = int(np.searchsorted(g, total, side="left"))
    j = min(max(j, 1), len(bp) - 1)
    c0, c1, g0, g1 = bp[j - 1], bp[j], g[j - 1], g[j]
    c = c1 if g1 == g0 else c0 + (total - g0) * (c1 - c0) / (g1 - g0)
    x = np.clip(y + c, 0, n)
    fl = np.floor(x)
    frac = x - fl
    lengths = fl.astype(np.int64)
    k = total - int(lengths.sum())
    if 0 < k <= big_l:
        # Largest remainder; within a run of equal floors the fractions are non-increasing with
        # depth, so the +1s go to a prefix of each run and the result stays non-increasing.
        order = sorted((l for l in range(big_l) if lengths[l] < n), key=lambda l: (-frac[l], l))
        for l in order[:k]:
            lengths[l] += 1
    _fix_sum(lengths, total, n)
    return tuple(int(v) for v in lengths)


def _fix_sum(lengths: np.ndarray, total: int, n: int) -> None:
    """Move sum(lengths) to `total` one token at a time, keeping non-increasing and [0, n].

    Only reached through floating-point slack (a residual of a token or two).
    """
    big_l = len(lengths)
    while lengths.sum() < total:
        l = next(l for l in range(big_l) if lengths[l] < n and (l == 0 or lengths[l - 1] > lengths[l]))
        lengths[l] += 1
    while lengths.sum() > total:
        l = next(l for l in reversed(range(big_l))
                 if lengths[l] > 0 and (l == big_l - 1 or lengths[l + 1] < lengths[l]))
        lengths[l] -= 1


def _stream_times(lengths: np.ndarray, n_tokens: int, rates: RestoreRates,
                  load_bytes: np.ndarray) -> tuple[float, float]:
    rec = lengths.astype(np.float64)
    on = rec > 0
    t_rec = 0.0
    if on.any():
        t_rec = (rates.recompute_s_fixed + rates.recompute_s_per_layer * int(on.sum())
                 + rates.recompute_s_per_token * float(rec.sum())
                 + rates.recompute_s_per_token_sq * float((rec * rec).sum()))
    bytes_l = (n_tokens - rec) * load_bytes
    loading = bytes_l > 0
    t_load = 0.0
    if loading.any():
        total_bytes = float(bytes_l.sum())
        bw = rates.load_bytes_per_s
        t_bytes = math.inf if bw <= 0 else total_bytes / bw
        t_load = rates.load_s_fixed + rates.load_s_per_layer * int(loading.sum()) + t_bytes
    return float(t_rec), float(t_load)


def _load_bytes_array(load_bytes_per_token: Sequence[float] | float, n_layers: int) -> np.ndarray:
    b = np.asarray(load_bytes_per_token, dtype=np.float64)
    if b.ndim == 0:
        b = np.full(n_layers, float(b))
    if b.shape != (n_layers,):
        raise ValueError(f"load_bytes_per_token needs one entry per layer ({n_layers}); got {b.shape}")
    if (b < 0).any():
        raise ValueError("load_bytes_per_token must be >= 0")
    return b


def predict(split: RestoreSplit, rates: RestoreRates,
            load_bytes_per_token: Sequence[float]) -> tuple[float, float]:
    """Predicted (t_recompute_s, t_load_s) of a split under the linear cost model.

    Parameters
    ----------
    split : the per-layer recompute lengths
    rates : measured rates (`RestoreRates`)
    load_bytes_per_token : (L,) stored bytes per loaded token of layer l; smaller for compressed
        layers (a merged pair's bytes split over its two layers). A scalar means the same for all.
    """
    b = _load_bytes_array(load_bytes_per_token, split.n_layers)
    return _stream_times(np.asarray(split.lengths, dtype=np.int64), split.n_tokens, rates, b)


def choose_split(n_tokens: int, n_layers: int, rates: RestoreRates,
                 load_bytes_per_token: Sequence[float] | float, slope: float = 1.0,
                 n_grid: int = 201, min_gain: float = 0.0) -> RestoreSplit:
    """Krul's bubble-free split (Eq. 1): the pyramid whose recompute and load times are closest.

    Minimises max(T_recompute, T_load) over the recompute ratio r. First over the grid
    r = i / (n_grid - 1); then, since T_recompute is non-decreasing in r and T_load non-increasing,
    by integer bisection of the first total recompute length sum(L_l) where T_recompute >= T_load
    inside the grid cell holding the crossing, and a scan of L totals on each side of it: integer
    rounding can move a token between layers, so with per-layer or quadratic costs the streams are
    monotone only up to one layer's overhead. The result is never worse than the best grid point;
    ties go to the smaller r (less compute).

    Parameters
    ----------
    n_tokens, n_layers : N, L
    rates : measured `RestoreRates`
    load_bytes_per_token : (L,) stored bytes per loaded token per layer (or a scalar)
    slope : pyramid slope (0 = flat split)
    n_grid : grid points over r in [0, 1], >= 2
    min_gain : float in [0, 1)
        Overlap only when it pays: if the best split's predicted time is not at least this fraction
        below the better single-stream restore (load everything, r = 0, or recompute everything,
        r = 1), that single-stream restore is returned. 0 (default) is the plain argmin. The linear
        model leaves out what running two streams costs (thread start and join, and on a CPU the
        two streams sharing cores), so a predicted gain of a few percent is not a real one.

    Returns
    -------
    RestoreSplit with the predicted stream times filled in.
    """
    if n_grid < 2:
        raise ValueError(f"n_grid must be >= 2; got {n_grid}")
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain must be in [0, 1); got {min_gain}")
    b = _load_bytes_array(load_bytes_per_token, n_layers)
    total_max = n_tokens * n_layers
    cache: dict[float, tuple[float, float, float, tuple[int, ...], float, float]] = {}

    def evaluate(r: float):
        if r not in cache:
            lengths = pyramid_lengths(n_tokens, n_layers, r, slope)
            t_rec, t_load = _stream_times(np.asarray(lengths, dtype=np.int64), n_tokens, rates, b)
            cache[r] = (max(t_rec, t_load), r, t_rec - t_load, lengths, t_rec, t_load)
        return cache[r]

    grid = [evaluate(i / (n_grid - 1)) for i in range(n_grid)]
    best = min(grid, key=lambda e: (e[0], e[1]))
    if total_max > 0:
        # The grid cell where T_rec - T_load turns >= 0.
        cell = next((i for i in range(1, n_grid) if grid[i - 1][2] < 0 <= grid[i][2]), None)
        if cell is not None:
            lo = int(round(grid[cell - 1][1] * total_max))  # diff < 0 here
            hi = int(round(grid[cell][1] * total_max))      # diff >= 0 here
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if evaluate(mid / total_max)[2] < 0:
                    lo = mid
                else:
                    hi = mid
            for total in range(max(0, hi - n_layers - 1), min(total_max, hi + n_layers) + 1):
                cand = evaluate(total / total_max)
                if (cand[0], cand[1]) < (best[0], best[1]):
                    best = cand
    single = min(grid[0], grid[-1], key=lambda e: (e[0], e[1]))
    if best[0] > (1.0 - min_gain) * single[0]:
        best = single
    _, _, _, lengths, t_rec, t_load = best
    return RestoreSplit(lengths, n_tokens, t_rec, t_load)


def fixed_split(n_tokens: int, n_layers: int, recompute_ratio: float, slope: float = 0.0) -> RestoreSplit:
    """A split at a fixed recompute ratio (flat by default: the partial-recompute baseline)."""
    return RestoreSplit(pyramid_lengths(n_tokens, n_layers, recompute_ratio, slope), n_tokens)


def cake_split(n_tokens: int, n_layers: int, rates: RestoreRates,
               load_bytes_per_token: Sequence[float] | float, n_grid: int = 201) -> RestoreSplit:
    """Cake (Jin et al., ICML'25): compute KV from the front while loading from the back until they meet.

    Cake's two streams meet at one token index for every layer, at the point where both finish
    together; under this cost model that is exactly `choose_split` with slope 0 (a flat split) and
    the uncompressed per-layer bytes (pass the full KV bytes per token; Cake does not compress).
    Cake finds the meeting point online chunk by chunk; here it comes from the measured rates.
    """
    return choose_split(n_tokens, n_layers, rates, load_bytes_per_token, slope=0.0, n_grid=n_grid)


def bound_recompute_ratio(n_tokens: int, prefill_tokens_per_s: float, load_bytes_per_token_total: float,
                          bandwidth_bytes_per_s: float) -> float:
    """The r* of `bound_s`: (N b / B) / (N / P + N b / B), in [0, 1]."""
    a = _ratio(n_tokens, prefill_tokens_per_s)                                # all recomputed
    c = _ratio(n_tokens * load_bytes_per_token_total, bandwidth_bytes_per_s)  # all loaded
    if c == 0:
        return 0.0
    if a == 0:
        return 1.0
    if math.isinf(a) and math.isinf(c):
        return 0.0
    if math.isinf(a):
        return 0.0
    if math.isinf(c):
        return 1.0
    return c / (a + c)


def bound_s(n_tokens: int, prefill_tokens_per_s: float, load_bytes_per_token_total: float,
            bandwidth_bytes_per_s: float) -> float:
    """Ideal overlapped restore time: min over r of max(r N / P, (1 - r) N b / B).

    Closed form: the two terms are equal at r* = (N b / B) / (N / P + N b / B), giving
    (N / P)(N b / B) / (N / P + N b / B) -- half the harmonic mean of the all-recompute and all-load
    times. No per-layer or fixed costs: the lower bound the scheduler is compared with.
    """
    a = _ratio(n_tokens, prefill_tokens_per_s)
    c = _ratio(n_tokens * load_bytes_per_token_total, bandwidth_bytes_per_s)
    if a == 0 or c == 0:
        return 0.0
    if math.isinf(a):
        return c
    if math.isinf(c):
        return a
    return a * c / (a + c)


def _ratio(amount: float, rate: float) -> float:
    """amount / rate with 0 / anything = 0 and x / 0 = inf."""
    if amount == 0:
        return 0.0
    if rate <= 0:
        return math.inf
    return amount / rate
