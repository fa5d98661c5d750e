"""Fit the scheduler's cost model (`scheduler.RestoreRates`) on recorded bench runs, and predict them.

The bench (`krul.bench.run_ttft`) writes one row per (model, tier, history length, policy, prefill
path) with the median restore time, and with ``--timeline`` one line per row holding the per-layer
events of one restore: ``(stream, layer, start_ms, end_ms)`` for the streams "recompute", "h2d" and
"place". This module refits the max-form cost model on those records, so a GPU run's data can check
the model (and choose a `min_gain`) on a machine without a GPU:

- per recomputed layer, the recompute event's duration is max(host, device) with
  host = h + h_job * J_l (J_l: the loader jobs the recompute thread issued at that layer's start,
  reconstructed by `scheduler.issue_schedule` for direct-mode restores) and
  device = a + b L_l + c L_l^2; fitted by alternating assignment (`fit_max_form`);
- the fixed recompute cost is the median over the tier's recompute-only rows of the restore time
  less the predicted layer times;
- the load stream (fixed + bytes / bandwidth) is fitted on the tier's load-only rows.

Rows whose plan is an svd plan are left out of fits and predictions (`is_svd_plan_row`): at 37ed210
the svd expansion ran in fp32 on the recompute stream's SMs and slowed those restores 2-4x, which is
a defect of the expansion, not something the scheduler's model should learn.

Only numpy and the scheduler: no torch, no CUDA.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from krul import scheduler
from krul.scheduler import RestoreRates, RestoreSplit

# How the bench's policies split a history (policies.py at 37ed210; tests check they still agree):
# (kind, recompute ratio, pyramid slope); kind "ratio" takes the row's recorded recompute_ratio.
POLICY_SPLITS: dict[str, tuple[str, float, float]] = {
    "full-recompute": ("recompute", 1.0, 0.0),
    "full-load": ("load", 0.0, 0.0),
    "minicache": ("load", 0.0, 0.0),
    "kvsharer": ("load", 0.0, 0.0),
    "partial-recompute": ("fixed", 0.4, 0.0),
    "krul-fixed-split": ("fixed", 0.4, 1.0),
    "cake": ("ratio", float("nan"), 0.0),
}
SCHEDULER_SLOPE = 1.0  # every other policy: the scheduler's pyramid with the row's ratio
DIRECT_LOOKAHEAD = 2   # restore.restore_into's default `lookahead` for direct CUDA loads


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a bench csv, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_timelines(path: str | Path) -> list[dict]:
    """The lines of a bench timeline jsonl (one dict per row that recorded one)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_svd_plan_row(row: dict) -> bool:
    """Whether the row's state was built with an svd plan.

    The plan source names svd, or is the krul plan file (at 37ed210 that file held the
    krul-svd-loss record's plans: 8 svd pairs mapped to 32 layers).
    """
    src = str(row.get("plan_source", ""))
    return "svd" in src.lower() or src.startswith("plan-file")


def row_split(row: dict, n_layers: int = 32) -> RestoreSplit:
    """The per-layer recompute lengths a bench row restored with, rebuilt from its policy and ratio.

    full-recompute: all N tokens at all layers; full-load, minicache, kvsharer: none; partial-
    recompute: flat 0.4; krul-fixed-split: pyramid (slope 1) at 0.4; cake: flat at the row's ratio;
    any other (the krul variants): pyramid (slope 1) at the row's ratio (`scheduler.pyramid_lengths`).
    The row's ratio is rounded to 4 digits, so a rebuilt split may differ from the run's by a few
    tokens in all.
    """
    n = int(float(row["history_tokens"]))
    kind, ratio, slope = POLICY_SPLITS.get(row["policy"], ("ratio", float("nan"), SCHEDULER_SLOPE))
    if kind == "recompute":
        return RestoreSplit((n,) * n_layers, n)
    if kind == "load":
        return RestoreSplit((0,) * n_layers, n)
    if kind == "ratio":
        ratio = min(1.0, max(0.0, float(row["recompute_ratio"])))
    return RestoreSplit(scheduler.pyramid_lengths(n, n_layers, ratio, slope), n)


def row_bytes_per_token(row: dict, split: RestoreSplit) -> float:
    """The row's loaded bytes per loaded (layer, token): its `loaded_bytes` over sum(N - L_l).

    Equal to the layer's full KV bytes per token for uncompressed rows; smaller for minicache and
    kvsharer, whose pairs store fewer bytes.
    """
    loaded_tokens = sum(split.n_tokens - x for x in split.lengths)
    nbytes = float(row.get("loaded_bytes") or 0.0)
    return nbytes / loaded_tokens if loaded_tokens and nbytes > 0 else 0.0


def is_direct(row: dict) -> bool:
    """Whether the restore's loader was driven by the recompute thread (direct CUDA mode)."""
    return "/direct" in str(row.get("restore_mode", ""))


def _key(d: dict) -> tuple:
    return (d["device"], d["model"], d["tier"], int(float(d["history_tokens"])),
            int(float(d["new_input_tokens"])), d["policy"], d["plan_source"],
            str(d.get("prefill_path") or "graph"))


def match_timelines(rows: Sequence[dict], timelines: Sequence[dict]) -> list[tuple[dict, dict]]:
    """(row, timeline) pairs with the same key (device, model, tier, N, new tokens, policy, plan, path)."""
    by = {_key(r): r for r in rows}
    return [(by[_key(t)], t) for t in timelines if _key(t) in by]


@dataclass
class LayerSample:
    """One recomputed layer of a recorded restore: its length, jobs issued at its start, duration."""

    length: int
    jobs: int
    seconds: float
    row: dict = field(repr=False, default_factory=dict)


def layer_samples(rows: Sequence[dict], timelines: Sequence[dict], n_layers: int = 32,
                  lookahead: int = DIRECT_LOOKAHEAD, exclude=is_svd_plan_row) -> list[LayerSample]:
    """Per-layer recompute samples of every timeline whose row is not excluded.

    A layer's jobs are those `scheduler.issue_schedule` assigns it for direct-mode rows (one job per
    layer with loaded tokens); 0 where the loader had its own threads (pool mode: pageable, disk).
    """
    out = []
    for row, tl in match_timelines(rows, timelines):
        if exclude(row):
            continue
        split = row_split(row, n_layers)
        lengths = np.asarray(split.lengths)
        n_jobs = int((lengths < split.n_tokens).sum())
        at = (scheduler.issue_schedule(lengths, n_jobs, lookahead)[1] if is_direct(row)
              else np.zeros(n_layers, dtype=np.int64))
        for stream, layer, start, end in tl["events"]:
            if stream == "recompute" and lengths[layer] > 0:
                out.append(LayerSample(int(lengths[layer]), int(at[layer]), (end - start) / 1e3, row))
    return out


def fit_nonneg(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error (rows weighted by 1 / time), by active set.

    features : (samples, k) ; times : (samples,) -> (k,) coefficients >= 0.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(times, dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))  # drop the most negative term and refit
    return coef


_nnls_rel = fit_nonneg


def fit_max_form(lengths: Sequence[int], jobs: Sequence[int], seconds: Sequence[float],
                 host_seconds: Sequence[float] | None = None, iters: int = 50) -> dict:
    """Fit max(h + h_job J, a + b L + c L^2) to per-layer times (relative least squares, coefs >= 0).

    Parameters
    ----------
    lengths, jobs, seconds : per-layer samples: recompute length, loader jobs issued at the layer's
        start, the layer's measured time (its device event: max of host and device).
    host_seconds : the host's own time to issue each layer, where measured; then (h, h_job) are fitted
        on those and only the device terms by assignment.
    iters : assignment rounds at most.

    Returns
    -------
    {"host": [h, h_job], "device": [a, b, c], "host_bound": fraction of samples the host bounds}

    Notes
    -----
    Alternating assignment: each sample is attributed to the larger of the two current predictions,
    each side is refitted on its samples (non-negative least squares on relative error), until the
    attribution no longer changes. Starts from the device fit on all samples without jobs and a host
    floor at the 10th percentile of their times.
    """
    L = np.asarray(lengths, dtype=np.float64)
    J = np.asarray(jobs, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if len(t) == 0:
        raise ValueError("fit_max_form needs at least one sample")
    xd = np.stack([np.ones_like(L), L, L * L], axis=1)
    xh = np.stack([np.ones_like(J), J], axis=1)
    no_jobs = J == 0 if (J == 0).any() else np.ones(len(t), dtype=bool)
    device = _nnls_rel(xd[no_jobs], t[no_jobs])
    if host_seconds is not None:
        host = _nnls_rel(xh, np.asarray(host_seconds, dtype=np.float64))
        fixed_host = True
    else:
        host = np.array([float(np.quantile(t[no_jobs], 0.1)), 0.0])
        fixed_host = False
    assign = None
    for _ in range(iters):
        host_bound = xh @ host >= xd @ device
        if assign is not None and (host_bound == assign).all():
            break
        assign = host_bound
        if not fixed_host and host_bound.sum() >= 2:
            host = _nnls_rel(xh[host_bound], t[host_bound])
        if (~host_bound).sum() >= 3:
            device = _nnls_rel(xd[~host_bound], t[~host_bound])
    return {"host": host.tolist(), "device": device.tolist(),
            "host_bound": float((xh @ host >= xd @ device).mean())}


def fit_rates_from_records(rows: Sequence[dict], timelines: Sequence[dict], tier: str = "pinned",
                           n_layers: int = 32, exclude=is_svd_plan_row,
                           models: Iterable[str] | None = None) -> RestoreRates:
    """The `RestoreRates` of one tier refitted on recorded rows and their per-layer timelines.

    Parameters
    ----------
    rows, timelines : `read_rows` / `read_timelines` of one or more bench runs on one device.
    tier : the tier whose load stream and fixed costs are fitted ("pinned", "pageable", "disk").
        The layer model is fitted on every tier's timelines (the device does not change with where
        the bytes come from); the host cost per issued job only shows in direct-mode (pinned) ones.
    n_layers : layers of the recorded models (all the 7-8B shapes have 32).
    exclude : rows left out (default: svd-plan rows, see the module docstring).
    models : only these models' rows (default all).

    Returns
    -------
    RestoreRates whose `load_issue_lookahead` is restore.py's direct lookahead (2) where the tier's
    rows were direct-mode restores, else 0.
    """
    keep = set(models) if models is not None else None
    rows = [r for r in rows if not exclude(r) and (keep is None or r["model"] in keep)]
    samples = layer_samples(rows, timelines, n_layers, DIRECT_LOOKAHEAD, exclude)
    fit = fit_max_form([s.length for s in samples], [s.jobs for s in samples], [s.seconds for s in samples])
    (h, h_job), (a, b, c) = fit["host"], fit["device"]
    tier_rows = [r for r in rows if r["tier"] == tier]
    if not tier_rows:
        raise ValueError(f"no rows of tier {tier!r} to fit the load stream on")
    direct = sum(map(is_direct, tier_rows)) * 2 > len(tier_rows)
    base = RestoreRates(recompute_s_per_token=b, recompute_s_per_token_sq=c, recompute_s_per_layer=a,
                        recompute_host_s_per_layer=h, recompute_host_s_per_job=h_job if direct else 0.0,
                        load_issue_lookahead=DIRECT_LOOKAHEAD if direct else 0)
    # fixed recompute cost: what the tier's recompute-only restores took beyond their layers
    resid = []
    for r in tier_rows:
        split = row_split(r, n_layers)
        if split.recompute_ratio > 0 and float(r.get("loaded_bytes") or 0) == 0:
            resid.append(float(r["restore_s"]) - float(base.layer_times(split.lengths).sum()))
    fixed = max(0.0, float(np.median(resid))) if resid else 0.0
    # load stream: fixed + bytes / bandwidth on the tier's load-only rows
    x, y = [], []
    for r in tier_rows:
        if row_split(r, n_layers).recompute_ratio == 0 and float(r.get("loaded_bytes") or 0) > 0:
            x.append([1.0, float(r["loaded_bytes"])])
            y.append(float(r["restore_s"]))
    if not x:
        raise ValueError(f"no load-only rows of tier {tier!r} to fit the load stream on")
    l_fixed, s_per_byte = _nnls_rel(np.array(x), np.array(y))
    bw = float(1.0 / s_per_byte) if s_per_byte > 0 else math.inf
    return RestoreRates(**{**base.to_dict(), "recompute_s_fixed": fixed, "load_bytes_per_s": bw,
                           "load_s_fixed": float(l_fixed)})  # plain floats: to_dict() stays JSON


def predict_row(row: dict, rates: RestoreRates, n_layers: int = 32) -> float:
    """Predicted restore time (s) of a bench row: max of the two streams of its rebuilt split, its
    loads priced at the row's own loaded bytes (`row_bytes_per_token`)."""
    split = row_split(row, n_layers)
    t_rec, t_load = scheduler.predict(split, rates, row_bytes_per_token(row, split))
    return max(t_rec, t_load)


def predict_layers(row: dict, rates: RestoreRates, n_layers: int = 32) -> np.ndarray:
    """Predicted time (s) of each recomputed layer of a bench row (zeros where L_l = 0)."""
    split = row_split(row, n_layers)
    lengths = np.asarray(split.lengths)
    if not (rates.load_issue_lookahead > 0 and is_direct(row)):
        return rates.layer_times(lengths)
    n_jobs = int((lengths < split.n_tokens).sum())
    return rates.layer_times(lengths, scheduler.issue_schedule(lengths, n_jobs, int(rates.load_issue_lookahead))[1])
