"""Measure the restore cost model on the running machine: `scheduler.RestoreRates` per tier.

`measure_rates(adapter, tier, n_tokens_grid)` times a few prefix recomputes through the code the
restore itself runs (`restore.recompute_into`) and loads of synthetic states through the restore's
own loader from the tier (pinned or pageable CPU memory, or a state file read with the page cache
dropped), and fits the scheduler's linear model to them:

    recompute: fixed + per_layer * (layers recomputed) + per_token * sum(L_l) + per_token_sq * sum(L_l^2)
    load:      fixed + per_layer * (layers loaded) + bytes / bandwidth

by non-negative least squares on relative errors. Results are cached in memory per
(device, model, dtype, tier) (the recompute part per (device, model, dtype)). `raw_bandwidth` times
the tier's plain primitive (a 256 MiB pinned or pageable host-to-device copy, a large file read), the
`B` of the restore bound. Works on CUDA and on the CPU (real small models).

This module knows nothing about policies or plans; it only measures.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from krul.adapter import BufferCache, ModelAdapter, recompute_into
from krul.restore import DiskSource, drop_page_cache, host_pool, restore_into
from krul.scheduler import RestoreRates
from krul.store import DiskStore, MemoryStore, StoreError, TIERS, build_state

_RECOMPUTE: dict[tuple, dict] = {}
_LOAD: dict[tuple, dict] = {}
_RAW: dict[tuple, float] = {}
_RATES: dict[tuple, RestoreRates] = {}


def device_label(device: torch.device | str) -> str:
    """'cuda:<GPU name>' or 'cpu:<processor>' (the key rates are cached under)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda:" + torch.cuda.get_device_name(device)
    return "cpu:" + (platform.processor() or platform.machine())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall times (s) of `fn()` with the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
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


# -- recompute -------------------------------------------------------------------------------------
def measure_recompute(adapter: ModelAdapter, n_tokens_grid: Sequence[int], repeats: int = 3) -> dict:
    """Time pyramid recomputes (all layers, and the shallower half) at each grid length; fit.

    Returns {"coef": [fixed, per_layer, per_token, per_token_sq], "samples": [...]}.
    """
    device = adapter.device
    grid = sorted({int(n) for n in n_tokens_grid if int(n) > 0})
    if not grid:
        raise ValueError("n_tokens_grid needs at least one positive length")
    n_layers = adapter.n_layers
    cache = BufferCache.for_adapter(adapter, max(grid))
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, adapter.config.vocab_size, (1, max(grid)), generator=g).to(device)
    half = max(1, n_layers // 2)
    samples, rows, times = [], [], []
    with torch.inference_mode():
        for n in grid:
            for n_on in sorted({n_layers, half}):
                lengths = [n] * n_on + [0] * (n_layers - n_on)
                t = float(np.median(time_it(lambda: recompute_into(adapter, ids, lengths, cache), device,
                                            repeats=repeats)))
                samples.append({"n_tokens": n, "layers": n_on, "s": t})
                rows.append([1.0, n_on, n * n_on, float(n) * n * n_on])
                times.append(t)
    del cache
    coef = fit_nonneg(np.array(rows), np.array(times))
    return {"coef": coef.tolist(), "samples": samples}


# -- loads -----------------------------------------------------------------------------------------
def _synthetic_state(adapter: ModelAdapter, n_tokens: int, n_loaded_layers: int):
    """A state whose last `n_loaded_layers` layers store `n_tokens` exact tokens (contents random)."""
    n_layers = adapter.n_layers
    shape = (1, adapter.n_kv_heads, n_tokens, adapter.head_dim)
    kv = [(torch.empty(shape, dtype=adapter.dtype), torch.empty(shape, dtype=adapter.dtype))
          for _ in range(n_layers)]
    for k, v in kv[n_layers - n_loaded_layers:]:  # values do not matter for timing; defined bytes do
        k.fill_(0.5)
        v.fill_(-0.5)
    lengths = [n_tokens] * (n_layers - n_loaded_layers) + [0] * n_loaded_layers
    ids = torch.zeros(n_tokens, dtype=torch.int64)
    return build_state(adapter.fingerprint(), ids, kv, lengths, None)


def measure_load(adapter: ModelAdapter, tier: str, load_bytes: int | None = None, repeats: int = 3,
                 root: str | Path | None = None, verify: bool = True) -> dict:
    """Time the restore's loader alone from `tier` on synthetic states; fit fixed/per-layer/bandwidth.

    Samples: all layers and the deeper half, each at about `load_bytes` and a quarter of it.
    Returns {"coef": [fixed, per_layer, s_per_byte], "samples": [...]}.
    """
    if tier not in TIERS:
        raise StoreError(f"unknown tier {tier!r}; known: {', '.join(TIERS)}")
    device = adapter.device
    if load_bytes is None:
        load_bytes = (512 << 20) if device.type == "cuda" else (32 << 20)
    n_layers = adapter.n_layers
    per_token = adapter.layer_kv_bytes_per_token() * n_layers
    n_big = max(16, int(load_bytes // per_token))
    half = max(1, n_layers // 2)
    cache = BufferCache.for_adapter(adapter, n_big)
    tmp = None
    if tier == "disk":
        tmp = tempfile.mkdtemp(prefix="krul-profile-", dir=root)
        store = DiskStore(tmp)
    else:
        store = MemoryStore(pinned=tier == "pinned")
    samples, rows, times = [], [], []
    try:
        with torch.inference_mode():
            for n in (max(8, n_big // 4), n_big):
                for n_on in sorted({n_layers, half}):
                    state = _synthetic_state(adapter, n, n_on)
                    nbytes = state.kv_bytes()
                    store.put("profile", state)
                    del state
                    if tier == "disk":
                        path = store.path("profile")

                        def once():
                            drop_page_cache(path)
                            sync(device)
                            t = time.perf_counter()
                            restore_into(adapter, DiskSource(path), cache, recompute=False, verify=verify)
                            return time.perf_counter() - t
                    else:
                        stored = store.get("profile")

                        def once():
                            sync(device)
                            t = time.perf_counter()
                            restore_into(adapter, stored, cache, recompute=False)
                            return time.perf_counter() - t
                    once()  # warm-up
                    t = float(np.median([once() for _ in range(repeats)]))
                    samples.append({"n_tokens": n, "layers": n_on, "bytes": nbytes, "s": t})
                    rows.append([1.0, n_on, float(nbytes)])
                    times.append(t)
                    store.delete("profile")
                    stored = None
    finally:
        if tmp is not None:
            for p in Path(tmp).glob("*"):
                p.unlink(missing_ok=True)
            os.rmdir(tmp)
    coef = fit_nonneg(np.array(rows), np.array(times))
    return {"coef": coef.tolist(), "samples": samples}


def raw_bandwidth(tier: str, device: torch.device | str, nbytes: int | None = None, repeats: int = 3,
                  root: str | Path | None = None) -> float:
    """Best bytes/s of the tier's plain primitive: a pinned or pageable host-to-device copy
    (a host memcpy on the CPU), or a sequential read of a large file with the page cache dropped."""
    device = torch.device(device)
    key = (device_label(device), tier, nbytes)
    if key in _RAW:
        return _RAW[key]
    cuda = device.type == "cuda"
    if tier == "pinned" and not cuda:
        raise StoreError("tier 'pinned' needs CUDA")
    if tier in ("pinned", "pageable"):
        nbytes = nbytes or (256 << 20)
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=tier == "pinned" and cuda)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        best = min(time_it(lambda: dst.copy_(src, non_blocking=tier == "pinned"), device,
                           repeats=max(3, repeats), warmup=2))
        del src, dst
        _RAW[key] = nbytes / best
        return _RAW[key]
    if tier != "disk":
        raise StoreError(f"unknown tier {tier!r}; known: {', '.join(TIERS)}")
    nbytes = nbytes or ((1 << 30) if cuda else (128 << 20))
    pool = host_pool(device)
    block = np.random.default_rng(0).integers(0, 256, pool.slot_bytes, dtype=np.uint8).tobytes()
    fd, path = tempfile.mkstemp(prefix="krul-bw-", suffix=".bin", dir=root)
    try:
        with os.fdopen(fd, "wb") as f:
            written = 0
            while written < nbytes:
                f.write(block[:min(len(block), nbytes - written)])
                written += min(len(block), nbytes - written)
        best = float("inf")
        for n_threads in (1, 4):  # one sequential reader, and as many as the restore's loader uses
            for _ in range(max(1, repeats - 1)):
                drop_page_cache(path)
                best = min(best, _timed_read(path, nbytes, pool, n_threads))
    finally:
        os.unlink(path)
    _RAW[key] = nbytes / best
    return _RAW[key]


def _timed_read(path: str, nbytes: int, pool, n_threads: int) -> float:
    """Seconds to read `nbytes` of `path` in slot-sized chunks, chunk k by thread k % n_threads."""
    import threading

    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        n_chunks = -(-nbytes // pool.slot_bytes)

        def work(r: int) -> None:
            for k in range(r, n_chunks, n_threads):
                off = k * pool.slot_bytes
                view = memoryview(pool.arrays[r % pool.n_slots])[:min(pool.slot_bytes, nbytes - off)]
                while len(view):
                    got = os.preadv(fd, [view], off)
                    if got <= 0:
                        return
                    view, off = view[got:], off + got

        threads = [threading.Thread(target=work, args=(r,)) for r in range(n_threads)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t
    finally:
        os.close(fd)


# -- the rates -------------------------------------------------------------------------------------
def _model_key(adapter: ModelAdapter) -> tuple:
    return (device_label(adapter.device), adapter.name, str(adapter.dtype))


def measure_rates(adapter: ModelAdapter, tier: str, n_tokens_grid: Sequence[int] | None = None,
                  repeats: int = 3, root: str | Path | None = None, load_bytes: int | None = None,
                  verify: bool = True, force: bool = False) -> RestoreRates:
    """The scheduler's `RestoreRates` for this model and tier, measured now (cached in memory).

    Parameters
    ----------
    adapter : the model on its device.
    tier : "pinned" | "pageable" | "disk".
    n_tokens_grid : history lengths the recompute fit covers (default 64..1024 on the CPU,
        256..8192 on CUDA); the fit is cached per model on first use, pass `force` to refit.
    root : folder for the disk tier's scratch files.
    load_bytes : size of the largest synthetic load (default 512 MiB on CUDA, 32 MiB on the CPU).
    verify : disk loads check the file's sha256 as the restore does (it can bound the rate).
    """
    key = _model_key(adapter) + (tier,) + (("verified",) if tier == "disk" and verify else ())
    if key in _RATES and not force:
        return _RATES[key]
    if n_tokens_grid is None:
        n_tokens_grid = (256, 1024, 4096, 8192) if adapter.device.type == "cuda" else (64, 256, 1024)
    mkey = _model_key(adapter)
    if mkey not in _RECOMPUTE or force:
        _RECOMPUTE[mkey] = measure_recompute(adapter, n_tokens_grid, repeats)
    if key not in _LOAD or force:
        _LOAD[key] = measure_load(adapter, tier, load_bytes, repeats, root, verify)
    r_fixed, r_layer, r_token, r_sq = _RECOMPUTE[mkey]["coef"]
    l_fixed, l_layer, l_per_byte = _LOAD[key]["coef"]
    bw = 1.0 / l_per_byte if l_per_byte > 0 else raw_bandwidth(tier, adapter.device, root=root)
    rates = RestoreRates(recompute_s_per_token=r_token, recompute_s_per_token_sq=r_sq,
                         recompute_s_per_layer=r_layer, recompute_s_fixed=r_fixed,
                         load_bytes_per_s=bw, load_s_per_layer=l_layer, load_s_fixed=l_fixed)
    _RATES[key] = rates
    return rates


def rates_details(adapter: ModelAdapter, tier: str, verify: bool = True) -> dict:
    """The samples and fits behind `measure_rates(adapter, tier)` (for environment records)."""
    key = _model_key(adapter) + (tier,) + (("verified",) if tier == "disk" and verify else ())
    return {"device": key[0], "model": key[1], "dtype": key[2], "tier": tier,
            "rates": _RATES[key].to_dict() if key in _RATES else None,
            "recompute": _RECOMPUTE.get(_model_key(adapter)), "load": _LOAD.get(key)}


def clear_cache() -> None:
    """Forget every measured rate (tests)."""
    for d in (_RECOMPUTE, _LOAD, _RAW, _RATES):
        d.clear()
