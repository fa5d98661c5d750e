"""Measure the restore cost model on the running machine: `scheduler.RestoreRates` per tier.

`measure_rates(adapter, tier, n_tokens_grid)` times prefix recomputes through the code the restore
itself runs (`restore.recompute_into`) and loads of synthetic states through the restore's own loader
from the tier (pinned or pageable CPU memory, or a state file read with the page cache dropped), and
fits the scheduler's max-form model (`scheduler.RestoreRates`) to them:

    recompute: fixed + sum over recomputed layers of max(host_l, device_l)
               host_l = h + h_job * (loader jobs issued at the layer's start)
               device_l = a + b L_l + c L_l^2
    load:      fixed + per job (one per loaded layer) + bytes / bandwidth, a job starting no
               earlier than it is issued

The recompute probes run from a short prefix (64 tokens) up to the grid's longest, each length as all
layers at full length and as a partial pyramid (layers recomputing shorter and shorter prefixes, the
deepest none). Per layer they record the host's wall time to enqueue the layer's ops (h) and the
device time from events (a, b, c); on CUDA the device is first held by a sleep kernel so the host
enqueues ahead of it and the events time the device alone. On the CPU both are the same measured
time, so the model is its device part (h = 0). For pinned loads on CUDA, whose jobs the recompute
thread issues, a restore of a short-prefix split measures h_job (the layers that issue jobs against
those that do not). Fits are non-negative least squares on relative errors. Results are cached in
memory per (device, model, dtype, tier) (the recompute part per (device, model, dtype)).
`raw_bandwidth` times the tier's plain primitive (a 256 MiB pinned or pageable host-to-device copy, a
large file read), the `B` of the restore bound. Works on CUDA and on the CPU (real small models).

This module knows nothing about policies or plans; it only measures.
"""
from __future__ import annotations

import inspect
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from krul.adapter import BufferCache, ModelAdapter, recompute_into
from krul.costmodel import fit_max_form, fit_nonneg  # noqa: F401  (fit_nonneg: kept importable here)
from krul.restore import DiskSource, drop_page_cache, host_pool, restore_into
from krul.scheduler import RestoreRates, issue_schedule, pyramid_lengths
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


# -- recompute -------------------------------------------------------------------------------------
SHORT_PREFIX = 64  # tokens: the shortest recompute probe, where a GPU layer is bound by its host issue


def probe_lengths(n_tokens: int, n_layers: int) -> dict[str, tuple[int, ...]]:
    """The recompute shapes probed at one length: all layers at `n_tokens`, and a partial pyramid
    (`pyramid_lengths` at ratio 0.5, slope 1: from ~n_tokens at the first layer down to 0)."""
    return {"full": (int(n_tokens),) * n_layers,
            "pyramid": pyramid_lengths(int(n_tokens), n_layers, 0.5, slope=1.0)}


class _LayerTimer:
    """`recompute_into`'s on_layer hook: per layer the host's enqueue time and the device time.

    On CUDA, events on the current stream time the device; `hold_s` > 0 first enqueues a sleep
    kernel of about that long so the host runs ahead and the events time the device alone. On the
    CPU both times are the host's wall time of the layer.
    """

    def __init__(self, device: torch.device, hold_s: float = 0.0):
        self.device = device
        self.cuda = device.type == "cuda"
        self.hold_s = hold_s
        self.host: dict[int, list[float]] = {}
        self.events: dict[int, list] = {}

    def start(self) -> None:
        if self.cuda and self.hold_s > 0 and hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(int(min(self.hold_s, 0.5) * _sleep_cycles_per_s(self.device)))

    def __call__(self, layer_idx: int, what: str) -> None:
        t = time.perf_counter()
        self.host.setdefault(layer_idx, []).append(t)
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.setdefault(layer_idx, []).append(ev)

    def times(self) -> tuple[dict[int, float], dict[int, float]]:
        """({layer: host s}, {layer: device s}); call after synchronizing."""
        host = {l: b - a for l, (a, b) in self.host.items()}
        if not self.cuda:
            return host, dict(host)
        return host, {l: a.elapsed_time(b) / 1e3 for l, (a, b) in self.events.items()}


_SLEEP_RATE: dict[str, float] = {}


def _sleep_cycles_per_s(device: torch.device) -> float:
    """Cycles of `torch.cuda._sleep` per second on this device (measured once)."""
    key = device_label(device)
    if key not in _SLEEP_RATE:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # warm
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        torch.cuda.synchronize(device)
        _SLEEP_RATE[key] = cycles / max(a.elapsed_time(b) / 1e3, 1e-6)
    return _SLEEP_RATE[key]


def measure_recompute(adapter: ModelAdapter, n_tokens_grid: Sequence[int], repeats: int = 3) -> dict:
    """Time pyramid recomputes layer by layer from a short prefix up to the grid's longest; fit.

    The lengths are the grid plus a short prefix (`SHORT_PREFIX` tokens, or the grid's shortest if
    that is shorter); each is probed as all layers and as a partial pyramid (`probe_lengths`).

    Returns
    -------
    {"coef": [fixed, per_layer, per_token, per_token_sq] (the device part and the fixed cost),
     "host": [host s per layer], "samples": one entry per probe with its lengths, wall time and
     per-layer median host and device times}
    """
    device = adapter.device
    grid = sorted({int(n) for n in n_tokens_grid if int(n) > 0})
    if not grid:
        raise ValueError("n_tokens_grid needs at least one positive length")
    grid = sorted(set(grid) | {min(SHORT_PREFIX, grid[0])})
    n_layers = adapter.n_layers
    cuda = device.type == "cuda"
    cache = BufferCache.for_adapter(adapter, max(grid))
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, adapter.config.vocab_size, (1, max(grid)), generator=g).to(device)
    samples = []
    L_s, host_s, dev_s = [], [], []
    with torch.inference_mode():
        for n in grid:
            for shape, lengths in probe_lengths(n, n_layers).items():
                run = lambda hook=None: recompute_into(adapter, ids, lengths, cache, hook)  # noqa: E731
                run()  # warm-up
                walls: list[float] = []
                per_host: dict[int, list[float]] = {}
                per_dev: dict[int, list[float]] = {}

                def timed(hold: float) -> float:
                    timer = _LayerTimer(device, hold)
                    sync(device)
                    t = time.perf_counter()
                    timer.start()
                    run(timer)
                    sync(device)
                    wall = time.perf_counter() - t
                    host, dev = timer.times()
                    for l in host:
                        per_host.setdefault(l, []).append(host[l])
                        per_dev.setdefault(l, []).append(dev[l])
                    return wall

                if cuda and hasattr(torch.cuda, "_sleep"):
                    # plain runs for the wall time; then runs with the device held for the sleep
                    # kernel's length, so the host enqueues ahead and the events time the device alone
                    walls = time_it(run, device, repeats=repeats, warmup=0)
                    hold = 1.5 * float(np.median(walls)) + 1e-3
                    for _ in range(repeats):
                        timed(hold)
                else:
                    walls = [timed(0.0) for _ in range(repeats)]
                layers = sorted(per_host)
                med_h = [float(np.median(per_host[l])) for l in layers]
                med_d = [float(np.median(per_dev[l])) for l in layers]
                for l, h, d in zip(layers, med_h, med_d):
                    L_s.append(lengths[l])
                    host_s.append(h)
                    dev_s.append(d)
                samples.append({"n_tokens": n, "shape": shape, "layers": sum(1 for x in lengths if x > 0),
                                "lengths": list(lengths), "s": float(np.median(walls)),
                                "host_s": med_h, "device_s": med_d})
    del cache
    L_a, h_a, d_a = np.array(L_s, dtype=np.float64), np.array(host_s), np.array(dev_s)
    if cuda:
        host = float(np.median(h_a))
        device_coef = fit_nonneg(np.stack([np.ones_like(L_a), L_a, L_a * L_a], axis=1), d_a)
        if not hasattr(torch.cuda, "_sleep"):  # events timed max(host, device): fit the max form
            fit = fit_max_form(L_a, np.zeros_like(L_a), d_a, host_seconds=h_a)
            host, device_coef = fit["host"][0], np.array(fit["device"])
    else:  # one thread issues and computes: the measured time is the device part, no host floor
        host = 0.0
        device_coef = fit_nonneg(np.stack([np.ones_like(L_a), L_a, L_a * L_a], axis=1), d_a)
    a, b, c = (float(x) for x in device_coef)
    layer_model = RestoreRates(recompute_s_per_token=b, recompute_s_per_token_sq=c, recompute_s_per_layer=a,
                               recompute_host_s_per_layer=host)
    resid = [s["s"] - float(layer_model.layer_times(s["lengths"]).sum()) for s in samples]
    fixed = max(0.0, float(np.median(resid)))
    return {"coef": [fixed, a, b, c], "host": [host], "samples": samples}


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


DIRECT_LOOKAHEAD = int(inspect.signature(restore_into).parameters["lookahead"].default)


def issues_from_recompute_thread(device: torch.device, tier: str) -> bool:
    """Whether the recompute thread issues the loader's jobs: pinned memory on CUDA (restore.py's
    direct mode); elsewhere the loader has its own threads (CPU thread, staging pool readers)."""
    return torch.device(device).type == "cuda" and tier == "pinned"


def measure_issue_cost(adapter: ModelAdapter, n_tokens: int, repeats: int = 3) -> dict:
    """Host cost per loader job issued from the recompute thread (pinned loads on CUDA).

    Restores a state whose every layer recomputes a short prefix and loads the rest (one job per
    layer), so each recomputed layer is bound by its host issue time; the layers that issue jobs at
    their start (`scheduler.issue_schedule`) take longer by the jobs' issue cost. Fits
    t = h + h_job * jobs on the per-layer recompute events (non-negative least squares).

    Returns {"s_per_job": h_job, "s_per_layer": h, "lookahead": restore.py's lookahead, "samples"}.
    """
    n_layers = adapter.n_layers
    short = max(1, min(SHORT_PREFIX, n_tokens // 2))
    lengths = [short] * n_layers
    shape = (1, adapter.n_kv_heads, n_tokens, adapter.head_dim)
    g = torch.Generator(device="cpu").manual_seed(1)
    kv = [(torch.randn(shape, generator=g).to(adapter.dtype), torch.randn(shape, generator=g).to(adapter.dtype))
          for _ in range(n_layers)]
    ids = torch.randint(0, adapter.config.vocab_size, (n_tokens,), generator=g)
    store = MemoryStore(pinned=True)
    store.put("profile-issue", build_state(adapter.fingerprint(), ids, kv, lengths, None))
    stored = store.get("profile-issue")
    del kv
    cache = BufferCache.for_adapter(adapter, n_tokens)
    rows, times = [], []
    try:
        with torch.inference_mode():
            restore_into(adapter, stored, cache, timeline=True)  # warm-up
            for _ in range(repeats):
                rep = restore_into(adapter, stored, cache, timeline=True)
                n_jobs = sum(1 for e in rep.events if e[0] == "h2d")
                _, at = issue_schedule(lengths, n_jobs, DIRECT_LOOKAHEAD)
                for stream, layer, start, end in rep.events:
                    if stream == "recompute":
                        rows.append([1.0, float(at[layer])])
                        times.append((end - start) / 1e3)
    finally:
        store.delete("profile-issue")
    h, h_job = fit_nonneg(np.array(rows), np.array(times))
    return {"s_per_job": float(h_job), "s_per_layer": float(h), "lookahead": DIRECT_LOOKAHEAD,
            "samples": [{"jobs": int(r[1]), "s": t} for r, t in zip(rows, times)]}


def measure_load(adapter: ModelAdapter, tier: str, load_bytes: int | None = None, repeats: int = 3,
                 root: str | Path | None = None, verify: bool = True) -> dict:
    """Time the restore's loader alone from `tier` on synthetic states; fit fixed/per-layer/bandwidth.

    Samples: all layers and the deeper half, each at about `load_bytes` and a quarter of it. Where
    the recompute thread issues the jobs (`issues_from_recompute_thread`), also their host issue
    cost (`measure_issue_cost`, at the smaller size).
    Returns {"coef": [fixed, per_layer, s_per_byte], "samples": [...], "issue": None or
    `measure_issue_cost`'s dict}.
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
    issue = None
    if issues_from_recompute_thread(device, tier):
        issue = measure_issue_cost(adapter, max(2 * SHORT_PREFIX, n_big // 4), repeats)
    return {"coef": coef.tolist(), "samples": samples, "issue": issue}


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

    The recompute part (`measure_recompute`: device terms, host issue floor, fixed cost) is per
    model; the load part (`measure_load`: bandwidth, per-job and fixed costs, and for pinned loads on
    CUDA the host cost of the jobs the recompute thread issues) per tier.

    Parameters
    ----------
    adapter : the model on its device.
    tier : "pinned" | "pageable" | "disk".
    n_tokens_grid : history lengths the recompute fit covers (default 64..1024 on the CPU,
        256..8192 on CUDA), plus a short prefix (`SHORT_PREFIX`) if the grid starts above it; the fit
        is cached per model on first use, pass `force` to refit.
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
    host = (_RECOMPUTE[mkey].get("host") or [0.0])[0]
    l_fixed, l_layer, l_per_byte = _LOAD[key]["coef"]
    issue = _LOAD[key].get("issue")
    # the loader cannot copy faster than the tier's raw large copy: a fitted slope above it (82 GB/s
    # over a 55 GB/s PCIe link on the H200 at 462539c, the per-job term absorbing bytes) is a fit
    # artefact that made the scheduler underprice every load by ~25%
    raw_bytes = None if adapter.device.type == "cuda" else max(8 << 20, int(load_bytes or (32 << 20)))
    raw = raw_bandwidth(tier, adapter.device, nbytes=raw_bytes, root=root)
    bw = min(1.0 / l_per_byte, raw) if l_per_byte > 0 else raw
    rates = RestoreRates(recompute_s_per_token=r_token, recompute_s_per_token_sq=r_sq,
                         recompute_s_per_layer=r_layer, recompute_s_fixed=r_fixed,
                         load_bytes_per_s=bw, load_s_per_layer=l_layer, load_s_fixed=l_fixed,
                         recompute_host_s_per_layer=host,
                         recompute_host_s_per_job=issue["s_per_job"] if issue else 0.0,
                         load_issue_lookahead=issue["lookahead"] if issue else 0)
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
