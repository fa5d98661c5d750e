"""Execute a restore: recompute the pyramid's prefixes and load the rest, on two streams.

Given a `StoredState` (on any tier) and a model adapter, produce per-layer `(keys, values)` on the
model's device covering every history token. The recompute stream runs layers on sliced hidden
states (`ModelAdapter.recompute_prefix`); the load stream copies each layer's stored items to the
device and expands compressed pairs. The streams are independent (recomputing layer l needs only
tokens [0:L_l], loading needs nothing computed), so they are joined once per layer at the end.
On CUDA the load stream is a side CUDA stream (non-blocking copies from pinned memory); on the CPU
it is a worker thread. Both report their measured time beside the scheduler's prediction.

This module knows nothing about which policy chose the plan; it executes what the state says.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from krul.adapter import KV, ModelAdapter
from krul.store import StoredState, StoreError, check_fingerprint


@dataclass
class RestoreReport:
    """Timings of one restore (seconds) and what moved."""

    restore_s: float = 0.0
    recompute_s: float = 0.0
    load_s: float = 0.0
    fetch_s: float = 0.0  # reading the state from its tier (disk read, deserialise) before loading
    loaded_bytes: int = 0
    recomputed_tokens: int = 0  # sum over layers of L_l
    n_tokens: int = 0
    predicted: dict = field(default_factory=dict)
    events: list = field(default_factory=list)  # (stream, layer_idx, start_s, end_s) relative

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "events"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_layers(state: StoredState, device: torch.device, record=None) -> list[KV | None]:
    """Copy each layer's stored tokens [L_l:N] to `device`, expanding compressed pairs.

    Returns per layer (keys, values) of shape (1, kv_heads, N - L_l, head_dim), None if L_l = N.
    """
    n_layers, n = state.n_layers, state.n_tokens
    parts: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_layers)]
    non_blocking = device.type == "cuda"
    for item in sorted(state.items, key=lambda it: (min(it.layers), it.start)):
        t0 = time.perf_counter()
        payload = item.payload.to(device, non_blocking=non_blocking)
        expanded = payload.expand()
        for layer_idx, (k, v) in zip(item.layers, expanded):
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
            skip = max(0, begin - start)
            ks.append(k[:, :, skip:])
            vs.append(v[:, :, skip:])
        keys = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
        values = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
        if keys.shape[2] != n - begin:
            raise StoreError(f"layer {layer_idx}: stored {keys.shape[2]} tokens, expected {n - begin}")
        out.append((keys, values))
    return out


def restore(adapter: ModelAdapter, state: StoredState, overlap: bool = True) -> tuple[list[KV], RestoreReport]:
    """Restore every layer's KV of the state's history on the adapter's device.

    Returns
    -------
    layers : per layer (keys, values), each (1, kv_heads, n_tokens, head_dim), model dtype.
    report : per-stream measured times (`recompute_s`, `load_s`) and the total `restore_s`.
    """
    check_fingerprint(state, adapter.fingerprint())
    device = adapter.device
    report = RestoreReport(n_tokens=state.n_tokens, recomputed_tokens=int(sum(state.recompute_lengths)),
                           predicted=dict(state.meta.get("predicted", {})))
    lengths = state.recompute_lengths
    ids = state.token_ids[None]
    needs_load = any(l < state.n_tokens for l in lengths)
    needs_recompute = lengths[0] > 0
    _sync(device)
    t0 = time.perf_counter()
    loaded: list[KV | None] = [None] * state.n_layers
    recomputed: list[KV | None] = [None] * state.n_layers

    if device.type == "cuda" and overlap:
        load_stream = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        load_stream.wait_stream(main)
        ev = {name: torch.cuda.Event(enable_timing=True) for name in ("l0", "l1", "r0", "r1")}
        with torch.cuda.stream(load_stream):
            ev["l0"].record()
            if needs_load:
                loaded = load_layers(state, device)
            ev["l1"].record()
        ev["r0"].record()
        if needs_recompute:
            recomputed = adapter.recompute_prefix(ids, lengths)
        ev["r1"].record()
        main.wait_stream(load_stream)
        torch.cuda.synchronize(device)
        report.load_s = ev["l0"].elapsed_time(ev["l1"]) / 1e3
        report.recompute_s = ev["r0"].elapsed_time(ev["r1"]) / 1e3
    elif overlap and needs_load and needs_recompute:
        box: dict = {}

        def work():
            t = time.perf_counter()
            try:
                box["layers"] = load_layers(state, device)
            except BaseException as exc:  # re-raised in the caller
                box["error"] = exc
            box["s"] = time.perf_counter() - t

        worker = threading.Thread(target=work, name="krul-load")
        worker.start()
        t = time.perf_counter()
        recomputed = adapter.recompute_prefix(ids, lengths)
        report.recompute_s = time.perf_counter() - t
        worker.join()
        if "error" in box:
            raise box["error"]
        loaded, report.load_s = box["layers"], box["s"]
    else:
        if needs_load:
            t = time.perf_counter()
            loaded = load_layers(state, device)
            _sync(device)
            report.load_s = time.perf_counter() - t
        if needs_recompute:
            t = time.perf_counter()
            recomputed = adapter.recompute_prefix(ids, lengths)
            _sync(device)
            report.recompute_s = time.perf_counter() - t

    layers: list[KV] = []
    for layer_idx in range(state.n_layers):
        rec, lod = recomputed[layer_idx], loaded[layer_idx]
        if rec is None:
            layers.append(lod)
        elif lod is None:
            layers.append(rec)
        else:
            layers.append((torch.cat([rec[0], lod[0]], dim=2), torch.cat([rec[1], lod[1]], dim=2)))
        if layers[-1] is None:
            raise StoreError(f"layer {layer_idx}: neither recomputed nor stored")
    _sync(device)
    report.restore_s = time.perf_counter() - t0
    report.loaded_bytes = state.kv_bytes() if needs_load else 0
    return layers, report
