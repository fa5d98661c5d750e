"""Bubble-free restoration scheduler: how many history tokens each layer recomputes vs loads.

Restoring N history tokens over L layers (Krul, arXiv 2507.08045, Sec. 3.4): layer l recomputes its
first L_l tokens and loads the KV of the rest, the two on independent streams, so restoration takes
max(T_recompute, T_load). Pyramid layout: L_l is non-increasing with depth (shallow layers recompute
more, deeper layers, which hold the compressed pairs, load more); recomputing layer l needs layer
l-1's hidden states of tokens [0:L_l], which exist because L_{l-1} >= L_l. Compression makes the
per-layer load sizes unequal, so a fixed split leaves one stream idle ("bubbles"); the recompute
ratio r_c is chosen so the two stream times are as close as possible (the paper's Eq. 1), here by
minimising max(T_recompute, T_load) over r_c under a measured cost model (`RestoreRates`).

The cost model, per recomputed layer l (L_l > 0 tokens):

    max(host_l, device_l),  host_l = h + h_job * J_l,  device_l = a + b L_l + c L_l^2

plus a fixed cost once: a GPU runs a layer no faster than one host thread can issue its ~40 ops
(h, ~0.6 ms per HF decoder layer on an H200), and the loader's jobs issued from the same thread at the
layer's start (J_l of them, h_job each) add to that layer's host time. The load stream copies its
jobs (one per layer with loaded bytes, in layer order) one after another at the measured bandwidth,
each no earlier than the host issued it. With the host terms at 0 (the defaults) this is the plain
sum a + b L + c L^2 per layer and the loads all issued at once: the linear model.

Loaded bytes per layer are priced from a per-layer bytes-per-token array (or a scalar), or by a
callable ``load_bytes(lengths) -> (L,) bytes`` for stored forms whose bytes are not linear in the
loaded tokens (an svd pair's stored bytes depend on its segment length).

This module is only the cost model and the plan: it issues no CUDA calls, and its rates are measured
on the running machine by the caller (`RestoreRates`), never constants baked in here.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence, Union

import numpy as np


@dataclass(frozen=True)
class RestoreRates:
    """Cost model of the two restoration streams, measured on the running machine.

    Recompute of layer l over L_l tokens (if L_l > 0), with J_l loader jobs issued at its start:
        max(recompute_host_s_per_layer + recompute_host_s_per_job * J_l,
            recompute_s_per_layer + recompute_s_per_token * L_l + recompute_s_per_token_sq * L_l**2),
    plus recompute_s_fixed once if anything is recomputed (embedding, setup).
    Load of the jobs (one per layer with loaded bytes B_l > 0, in layer order), one after another:
        each takes load_s_per_layer + B_l / load_bytes_per_s and starts no earlier than it was issued;
        plus load_s_fixed once if anything is loaded.

    Attributes
    ----------
    recompute_s_per_token, recompute_s_per_token_sq, recompute_s_per_layer : float
        The device time of a recomputed layer: b, c and a of a + b L + c L^2 (s).
    recompute_s_fixed : float
        Once per restore that recomputes anything (s).
    load_bytes_per_s, load_s_per_layer, load_s_fixed : float
        The load stream: bandwidth, cost per job (one job per loaded layer), once per restore.
    recompute_host_s_per_layer : float
        Host time to issue one recomputed layer's ops (s): the floor of a layer's time. 0 (default)
        where the issuing is the compute itself (a CPU) or not measured.
    recompute_host_s_per_job : float
        Host time per loader job issued from the recompute thread (s), added to the host time of the
        layer at whose start it is issued. Only used when `load_issue_lookahead` > 0.
    load_issue_lookahead : float
        How the loader is driven. 0 (default): it has its own thread(s) (CPU threads, a staging pool)
        and every job may start at once. k > 0: the recompute thread issues the jobs (restore.py's
        direct CUDA mode with `lookahead=k`): k before the first recomputed layer, then
        max(k, ceil(pending / layers left)) at the start of each recomputed layer, the rest after
        the last; a job starts no earlier than the host time it was issued at.
    """

    recompute_s_per_token: float
    recompute_s_per_token_sq: float = 0.0
    recompute_s_per_layer: float = 0.0
    recompute_s_fixed: float = 0.0
    load_bytes_per_s: float = 1e10
    load_s_per_layer: float = 0.0
    load_s_fixed: float = 0.0
    recompute_host_s_per_layer: float = 0.0
    recompute_host_s_per_job: float = 0.0
    load_issue_lookahead: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RestoreRates":
        """Inverse of `to_dict`; dicts written before the host terms existed load with them at 0."""
        return cls(**{k: float(v) for k, v in d.items()})

    def layer_times(self, lengths: Sequence[int] | np.ndarray,
                    jobs_issued: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Per-layer recompute times (s): max(host, device) where L_l > 0, else 0.

        Parameters
        ----------
        lengths : (L,) recompute lengths
        jobs_issued : (L,) loader jobs issued at each layer's start (default none)
        """
        rec = np.asarray(lengths, dtype=np.float64)
        jobs = np.zeros_like(rec) if jobs_issued is None else np.asarray(jobs_issued, dtype=np.float64)
        device = (self.recompute_s_per_layer + self.recompute_s_per_token * rec
                  + self.recompute_s_per_token_sq * rec * rec)
        host = self.recompute_host_s_per_layer + self.recompute_host_s_per_job * jobs
        return np.where(rec > 0, np.maximum(host, device), 0.0)


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


@functools.lru_cache(maxsize=64)
def _depth_weights(n_layers: int, slope: float) -> np.ndarray:
    """s_l = 1 + slope * (1 - 2 l / (L - 1)), mean 1, non-increasing for slope >= 0 (read-only: it is
    cached, since `choose_split` asks for the same weights about a thousand times per call)."""
    if n_layers == 1:
        w = np.ones(1)
    else:
        l = np.arange(n_layers, dtype=np.float64)
        w = 1.0 + slope * (1.0 - 2.0 * l / (n_layers - 1))
    w.setflags(write=False)
    return w


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
    return tuple(pyramid_lengths_grid(n_tokens, n_layers, [recompute_ratio], slope)[0].tolist())


def pyramid_lengths_grid(n_tokens: int, n_layers: int, recompute_ratios: Sequence[float],
                         slope: float = 1.0) -> np.ndarray:
    """`pyramid_lengths` at many recompute ratios at once (the scheduler's grid): row i equals
    `pyramid_lengths(n_tokens, n_layers, recompute_ratios[i], slope)` exactly, element for element.

    Returns
    -------
    (len(recompute_ratios), L) int64
    """
    ratios = [float(r) for r in recompute_ratios]
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"recompute_ratio must be in [0, 1]; got {next(r for r in ratios if not 0.0 <= r <= 1.0)}")
    if slope < 0:
        raise ValueError(f"slope must be >= 0 (shallow layers recompute more); got {slope}")
    if n_tokens < 0 or n_layers < 0:
        raise ValueError(f"n_tokens and n_layers must be >= 0; got {n_tokens}, {n_layers}")
    n, big_l = int(n_tokens), int(n_layers)
    totals = np.array([int(round(r * n * big_l)) for r in ratios], dtype=np.int64)
    out = np.zeros((len(ratios), big_l), dtype=np.int64)
    if big_l == 0:
        return out
    out[totals >= n * big_l] = n
    rows = np.flatnonzero((totals > 0) & (totals < n * big_l))
    if not rows.size:
        return out
    total = totals[rows]
    y = (n * np.asarray(ratios)[rows])[:, None] * _depth_weights(big_l, slope)[None, :]  # (M, L)
    # g(c) = sum(clip(y + c, 0, N)) is piecewise linear and non-decreasing: solve g(c) = total exactly
    # on the segment between consecutive breakpoints (g(-max y) = 0 < total < N L = g(N - min y)).
    bp = np.sort(np.concatenate([-y, n - y], axis=1), axis=1)  # (M, 2L)
    g = np.clip(y[:, None, :] + bp[:, :, None], 0, n).sum(axis=2)  # (M, 2L), non-decreasing
    j = np.clip((g < total[:, None]).sum(axis=1), 1, 2 * big_l - 1)[:, None]  # first g >= total
    c0, c1 = np.take_along_axis(bp, j - 1, 1)[:, 0], np.take_along_axis(bp, j, 1)[:, 0]
    g0, g1 = np.take_along_axis(g, j - 1, 1)[:, 0], np.take_along_axis(g, j, 1)[:, 0]
    flat = g1 == g0
    c = np.where(flat, c1, c0 + (total - g0) * (c1 - c0) / np.where(flat, 1.0, g1 - g0))
    x = np.clip(y + c[:, None], 0, n)
    fl = np.floor(x)
    frac = x - fl
    lengths = fl.astype(np.int64)
    k = total - lengths.sum(axis=1)
    # Largest remainder where 0 < k <= L: the k open layers (L_l < N) of largest fraction, ties to
    # shallower layers. Within a run of equal floors the fractions are non-increasing with depth, so
    # the +1s go to a prefix of each run and the result stays non-increasing.
    open_ = lengths < n
    order = np.argsort(np.where(open_, -frac, np.inf), axis=1, kind="stable")
    take = ((np.arange(big_l)[None, :] < k[:, None]) & (k[:, None] <= big_l)
            & np.take_along_axis(open_, order, 1))
    add = np.zeros_like(lengths)
    np.put_along_axis(add, order, take.astype(np.int64), axis=1)
    lengths += add
    for i in np.flatnonzero(lengths.sum(axis=1) != total):
        _fix_sum(lengths[i], int(total[i]), n)
    out[rows] = lengths
    return out


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


LoadBytes = Union[Sequence[float], float, Callable[[np.ndarray], np.ndarray]]
"""How the scheduler prices loads: (L,) stored bytes per loaded token of each layer, one scalar for
all layers, or a callable ``load_bytes(lengths)`` taking the (L,) int64 recompute lengths of a split
and returning each layer's total loaded bytes under it, a (L,) float array (>= 0)."""


def issue_schedule(lengths: Sequence[int] | np.ndarray, n_jobs: int, lookahead: int) -> tuple[int, np.ndarray]:
    """How restore.py's direct CUDA loader spreads `n_jobs` jobs over the recomputed layers.

    `lookahead` jobs are issued before the first recomputed layer, then at the start of each recomputed
    layer max(lookahead, ceil(pending / recomputed layers left)); whatever is left (none, since the
    last layer takes all that is pending) after the last.

    Returns
    -------
    (issued before the first layer, (L,) jobs issued at each layer's start)
    """
    rec = np.asarray(lengths)
    at = np.zeros(len(rec), dtype=np.int64)
    first = min(max(int(lookahead), 0), n_jobs)
    pending = n_jobs - first
    layers = np.flatnonzero(rec > 0)
    for i, l in enumerate(layers):
        if pending <= 0:
            break
        n = min(pending, max(int(lookahead), math.ceil(pending / (len(layers) - i))))
        at[l] = n
        pending -= n
    return first, at


def stream_times(lengths: Sequence[int] | np.ndarray, rates: RestoreRates,
                 layer_bytes: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Predicted (t_recompute_s, t_load_s) of recompute lengths and per-layer loaded bytes.

    Parameters
    ----------
    lengths : (L,) recompute lengths L_l (non-increasing)
    rates : the cost model
    layer_bytes : (L,) total bytes loaded for each layer (0: nothing loaded, no job)

    Notes
    -----
    The recompute stream takes `recompute_s_fixed` + the sum of `RestoreRates.layer_times`. The load
    stream runs one job per layer with bytes > 0, in layer order, back to back; with
    `load_issue_lookahead` > 0 and something recomputed, a job issued at layer l's start is ready at
    the host time recompute_s_fixed + sum of the host times of the recomputed layers before l (+ the
    issue costs of the jobs before it in that layer): the host runs ahead of the device where the
    device is the slower, and a job can not be copied before it exists.
    """
    rec = np.asarray(lengths, dtype=np.int64)
    nbytes = np.asarray(layer_bytes, dtype=np.float64)
    job_bytes = nbytes[nbytes > 0]
    n_jobs = len(job_bytes)
    recomputing = bool((rec > 0).any())
    lookahead = int(rates.load_issue_lookahead)
    coupled = lookahead > 0 and recomputing and n_jobs > 0
    if coupled:
        first, at = issue_schedule(rec, n_jobs, lookahead)
    else:
        first, at = n_jobs, np.zeros(len(rec), dtype=np.int64)
    t_rec = 0.0
    if recomputing:
        t_rec = rates.recompute_s_fixed + float(rates.layer_times(rec, at).sum())
    t_load = 0.0
    if n_jobs:
        per_job = rates.load_s_per_layer + (job_bytes / rates.load_bytes_per_s if rates.load_bytes_per_s > 0
                                            else np.full(n_jobs, math.inf))
        if not coupled:
            t_load = rates.load_s_fixed + float(per_job.sum())
        else:
            h_job = rates.recompute_host_s_per_job
            ready = np.zeros(n_jobs)
            host = np.where(rec > 0, rates.recompute_host_s_per_layer + h_job * at, 0.0)
            start = rates.recompute_s_fixed + np.concatenate([[0.0], np.cumsum(host)[:-1]])
            j = first
            for l in np.flatnonzero(at):
                ready[j:j + at[l]] = start[l] + h_job * np.arange(1, at[l] + 1)
                j += int(at[l])
            end = 0.0
            for r, c in zip(ready, per_job):
                end = max(end, r) + c
            t_load = rates.load_s_fixed + float(end)
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


def layer_bytes_fn(load_bytes: LoadBytes, n_tokens: int, n_layers: int) -> Callable[[np.ndarray], np.ndarray]:
    """`load_bytes` (see `LoadBytes`) as a checked function: (L,) lengths -> (L,) loaded bytes."""
    if callable(load_bytes):
        def priced(lengths: np.ndarray) -> np.ndarray:
            out = np.asarray(load_bytes(np.asarray(lengths, dtype=np.int64)), dtype=np.float64)
            if out.shape != (n_layers,):
                raise ValueError(f"load_bytes(lengths) must return one entry per layer ({n_layers}); "
                                 f"got shape {out.shape}")
            if not np.isfinite(out).all() or (out < 0).any():
                raise ValueError("load_bytes(lengths) must return finite bytes >= 0")
            return out
        return priced
    b = _load_bytes_array(load_bytes, n_layers)
    return lambda lengths: (n_tokens - np.asarray(lengths, dtype=np.float64)) * b


def predict(split: RestoreSplit, rates: RestoreRates, load_bytes_per_token: LoadBytes) -> tuple[float, float]:
    """Predicted (t_recompute_s, t_load_s) of a split under the cost model (`stream_times`).

    Parameters
    ----------
    split : the per-layer recompute lengths
    rates : measured rates (`RestoreRates`)
    load_bytes_per_token : (L,) stored bytes per loaded token of layer l; smaller for compressed
        layers (a merged pair's bytes split over its two layers). A scalar means the same for all.
        Or a callable ``load_bytes(lengths) -> (L,)`` total loaded bytes per layer (`LoadBytes`).
    """
    lengths = np.asarray(split.lengths, dtype=np.int64)
    nbytes = layer_bytes_fn(load_bytes_per_token, split.n_tokens, split.n_layers)(lengths)
    return stream_times(lengths, rates, nbytes)


def choose_split(n_tokens: int, n_layers: int, rates: RestoreRates, load_bytes_per_token: LoadBytes,
                 slope: float | Sequence[float] = 1.0, n_grid: int = 201, min_gain: float = 0.0) -> RestoreSplit:
    """Krul's bubble-free split (Eq. 1): the pyramid whose recompute and load times are closest.

    With several slopes (beyond the paper, `RestorePolicy.extra_slopes`), the pyramid shape is
    chosen too: the split of each slope is found as below and the one of least predicted restore
    wins (ties to the first slope given). Steep pyramids recompute whole prefixes on fewer layers;
    they win where a recomputed layer costs a fixed host-issue floor whatever its length (a GPU:
    ~0.6-1.1 ms per HF decoder layer), which a gentle slope pays on nearly every layer.

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
    load_bytes_per_token : (L,) stored bytes per loaded token per layer (or a scalar), or a callable
        ``load_bytes(lengths) -> (L,)`` giving each layer's total loaded bytes under a split
        (`LoadBytes`); it is called once per candidate split.
    slope : pyramid slope (0 = flat split), or a sequence of candidate slopes
    n_grid : grid points over r in [0, 1], >= 2
    min_gain : float in [0, 1)
        Overlap only when it pays: if the best split's predicted time is not at least this fraction
        below the better single-stream restore (load everything, r = 0, or recompute everything,
        r = 1), that single-stream restore is returned. 0 (default) is the plain argmin. The model
        leaves out what running two streams costs beyond it (thread start and join; on a CPU the
        two streams sharing cores; on a GPU the copies and placements slowing the recompute), and
        its predictions err by several percent, so a predicted gain of a few percent is not a real one.

    Returns
    -------
    RestoreSplit with the predicted stream times filled in.
    """
    if n_grid < 2:
        raise ValueError(f"n_grid must be >= 2; got {n_grid}")
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain must be in [0, 1); got {min_gain}")
    priced = layer_bytes_fn(load_bytes_per_token, n_tokens, n_layers)
    slopes = (float(slope),) if np.isscalar(slope) else tuple(float(x) for x in slope)
    if not slopes:
        raise ValueError("slope needs at least one candidate")
    best = None
    for s in slopes:
        split = _choose_for_slope(n_tokens, n_layers, rates, priced, s, n_grid, min_gain)
        if best is None or split.t_restore_s < best.t_restore_s - 1e-12:
            best = split
    return best


def _choose_for_slope(n_tokens: int, n_layers: int, rates: RestoreRates, priced, slope: float,
                      n_grid: int, min_gain: float) -> RestoreSplit:
    """`choose_split` for one pyramid slope (`priced`: the callable form of the load bytes)."""
    total_max = n_tokens * n_layers
    cache: dict[float, tuple[float, float, float, tuple[int, ...], float, float]] = {}

    def evaluate(r: float, arr: np.ndarray | None = None):
        if r not in cache:
            if arr is None:
                arr = pyramid_lengths_grid(n_tokens, n_layers, [r], slope)[0]
            t_rec, t_load = stream_times(arr, rates, priced(arr))
            cache[r] = (max(t_rec, t_load), r, t_rec - t_load, tuple(arr.tolist()), t_rec, t_load)
        return cache[r]

    ratios = [i / (n_grid - 1) for i in range(n_grid)]
    grid = [evaluate(r, arr) for r, arr in zip(ratios, pyramid_lengths_grid(n_tokens, n_layers, ratios, slope))]
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
            scan = [total / total_max for total in range(max(0, hi - n_layers - 1), min(total_max, hi + n_layers) + 1)]
            todo = [r for r in scan if r not in cache]
            for r, arr in zip(todo, pyramid_lengths_grid(n_tokens, n_layers, todo, slope)):
                evaluate(r, arr)
            for r in scan:
                cand = evaluate(r)
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


def cake_split(n_tokens: int, n_layers: int, rates: RestoreRates, load_bytes_per_token: LoadBytes,
               n_grid: int = 201, min_gain: float = 0.0) -> RestoreSplit:
    """Cake (Jin et al., ICML'25): compute KV from the front while loading from the back until they meet.

    Cake's two streams meet at one token index for every layer, at the point where both finish
    together; under this cost model that is exactly `choose_split` with slope 0 (a flat split) and
    the uncompressed per-layer bytes (pass the full KV bytes per token; Cake does not compress).
    Cake finds the meeting point online chunk by chunk; here it comes from the measured rates.
    `load_bytes_per_token` and `min_gain` are as in `choose_split` (a callable prices loads too).
    """
    return choose_split(n_tokens, n_layers, rates, load_bytes_per_token, slope=0.0, n_grid=n_grid,
                        min_gain=min_gain)


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
