"""Stored conversation states: layouts, byte accounting, integrity, and the storage tiers.

A `StoredState` is what is left of a conversation's KV cache once it is offloaded: the token ids of
its history, the per-layer recompute lengths L_l (the KV of tokens [0:L_l] of layer l is NOT
stored: it is recomputed on restore), and a list of items. An item covers tokens [start, end) of
one layer (`ExactLayer`) or of a compressed pair of layers (`compression.CompressedPair`). Items
accumulate turn by turn (one per layer or pair per turn, plus exact gap fillers when the split
moves); an item already stored is never re-compressed.

Tiers: `pageable` (ordinary CPU memory), `pinned` (page-locked, CUDA only) and `disk` (one file per
conversation, format 2: header and body sha256-checked, the header schema-validated; written to a
unique temp file under a per-key lock, fsynced, renamed and the folder fsynced; read from the disk
with the page cache dropped; a given root persists across processes). `TieredStore` stacks them
under byte budgets, with an `active` tier above (the live cache kept where the model runs): LRU
eviction with a TTL, pinning against eviction, demotion down the tiers and deletion past the last
(the engine then recomputes), and a full tier (ENOSPC, a file-size limit) skipped with a warning.
Every state carries the fingerprint of the model that produced it; restoring into another model is an
error. The store knows nothing about which layers to compress or why.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch

KV = tuple[torch.Tensor, torch.Tensor]
TIERS = ("pageable", "pinned", "disk")


class StoreError(RuntimeError):
    """A missing, corrupted or mismatched stored state."""


class Payload(Protocol):
    method: str

    def nbytes(self) -> int: ...
    def n_tokens(self) -> int: ...
    def crop_left(self, start: int) -> "Payload": ...
    def to(self, device, non_blocking: bool = False) -> "Payload": ...


@dataclass
class ExactLayer:
    """One layer's exact K and V for a token range: each (1, kv_heads, tokens, head_dim)."""

    keys: torch.Tensor
    values: torch.Tensor
    method: str = "exact"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def n_tokens(self) -> int:
        return self.keys.shape[-2]

    def expand(self) -> tuple[KV]:
        return ((self.keys, self.values),)

    def crop_left(self, start: int) -> "ExactLayer":
        return ExactLayer(self.keys[:, :, start:], self.values[:, :, start:])

    def to(self, device, non_blocking: bool = False) -> "ExactLayer":
        return ExactLayer(self.keys.to(device, non_blocking=non_blocking),
                          self.values.to(device, non_blocking=non_blocking))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values}

    def meta(self) -> dict:
        return {}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "ExactLayer":
        return cls(tensors["keys"], tensors["values"])


# -- packed payloads (one host-to-device copy per item) ------------------------------------------
ALIGN = 256  # byte alignment of every tensor in a packed blob and in the restore's staging buffer


def packed_layout(nbytes: Sequence[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Byte offsets of tensors of `nbytes` laid out in order, each at a multiple of `align`, and the
    total size (the last tensor padded too). The one layout rule of packed payloads (`pack_payload`)
    and of the restore's per-item staging buffers (`restore._make_jobs`): a packed item's bytes are
    its staging buffer's bytes."""
    offsets, pos = [], 0
    for nb in nbytes:
        offsets.append(pos)
        pos += -(-int(nb) // align) * align
    return offsets, pos


def pack_payload(payload, pin: bool = False):
    """The same payload with its tensors copied into one contiguous uint8 blob (page-locked if `pin`):
    tensors in sorted name order at `packed_layout` offsets, each a view of the blob with its dtype
    and shape. The blob owns its memory (no view into the caller's buffers)."""
    named = payload.tensors()
    names = sorted(named)
    tensors = [named[n].detach() for n in names]
    nbytes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = packed_layout(nbytes)
    blob = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    views = {}
    for name, t, nb, off in zip(names, tensors, nbytes, offsets):
        view = blob[off:off + nb].view(t.dtype).view(t.shape)
        view.copy_(t)
        views[name] = view
    return payload_from_tensors(payload.method, views, payload.meta())


def map_tensors(payload, fn):
    """The same payload with `fn` applied to every stored tensor (pin, clone, move)."""
    return type(payload).from_tensors({k: fn(v) for k, v in payload.tensors().items()}, payload.meta())


@dataclass
class StoredItem:
    """Tokens [start, end) of `layers` (one layer, or a compressed pair (a, b))."""

    layers: tuple[int, ...]
    start: int
    end: int
    payload: object  # ExactLayer | compression.CompressedPair

    def nbytes(self) -> int:
        return self.payload.nbytes()

    def crop_left(self, new_start: int) -> "StoredItem":
        """Drop tokens before `new_start` (they will be recomputed)."""
        if new_start <= self.start:
            return self
        return StoredItem(self.layers, new_start, self.end, self.payload.crop_left(new_start - self.start))


@dataclass
class StoredState:
    """A conversation's offloaded state.

    token_ids : (n_tokens,) int64, the history the KV belongs to.
    recompute_lengths : (n_layers,) L_l, non-increasing; tokens [0:L_l] of layer l are recomputed.
    """

    fingerprint: dict
    token_ids: torch.Tensor
    recompute_lengths: tuple[int, ...]
    items: list[StoredItem] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # plan, split, predictions: for reports only

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def n_layers(self) -> int:
        return len(self.recompute_lengths)

    def kv_bytes(self) -> int:
        """Bytes of stored KV payloads (every tensor an item holds, extras included)."""
        return sum(item.nbytes() for item in self.items)

    def nbytes(self) -> int:
        """Everything stored: KV payloads plus the token ids (int32 on disk)."""
        return self.kv_bytes() + 4 * self.n_tokens

    def items_for_layer(self, layer_idx: int) -> list[StoredItem]:
        return sorted((it for it in self.items if layer_idx in it.layers), key=lambda it: it.start)

    def check_coverage(self) -> None:
        """Invariant: layer l's items tile exactly [L_l, n_tokens) after cropping to L_l."""
        for layer_idx, begin in enumerate(self.recompute_lengths):
            cursor = begin
            for item in self.items_for_layer(layer_idx):
                if item.end <= begin:
                    continue
                if max(item.start, begin) != cursor:
                    raise StoreError(f"layer {layer_idx}: stored tokens jump from {cursor} to "
                                     f"{item.start}; the state is inconsistent")
                cursor = item.end
            if cursor != self.n_tokens:
                raise StoreError(f"layer {layer_idx}: stored tokens end at {cursor}, expected "
                                 f"{self.n_tokens}; the state is inconsistent")

    def map_payloads(self, fn) -> "StoredState":
        items = [StoredItem(it.layers, it.start, it.end, fn(it.payload)) for it in self.items]
        return StoredState(self.fingerprint, self.token_ids, self.recompute_lengths, items, self.meta)


def check_fingerprint(state: StoredState, expected: dict) -> None:
    """Raise `StoreError` naming every field where the state and the model differ."""
    diffs = [f"{k}: stored {state.fingerprint.get(k)!r} vs model {v!r}"
             for k, v in expected.items() if state.fingerprint.get(k) != v]
    if diffs:
        raise StoreError("stored state belongs to another model; " + "; ".join(diffs)
                         + ". Restore it with the model that produced it, or recompute.")


# -- serialisation (disk tier) -----------------------------------------------------------------
# File format 2 (every byte is covered by a checksum):
#   MAGIC (11 bytes) | header length n (u64 little-endian) | header_sha256 (32 raw bytes) | header | body
#   header_sha256 = sha256(MAGIC + n + header): a damaged magic, length, header or digest is caught at
#   open time, before the header is trusted. The header (UTF-8 JSON, validated against its schema by
#   `parse_header`) holds the tensor table (dtype, shape, body offset, nbytes of every tensor), the
#   body's length and sha256 (checked while a restore streams the body, or by `deserialize`), and the
#   sha256 of the token ids (checked when they are read at open time).
#   body = the raw tensor bytes, each tensor at a multiple of ALIGN (zero padding between them).
# Format 1 (`KRULSTATE1`: a header outside the checksum, a safetensors body) is refused.
FORMAT_VERSION = 2
MAGIC = b"KRULSTATE2\n"
_OLD_MAGICS = {b"KRULSTATE1\n": 1}
PREFIX_NBYTES = len(MAGIC) + 8 + 32
MAX_HEADER_NBYTES = 256 << 20
DTYPES = {str(dt).removeprefix("torch."): dt for dt in (
    torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
_FIX = "delete the state (DiskStore.delete); the conversation is then recomputed from its tokens"


class CorruptStateError(StoreError):
    """A stored state that fails its checksums or its schema: never restored, to be deleted."""


class MissingStateError(StoreError):
    """No stored state under the key (never stored, deleted, or removed from the disk)."""


def payload_from_tensors(method: str, tensors: dict, meta: dict):
    """The payload of `method` ("exact", a compression method, "quant": `quant.QuantizedPayload`, or
    "evicted": `h2o.EvictedLayer`)."""
    if method == "exact":
        return ExactLayer.from_tensors(tensors, meta)
    if method == "evicted":
        from krul.h2o import EvictedLayer

        return EvictedLayer.from_tensors(tensors, meta)
    if method == "quant":
        from krul.quant import QuantizedPayload

        return QuantizedPayload.from_tensors(tensors, meta)
    from krul.compression import CompressedPair

    return CompressedPair.from_tensors(tensors, meta)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def encode(state: StoredState) -> tuple[bytes, bytearray]:
    """(prefix + header, body) of `state`'s file (format 2); `serialize` joins them."""
    named: list[tuple[str, torch.Tensor]] = [("token_ids", state.token_ids.to(torch.int32))]
    items_meta = []
    for i, item in enumerate(state.items):
        tensors = item.payload.tensors()
        names = sorted(tensors)
        named += [(f"{i}.{n}", tensors[n]) for n in names]
        items_meta.append({"layers": [int(x) for x in item.layers], "start": int(item.start),
                           "end": int(item.end), "method": item.payload.method, "keys": names,
                           "meta": item.payload.meta()})
    datas = [_tensor_bytes(t) for _, t in named]
    offsets, _ = packed_layout([len(d) for d in datas])
    body_nbytes = offsets[-1] + len(datas[-1])
    body = bytearray(body_nbytes)
    table = {}
    for (name, t), data, off in zip(named, datas, offsets):
        body[off:off + len(data)] = data
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise StoreError(f"cannot store tensor {name!r} of dtype {t.dtype}; storable: {', '.join(DTYPES)}")
        table[name] = {"dtype": dtype, "shape": [int(x) for x in t.shape], "offset": off, "nbytes": len(data)}
    header = json.dumps({
        "format": FORMAT_VERSION, "fingerprint": state.fingerprint, "n_tokens": state.n_tokens,
        "recompute_lengths": [int(x) for x in state.recompute_lengths], "items": items_meta,
        "meta": state.meta, "tensors": table, "body_nbytes": body_nbytes,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "token_ids_sha256": hashlib.sha256(datas[0]).hexdigest()}).encode()
    head = MAGIC + len(header).to_bytes(8, "little")
    return head + hashlib.sha256(head + header).digest() + header, body


def serialize(state: StoredState) -> bytes:
    """One self-describing blob (format 2, see above): prefix, checksummed JSON header, body."""
    head, body = encode(state)
    return head + bytes(body)


def _corrupt(source: str, what: str) -> CorruptStateError:
    return CorruptStateError(f"{source}: {what}; the stored state is corrupted: {_FIX}")


def parse_prefix(prefix: bytes, size: int, source: str) -> int:
    """The header length from a file's first PREFIX_NBYTES bytes (`size`: the file's size)."""
    for magic, version in _OLD_MAGICS.items():
        if prefix.startswith(magic):
            raise CorruptStateError(f"{source}: a krul state of format {version}, which this version no "
                                    f"longer reads (format {FORMAT_VERSION} checksums its header too); "
                                    f"{_FIX}")
    if prefix[:len(MAGIC)] != MAGIC:
        if prefix.startswith(MAGIC[:9]):
            raise _corrupt(source, "bad magic or unknown format version")
        raise CorruptStateError(f"{source}: not a krul state file (bad magic); {_FIX}")
    if len(prefix) < PREFIX_NBYTES or size < PREFIX_NBYTES:
        raise _corrupt(source, f"the file ends at byte {size}, inside its {PREFIX_NBYTES}-byte prefix")
    n = int.from_bytes(prefix[len(MAGIC):len(MAGIC) + 8], "little")
    if n > min(MAX_HEADER_NBYTES, size - PREFIX_NBYTES):
        raise _corrupt(source, f"header length {n} does not fit a file of {size} bytes")
    return n


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, source: str, what: str) -> None:
    if not ok:
        raise _corrupt(source, f"invalid header: {what}")


def parse_header(prefix: bytes, header_bytes: bytes, size: int, source: str) -> dict:
    """Verify the header's sha256 and validate it against the schema (types, required keys, item layers
    and token ranges, tensor names, dtypes, shapes and body extents, the body's length vs `size`).
    Every failure is a `CorruptStateError`; returns the header dict."""
    n = parse_prefix(prefix, size, source)
    if len(header_bytes) != n:
        raise _corrupt(source, f"the header ends early ({len(header_bytes)} of {n} bytes)")
    digest = prefix[len(MAGIC) + 8:PREFIX_NBYTES]
    if hashlib.sha256(prefix[:len(MAGIC) + 8] + header_bytes).digest() != digest:
        raise _corrupt(source, "header checksum mismatch")
    try:
        h = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _corrupt(source, f"unreadable header ({type(exc).__name__}: {exc})") from None
    _check(isinstance(h, dict), source, "not a JSON object")
    _check(h.get("format") == FORMAT_VERSION, source, f"format {h.get('format')!r}, expected {FORMAT_VERSION}")
    for key, typ in (("fingerprint", dict), ("n_tokens", int), ("recompute_lengths", list), ("items", list),
                     ("meta", dict), ("tensors", dict), ("body_nbytes", int), ("body_sha256", str),
                     ("token_ids_sha256", str)):
        _check(key in h, source, f"missing {key!r}")
        _check(isinstance(h[key], typ) and not isinstance(h[key], bool), source, f"{key!r} is not a {typ.__name__}")
    for key in ("body_sha256", "token_ids_sha256"):
        _check(re.fullmatch(r"[0-9a-f]{64}", h[key]) is not None, source, f"{key!r} is missing or not a sha256")
    n_tokens, body_nbytes = h["n_tokens"], h["body_nbytes"]
    _check(n_tokens >= 0 and body_nbytes >= 0, source, "negative n_tokens or body_nbytes")
    _check(PREFIX_NBYTES + n + body_nbytes == size, source,
           f"header + body = {PREFIX_NBYTES + n + body_nbytes} bytes but the file has {size} (truncated or "
           "extended)")
    lengths = h["recompute_lengths"]
    _check(all(_is_int(x) and 0 <= x <= n_tokens for x in lengths), source,
           f"recompute_lengths must be ints in [0, {n_tokens}]")
    n_layers = len(lengths)
    table = h["tensors"]
    extents = []
    for name, e in table.items():
        _check(isinstance(e, dict) and set(e) == {"dtype", "shape", "offset", "nbytes"}, source,
               f"tensor {name!r}: entry must have dtype, shape, offset, nbytes")
        _check(isinstance(e["dtype"], str) and e["dtype"] in DTYPES, source, f"tensor {name!r}: unknown dtype {e['dtype']!r}")
        _check(isinstance(e["shape"], list) and all(_is_int(x) and x >= 0 for x in e["shape"]), source,
               f"tensor {name!r}: shape must be a list of ints >= 0")
        _check(_is_int(e["offset"]) and _is_int(e["nbytes"]) and e["offset"] >= 0, source,
               f"tensor {name!r}: offset and nbytes must be ints >= 0")
        numel = 1
        for x in e["shape"]:
            numel *= x
        itemsize = torch.empty(0, dtype=DTYPES[e["dtype"]]).element_size()
        _check(e["nbytes"] == numel * itemsize, source, f"tensor {name!r}: {e['nbytes']} bytes for shape "
               f"{e['shape']} of {e['dtype']}")
        _check(e["offset"] % itemsize == 0 and e["offset"] + e["nbytes"] <= body_nbytes, source,
               f"tensor {name!r}: bytes [{e['offset']}, {e['offset'] + e['nbytes']}) not aligned or outside "
               f"the body of {body_nbytes} bytes")
        if e["nbytes"]:
            extents.append((e["offset"], e["offset"] + e["nbytes"], name))
    extents.sort()
    for (_, end_a, a), (start_b, _, b) in zip(extents, extents[1:]):
        _check(start_b >= end_a, source, f"tensors {a!r} and {b!r} overlap")
    ids = table.get("token_ids")
    _check(ids is not None and ids["dtype"] == "int32" and ids["shape"] == [n_tokens], source,
           f"token_ids must be int32 of shape [{n_tokens}]")
    from krul.compression import METHODS, _names
    from krul import quant

    used = {"token_ids"}
    for i, it in enumerate(h["items"]):
        what = f"item {i}"
        _check(isinstance(it, dict) and {"layers", "start", "end", "method", "keys", "meta"} <= set(it), source,
               f"{what}: needs layers, start, end, method, keys, meta")
        outer, layers = it["method"], it["layers"]
        _check(isinstance(outer, str) and (outer in ("exact", quant.METHOD, "evicted") or outer in METHODS), source,
               f"{what}: unknown method {outer!r}")
        _check(isinstance(it["meta"], dict), source, f"{what}: meta is not an object")
        if outer == "evicted":  # h2o's kept tokens of one layer (`h2o.check_header`)
            from krul import h2o

            _check(isinstance(layers, list) and len(layers) == 1 and _is_int(layers[0]) and 0 <= layers[0] < n_layers
                   and _is_int(it["start"]) and _is_int(it["end"]) and 0 <= it["start"] <= it["end"] <= n_tokens
                   and isinstance(it["keys"], list) and all(f"{i}.{key}" in table for key in it["keys"]), source,
                   f"{what}: an evicted layer needs one layer, a range inside [0, {n_tokens}] and its tensors")
            problem = h2o.check_header(it["keys"], {key: table[f"{i}.{key}"] for key in it["keys"]},
                                       it["end"] - it["start"])
            _check(problem is None, source, f"{what}: evicted layer: {problem}")
            used.update(f"{i}.{key}" for key in it["keys"])
            continue
        method = outer
        if outer == quant.METHOD:  # a quantized payload: checked as its inner method, then its codes
            method = it["meta"].get("inner")
            _check(isinstance(method, str) and method in quant.INNER_METHODS, source,
                   f"{what}: unknown inner method {method!r} of a quantized payload")
        _check(isinstance(layers, list) and len(layers) == (1 if method == "exact" else 2)
               and all(_is_int(x) and 0 <= x < n_layers for x in layers) and len(set(layers)) == len(layers),
               source, f"{what}: layers {layers!r} not {'one layer' if method == 'exact' else 'a pair'} "
               f"in [0, {n_layers})")
        _check(_is_int(it["start"]) and _is_int(it["end"]) and 0 <= it["start"] <= it["end"] <= n_tokens,
               source, f"{what}: token range [{it['start']!r}, {it['end']!r}) not inside [0, {n_tokens}]")
        if outer == quant.METHOD:
            expected = quant.stored_names(method)
        else:
            expected = ["keys", "values"] if method == "exact" else sorted(_names(method))
        _check(it["keys"] == expected, source, f"{what}: tensors {it['keys']!r}, expected {expected}")
        for key in expected:
            _check(f"{i}.{key}" in table, source, f"{what}: tensor {i}.{key} missing from the tensor table")
        if method != "exact":
            m = it["meta"] if outer != quant.METHOD else it["meta"].get("inner_meta")
            _check(isinstance(m, dict), source, f"{what}: inner meta is not an object")
            _check(m.get("method") == method and [m.get("layer_a"), m.get("layer_b")] == layers, source,
                   f"{what}: meta {m!r} does not name method {method!r} and layers {layers}")
            _check(isinstance(m.get("t", 0.5), (int, float)) and not isinstance(m.get("t"), bool), source,
                   f"{what}: meta 't' {m.get('t')!r} is not a number")
        used.update(f"{i}.{key}" for key in expected)
        if outer == quant.METHOD:
            problem = quant.check_header(it["meta"], {key: table[f"{i}.{key}"] for key in expected})
            _check(problem is None, source, f"{what}: quantized payload: {problem}")
            shape = it["meta"]["tensors"][quant._MAIN[method]]["shape"]
            _check(shape[quant.TOKEN_AXIS[method][quant._MAIN[method]]] == it["end"] - it["start"], source,
                   f"{what}: quantized payload of shape {shape} does not hold {it['end'] - it['start']} tokens")
        elif method == "exact":
            k, v = table[f"{i}.keys"], table[f"{i}.values"]
            _check(len(k["shape"]) == 4 and k["shape"] == v["shape"] and k["shape"][2] == it["end"] - it["start"],
                   source, f"{what}: keys/values shapes {k['shape']}/{v['shape']} do not hold "
                   f"{it['end'] - it['start']} tokens")
    _check(used == set(table), source, f"tensors {sorted(set(table) - used)} belong to no item")
    return h


def check_token_ids(raw: bytes, header: dict, source: str) -> torch.Tensor:
    """The token ids (int64) from their raw bytes, checked against the header's sha256."""
    if hashlib.sha256(raw).hexdigest() != header["token_ids_sha256"]:
        raise _corrupt(source, "token ids checksum mismatch")
    if not raw:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(raw), dtype=torch.int32).to(torch.int64)


def state_from_header(header: dict, token_ids: torch.Tensor, payload_for, source: str) -> StoredState:
    """The state a validated header describes; `payload_for(i, method, names, meta)` builds item i's
    payload. Coverage is checked (an inconsistent state is corrupt)."""
    items = []
    for i, it in enumerate(header["items"]):
        payload = payload_for(i, it["method"], it["keys"], it["meta"])
        items.append(StoredItem(tuple(it["layers"]), it["start"], it["end"], payload))
    state = StoredState(header["fingerprint"], token_ids, tuple(header["recompute_lengths"]), items,
                        header["meta"])
    try:
        state.check_coverage()
    except StoreError as exc:
        raise _corrupt(source, str(exc)) from None
    return state


def deserialize(blob: bytes, source: str = "state") -> StoredState:
    """Inverse of `serialize`; any damage raises `CorruptStateError` (never silently wrong KV)."""
    blob = memoryview(blob)
    prefix = bytes(blob[:PREFIX_NBYTES])
    n = parse_prefix(prefix, len(blob), source)
    header = parse_header(prefix, bytes(blob[PREFIX_NBYTES:PREFIX_NBYTES + n]), len(blob), source)
    body = bytearray(blob[PREFIX_NBYTES + n:])
    if hashlib.sha256(body).hexdigest() != header["body_sha256"]:
        raise _corrupt(source, "body checksum mismatch (the stored KV is damaged)")
    flat = torch.frombuffer(body, dtype=torch.uint8) if body else torch.zeros(0, dtype=torch.uint8)
    table = header["tensors"]

    def tensor(name: str) -> torch.Tensor:
        e = table[name]
        return flat[e["offset"]:e["offset"] + e["nbytes"]].view(DTYPES[e["dtype"]]).view(e["shape"])

    ids = table["token_ids"]
    token_ids = check_token_ids(bytes(body[ids["offset"]:ids["offset"] + ids["nbytes"]]), header, source)

    def payload_for(i, method, names, meta):
        try:
            return payload_from_tensors(method, {k: tensor(f"{i}.{k}") for k in names}, meta)
        except (KeyError, ValueError, TypeError) as exc:
            raise _corrupt(source, f"item {i}: {type(exc).__name__}: {exc}") from None

    return state_from_header(header, token_ids, payload_for, source)


def drop_page_cache(path: str | Path) -> None:
    """fsync the file and ask the kernel to forget its cached pages (the next read hits the disk)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- tiers -------------------------------------------------------------------------------------
class KVStore:
    """Base: a mapping conversation id -> StoredState on one tier."""

    tier = "base"

    def put(self, key: str, state: StoredState) -> int:
        raise NotImplementedError

    def get(self, key: str) -> StoredState:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        raise NotImplementedError


class MemoryStore(KVStore):
    """CPU memory; `pinned=True` page-locks the stored payloads (needs CUDA).

    pack : store each item's payload as views into ONE contiguous blob laid out as the restore's
        staging buffer (`pack_payload`), so a restore copies an item to the device in one copy.
        Default: the pinned tier packs (page-locked), the pageable one stores tensor by tensor.
        `pack=True` on a pageable store packs without page-locking (tests on CPU-only machines).
    """

    def __init__(self, pinned: bool = False, pack: bool | None = None):
        if pinned and not torch.cuda.is_available():
            raise StoreError("tier 'pinned' needs CUDA (page-locked memory serves GPU copies); "
                             "use --tier pageable or disk on this machine")
        self.pinned = pinned
        if pack is None:  # KRUL_PACK_PINNED=0 turns the pinned tier's packing off (comparisons, fallback)
            pack = pinned and os.environ.get("KRUL_PACK_PINNED", "1") != "0"
        self.pack = bool(pack)
        self.tier = "pinned" if pinned else "pageable"
        self._states: dict[str, StoredState] = {}

    def put(self, key: str, state: StoredState) -> int:
        pin = self.pinned and torch.cuda.is_available()

        def move(payload):
            # own the memory (no views into larger live buffers); page-lock it for the pinned tier
            if self.pack:
                return pack_payload(payload, pin=pin)
            if self.pinned:
                return map_tensors(payload, lambda t: t.to("cpu").contiguous().pin_memory())
            return map_tensors(payload, lambda t: t.to("cpu", copy=True).contiguous())

        self._states[key] = state.map_payloads(move)
        return self._states[key].nbytes()

    def get(self, key: str) -> StoredState:
        if key not in self._states:
            raise StoreError(f"no stored state for conversation {key!r} in the {self.tier} tier")
        return self._states[key]

    def delete(self, key: str) -> None:
        self._states.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._states


class DiskStore(KVStore):
    """One file per conversation state under `root` (format 2: header and body checksummed).

    Durability: a write serialises the state, takes the key's lock (`fcntl.flock` on `<name>.lock`,
    held across processes and threads, also by `delete`), writes a unique temp file in `root`
    (`.<name>.<random>.tmp`), fsyncs it, renames it over the target (`os.replace`) and fsyncs the
    folder. A reader sees the previous complete version or the new one, never a mix; a failed write
    (ENOSPC, a file-size limit, an interrupt) removes its temp file and raises `StoreError`, leaving
    the previous version in place. Temp files left by a killed writer are swept when a store opens the
    folder (only those whose key no writer holds). Lock files are kept (removing them would race).

    Persistence: a store opened on a given `root` reads what earlier processes stored there; nothing
    removes the folder. `DiskStore.temporary()` (what `make_store("disk")` without a root gives) is a
    fresh folder removed at exit.

    `get` of a missing key raises `MissingStateError`; of a damaged file `CorruptStateError` (both
    `StoreError`s): delete the state and recompute the conversation.
    """

    tier = "disk"
    SUFFIX = ".krul"

    def __init__(self, root: str | Path, drop_page_cache: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.drop_page_cache = drop_page_cache
        self.ephemeral = False
        self.swept = self.sweep()

    @classmethod
    def temporary(cls, drop_page_cache: bool = True) -> "DiskStore":
        """A store in a fresh temporary folder, removed when the process exits."""
        import atexit
        import shutil
        import tempfile

        root = tempfile.mkdtemp(prefix="krul-states-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        store = cls(root, drop_page_cache)
        store.ephemeral = True
        return store

    def path(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        return self.root / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}{self.SUFFIX}"

    def _lock(self, name: str, blocking: bool = True):
        """An open fd holding the exclusive lock of state file `name`, or None (non-blocking, held)."""
        import fcntl

        fd = os.open(self.root / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fsync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sweep(self) -> list[Path]:
        """Remove temp files of failed or killed writes (those whose key's lock is free); returns them."""
        removed = []
        for tmp in self.root.glob(f".*{self.SUFFIX}.*.tmp"):
            name = tmp.name[1:].rsplit(".", 2)[0]  # ".<name>.<random>.tmp" (mkstemp: no dots in random)
            fd = self._lock(name, blocking=False)
            if fd is None:
                continue  # a writer is at work on this key
            try:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
            finally:
                os.close(fd)
        if removed:
            self._fsync_dir()
        return removed

    def put(self, key: str, state: StoredState) -> int:
        import tempfile

        path = self.path(key)
        head, body = encode(state)
        lock = self._lock(path.name)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")
            try:
                for data in (memoryview(head), memoryview(body)):
                    while len(data):
                        data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            tmp = None
            self._fsync_dir()
        except OSError as exc:
            raise StoreError(f"could not write the state of conversation {key!r} to {path}: {exc}. The "
                             "previous version (if any) is unchanged; free disk space or raise the "
                             "file-size limit, or the conversation is recomputed next turn") from exc
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            os.close(lock)
        if self.drop_page_cache:
            drop_page_cache(path)
        return state.nbytes()

    def get(self, key: str) -> StoredState:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise MissingStateError(f"no stored state for conversation {key!r}: {path} does not exist") from None
        try:
            if self.drop_page_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            size = os.fstat(fd).st_size
            blob = bytearray(size)
            view, got = memoryview(blob), 0
            while got < size:
                n = os.readv(fd, [view[got:]])
                if n <= 0:
                    break
                got += n
        finally:
            os.close(fd)
        return deserialize(blob[:got], f"{path} (conversation {key!r})")

    def delete(self, key: str) -> None:
        path = self.path(key)
        lock = self._lock(path.name)
        try:
            if path.exists():
                path.unlink(missing_ok=True)
                self._fsync_dir()
        finally:
            os.close(lock)

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()


def make_store(tier: str, root: str | Path | None = None) -> KVStore:
    """A store of the named tier; `root` is the folder of the disk tier (kept across processes);
    without one the disk tier is a temporary folder removed at exit."""
    if tier == "pageable":
        return MemoryStore(pinned=False)
    if tier == "pinned":
        return MemoryStore(pinned=True)
    if tier == "disk":
        return DiskStore(root) if root is not None else DiskStore.temporary()
    raise StoreError(f"unknown tier {tier!r}; known: {', '.join(TIERS)}")


def build_state(fingerprint: dict, token_ids: torch.Tensor, layers_kv: Sequence[KV],
                recompute_lengths: Sequence[int], previous: StoredState | None,
                pairs: Sequence[tuple[int, int]] = (), method: str = "merge",
                compress_kwargs: dict | None = None, meta: dict | None = None) -> StoredState:
    """The state to store after a turn, from the live cache and the previous state.

    Tokens already stored in `previous` keep their stored (possibly compressed) form, cropped to
    the new recompute lengths; tokens not yet stored are taken exact from the live cache:
    the new turn's segment [n_old, n_new) is compressed with `pairs`; gap tokens (stored now but
    recomputed last time) are stored exact per layer.

    layers_kv : per layer (keys, values), each (1, kv_heads, >= n_new, head_dim), exact for every
        token not in `previous`.
    """
    n_new = int(token_ids.numel())
    n_layers = len(layers_kv)
    lengths = [int(x) for x in recompute_lengths]
    items: list[StoredItem] = []
    covered_from = [n_new] * n_layers  # first token of layer l held by kept old items
    n_old = 0
    if previous is not None:
        n_old = previous.n_tokens
        for item in previous.items:
            keep_from = min(lengths[l] for l in item.layers)
            if item.end <= keep_from:
                continue
            kept = item.crop_left(keep_from)
            items.append(kept)
            for l in item.layers:
                covered_from[l] = min(covered_from[l], max(kept.start, lengths[l]))
    for l in range(n_layers):
        gap_end = min(covered_from[l], n_old) if previous is not None else 0
        if lengths[l] < gap_end:  # recomputed last time, stored now: exact
            k, v = layers_kv[l]
            items.append(StoredItem((l,), lengths[l], gap_end,
                                    ExactLayer(k[:, :, lengths[l]:gap_end], v[:, :, lengths[l]:gap_end])))
    paired = {l for pair in pairs for l in pair}
    jobs = []
    for a, b in pairs:
        start = max(n_old, min(lengths[a], lengths[b]))
        if start < n_new:
            jobs.append((a, b, tuple(t[:, :, start:n_new] for t in layers_kv[a]),
                         tuple(t[:, :, start:n_new] for t in layers_kv[b]), start))
    if jobs:
        from krul.compression import compress_pairs

        for (a, b, _, _, start), payload in zip(jobs, compress_pairs(method, jobs, **(compress_kwargs or {}))):
            items.append(StoredItem((a, b), start, n_new, payload))
    for l in range(n_layers):
        start = max(n_old, lengths[l])
        if l in paired or start >= n_new:
            continue
        k, v = layers_kv[l]
        items.append(StoredItem((l,), start, n_new, ExactLayer(k[:, :, start:n_new], v[:, :, start:n_new])))
    state = StoredState(fingerprint, token_ids.detach().to("cpu", torch.int64), tuple(lengths), items,
                        meta or {})
    state.check_coverage()
    return state


# -- budgets and tiers -------------------------------------------------------------------------
# The tier order of a `TieredStore`: "active" (the live cache kept where the model runs: restoring
# from it costs nothing), then the stores above, fastest first. A state evicted from a tier moves to
# the next one (demotion); evicted from the last, it is deleted and the conversation is recomputed.
TIER_ORDER = ("active", "pinned", "pageable", "disk")


class StoreSpaceWarning(UserWarning):
    """A tier could not take a state (its budget, a full disk, a file-size limit): the state went to
    the next tier, or was dropped (the conversation is then recomputed, exact)."""


@dataclass
class TierSpec:
    """One tier of a `TieredStore`: its name (`TIER_ORDER`), byte budget and time to live.

    budget_bytes : the most bytes the tier holds (None: unbounded; 0: the tier is off). Memory tiers
        count `StoredState.nbytes()` (every stored tensor plus the token ids, `kv_bytes()` + 4 per
        token); the disk tier counts the files' sizes; the active tier the live caches' buffers
        (`BufferCache.nbytes()`, capacity included).
    ttl_s : a state unused for longer than this is evicted (demoted) at the store's next operation
        (None: no TTL).
    """

    name: str
    budget_bytes: int | None = None
    ttl_s: float | None = None

    def __post_init__(self):
        if self.name not in TIER_ORDER:
            raise StoreError(f"unknown tier {self.name!r}; known: {', '.join(TIER_ORDER)}")
        if self.budget_bytes is not None and self.budget_bytes < 0:
            raise StoreError(f"tier {self.name!r}: budget_bytes must be >= 0 or None, not {self.budget_bytes}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise StoreError(f"tier {self.name!r}: ttl_s must be > 0 or None, not {self.ttl_s}")


def parse_budgets(text: str) -> dict[str, int | None]:
    """`"active=0,pageable=64MiB,disk=1GiB"` -> {tier: bytes}; `none` is unbounded. Units: B, KiB,
    MiB, GiB (or k, M, G: powers of 1024)."""
    units = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gib": 1 << 30}
    out: dict[str, int | None] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip().lower()
        if name not in TIER_ORDER or not value:
            raise StoreError(f"bad budget {part!r}; write TIER=BYTES with TIER one of {', '.join(TIER_ORDER)}, "
                             "e.g. pageable=64MiB,disk=1GiB (none: unbounded)")
        if value == "none":
            out[name] = None
            continue
        m = re.fullmatch(r"([0-9.]+)\s*([a-z]*)", value)
        if m is None or m.group(2) not in units:
            raise StoreError(f"bad budget {part!r}; units: B, KiB, MiB, GiB")
        out[name] = int(float(m.group(1)) * units[m.group(2)])
    return out


@dataclass
class _Entry:
    nbytes: int
    last_used: float


class TieredStore(KVStore):
    """Conversation states across tiers with byte budgets, LRU eviction, a TTL, pinning and demotion.

    `put` places a state in the first storage tier (pinned, pageable, disk: those configured, in
    `TIER_ORDER`) whose budget can hold it, evicting that tier's least recently used states to make
    room; an evicted state is demoted: put into the next tier by the same rule (so evictions cascade
    down), and evicted from the last tier it is deleted (`deletions`): that conversation's next turn
    finds no state and the engine recomputes its history from the messages (exact, only slower). A
    state unused for longer than its tier's `ttl_s` is evicted the same way. A pinned conversation
    (`pin`, against eviction; not to be confused with the page-locked "pinned" tier) is never
    evicted: a state that cannot fit around pinned ones goes to the next tier.

    A tier that fails to take a state (a full disk: ENOSPC, a file-size limit, any `StoreError` of
    its `put`) is skipped with a `StoreSpaceWarning` (once per tier and error kind): the state goes to
    the next tier, or nowhere (then it is dropped, `dropped`, and the conversation is recomputed).
    Never a crash, never wrong KV: every tier below is exact storage of what the policy built.

    The active tier is write-through: `keep_active(key, cache)` keeps the turn's live cache (exact,
    on the model's device) beside the state the policy stored, and `take_active(key)` hands it back
    to the next turn (a restore that costs nothing). Evicting an active cache just drops it (the
    state is below). Its budget counts the caches' buffers.

    `get` counts a hit on the tier it reads from (`hits`); `stats()` reports bytes, counts, hits,
    evictions, demotions, deletions, drops and full-tier errors per tier. One lock makes the store
    safe to share between threads (the trace's workers); the disk tier is a `DiskStore` (format 2,
    durable, and locked across processes per key).

    Parameters
    ----------
    tiers : the tiers, each a `TierSpec` (or a name: unbounded); order is always `TIER_ORDER`.
    root : the disk tier's folder (kept across processes), or None for a temporary one.
    clock : seconds, monotonic (tests pass a fake one to drive the TTL).
    """

    tier = "tiered store's"  # as the engine words a miss: "... in the tiered store's tier"

    def __init__(self, tiers: Sequence[TierSpec | str], root: str | Path | None = None, clock=None,
                 disk: "DiskStore | None" = None):
        import threading
        import time

        specs = {}
        for t in tiers:
            spec = TierSpec(t) if isinstance(t, str) else t
            if spec.name in specs:
                raise StoreError(f"tier {spec.name!r} given twice")
            specs[spec.name] = spec
        if not specs:
            raise StoreError(f"a tiered store needs at least one tier of {', '.join(TIER_ORDER)}")
        self.specs = {name: specs[name] for name in TIER_ORDER if name in specs}
        self.storage = [name for name in self.specs if name != "active"]
        if not self.storage:
            raise StoreError("a tiered store needs a storage tier below 'active' (pinned, pageable or disk): "
                             "the active tier is write-through")
        self.clock = clock or time.monotonic
        self._lock = threading.RLock()
        self.stores: dict[str, KVStore] = {}
        for name in self.storage:
            if name == "disk":
                self.stores[name] = disk if disk is not None else (
                    DiskStore(root) if root is not None else DiskStore.temporary())
            else:
                self.stores[name] = MemoryStore(pinned=name == "pinned")
        # per tier: key -> entry, in least-recently-used-first order (dicts keep insertion order)
        self._entries: dict[str, dict[str, _Entry]] = {name: {} for name in self.specs}
        self._active: dict[str, object] = {}
        self._pins: set[str] = set()
        self._warned: set[tuple[str, str]] = set()
        self.counts = {name: {k: 0 for k in ("puts", "hits", "evictions", "expired", "full_errors")}
                       for name in self.specs}
        self.demotions = 0
        self.deletions = 0  # evicted from the last tier: the conversation is recomputed next turn
        self.dropped = 0  # no tier could take a put: likewise

    # -- the public surface ----------------------------------------------------------------------
    @property
    def disk(self) -> "DiskStore | None":
        return self.stores.get("disk")

    def pin(self, key: str) -> None:
        """Keep `key`'s state (and its active cache) from eviction until `unpin`."""
        with self._lock:
            self._pins.add(key)

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pins.discard(key)

    def where(self, key: str) -> str | None:
        """The storage tier holding `key`'s state, or None."""
        with self._lock:
            return next((name for name in self.storage if key in self._entries[name]), None)

    def used_bytes(self, tier: str) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries[tier].values())

    def keys(self, tier: str) -> list[str]:
        """The keys a tier holds, least recently used first."""
        with self._lock:
            return list(self._entries[tier])

    def put(self, key: str, state: StoredState) -> int:
        with self._lock:
            self._expire()
            self._remove(key, "all-storage")
            placed = self._place(key, state, 0)
            return self._entries[placed][key].nbytes if placed else 0

    def get(self, key: str) -> StoredState:
        with self._lock:
            self._expire()
            tier = self.where(key)
            if tier is None:
                raise MissingStateError(f"no stored state for conversation {key!r} in any tier "
                                        f"({', '.join(self.storage)}): never stored, evicted past the last "
                                        "tier, or dropped; the conversation is recomputed")
            state = self.stores[tier].get(key)
            self._touch(tier, key)
            self.counts[tier]["hits"] += 1
            return state

    def delete(self, key: str) -> None:
        with self._lock:
            self._remove(key, "all")
            for name in self.storage:  # also what a store holds outside the accounting (an earlier process)
                self.stores[name].delete(key)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            self._expire()
            return self.where(key) is not None

    def keep_active(self, key: str, cache) -> bool:
        """Keep the live `cache` of `key` (its stored state is already below) in the active tier;
        False (nothing kept) when there is no active tier or it cannot make room."""
        with self._lock:
            if "active" not in self.specs:
                return False
            self._expire()
            self._remove(key, "active")
            nbytes = int(cache.nbytes())
            if not self._make_room("active", nbytes, key):
                return False
            self._active[key] = cache
            self._entries["active"][key] = _Entry(nbytes, self.clock())
            self.counts["active"]["puts"] += 1
            return True

    def take_active(self, key: str):
        """(state, live cache) kept for `key`, removed from the active tier (the turn writes into the
        cache), or None. The state (the previous items the next offload builds on) is read from its
        storage tier without counting a hit there: free from memory, a file read from the disk tier."""
        with self._lock:
            if "active" not in self.specs:
                return None
            self._expire()
            cache = self._active.pop(key, None)
            if cache is None:
                return None
            self._entries["active"].pop(key, None)
            tier = self.where(key)
            if tier is None:  # the state below is gone (evicted past the last tier): recompute
                return None
            state = self.stores[tier].get(key)
            self._touch(tier, key)
            self.counts["active"]["hits"] += 1
            return state, cache

    def stats(self) -> dict:
        """Per tier: budget, used bytes, states, and the counters; plus demotions, deletions, drops."""
        with self._lock:
            tiers = {name: {"budget_bytes": spec.budget_bytes, "ttl_s": spec.ttl_s,
                            "used_bytes": self.used_bytes(name), "n_states": len(self._entries[name]),
                            **self.counts[name]} for name, spec in self.specs.items()}
            return {"tiers": tiers, "demotions": self.demotions, "deletions": self.deletions,
                    "dropped": self.dropped, "pinned_keys": len(self._pins)}

    # -- placement, eviction, demotion -----------------------------------------------------------
    def _touch(self, tier: str, key: str) -> None:
        entry = self._entries[tier].pop(key)
        entry.last_used = self.clock()
        self._entries[tier][key] = entry  # most recently used last

    def _remove(self, key: str, which: str) -> None:
        names = {"all": list(self.specs), "all-storage": self.storage, "active": ["active"]}[which]
        for name in (n for n in names if n in self.specs):
            if self._entries[name].pop(key, None) is None:
                continue
            if name == "active":
                self._active.pop(key, None)
            else:
                self.stores[name].delete(key)

    def _nbytes(self, tier: str, key: str, state: StoredState) -> int:
        if tier == "disk":
            try:
                return os.stat(self.stores["disk"].path(key)).st_size
            except OSError:
                pass
        return state.nbytes()

    def _make_room(self, tier: str, nbytes: int, incoming: str) -> bool:
        """Evict `tier`'s least recently used unpinned states until `nbytes` more fit; False (nothing
        evicted) when they cannot fit even then."""
        budget = self.specs[tier].budget_bytes
        if budget is None:
            return True
        entries = self._entries[tier]
        evictable = [k for k in entries if k not in self._pins and k != incoming]
        used = sum(e.nbytes for e in entries.values())
        if nbytes > budget - used + sum(entries[k].nbytes for k in evictable):
            return False
        for k in evictable:
            if used + nbytes <= budget:
                break
            used -= entries[k].nbytes
            self.counts[tier]["evictions"] += 1
            self._evict(tier, k)
        return True

    def _evict(self, tier: str, key: str) -> None:
        """Move `key`'s state out of `tier`: down to the next storage tier, or deleted past the last."""
        self._entries[tier].pop(key)
        if tier == "active":  # write-through: the state is below already
            self._active.pop(key, None)
            return
        store = self.stores[tier]
        i = self.storage.index(tier)
        state = store.get(key) if i + 1 < len(self.storage) else None
        store.delete(key)
        if state is None:
            self.deletions += 1
            self._remove(key, "active")  # a live cache without its state is never handed back
            return
        self.demotions += 1
        self._place(key, state, i + 1)

    def _place(self, key: str, state: StoredState, first: int) -> str | None:
        """Put `state` in the first storage tier from index `first` that takes it; its name or None."""
        for name in self.storage[first:]:
            spec = self.specs[name]
            estimate = state.nbytes()
            if spec.budget_bytes is not None and estimate > spec.budget_bytes:
                continue
            if not self._make_room(name, estimate, key):
                continue
            try:
                self.stores[name].put(key, state)
            except StoreError as exc:  # a full disk, a file-size limit: next tier, never a crash
                self.counts[name]["full_errors"] += 1
                self._warn(name, key, exc)
                continue
            nbytes = self._nbytes(name, key, state)
            self._entries[name][key] = _Entry(nbytes, self.clock())
            self.counts[name]["puts"] += 1
            if (spec.budget_bytes is not None and self.used_bytes(name) > spec.budget_bytes
                    and not self._make_room(name, 0, key)):  # the file came out larger than estimated,
                self.counts[name]["evictions"] += 1  # and only it can go: down, or deleted
                self._evict(name, key)
                return self.where(key)
            return name
        self.dropped += 1
        return None

    def _warn(self, tier: str, key: str, exc: Exception) -> None:
        import warnings

        kind = type(exc.__cause__ or exc).__name__ + str(getattr(exc.__cause__, "errno", ""))
        if (tier, kind) in self._warned:
            return
        self._warned.add((tier, kind))
        rest = self.storage[self.storage.index(tier) + 1:]
        warnings.warn(f"krul: the {tier} tier could not store conversation {key!r} ({exc}); "
                      + (f"trying the {rest[0]} tier" if rest else "no tier left: the conversation will be "
                         "recomputed from its messages (exact, slower)") + ". Free space or raise the budget.",
                      StoreSpaceWarning, stacklevel=4)

    def _expire(self) -> None:
        """Evict every unpinned state unused for longer than its tier's ttl_s (top tier first)."""
        now = self.clock()
        for name, spec in self.specs.items():
            if spec.ttl_s is None:
                continue
            for key, entry in list(self._entries[name].items()):
                if key in self._entries[name] and key not in self._pins and now - entry.last_used > spec.ttl_s:
                    self.counts[name]["expired"] += 1
                    self._evict(name, key)


def make_tiered_store(budgets: dict[str, int | None], root: str | Path | None = None,
                      ttl_s: dict[str, float] | None = None, clock=None) -> TieredStore:
    """A `TieredStore` of the tiers named in `budgets` ({tier: bytes or None}); 'pinned' is left out
    when CUDA is absent (page-locked memory serves GPU copies only)."""
    ttl_s = ttl_s or {}
    specs = [TierSpec(name, budgets[name], ttl_s.get(name)) for name in TIER_ORDER
             if name in budgets and not (name == "pinned" and not torch.cuda.is_available())]
    return TieredStore(specs, root=root, clock=clock)
