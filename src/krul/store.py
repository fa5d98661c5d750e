"""Stored conversation states: layouts, byte accounting, integrity, and the storage tiers.

A `StoredState` is what is left of a conversation's KV cache once it is offloaded: the token ids of
its history, the per-layer recompute lengths L_l (the KV of tokens [0:L_l] of layer l is NOT
stored: it is recomputed on restore), and a list of items. An item covers tokens [start, end) of
one layer (`ExactLayer`) or of a compressed pair of layers (`compression.CompressedPair`). Items
accumulate turn by turn (one per layer or pair per turn, plus exact gap fillers when the split
moves); an item already stored is never re-compressed.

Tiers: `pageable` (ordinary CPU memory), `pinned` (page-locked, CUDA only) and `disk` (one file per
conversation, written atomically, sha256-checked on read, read from the disk with the page cache
dropped). Every state carries the fingerprint of the model that produced it; restoring into
another model is an error. The store knows nothing about which layers to compress or why.
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
MAGIC = b"KRULSTATE1\n"


def payload_from_tensors(method: str, tensors: dict, meta: dict):
    if method == "exact":
        return ExactLayer.from_tensors(tensors, meta)
    from krul.compression import CompressedPair

    return CompressedPair.from_tensors(tensors, meta)


def serialize(state: StoredState) -> bytes:
    """One self-describing blob: magic, header length, JSON header with the body's sha256, body."""
    from safetensors.torch import save

    tensors = {"token_ids": state.token_ids.to(torch.int32).contiguous()}
    items_meta = []
    for i, item in enumerate(state.items):
        payload = item.payload
        named, extra = payload.tensors(), payload.meta()
        for key, tensor in named.items():
            tensors[f"{i}.{key}"] = tensor.detach().to("cpu").contiguous()
        items_meta.append({"layers": list(item.layers), "start": item.start, "end": item.end,
                           "method": payload.method, "keys": sorted(named), "meta": extra})
    body = save(tensors)
    header = json.dumps({"fingerprint": state.fingerprint, "recompute_lengths": list(state.recompute_lengths),
                         "items": items_meta, "meta": state.meta,
                         "body_sha256": hashlib.sha256(body).hexdigest()}).encode()
    return MAGIC + len(header).to_bytes(8, "little") + header + body


def deserialize(blob: bytes, source: str = "state") -> StoredState:
    """Inverse of `serialize`; any damage raises `StoreError` (never silently wrong KV)."""
    from safetensors.torch import load

    if not blob.startswith(MAGIC):
        raise StoreError(f"{source}: not a krul state file (bad magic)")
    try:
        n = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "little")
        header = json.loads(blob[len(MAGIC) + 8:len(MAGIC) + 8 + n])
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{source}: corrupted header ({exc})") from exc
    body = blob[len(MAGIC) + 8 + n:]
    if hashlib.sha256(body).hexdigest() != header.get("body_sha256"):
        raise StoreError(f"{source}: checksum mismatch, the stored KV is corrupted; delete it and "
                         "recompute the conversation")
    tensors = load(body)
    items = []
    for i, meta in enumerate(header["items"]):
        named = {key: tensors[f"{i}.{key}"] for key in meta["keys"]}
        payload = payload_from_tensors(meta["method"], named, meta["meta"])
        items.append(StoredItem(tuple(meta["layers"]), meta["start"], meta["end"], payload))
    return StoredState(header["fingerprint"], tensors["token_ids"].to(torch.int64),
                       tuple(header["recompute_lengths"]), items, header.get("meta", {}))


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
    """One file per conversation state under `root`, written atomically, checksummed."""

    tier = "disk"

    def __init__(self, root: str | Path, drop_page_cache: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.drop_page_cache = drop_page_cache

    def path(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        return self.root / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.krul"

    def put(self, key: str, state: StoredState) -> int:
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(serialize(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.drop_page_cache:
            drop_page_cache(path)
        return state.nbytes()

    def get(self, key: str) -> StoredState:
        path = self.path(key)
        if not path.exists():
            raise StoreError(f"no stored state for conversation {key!r}: {path} does not exist")
        if self.drop_page_cache:
            drop_page_cache(path)
        return deserialize(path.read_bytes(), str(path))

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()


def make_store(tier: str, root: str | Path | None = None) -> KVStore:
    """A store of the named tier; `root` is the folder of the disk tier."""
    if tier == "pageable":
        return MemoryStore(pinned=False)
    if tier == "pinned":
        return MemoryStore(pinned=True)
    if tier == "disk":
        if root is None:
            import tempfile

            root = tempfile.mkdtemp(prefix="krul-states-")
        return DiskStore(root)
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
