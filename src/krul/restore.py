"""Execute a restore: recompute the pyramid's prefixes and load the rest, overlapped.

Given a stored state (a `StoredState` in CPU memory, pinned or pageable, or a `DiskSource`: a state
file of `store.DiskStore`, read during the restore) and a model adapter, write every history token's
KV into preallocated per-layer device buffers (`BufferCache`): layer l's tokens [0:L_l] are
recomputed (layer by layer on sliced hidden states, `recompute_into`), tokens [L_l:N] are loaded
(copied to the device and, for compressed pairs, expanded; an evicted (H2O) layer's kept tokens go to
the first slots of its buffer and the layer is told which positions they are,
`BufferLayer.hold_evicted`, so its KV length is less than the history's). The two parts of a layer are disjoint
regions of the same buffer, so nothing is concatenated and nothing is copied twice; the model then
continues from the same `BufferCache` (a transformers `Cache` whose layers write in place).
The engine's turns and the figures' timings restore through `restore_cache` (a fresh cache sized for
the history and what follows it), the bench through `restore_into` (buffers it allocated outside the
timed region): the same executor either way.

How the streams run:
- CUDA: recompute on its own stream; host-to-device copies on a copy stream; expansion and placement
  into the buffers on a third stream that waits per item on the copy stream (so the copy engine never
  idles behind a kernel). Pinned sources are copied directly, their copies enqueued a few items at a
  time between recomputed layers (layer l+1 copies while layer l computes): each batch's copies
  first, then its placements (the host issues expansion ops while the copy engine works). An item
  packed by the pinned `MemoryStore` (one page-locked blob laid out as its staging buffer,
  `store.pack_payload`) is one copy; other pinned sources one copy per stored tensor. Pageable and
  disk sources go through a preallocated pool of page-locked slots (`HostPool`): reader threads fill slots
  (memcpy, or file reads with the page cache dropped by the caller), an issuer thread enqueues the
  slot-to-device copies, a hasher thread checks the disk body's sha256 as it streams by. Nothing is
  pinned on the restore path. The streams are joined once before returning (`join="end"`), or per
  layer by the consumer (`join="layer"`: each layer's first use waits for that layer's ready events,
  so the new input's forward starts on shallow layers while deeper ones are still arriving).
- CPU: the loader runs on a worker thread while the main thread recomputes.
Per-stream CUDA events (or host clocks on the CPU) give the measured stream times and, with
`timeline=True`, a per-layer timeline `(stream, layer, start_ms, end_ms)` relative to the start.

This module knows nothing about which policy chose the state's plan; it executes what the state says.
It has no contact with transformers internals: the buffer cache and the layer-by-layer recompute
(`BufferCache`, `recompute_into`) live in `adapter.py` and are re-exported here.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from krul import h2o
from krul.adapter import KV, BufferCache, BufferLayer, ModelAdapter, recompute_into  # noqa: F401 (re-exported)
from krul.store import (ALIGN, MAGIC, StoredItem, StoredState, StoreError, drop_page_cache,  # noqa: F401
                        packed_layout, payload_from_tensors, check_fingerprint)  # drop_page_cache: re-exported
from krul.store import (_FIX, DTYPES, PREFIX_NBYTES, CorruptStateError, MissingStateError, check_token_ids,
                        parse_header, parse_prefix, state_from_header)


# =============================================================================================
# Sources: what a restore reads from
# =============================================================================================

@dataclass(frozen=True)
class FileTensor:
    """Where one stored tensor lies in a state file."""

    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class FilePayload:
    """A stored payload still on disk: its tensors' locations, read during the restore."""

    method: str
    files: dict[str, FileTensor]
    extra: dict

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.files.values())

    def meta(self) -> dict:
        return self.extra


@dataclass
class OpenedFile:
    """A state file's header: the state (with `FilePayload`s) and where its body lies."""

    path: Path
    state: StoredState
    body_offset: int
    body_nbytes: int
    body_sha256: str


class DiskSource:
    """A state file written by `store.DiskStore`, restored by streaming it from the disk.

    Nothing is read until `restore_into` opens it (the header read is part of the restore). The
    caller drops the page cache beforehand if it wants cold reads (`drop_page_cache`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def open(self) -> OpenedFile:
        return open_state_file(self.path)


def _pread_exact(fd: int, nbytes: int, offset: int, source: str = "state file") -> bytes:
    out = bytearray()
    while len(out) < nbytes:
        chunk = os.pread(fd, nbytes - len(out), offset + len(out))
        if not chunk:
            raise CorruptStateError(f"{source}: the file ends early (wanted {nbytes} bytes at offset "
                                    f"{offset}); the stored state is corrupted: {_FIX}")
        out += chunk
    return bytes(out)


def open_state_file(path: str | Path) -> OpenedFile:
    """Parse a `store.serialize` file's prefix and header (checksummed and validated by
    `store.parse_header`) and its token ids (checked against their sha256); every other tensor stays
    on disk as a `FileTensor`. The body's sha256 is checked while a verified restore streams it.
    A missing file is a `MissingStateError`, a damaged one a `CorruptStateError`."""
    path = Path(path)
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise MissingStateError(f"no stored state at {path}: the file does not exist") from None
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, PREFIX_NBYTES, 0)
        n = parse_prefix(prefix, size, source)
        header = parse_header(prefix, _pread_exact(fd, n, PREFIX_NBYTES, source), size, source)
        body = PREFIX_NBYTES + n
        table = header["tensors"]

        def locate(name: str) -> FileTensor:
            e = table[name]
            return FileTensor(body + e["offset"], e["nbytes"], DTYPES[e["dtype"]], tuple(e["shape"]))

        ids = table["token_ids"]
        token_ids = check_token_ids(_pread_exact(fd, ids["nbytes"], body + ids["offset"], source), header,
                                    source)
    finally:
        os.close(fd)

    def payload_for(i, method, names, meta):
        return FilePayload(method, {key: locate(f"{i}.{key}") for key in names}, meta)

    state = state_from_header(header, token_ids, payload_for, source)
    return OpenedFile(path, state, body, header["body_nbytes"], header["body_sha256"])


# =============================================================================================
# Host staging pool and streams (allocated once, reused by every restore)
# =============================================================================================
class HostPool:
    """Preallocated staging slots for pageable and disk loads: page-locked when CUDA is used.

    Allocating (pinning) happens here, once; restores only reuse the slots.
    """

    def __init__(self, n_slots: int = 16, slot_bytes: int = 16 << 20, pin: bool = True):
        if n_slots < 2 or slot_bytes < 4096:
            raise ValueError("HostPool needs >= 2 slots of >= 4 KiB")
        self.n_slots, self.slot_bytes, self.pinned = n_slots, slot_bytes, pin
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n_slots)]
        self.arrays = [s.numpy() for s in self.slots]  # the same memory, for os.preadv and hashlib

    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes


_POOLS: dict[tuple, HostPool] = {}
_STREAMS: dict[int, tuple] = {}


def host_pool(device: torch.device, n_slots: int = 16, slot_bytes: int = 16 << 20) -> HostPool:
    """The process-wide pool for `device` (pinned for CUDA), allocated on first use."""
    key = (device.type, n_slots, slot_bytes)
    if key not in _POOLS:
        _POOLS[key] = HostPool(n_slots, slot_bytes, pin=device.type == "cuda")
    return _POOLS[key]


def _cuda_streams(device: torch.device) -> tuple:
    """(copy, place, recompute) side streams of `device`, created once.

    The recompute stream has the highest priority the device offers: the first token waits on it,
    and the placement kernels (expansion of compressed pairs) must fill the SMs it leaves idle, not
    delay its layers. Copies run on the copy engines, where priority does not apply."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _STREAMS:
        high = torch.cuda.Stream.priority_range()[1] if hasattr(torch.cuda.Stream, "priority_range") else -1
        _STREAMS[idx] = (torch.cuda.Stream(device=idx), torch.cuda.Stream(device=idx),
                         torch.cuda.Stream(device=idx, priority=high))
    return _STREAMS[idx]


class _Clock:
    """Marks on CUDA streams (events) or the host clock; resolved to ms after the restore."""

    def __init__(self, device: torch.device, detailed: bool):
        self.cuda = device.type == "cuda"
        self.detailed = detailed
        self.spans: list[tuple[str, object, object, object]] = []
        self.t0 = time.perf_counter()
        self.t0_ev = None
        if self.cuda:
            self.t0_ev = torch.cuda.Event(enable_timing=True)
            self.t0_ev.record()

    def mark(self, stream=None):
        if not self.cuda or stream is None:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def ms(self, handle) -> float:
        if isinstance(handle, float):
            return (handle - self.t0) * 1e3
        return self.t0_ev.elapsed_time(handle)

    def add(self, stream_name: str, layers, start, end) -> None:
        self.spans.append((stream_name, layers, start, end))

    def resolve(self) -> list[tuple[str, int, float, float]]:
        out = []
        for name, layers, a, b in self.spans:
            a_ms, b_ms = self.ms(a), self.ms(b)
            for layer in (layers if isinstance(layers, (tuple, list)) else (layers,)):
                out.append((name, int(layer), round(a_ms, 4), round(b_ms, 4)))
        return sorted(out, key=lambda e: (e[2], e[0], e[1]))


# =============================================================================================
# The loader
# =============================================================================================
_ALIGN = ALIGN  # store.packed_layout's alignment: a packed item's blob is its staging buffer's image


@dataclass
class _Job:
    """One stored item to bring into the buffers."""

    item: StoredItem
    method: str
    extra: dict
    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[tuple[int, ...]]
    nbytes: list[int]
    offsets: list[int]  # in the job's staging buffer
    sources: list  # host tensors (memory states) or FileTensor (disk)
    total: int = 0
    # memory sources packed by `store.pack_payload`: the uint8 view of the `total` bytes they lie in,
    # laid out as the staging buffer (copied to the device in one copy); None: copied tensor by tensor
    blob: torch.Tensor | None = None
    staging: torch.Tensor | None = None
    remaining: int = 0

    def tensors_from(self, staging: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, dt, shape, nb, off in zip(self.names, self.dtypes, self.shapes, self.nbytes, self.offsets):
            out[name] = staging[off:off + nb].view(dt).view(shape)
        return out


def _make_jobs(state: StoredState) -> list[_Job]:
    lengths = state.recompute_lengths
    jobs = []
    for item in sorted(state.items, key=lambda it: (min(it.layers), it.start)):
        if all(item.end <= lengths[l] for l in item.layers):
            continue  # everything it holds is recomputed
        payload = item.payload
        if isinstance(payload, FilePayload):
            names = sorted(payload.files)
            sources = [payload.files[n] for n in names]
            dtypes = [s.dtype for s in sources]
            shapes = [s.shape for s in sources]
            nbytes = [s.nbytes for s in sources]
            method, extra = payload.method, payload.meta()
        else:
            named = payload.tensors()
            names = sorted(named)
            sources = [named[n] for n in names]
            dtypes = [t.dtype for t in sources]
            shapes = [tuple(t.shape) for t in sources]
            nbytes = [t.numel() * t.element_size() for t in sources]
            method, extra = payload.method, payload.meta()
        offsets, pos = packed_layout(nbytes, _ALIGN)
        blob = None if isinstance(payload, FilePayload) else _packed_blob(sources, nbytes, offsets, pos)
        jobs.append(_Job(item, method, extra, names, dtypes, shapes, nbytes, offsets, sources, pos, blob))
    return jobs


def _packed_blob(sources: Sequence[torch.Tensor], nbytes: Sequence[int], offsets: Sequence[int],
                 total: int) -> torch.Tensor | None:
    """The uint8 view of the `total` bytes that `sources` lie in when they are laid out exactly as the
    job's staging buffer (contiguous CPU tensors of one storage at `offsets` from a common base, as
    `store.pack_payload` writes them); None otherwise (e.g. separate tensors, a cropped packed item)."""
    base = storage = None
    for t, nb, off in zip(sources, nbytes, offsets):
        if not nb:
            continue  # nothing of it is copied
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        st = t.untyped_storage()
        at = t.data_ptr() - off
        if base is None:
            base, storage = at, st
        elif at != base or st.data_ptr() != storage.data_ptr():
            return None
    if base is None:
        return None
    start = base - storage.data_ptr()
    if start < 0 or start + total > storage.nbytes():
        return None
    return torch.empty(0, dtype=torch.uint8).set_(storage, start, (total,))


def _copies_then_placements(batch: Sequence[_Job], copy, place) -> None:
    """Issue a batch of jobs: every job's host-to-device copy first (`copy(job)` -> its copied event),
    then every placement (`place(job, event)`), so the copy engine has the whole batch's bytes before
    the host spends its time issuing the placement (expansion) ops."""
    events = [copy(job) for job in batch]
    for job, ev in zip(batch, events):
        place(job, ev)


def _place(job: _Job, tensors: dict[str, torch.Tensor], cache: BufferCache,
           lengths: Sequence[int]) -> None:
    """Write a job's loaded tokens into each layer's buffers (on the current stream).

    Layer l of the item loads tokens [max(start, L_l), end) (the rest is recomputed), written straight
    into the buffer views `buf[:, :, begin:end]`: compressed pairs are reconstructed there by
    `compression.place_pair` (KV-dtype ops with `out=`, no full-size temporaries), exact layers copied;
    quantized payloads (`quant.QuantizedPayload`, method "quant") dequantize in the KV dtype in their
    own `place` and then place as their inner payload.
    """
    payload = payload_from_tensors(job.method, tensors, job.extra)
    item = job.item
    outs, skips = [], []
    for layer_idx in item.layers:
        begin = min(max(item.start, int(lengths[layer_idx])), item.end)
        skips.append(begin - item.start)  # leading segment tokens recomputed, not loaded
        k_buf, v_buf = cache.buffers(layer_idx)
        outs.append((k_buf[:, :, begin:item.end], v_buf[:, :, begin:item.end]) if begin < item.end else None)
    if job.method != "exact":  # compressed pairs, quantized payloads of any inner method, evicted layers
        payload.place(outs, skips)
        if job.method == h2o.METHOD:  # slots [0, kept) hold the kept positions of the item's [0, end)
            cache.layers[item.layers[0]].hold_evicted(item.end, payload.positions, payload.scores)
        return
    for out, skip, kv in zip(outs, skips, payload.expand()):
        if out is not None:
            for view, x in zip(out, kv):
                view.copy_(x[:, :, skip:])


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class _Abort(Exception):
    pass


class _Loader:
    """Moves a state's stored items into a `BufferCache` on the load streams (or a CPU thread).

    Modes: "direct" (memory sources copied straight from where they lie: pinned memory to a CUDA
    device, or any memory on the CPU) and "pool" (pageable memory or a file, staged through the
    `HostPool` by reader threads).
    """

    def __init__(self, state: StoredState, cache: BufferCache, device: torch.device, clock: _Clock,
                 opened: OpenedFile | None, verify: bool, pool: HostPool | None, n_readers: int | None):
        self.state, self.cache, self.device, self.clock = state, cache, device, clock
        self.lengths = state.recompute_lengths
        self.opened = opened
        self.verify = verify and opened is not None and bool(opened.body_sha256)
        self.cuda = device.type == "cuda"
        self.jobs = _make_jobs(state)
        self.loaded_bytes = sum(sum(j.nbytes) for j in self.jobs)
        self.copy_stream = self.place_stream = None
        if self.cuda:
            self.copy_stream, self.place_stream, _ = _cuda_streams(device)
        if not self.jobs:  # nothing is loaded (all recomputed): no source is read, whatever its tier
            self.mode = "none"
        elif opened is not None:
            self.mode = "pool"
        elif self.cuda:
            pinned = all(s.is_pinned() for j in self.jobs for s in j.sources if s.numel())
            self.mode = "direct" if pinned else "pool"
        else:
            self.mode = "direct"
        self.pool = pool
        if self.mode == "pool" and self.pool is None:
            self.pool = host_pool(device)
        self.n_readers = n_readers or (4 if opened is not None else 2)
        self.next_job = 0
        self.last = None  # last mark (placement end)
        self.hash_s = 0.0
        self.read_s = 0.0
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.abort = False
        self.layer_ready: dict[int, object] = {}

    # -- common --------------------------------------------------------------------------------
    def _stream_ctx(self, stream):
        return torch.cuda.stream(stream) if self.cuda else _null_ctx()

    def _finish_job(self, job: _Job, copied_event) -> None:
        """Enqueue expansion and placement of a fully staged job on the place stream."""
        with self._stream_ctx(self.place_stream):
            if self.cuda:
                self.place_stream.wait_event(copied_event)
                job.staging.record_stream(self.place_stream)
            a = self.clock.mark(self.place_stream) if self.clock.detailed else None
            _place(job, job.tensors_from(job.staging), self.cache, self.lengths)
            b = self.clock.mark(self.place_stream)
            if a is not None:
                self.clock.add("place", job.item.layers, a, b)
            self.last = b
            for layer_idx in job.item.layers:  # the latest placement of a layer is its ready event
                self.layer_ready[layer_idx] = b
        job.staging = None

    # -- direct mode ---------------------------------------------------------------------------
    def issue_direct(self, n_jobs: int | None = None) -> None:
        """Enqueue (CUDA) or run (CPU) the next `n_jobs` jobs (all if None).

        CUDA: the batch's copies are all enqueued before its placements (`_copies_then_placements`)."""
        end = len(self.jobs) if n_jobs is None else min(len(self.jobs), self.next_job + n_jobs)
        if not self.cuda:
            while self.next_job < end:
                job = self.jobs[self.next_job]
                self.next_job += 1
                # memory on the CPU: the sources are already where they are used
                a = self.clock.mark()
                _place(job, dict(zip(job.names, job.sources)), self.cache, self.lengths)
                self.last = self.clock.mark()
                if self.clock.detailed:
                    self.clock.add("load", job.item.layers, a, self.last)
            return
        batch = self.jobs[self.next_job:end]
        self.next_job = max(self.next_job, end)
        _copies_then_placements(batch, self._copy_direct, self._finish_job)

    def _copy_direct(self, job: _Job):
        """Enqueue a job's host-to-device copy into a fresh staging buffer on the copy stream: one
        copy of its packed blob, or one per stored tensor; returns the event recorded after it."""
        with torch.cuda.stream(self.copy_stream):
            a = self.clock.mark(self.copy_stream) if self.clock.detailed else None
            job.staging = torch.empty(job.total, dtype=torch.uint8, device=self.device)
            if job.blob is not None:
                job.staging.copy_(job.blob, non_blocking=True)
            else:
                for src, nb, off in zip(job.sources, job.nbytes, job.offsets):
                    if nb:
                        job.staging[off:off + nb].copy_(_flat_bytes(src), non_blocking=True)
            copied = torch.cuda.Event(enable_timing=self.clock.detailed)
            copied.record(self.copy_stream)
            if self.clock.detailed:
                self.clock.add("h2d", job.item.layers, a, copied)
        return copied

    def issue_all(self, batch: int) -> None:
        """Issue every remaining job, `batch` at a time, each batch's copies before its placements:
        the body of the loader's own issue thread (`restore_into(issue="thread")`), so the
        recompute launches on the calling thread never wait behind the loader's issue work."""
        while self.pending:
            if self.abort:
                raise _Abort()
            self.issue_direct(max(1, batch))

    @property
    def pending(self) -> int:
        return len(self.jobs) - self.next_job

    # -- pool mode -----------------------------------------------------------------------------
    def start_pool(self) -> None:
        """Start reader, issuer (and hasher) threads streaming the sources through the pool."""
        pool = self.pool
        segs = []  # (stream_pos, nbytes, job, staging_offset)
        if self.opened is not None:
            base = self.opened.body_offset
            self.total = self.opened.body_nbytes
            for job in self.jobs:
                for src, nb, off in zip(job.sources, job.nbytes, job.offsets):
                    if nb:
                        segs.append((src.offset - base, nb, job, off))
            self.extents = [(0, self.total, ("file", base))]
        else:
            pos, self.extents = 0, []
            for job in self.jobs:
                for src, nb, off in zip(job.sources, job.nbytes, job.offsets):
                    if nb:
                        self.extents.append((pos, nb, ("tensor", _flat_bytes(src))))
                        segs.append((pos, nb, job, off))
                        pos += nb
            self.total = pos
        segs.sort(key=lambda s: s[0])
        self.segs = segs
        for job in self.jobs:
            job.remaining = sum(job.nbytes)
        self.n_chunks = -(-self.total // pool.slot_bytes) if self.total else 0
        n = self.n_chunks
        self.read_done = [threading.Event() for _ in range(n)]
        self.issued = [threading.Event() for _ in range(n)]
        self.hashed = [threading.Event() for _ in range(n)]
        self.copy_events: list = [None] * n
        self.read_marks: list = [None] * n
        self.abort = False
        self.digest = hashlib.sha256() if self.verify else None
        self.h2d_marks: list = []
        # jobs of zero bytes (empty token ranges) complete without data
        self._empty_jobs = [j for j in self.jobs if j.remaining == 0]
        self.n_readers = max(1, min(self.n_readers, pool.n_slots, n))
        for r in range(self.n_readers):
            self.spawn(self._reader, r)
        self.spawn(self._issuer)
        if self.verify:
            self.spawn(self._hasher)

    def spawn(self, fn, *args) -> None:
        def run():
            try:
                with torch.inference_mode():
                    if self.cuda:
                        with torch.cuda.device(self.device):
                            fn(*args)
                    else:
                        fn(*args)
            except _Abort:
                pass
            except BaseException as exc:  # re-raised by join()
                self.errors.append(exc)
                self.abort = True

        t = threading.Thread(target=run, name=f"krul-{fn.__name__.strip('_')}", daemon=True)
        self.threads.append(t)
        t.start()

    def _wait(self, ev: threading.Event) -> None:
        while not ev.wait(0.02):
            if self.abort:
                raise _Abort()

    def _chunk(self, k: int) -> tuple[int, int]:
        s = self.pool.slot_bytes
        return k * s, min(self.total, (k + 1) * s)

    def _reader(self, r: int) -> None:
        pool = self.pool
        fd = None
        if self.opened is not None:
            fd = os.open(self.opened.path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        try:
            for k in range(r, self.n_chunks, self.n_readers):
                slot = k % pool.n_slots
                j = k - pool.n_slots
                if j >= 0:  # the slot's previous chunk must be copied out (and hashed)
                    self._wait(self.issued[j])
                    if self.copy_events[j] is not None:
                        self.copy_events[j].synchronize()
                    if self.verify:
                        self._wait(self.hashed[j])
                lo, hi = self._chunk(k)
                t = time.perf_counter()
                self._fill(pool, slot, lo, hi, fd)
                self.read_marks[k] = (t, time.perf_counter())
                self.read_done[k].set()
        finally:
            if fd is not None:
                os.close(fd)

    def _fill(self, pool: HostPool, slot: int, lo: int, hi: int, fd) -> None:
        """Copy stream bytes [lo, hi) into the slot."""
        for pos, nb, (kind, src) in self.extents:
            a, b = max(lo, pos), min(hi, pos + nb)
            if a >= b:
                continue
            if kind == "file":
                view = memoryview(pool.arrays[slot])[a - lo:b - lo]
                off = src + a - pos
                while len(view):
                    got = os.preadv(fd, [view], off)
                    if got <= 0:
                        raise StoreError(f"{self.opened.path}: file ends early at byte {off}")
                    view, off = view[got:], off + got
            else:
                pool.slots[slot][a - lo:b - lo].copy_(src[a - pos:b - pos])

    def _hasher(self) -> None:
        pool = self.pool
        for k in range(self.n_chunks):
            self._wait(self.read_done[k])
            lo, hi = self._chunk(k)
            t = time.perf_counter()
            self.digest.update(memoryview(pool.arrays[k % pool.n_slots])[:hi - lo])
            self.hash_s += time.perf_counter() - t
            self.hashed[k].set()

    def _issuer(self) -> None:
        pool = self.pool
        seg_i = 0
        segs = self.segs
        for job in self._empty_jobs:
            job.staging = torch.empty(job.total, dtype=torch.uint8, device=self.device)
            with self._stream_ctx(self.copy_stream):
                ev = self.clock.mark(self.copy_stream) if self.cuda else None
            self._finish_job(job, ev)
        for k in range(self.n_chunks):
            self._wait(self.read_done[k])
            lo, hi = self._chunk(k)
            slot = pool.slots[k % pool.n_slots]
            done_jobs = []
            with self._stream_ctx(self.copy_stream):
                a = self.clock.mark(self.copy_stream) if self.clock.detailed else None
                while seg_i < len(segs) and segs[seg_i][0] < hi:
                    pos, nb, job, off = segs[seg_i]
                    s, e = max(lo, pos), min(hi, pos + nb)
                    if s < e:
                        if job.staging is None:
                            job.staging = torch.empty(job.total, dtype=torch.uint8, device=self.device)
                        d = off + (s - pos)
                        job.staging[d:d + (e - s)].copy_(slot[s - lo:e - lo], non_blocking=True)
                        job.remaining -= e - s
                        if job.remaining == 0:
                            done_jobs.append(job)
                    if pos + nb <= hi:
                        seg_i += 1
                    else:
                        break  # the segment continues in the next chunk
                ev = None
                if self.cuda:
                    ev = torch.cuda.Event(enable_timing=self.clock.detailed)
                    ev.record(self.copy_stream)
                self.copy_events[k] = ev
                if a is not None:
                    self.h2d_marks.append((k, a, ev if ev is not None else self.clock.mark()))
            self.issued[k].set()
            for job in done_jobs:
                self._finish_job(job, ev)

    # -- end -----------------------------------------------------------------------------------
    def join(self) -> None:
        """Wait for the host threads (not the device streams); re-raise their first error."""
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        if self.mode == "pool":
            self.read_s = sum(b - a for a, b in (m for m in self.read_marks if m is not None))
            if self.clock.detailed:
                for k, m in enumerate(self.read_marks):
                    if m is not None:
                        self.clock.add("read", self._chunk_layer(k), m[0], m[1])
                for k, a, b in self.h2d_marks:
                    self.clock.add("h2d", self._chunk_layer(k), a, b)
            if self.verify and self.digest.hexdigest() != self.opened.body_sha256:
                raise StoreError(f"{self.opened.path}: checksum mismatch, the stored KV is corrupted; "
                                 "delete it and recompute the conversation")
            if any(j.staging is not None for j in self.jobs) or any(j.remaining for j in self.jobs):
                raise StoreError("restore: some stored items were not fully read; the state file "
                                 "does not match its header")

    def _chunk_layer(self, k: int) -> int:
        lo, hi = self._chunk(k)
        for pos, nb, job, _ in self.segs:
            if pos + nb > lo and pos < hi:
                return min(job.item.layers)
        return -1


ISSUE_MODES = ("interleaved", "thread")  # restore_into's `issue`: who enqueues direct CUDA loads


class _null_ctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# =============================================================================================
# Restore
# =============================================================================================
@dataclass
class RestoreReport:
    """Timings of one restore (seconds) and what moved."""

    restore_s: float = 0.0
    recompute_s: float = 0.0  # the recompute stream's busy span
    load_s: float = 0.0  # from the restore's start until the last loaded layer is placed
    fetch_s: float = 0.0  # opening a disk state (headers, token ids)
    read_s: float = 0.0  # host time in file reads / staging memcpy (summed over reader threads)
    hash_s: float = 0.0  # host time verifying the disk body's sha256 (overlapped)
    loaded_bytes: int = 0
    recomputed_tokens: int = 0  # sum over layers of L_l
    n_tokens: int = 0
    mode: str = ""  # "cuda-streams/direct", "cuda-streams/pool", "cpu-thread/...", "serial/..."
    join: str = "end"  # "end": the device finished when restore_into returned; "layer": see there
    predicted: dict = field(default_factory=dict)
    events: list = field(default_factory=list)  # (stream, layer_idx, start_ms, end_ms) from the start
    _finalize: object = field(default=None, repr=False)

    def finalize(self) -> "RestoreReport":
        """Resolve the device timings (join="layer": call after the device has synchronized)."""
        if self._finalize is not None:
            fn, self._finalize = self._finalize, None
            fn(self)
        return self

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("events", "_finalize")}


_FINGERPRINTS: "weakref.WeakKeyDictionary[ModelAdapter, dict]" = weakref.WeakKeyDictionary()


def _fingerprint(adapter: ModelAdapter) -> dict:
    """The adapter's fingerprint, computed once (hashing a tokenizer's vocabulary takes ~50 ms)."""
    if adapter not in _FINGERPRINTS:
        _FINGERPRINTS[adapter] = adapter.fingerprint()
    return _FINGERPRINTS[adapter]


def restore_into(adapter: ModelAdapter, source: StoredState | DiskSource | str | Path, cache: BufferCache,
                 overlap: bool = True, timeline: bool = False, verify: bool = True,
                 pool: HostPool | None = None, n_readers: int | None = None,
                 lookahead: int = 2, recompute: bool = True, join: str = "end",
                 issue: str = "interleaved") -> RestoreReport:
    """Restore a stored history into `cache` (its layers then hold `n_tokens` tokens).

    Parameters
    ----------
    source : a `StoredState` in CPU memory (pinned or pageable), or a state file (`DiskSource` or
        its path) that is opened and streamed here (header, token ids and body reads are timed).
    cache : a `BufferCache` of the adapter's geometry with capacity >= n_tokens (+ new input).
    overlap : run recompute and loads concurrently (False: load everything, then recompute).
    timeline : record per-layer events (`report.events`); otherwise only the stream spans.
    verify : check a disk body's sha256 while streaming it (raises `StoreError` on mismatch).
    lookahead : pinned CUDA loads: items enqueued ahead of each recomputed layer (`issue="interleaved"`),
        or per batch of the loader's issue thread (`issue="thread"`).
    issue : who enqueues the direct (pinned, CUDA) loads while layers are recomputed.
        "interleaved": the calling thread, `lookahead` items up front and then a share of the rest at
        the start of each recomputed layer (the cost model's `load_issue_lookahead` prices that
        host work into the recomputed layers). "thread": a loader thread of its own issues them all,
        `lookahead` per batch, from the start, so the recompute launches never wait behind the
        loader's issue work (they may still share the interpreter lock with it). On the CPU the
        loads always run on a worker thread; pool-mode (pageable, disk) loads always have their
        own issuer thread.
    recompute : False times the loads alone (profiling): recomputed regions are left unwritten.
    join : "end" joins every stream and synchronizes before returning. "layer" (CUDA) returns once
        everything is enqueued, leaving per-layer ready events in the cache: each layer's first
        `update` (the new input's forward) makes its stream wait for that layer only, so the new
        input's layer l can run while deeper layers are still being restored. The report's times are
        then resolved by `report.finalize()` after the caller synchronizes; `restore_s` is the
        device time until the last layer was ready.

    The caller synchronizes the device before calling if it wants `restore_s` to start now; the
    function returns after the device finished (every stream joined and synchronized).
    """
    device = adapter.device
    if join not in ("end", "layer"):
        raise ValueError(f"join must be 'end' or 'layer', not {join!r}")
    if issue not in ISSUE_MODES:
        raise ValueError(f"issue must be one of {ISSUE_MODES}, not {issue!r}")
    cache.join()  # a previous per-layer restore into these buffers must be complete first
    cache.clear_evicted()  # what a previous restore declared; an evicted state's placements declare anew
    clock = _Clock(device, timeline)
    t_start = clock.t0
    opened = None
    if isinstance(source, (str, Path)):
        source = DiskSource(source)
    if isinstance(source, DiskSource):
        opened = source.open()
        state = opened.state
    else:
        state = source
    fetch_s = time.perf_counter() - t_start
    check_fingerprint(state, _fingerprint(adapter))
    state.check_coverage()
    n, lengths = state.n_tokens, tuple(int(x) for x in state.recompute_lengths)
    if len(cache.layers) != adapter.n_layers or cache.capacity < n:
        raise ValueError(f"cache has {len(cache.layers)} layers of capacity {cache.capacity}; the state "
                         f"needs {adapter.n_layers} layers of >= {n} tokens")
    report = RestoreReport(n_tokens=n, recomputed_tokens=sum(lengths), fetch_s=fetch_s,
                           predicted=dict(state.meta.get("predicted", {})))
    loader = _Loader(state, cache, device, clock, opened, verify, pool, n_readers)
    report.loaded_bytes = loader.loaded_bytes
    needs_recompute = bool(recompute and lengths and lengths[0] > 0)
    cuda = device.type == "cuda"
    rec_marks: list = []

    rec_ready: dict[int, object] = {}
    layer_join = cuda and join == "layer"

    def on_layer(layer_idx: int, what: str) -> None:
        if timeline or (layer_join and what == "end"):
            m = clock.mark(rec_stream if cuda else None)
            if what == "start":
                rec_marks.append([layer_idx, m, None])
            else:
                if rec_marks:
                    rec_marks[-1][2] = m
                rec_ready[layer_idx] = m
        if what == "start" and cuda and issue == "interleaved" and loader.mode == "direct" and loader.pending:
            # keep the copy stream fed: enqueue this layer's share of the remaining items
            layers_left = max(1, sum(1 for x in lengths[layer_idx:] if x > 0))
            loader.issue_direct(max(lookahead, math.ceil(loader.pending / layers_left)))

    def run_recompute() -> None:
        if needs_recompute:
            ids = state.token_ids[None].to(device)
            recompute_into(adapter, ids, lengths, cache, on_layer)

    rec_stream = None
    try:
        if cuda:
            copy_s, place_s, rec_stream = _cuda_streams(device)
            main = torch.cuda.current_stream(device)
            for s in (copy_s, place_s, rec_stream):
                s.wait_stream(main)  # the buffers may still be read by earlier work on the main stream
            if loader.mode == "pool":
                loader.start_pool()
            elif overlap and needs_recompute and issue == "thread":
                loader.spawn(loader.issue_all, lookahead)  # the loader's own issue thread
            elif overlap and needs_recompute:
                loader.issue_direct(lookahead)  # the rest is enqueued between recomputed layers
            else:
                loader.issue_direct()
            if not overlap:
                loader.join()
                torch.cuda.synchronize(device)
            with torch.cuda.stream(rec_stream):
                rec0 = clock.mark(rec_stream)
                run_recompute()
                rec1 = clock.mark(rec_stream)
            if loader.mode == "direct" and not (overlap and needs_recompute and issue == "thread"):
                loader.issue_direct()  # whatever the recompute loop did not enqueue
            loader.join()
            if layer_join:
                for layer_idx, layer in enumerate(cache.layers):
                    layer.pending = [ev for ev in (rec_ready.get(layer_idx), loader.layer_ready.get(layer_idx))
                                     if ev is not None]
            else:
                for s in (copy_s, place_s, rec_stream):
                    main.wait_stream(s)
                torch.cuda.synchronize(device)
            threaded = overlap and needs_recompute and issue == "thread" and loader.mode == "direct"
            report.mode = ("cuda-streams/" if overlap else "serial/") + loader.mode + ("-thread" if threaded else "")
        elif overlap and needs_recompute and loader.jobs:
            if loader.mode == "pool":
                loader.start_pool()
            else:
                loader.spawn(loader.issue_all, lookahead)
            rec0 = clock.mark()
            run_recompute()
            rec1 = clock.mark()
            loader.join()
            report.mode = "cpu-thread/" + loader.mode
        else:
            if loader.mode == "pool":
                loader.start_pool()
            else:
                loader.issue_direct()
            loader.join()
            rec0 = clock.mark()
            run_recompute()
            rec1 = clock.mark()
            report.mode = "serial/" + loader.mode
    except BaseException:
        loader.abort = True  # stop the loader threads before the error propagates
        for t in loader.threads:
            t.join()
        raise
    cache.set_length(n)  # n positions: all held, or for an evicted (h2o) layer its kept slots
    report.restore_s = time.perf_counter() - t_start
    report.join = "layer" if layer_join else "end"

    def finalize(rep: RestoreReport) -> None:
        if needs_recompute:
            rep.recompute_s = (clock.ms(rec1) - clock.ms(rec0)) / 1e3
        if loader.jobs and loader.last is not None:
            rep.load_s = max(0.0, clock.ms(loader.last)) / 1e3
        if layer_join:  # device time until the last layer was ready
            rep.restore_s = max([rep.load_s] + ([clock.ms(rec1) / 1e3] if needs_recompute else []))
        rep.read_s, rep.hash_s = loader.read_s, loader.hash_s
        if timeline:
            for layer_idx, a, b in rec_marks:
                clock.add("recompute", layer_idx, a, b)
            rep.events = clock.resolve()

    report._finalize = finalize
    if not layer_join:
        report.finalize()
    return report


def restore_cache(adapter: ModelAdapter, state: StoredState | DiskSource, extra_tokens: int = 0,
                  grow: bool = False, overlap: bool = True,
                  timeline: bool = False) -> tuple[BufferCache, "RestoreReport"]:
    """Restore a state's history into a fresh `BufferCache` that the next forwards continue from.

    extra_tokens : capacity beyond the history (new input, decoded tokens) so that the forwards
        that follow write in place; `grow` lets the cache reallocate past it instead of raising.
    timeline : record the per-layer events of both streams (`report.events`, `restore_into`).
    Returns the cache (holding `n_tokens` tokens) and the report (`recompute_s`, `load_s`, `restore_s`).
    """
    if isinstance(state, DiskSource):
        n = state.open().state.n_tokens
    else:
        n = state.n_tokens
    if extra_tokens < 0:
        raise ValueError(f"extra_tokens must be >= 0; got {extra_tokens}")
    cache = BufferCache.for_adapter(adapter, n + int(extra_tokens), grow=grow)
    if adapter.device.type == "cuda":
        torch.cuda.synchronize(adapter.device)
    report = restore_into(adapter, state, cache, overlap=overlap, timeline=timeline)
    return cache, report


def restore(adapter: ModelAdapter, state: StoredState | DiskSource, overlap: bool = True
            ) -> tuple[list[KV], RestoreReport]:
    """Restore every layer's KV of the state's history on the adapter's device.

    Returns
    -------
    layers : per layer (keys, values), each (1, kv_heads, n_tokens, head_dim), model dtype:
        the whole buffers of a fresh `BufferCache` of capacity n_tokens (contiguous).
    report : per-stream measured times (`recompute_s`, `load_s`) and the total `restore_s`.
    """
    cache, report = restore_cache(adapter, state, overlap=overlap)
    return cache.kv(), report


def load_layers(state: StoredState, device: torch.device, record=None) -> list[KV | None]:
    """Reference loader (tests, tools): each layer's stored tokens [L_l:N] on `device`, expanded.

    Returns per layer (keys, values) of shape (1, kv_heads, N - L_l, head_dim), None if L_l = N.
    """
    n_layers, n = state.n_layers, state.n_tokens
    parts: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_layers)]
    non_blocking = device.type == "cuda"
    for item in sorted(state.items, key=lambda it: (min(it.layers), it.start)):
        t0 = time.perf_counter()
        payload = item.payload.to(device, non_blocking=non_blocking)
        for layer_idx, (k, v) in zip(item.layers, payload.expand()):
            parts[layer_idx].append((item.start, k, v))
        if record is not None:
            record(min(item.layers), t0)
    out: list[KV | None] = []
    for layer_idx in range(n_layers):
        begin = state.recompute_lengths[layer_idx]
        if begin >= n:
            out.append(None)
            continue
        ks, vs = [], []
        for start, k, v in sorted(parts[layer_idx], key=lambda p: p[0]):
            if start + k.shape[2] <= begin:
                continue
            skip = max(0, begin - start)
            ks.append(k[:, :, skip:])
            vs.append(v[:, :, skip:])
        keys = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
        values = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
        if keys.shape[2] != n - begin:
            raise StoreError(f"layer {layer_idx}: stored {keys.shape[2]} tokens, expected {n - begin}")
        out.append((keys, values))
    return out
