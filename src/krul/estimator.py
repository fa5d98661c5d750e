"""Token-wise heterogeneous attention-similarity estimator (Krul, arXiv 2507.08045, idea 3).

Krul compresses, per conversation, the layer pairs whose attention maps are most alike over the
conversation's own tokens. Keeping every map does not fit, so the sums of `krul.similarity` are
accumulated as the maps are produced and the maps are dropped at once:

- prefill (the user message, the teacher-forced reply: q > 1 query tokens) runs in query blocks of
  `block_size` tokens (chunked prefill, exact for causal attention), so at most one block's maps
  `(n_layers, heads, block, k)` are held by the forward. On CUDA each layer's map is copied with
  `non_blocking=True` on a side stream into a pinned host buffer and the block is reduced on the CPU
  by a worker thread while the GPU goes on (two buffers: one being reduced, one being filled); on
  the CPU the block is reduced in place;
- decode steps (q == 1) are reduced on the model's device as soon as the last layer's row arrives,
  with no host copy;
- `stats` adds the CPU (prefill) and device (decode) partial sums.

The maps come from `ModelAdapter.capture_attention` (eager attention math through transformers'
`AttentionInterface`); outside `forward` the model runs its usual attention (sdpa). The estimator
knows nothing about tokenization, policies or stores, and the adapter knows nothing of these sums.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from krul.similarity import SimilarityStats

TIME_KEYS = ("prefill_cpu", "decode_device")


@dataclass
class _Block:
    """The query block whose maps are arriving, layer by layer."""

    conversation_id: str
    first_pos: int  # absolute position of the block's first query (cache length + offset)
    n_q: int
    mode: str  # "device" (q == 1, reduced on the model's device), "cpu", or "pinned" (CUDA prefill)
    buf: Tensor | None = None  # (n_layers, heads, q, k) host maps ("cpu", "pinned")
    rows: list = field(default_factory=list)  # per layer (heads, 1, k) ("device")
    slot: int = -1  # pinned buffer slot ("pinned")
    n_seen: int = 0
    done: bool = False


class AttentionEstimator:
    """Accumulates, per conversation, the layer-pair attention distances and per-layer boundary mass
    of every query token the model processes (prefill of the user message, each decode step, and
    the teacher-forced prefill of the real reply).

    Parameters
    ----------
    adapter : krul.adapter.ModelAdapter
        The model; its attention is captured only inside `forward`.
    edge_ratio : float
        Fraction of each query's causal window counted on each edge by the boundary mass
        (see `krul.similarity.boundary_mass`); the paper's 10%.
    block_size : int
        Query tokens per prefill block: bounds the maps held at once to
        n_layers * heads * block_size * k elements of `map_dtype` (on CUDA, `n_host_buffers` times
        that: blocks being reduced on the CPU while the next is copied).
    map_dtype : torch.dtype
        Dtype in which maps are held (and prefill maps copied to the host); float32 = exact, bfloat16
        halves the copy and the memory at ~3 significant digits per probability.
    n_host_buffers : int
        CUDA only: pinned host buffers of one block each (>= 2). A prefill block is copied into a free
        buffer while earlier ones are reduced by the worker; when none is free the forward waits for
        the oldest reduction. More buffers = more of the host reduction overlapped with the GPU (with
        ceil(q / block_size) buffers a whole prefill is), at n_host_buffers blocks of pinned memory.
    keep_host_buffer_bytes : int
        CPU model only: prefill blocks are copied into one host buffer reused from block to block
        (a fresh buffer of hundreds of MB faults its pages in again each time); it is kept between
        forwards while it is at most this many bytes, and freed at the end of a forward otherwise.

    Attributes
    ----------
    peak_map_bytes : int
        The largest number of bytes of maps held by the estimator at once.
    time_s : dict
        Cumulative seconds spent in capture copies and reductions, split into "prefill_cpu" (host
        reduction of prefill blocks, plus the copies on a CPU model) and "decode_device" (device
        reduction of decode rows; on CUDA measured with events).
    """

    def __init__(self, adapter, edge_ratio: float = 0.1, block_size: int = 256,
                 map_dtype: torch.dtype = torch.float32, n_host_buffers: int = 2,
                 keep_host_buffer_bytes: int = 256 << 20):
        if not 0.0 < edge_ratio <= 0.5:
            raise ValueError(f"edge_ratio must be in (0, 0.5]; got {edge_ratio}")
        if int(block_size) < 1:
            raise ValueError(f"block_size must be a positive number of query tokens; got {block_size}")
        if not map_dtype.is_floating_point:
            raise ValueError(f"map_dtype must be a floating dtype; got {map_dtype}")
        if int(n_host_buffers) < 2:
            raise ValueError(f"n_host_buffers must be >= 2 (one reduced while one fills); got {n_host_buffers}")
        self.adapter = adapter
        self.edge_ratio = float(edge_ratio)
        self.block_size = int(block_size)
        self.map_dtype = map_dtype
        self.n_host_buffers = int(n_host_buffers)
        self.keep_host_buffer_bytes = int(keep_host_buffer_bytes)
        self._host_flat: Tensor | None = None  # the CPU model's reused block buffer (flat)
        self.n_layers: int = adapter.n_layers
        self.n_heads: int = adapter.n_heads
        self.peak_map_bytes = 0
        self._held_bytes = 0
        self._lock = threading.Lock()  # guards _held_bytes, peak and _time (the worker writes them)
        self._time = {k: 0.0 for k in TIME_KEYS}
        self._host: dict[str, SimilarityStats] = {}  # prefill part, CPU
        self._device: dict[str, SimilarityStats] = {}  # decode part, on the model's device
        self._block: _Block | None = None
        # CUDA prefill machinery, created on first use
        self._executor: ThreadPoolExecutor | None = None
        self._copy_stream = None
        self._slots: list[Tensor | None] = [None] * self.n_host_buffers  # flat pinned buffers
        self._slot_futures: list[Future | None] = [None] * self.n_host_buffers
        self._slot_seq: list[int] = [0] * self.n_host_buffers  # submission order of each slot's block
        self._n_submitted = 0
        self._capacity_hint = 0  # elements of the largest block of the current forward
        self._decode_events: list = []  # (start, end) CUDA events not yet added to _time

    # -- the public surface -----------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, conversation_id: str, input_ids: Tensor, cache, logits_to_keep: int = 0) -> Tensor:
        """`ModelAdapter.forward` with the attention of every new query token accumulated.

        Parameters
        ----------
        conversation_id : str
            Whose sums the queries are added to.
        input_ids : (1, q)
            New tokens; their positions are the cache length + 0..q-1.
        cache : a transformers Cache (e.g. `DynamicCache`), updated in place.
        logits_to_keep : int
            0 = logits of all q positions, n > 0 = of the last n.

        Returns
        -------
        (1, q or min(q, logits_to_keep), vocab) float32 logits
        """
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (1, q) with q >= 1; got shape {tuple(input_ids.shape)}")
        if cache is None:
            raise ValueError("the estimator runs prefill in blocks over a cache: pass a DynamicCache "
                             "(an empty one for a first turn), not None")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0; got {logits_to_keep}")
        n_q = int(input_ids.shape[1])
        past = int(cache.get_seq_length())
        self._capacity_hint = self.n_layers * self.n_heads * min(n_q, self.block_size) * (past + n_q)
        outs = []
        with self.adapter.capture_attention(self._observe):
            for q0 in range(0, n_q, self.block_size):
                q1 = min(n_q, q0 + self.block_size)
                # how many of the requested last-logits fall in this block (0 = all of them)
                keep = 0 if logits_to_keep == 0 else max(0, min(q1 - q0, logits_to_keep - (n_q - q1)))
                self._begin_block(conversation_id, past + q0, q1 - q0)
                try:
                    logits = self.adapter.forward(input_ids[:, q0:q1], cache,
                                                  logits_to_keep=keep if keep > 0 or logits_to_keep == 0
                                                  else 1)
                    if not self._block.done:
                        raise RuntimeError(
                            f"the model called the capturing attention for {self._block.n_seen} of "
                            f"{self.n_layers} layers; a model whose attention does not go through "
                            "transformers' AttentionInterface cannot be estimated")
                finally:
                    self._abandon_block()
                if logits_to_keep == 0:
                    outs.append(logits)
                elif keep > 0:
                    outs.append(logits[:, -keep:])
        flat = self._host_flat
        if flat is not None and flat.numel() * flat.element_size() > self.keep_host_buffer_bytes:
            self._host_flat = None
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def stats(self, conversation_id: str) -> SimilarityStats | None:
        """The conversation's sums so far on the CPU (prefill part + decode part), or None if unseen.

        Waits for the prefill blocks still being reduced.
        """
        self._flush()
        host = self._host.get(conversation_id)
        if host is None:
            return None
        with torch.inference_mode(False):  # plain tensors, even when called inside inference mode
            return host.merge(self._device[conversation_id])  # the parts are created together

    def reset(self, conversation_id: str) -> None:
        """Forget the conversation's sums (e.g. before replaying it)."""
        self._flush()
        self._host.pop(conversation_id, None)
        self._device.pop(conversation_id, None)

    @property
    def time_s(self) -> dict:
        """Cumulative seconds per part (see the class docstring); resolves pending CUDA events."""
        self._collect_decode_events(wait=True)
        with self._lock:
            return dict(self._time)

    def close(self) -> None:
        """Finish pending reductions and stop the worker thread (the sums stay readable)."""
        self._flush()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- blocks -----------------------------------------------------------------------------
    def _parts(self, conversation_id: str, device: torch.device) -> tuple[SimilarityStats, SimilarityStats]:
        # Created as normal (non-inference) tensors, so callers may update the sums outside
        # inference mode later; in-place adds from inside inference mode are allowed.
        with torch.inference_mode(False):
            if conversation_id not in self._host:
                self._host[conversation_id] = SimilarityStats.zeros(self.n_layers, self.n_heads)
            if conversation_id not in self._device:
                self._device[conversation_id] = SimilarityStats.zeros(self.n_layers, self.n_heads, device)
        return self._host[conversation_id], self._device[conversation_id]

    def _begin_block(self, conversation_id: str, first_pos: int, n_q: int) -> None:
        device = self.adapter.device
        self._parts(conversation_id, device)
        if n_q == 1:
            mode = "device"
        elif device.type == "cuda":
            mode = "pinned"
        else:
            mode = "cpu"
        self._block = _Block(conversation_id, first_pos, n_q, mode)

    def _abandon_block(self) -> None:
        """Release what an unfinished block holds (after an error); a finished block holds nothing."""
        blk, self._block = self._block, None
        if blk is None or blk.done:
            return
        if blk.mode == "pinned" and blk.buf is not None:
            torch.cuda.current_stream(self.adapter.device).wait_stream(self._copy_stream)
        if blk.buf is not None:
            self._release(blk.buf.numel() * blk.buf.element_size())
        for row in blk.rows:
            if row is not None:
                self._release(row.numel() * row.element_size())

    def _hold(self, nbytes: int) -> None:
        with self._lock:
            self._held_bytes += nbytes
            self.peak_map_bytes = max(self.peak_map_bytes, self._held_bytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._held_bytes -= nbytes

    def _observe(self, layer_idx: int, probs: Tensor) -> None:
        """Called by the capturing attention of each layer; probs: (1, heads, q, k) float32."""
        blk = self._block
        if blk is None:
            raise RuntimeError("attention arrived outside an estimator block")
        if probs.shape[0] != 1 or probs.shape[2] != blk.n_q:
            raise ValueError(f"expected maps (1, heads, {blk.n_q}, k); got {tuple(probs.shape)}")
        maps = probs[0]  # (H, q, k)
        if blk.mode == "device":
            if not blk.rows:
                blk.rows = [None] * self.n_layers
            row = maps.to(self.map_dtype)
            blk.rows[layer_idx] = row
            self._hold(row.numel() * row.element_size())
        elif blk.mode == "cpu":
            t0 = time.perf_counter()
            if blk.buf is None:
                blk.buf = self._host_block(self.n_layers, *maps.shape)
                self._hold(blk.buf.numel() * blk.buf.element_size())
            blk.buf[layer_idx].copy_(maps)
            self._add_time("prefill_cpu", time.perf_counter() - t0)
        else:
            self._copy_to_pinned(blk, layer_idx, maps)
        blk.n_seen += 1
        if blk.n_seen == self.n_layers:
            self._finish_block(blk)

    def _host_block(self, *shape: int) -> Tensor:
        """A (n_layers, heads, q, k) view of the reused host buffer, grown (to this forward's
        largest block, `_capacity_hint`) when it is too small. Only one block uses it at a time: a
        CPU block is reduced before the next one starts."""
        n = shape[0] * shape[1] * shape[2] * shape[3]
        if self._host_flat is None or self._host_flat.numel() < n:
            self._host_flat = None  # the old one goes before the new one is made
            with torch.inference_mode(False):  # plain tensors, even when called inside inference mode
                self._host_flat = torch.empty(max(n, self._capacity_hint), dtype=self.map_dtype)
        return self._host_flat[:n].view(shape)

    def _finish_block(self, blk: _Block) -> None:
        host, dev = self._host[blk.conversation_id], self._device[blk.conversation_id]
        if blk.mode == "device":
            self._reduce_rows(blk, dev)
        elif blk.mode == "cpu":
            t0 = time.perf_counter()
            positions = torch.arange(blk.first_pos, blk.first_pos + blk.n_q)
            host.update(blk.buf, positions, self.edge_ratio)
            nbytes = blk.buf.numel() * blk.buf.element_size()
            blk.buf = None
            self._release(nbytes)
            self._add_time("prefill_cpu", time.perf_counter() - t0)
        else:
            done = torch.cuda.Event()
            done.record(self._copy_stream)
            positions = torch.arange(blk.first_pos, blk.first_pos + blk.n_q)
            self._slot_futures[blk.slot] = self._executor.submit(
                self._reduce_on_host, host, blk.buf, positions, done)
            self._n_submitted += 1
            self._slot_seq[blk.slot] = self._n_submitted
            blk.buf = None  # the worker owns it now
        blk.done = True

    def _reduce_rows(self, blk: _Block, dev: SimilarityStats) -> None:
        """One decode step: reduce the (n_layers, heads, 1, k) rows on the model's device at once."""
        cuda = dev.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        nbytes = sum(r.numel() * r.element_size() for r in blk.rows)
        self._hold(nbytes)  # the stacked copy, briefly beside the rows
        maps = torch.stack(blk.rows)  # (L, H, 1, k)
        blk.rows = []
        self._release(nbytes)
        # arange on the device: no host-to-device copy, no sync
        positions = torch.arange(blk.first_pos, blk.first_pos + 1, device=dev.device)
        dev.update(maps, positions, self.edge_ratio)
        del maps
        self._release(nbytes)
        if cuda:
            end.record()
            self._decode_events.append((start, end))
            if len(self._decode_events) >= 256:
                self._collect_decode_events(wait=False)
        else:
            self._add_time("decode_device", time.perf_counter() - t0)

    # -- CUDA prefill: pinned copies on a side stream, reduction in a worker thread ----------
    def _copy_to_pinned(self, blk: _Block, layer_idx: int, maps: Tensor) -> None:
        device = maps.device
        if blk.buf is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="krul-estimator")
                self._copy_stream = torch.cuda.Stream(device)
            blk.slot, blk.buf = self._acquire_slot((self.n_layers, *maps.shape))
            self._hold(blk.buf.numel() * blk.buf.element_size())
        src = maps.to(self.map_dtype)  # no-op for float32
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(device))  # the map is written
        with torch.cuda.stream(stream):
            blk.buf[layer_idx].copy_(src, non_blocking=True)
        # Invariant: the caching allocator must not hand out the map's memory before the copy ends.
        src.record_stream(stream)

    def _acquire_slot(self, shape: tuple) -> tuple[int, Tensor]:
        """A free pinned buffer viewed as `shape`, waiting for the oldest reduction if none is free."""
        numel = 1
        for s in shape:
            numel *= s
        busy = [i for i, f in enumerate(self._slot_futures) if f is not None and not f.done()]
        free = [i for i in range(self.n_host_buffers) if i not in busy]
        if free:  # prefer a buffer already pinned and large enough, then the largest
            slot = max(free, key=lambda i: (self._slots[i] is not None and self._slots[i].numel() >= numel,
                                            0 if self._slots[i] is None else self._slots[i].numel()))
        else:  # the worker reduces in submission order: the oldest finishes first
            slot = min(busy, key=lambda i: self._slot_seq[i])
        fut = self._slot_futures[slot]
        if fut is not None:
            fut.result()  # waits if busy; re-raises a worker error
            self._slot_futures[slot] = None
        flat = self._slots[slot]
        if flat is None or flat.numel() < numel:
            # Pinning costs ~0.65 ms/MiB: size for the largest block of this forward (k grows block
            # by block) with headroom for later turns, so that buffers are pinned rarely.
            self._slots[slot] = flat = None  # free the old buffer first
            capacity = int(max(numel, self._capacity_hint) * 1.25)
            with torch.inference_mode(False):
                flat = torch.empty(capacity, dtype=self.map_dtype, pin_memory=True)
            self._slots[slot] = flat
        return slot, flat[:numel].view(shape)

    def _reduce_on_host(self, host: SimilarityStats, buf: Tensor, positions: Tensor,
                        done) -> None:
        """Worker thread: wait for the block's copies, add its sums to the CPU part, free it."""
        try:
            done.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                host.update(buf, positions, self.edge_ratio)
            self._add_time("prefill_cpu", time.perf_counter() - t0)
        finally:
            self._release(buf.numel() * buf.element_size())

    def _flush(self) -> None:
        """Wait for every pending host reduction (re-raising its error)."""
        for i, fut in enumerate(self._slot_futures):
            if fut is not None:
                self._slot_futures[i] = None
                fut.result()

    # -- time --------------------------------------------------------------------------------
    def _add_time(self, key: str, seconds: float) -> None:
        with self._lock:
            self._time[key] += seconds

    def _collect_decode_events(self, wait: bool) -> None:
        keep = []
        for start, end in self._decode_events:
            if wait:
                end.synchronize()
            elif not end.query():
                keep.append((start, end))
                continue
            self._add_time("decode_device", start.elapsed_time(end) / 1e3)
        self._decode_events = keep
