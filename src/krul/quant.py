"""A storage codec for any stored payload: asymmetric integer quantization with per-group scales.

`quantize_payload(payload, bits, group)` stores every floating tensor of a payload (an exact layer
or a compressed pair of any method) as unsigned integer codes of `bits` bits (8, 4 or 2; 4 and 2 are
bit-packed, 2 or 4 codes per uint8) with one scale and one zero point (the group's minimum, a float
offset, as KIVI does) per group of `group` consecutive elements along the tensor's group axis.
Integer tensors (`retain_idx`) are stored as they are. The result is a `QuantizedPayload` (method
"quant"): the disk format and the restore treat it as any other payload.

Quantization of a group g with minimum lo and maximum hi: zero = lo rounded down to the KV dtype,
scale = (hi - zero) / (2^bits - 1) rounded up to it (so the codes cover the whole group), code =
round((x - zero) / scale) clamped to [0, 2^bits - 1]; dequantized x' = code * scale + zero. Hence
|x - x'| <= scale / 2 per group, plus one rounding to the KV dtype of x'. Scales and zero points are
stored in the KV dtype (2 bytes per group each in a bf16 deployment).

Grouping (the group axis: groups run along it, one scale per group and per index of the others):
- exact `keys`, share `k`: per channel, groups along the tokens (KIVI, Liu et al. 2024, arXiv
  2402.02750: key outliers sit in fixed channels);
- exact `values`, share `v`: per token, groups along the channels (KIVI);
- merge `k_dir` per channel along the tokens (a key's direction keeps its outlier channels), `v_dir`
  per token along the channels; the per-layer norms `*_norm_*` (batch, heads, tokens) along the tokens;
- svd `*_coef` (batch, tokens, rank): per rank column, groups along the tokens: the columns' scales
  are the singular values, which fall by orders of magnitude, so one scale per token row would spend
  the codes on the first columns; `*_basis` (batch, rank, width): per basis row, along the width;
- retained exact tokens `*_ret_*` (batch, heads, n_retained, head_dim): per token along head_dim
  (they are cropped by a token mask, which must not cut a group).

A payload cropped on the left (`crop_left`) keeps its codes: a group cut by the crop stays whole and
the tensor records how many leading elements of its first group are dropped (`lead`), so a crop never
re-quantizes. Placement (`place`) dequantizes in the KV dtype (the scales' dtype: uint8 codes
unpacked with shifts and masks, converted, one `addcmul` per tensor; no fp32 temporaries) and then
reuses the inner payload's placement (`compression.place_pair`) or copies into the exact layer's
views. Only the loaded tokens are dequantized: the payload is first cropped to the first loaded token.

KIVI keeps a full-precision window of the newest tokens (its residual, R = 128): a codec's optional
`window` (`policies.RestorePolicy.build`) stores the history's newest `window` tokens exact and
quantizes them at the next offload, the one case where a stored item is compressed again.

This module imports only `krul.compression` (the inner pairs); `store.payload_from_tensors` imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from krul.compression import METHODS, CompressedPair, place_pair

BITS = (2, 4, 8)
METHOD = "quant"
INNER_METHODS = ("exact", *METHODS)
_RETAINED = ("k_ret_a", "v_ret_a", "k_ret_b", "v_ret_b")
# group axis of every floating tensor, per inner method (see the module docstring)
GROUP_AXIS: dict[str, dict[str, int]] = {
    "exact": {"keys": 2, "values": 3},
    "share": {"k": 2, "v": 3},
    "merge": {"k_dir": 2, "v_dir": 3, "k_norm_a": 2, "k_norm_b": 2, "v_norm_a": 2, "v_norm_b": 2,
              **{n: 3 for n in _RETAINED}},
    "svd": {"k_coef": 1, "v_coef": 1, "k_basis": 2, "v_basis": 2, **{n: 3 for n in _RETAINED}},
}
# token axis of the tensors a left crop slices (retained tokens are masked; svd bases are kept whole)
TOKEN_AXIS: dict[str, dict[str, int]] = {
    "exact": {"keys": 2, "values": 2},
    "share": {"k": 2, "v": 2},
    "merge": {"k_dir": 2, "v_dir": 2, "k_norm_a": 2, "k_norm_b": 2, "v_norm_a": 2, "v_norm_b": 2},
    "svd": {"k_coef": 1, "v_coef": 1},
}
_MAIN = {"exact": "keys", "share": "k", "merge": "k_dir", "svd": "k_coef"}
_SUFFIXES = ("q", "scale", "zero")


class CodecError(ValueError):
    """A bad codec setting or a quantized payload that does not fit its description."""


def check_codec(bits: int, group: int) -> None:
    if bits not in BITS:
        raise CodecError(f"bits must be one of {BITS}; got {bits!r}")
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0 or group % (8 // bits):
        raise CodecError(f"group must be a positive int, a multiple of {8 // bits} at {bits} bits; got {group!r}")


def float_names(inner: str) -> tuple[str, ...]:
    """Names of the inner payload's floating tensors (quantized), in a fixed order."""
    if inner not in GROUP_AXIS:
        raise CodecError(f"unknown inner method {inner!r}; known: {', '.join(INNER_METHODS)}")
    return tuple(GROUP_AXIS[inner])


def int_names(inner: str) -> tuple[str, ...]:
    """Names of the inner payload's integer tensors (stored as they are)."""
    return ("retain_idx",) if inner in ("merge", "svd") else ()


def stored_names(inner: str) -> list[str]:
    """Every tensor name a quantized payload of `inner` stores, sorted (the disk header's keys)."""
    return sorted([f"{n}.{s}" for n in float_names(inner) for s in _SUFFIXES] + list(int_names(inner)))


# -- one tensor ---------------------------------------------------------------------------------
def effective_group(length: int, bits: int, group: int) -> int:
    """The group size a tensor whose group axis has `length` elements is quantized with: `group`, or
    when the axis is shorter the axis length rounded up to whole bytes of codes (a short segment's
    keys are not padded to a full group)."""
    per = 8 // bits
    return min(int(group), max(per, -(-int(length) // per) * per))


def n_groups(length: int, group: int, lead: int = 0) -> int:
    return -(-(int(length) + int(lead)) // int(group))


def grouped_shapes(shape, axis: int, bits: int, group: int, lead: int = 0):
    """(codes shape, scale/zero shape) of a tensor of `shape` grouped along `axis`."""
    rest = [int(x) for i, x in enumerate(shape) if i != axis]
    ng = n_groups(shape[axis], group, lead)
    return tuple(rest + [ng, group * bits // 8]), tuple(rest + [ng])


def quantized_nbytes(shape, axis: int, bits: int, group: int, scale_bytes: int) -> int:
    """Bytes of one tensor of `shape` quantized along `axis` (`quantize`, groups of `effective_group`):
    packed codes + a scale and a zero per group."""
    codes, scales = grouped_shapes(shape, axis, bits, effective_group(shape[axis], bits, group))
    return math.prod(codes) + 2 * math.prod(scales) * int(scale_bytes)


def _round_down(x: Tensor, dtype: torch.dtype) -> Tensor:
    r = x.to(dtype)
    return torch.where(r.to(x.dtype) > x, (x - x.abs() * 2.0 ** -7).to(dtype), r)


def _round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    r = x.to(dtype)
    return torch.where(r.to(x.dtype) < x, (x * (1 + 2.0 ** -7)).to(dtype), r)


def pack(q: Tensor, bits: int) -> Tensor:
    """uint8 codes (..., G) in [0, 2^bits) -> (..., G * bits / 8) uint8, code j of a byte in bits
    [j * bits, (j + 1) * bits)."""
    if bits == 8:
        return q
    per = 8 // bits
    q = q.unflatten(-1, (q.shape[-1] // per, per))
    out = q[..., 0].clone()
    for j in range(1, per):
        out |= q[..., j] << (bits * j)
    return out


def unpack(codes: Tensor, bits: int) -> Tensor:
    """Inverse of `pack`: (..., G * bits / 8) uint8 -> (..., G) uint8."""
    if bits == 8:
        return codes
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return ((codes.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def quantize(x: Tensor, axis: int, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, scale, zero) of `x` grouped along `axis`: codes uint8 (..., n_groups, g * bits / 8)
    (the other axes in order, `axis` removed), scale and zero (..., n_groups) in x's dtype, with
    g = `effective_group` (`group`, or less for a shorter axis; g = codes.shape[-1] * 8 / bits).
    Arithmetic in fp32 (fp64 stays fp64): quantizing is the offload's job, off the restore path."""
    check_codec(bits, group)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xt = x.detach().movedim(axis, -1).to(work)
    length = xt.shape[-1]
    group = effective_group(length, bits, group)
    ng = n_groups(length, group)
    pad = ng * group - length
    lo = F.pad(xt, (0, pad), value=math.inf).unflatten(-1, (ng, group)).amin(-1)
    hi = F.pad(xt, (0, pad), value=-math.inf).unflatten(-1, (ng, group)).amax(-1)
    levels = (1 << bits) - 1
    zero = _round_down(lo, x.dtype)
    span = (hi - zero.to(work)) / levels
    scale = _round_up(torch.where(span > 0, span, torch.ones_like(span)), x.dtype)
    xg = F.pad(xt, (0, pad)).unflatten(-1, (ng, group))
    q = ((xg - zero.to(work)[..., None]) / scale.to(work)[..., None]).round_().clamp_(0, levels)
    return pack(q.to(torch.uint8), bits), scale, zero


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, shape, axis: int, bits: int, lead: int = 0) -> Tensor:
    """The tensor of `shape` (in the scales' dtype) that `quantize` coded; `lead` leading elements of
    the first group along `axis` are dropped (a cropped tensor). Computed in the scales' dtype: codes
    unpacked in uint8, converted, then zero + code * scale in one op (a view of the padded result)."""
    q = unpack(codes, bits).to(scale.dtype)
    y = torch.addcmul(zero.unsqueeze(-1), q, scale.unsqueeze(-1)).flatten(-2)
    return y[..., lead:lead + int(shape[axis])].movedim(-1, axis)


# -- a quantized payload -----------------------------------------------------------------------
@dataclass
class QuantizedPayload:
    """Any payload (`inner`: "exact", "share", "merge" or "svd") with its floating tensors quantized.

    data : name -> tensor: for each floating tensor n of the inner payload `n.q` (uint8 codes),
        `n.scale` and `n.zero` (KV dtype); the inner integer tensors under their own names.
    inner_meta : the inner payload's `meta()`.
    shapes, leads : per floating tensor, its (cropped) shape and the leading elements of its first
        group that are dropped (0 unless cropped along its group axis).
    groups : per floating tensor, its group size (`effective_group` at quantization: <= `group`).
    """

    inner: str
    inner_meta: dict
    bits: int
    group: int
    data: dict[str, Tensor] = field(repr=False)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    leads: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    method: str = METHOD

    def __post_init__(self) -> None:
        check_codec(self.bits, self.group)
        names = stored_names(self.inner)
        missing = [n for n in names if n not in self.data]
        if missing:
            raise CodecError(f"quantized {self.inner} payload is missing tensors {missing}")
        for n in float_names(self.inner):
            self.leads.setdefault(n, 0)
            self.groups.setdefault(n, self.group)
            shape, axis, lead, group = self.shapes[n], GROUP_AXIS[self.inner][n], self.leads[n], self.groups[n]
            codes, scales = grouped_shapes(shape, axis, self.bits, group, lead)
            d = self.data
            if (tuple(d[f"{n}.q"].shape) != codes or d[f"{n}.q"].dtype != torch.uint8
                    or tuple(d[f"{n}.scale"].shape) != scales or tuple(d[f"{n}.zero"].shape) != scales
                    or not 0 <= lead < group or not 0 < group <= self.group or group % (8 // self.bits)):
                raise CodecError(f"quantized tensor {n!r} of shape {shape}: codes {tuple(d[f'{n}.q'].shape)} "
                                 f"scales {tuple(d[f'{n}.scale'].shape)} lead {lead}; expected {codes}, {scales}")

    # -- accounting ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Real bytes of every stored tensor: packed codes, scales, zero points, integer tensors."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def n_tokens(self) -> int:
        main = _MAIN[self.inner]
        return int(self.shapes[main][TOKEN_AXIS[self.inner][main]])

    @property
    def dtype(self) -> torch.dtype:
        return self.data[f"{_MAIN[self.inner]}.scale"].dtype

    @property
    def device(self) -> torch.device:
        return self.data[f"{_MAIN[self.inner]}.q"].device

    # -- dequantization -----------------------------------------------------------------------
    def dequantize_tensor(self, name: str) -> Tensor:
        d = self.data
        return dequantize(d[f"{name}.q"], d[f"{name}.scale"], d[f"{name}.zero"], self.shapes[name],
                          GROUP_AXIS[self.inner][name], self.bits, self.leads[name])

    def dequantize_tensors(self) -> dict[str, Tensor]:
        """The inner payload's tensors (floating ones dequantized in the KV dtype, contiguous)."""
        out = {n: self.dequantize_tensor(n).contiguous() for n in float_names(self.inner)}
        out.update({n: self.data[n] for n in int_names(self.inner)})
        return out

    def inner_pair(self) -> CompressedPair:
        """The dequantized inner pair (pairs only; exact layers: `dequantize_tensors`)."""
        if self.inner == "exact":
            raise CodecError("an exact layer has no inner pair; use dequantize_tensors()")
        return CompressedPair.from_tensors(self.dequantize_tensors(), self.inner_meta)

    def expand(self):
        """Per layer (keys, values) dequantized and expanded, as the inner payload's `expand`."""
        if self.inner == "exact":
            d = self.dequantize_tensors()
            return ((d["keys"], d["values"]),)
        return self.inner_pair().expand()

    def place(self, outs, skips) -> None:
        """Write tokens [skip:] of each layer into its view (None: nothing loaded), dequantizing only
        from the first loaded token on: pairs through `compression.place_pair`, exact layers by a
        dequantization copied into the views."""
        outs, skips = list(outs), [int(s) for s in skips]
        n = self.n_tokens()
        loaded = [s for o, s in zip(outs, skips) if o is not None and s < n]
        if not loaded:
            return
        first = min(loaded)
        src = self._crop(first, copy=False) if first else self
        skips = [max(0, s - first) for s in skips]
        if self.inner == "exact":
            out, skip = outs[0], skips[0]
            if skip:
                src = src._crop(skip, copy=False)
            for name, view in zip(("keys", "values"), out):
                view.copy_(src.dequantize_tensor(name))
            return
        place_pair(src.inner_pair(), outs, skips)

    # -- storage ------------------------------------------------------------------------------
    def _crop(self, start: int, copy: bool) -> "QuantizedPayload":
        n = self.n_tokens()
        if not 0 <= start <= n:
            raise ValueError(f"crop start must be in [0, {n}]; got {start}")
        if start == 0:
            return self
        take = (lambda t: t.clone()) if copy else (lambda t: t)
        data, shapes, leads = dict(self.data), dict(self.shapes), dict(self.leads)
        for name, t_axis in TOKEN_AXIS[self.inner].items():
            g_axis = GROUP_AXIS[self.inner][name]
            shape = list(shapes[name])
            shape[t_axis] -= start
            shapes[name] = tuple(shape)
            if t_axis == g_axis:  # drop whole groups, remember the cut inside the first one
                pos = leads[name] + start
                drop, leads[name] = divmod(pos, self.groups[name])
                for s in _SUFFIXES:
                    t = data[f"{name}.{s}"]
                    data[f"{name}.{s}"] = take(t.narrow(t.dim() - (1 if s != "q" else 2), drop,
                                                        t.shape[-1 if s != "q" else -2] - drop))
            else:  # the token axis survives in the grouped layout (group axis moved last)
                ax = t_axis if t_axis < g_axis else t_axis - 1
                for s in _SUFFIXES:
                    t = data[f"{name}.{s}"]
                    data[f"{name}.{s}"] = take(t.narrow(ax, start, t.shape[ax] - start))
        if self.inner in ("merge", "svd"):
            keep = self.data["retain_idx"] >= start
            data["retain_idx"] = (self.data["retain_idx"][keep] - start).to(torch.int32)
            for name in _RETAINED:  # grouped per token along head_dim: token axis 2 of (b, h, x, g, G')
                for s in _SUFFIXES:
                    data[f"{name}.{s}"] = data[f"{name}.{s}"][:, :, keep]
                shape = list(shapes[name])
                shape[2] = int(keep.sum())
                shapes[name] = tuple(shape)
        return QuantizedPayload(self.inner, self.inner_meta, self.bits, self.group, data, shapes, leads,
                                dict(self.groups))

    def crop_left(self, start: int) -> "QuantizedPayload":
        """Keep tokens [start:] only; the codes are kept (never re-quantized); fresh storage."""
        return self._crop(start, copy=True)

    def to(self, device, non_blocking: bool = False) -> "QuantizedPayload":
        data = {k: v.to(device, non_blocking=non_blocking) for k, v in self.data.items()}
        return QuantizedPayload(self.inner, self.inner_meta, self.bits, self.group, data, dict(self.shapes),
                                dict(self.leads), dict(self.groups))

    def tensors(self) -> dict[str, Tensor]:
        return {n: self.data[n] for n in stored_names(self.inner)}

    def meta(self) -> dict:
        return {"inner": self.inner, "inner_meta": dict(self.inner_meta), "bits": self.bits, "group": self.group,
                "tensors": {n: {"shape": [int(x) for x in self.shapes[n]], "lead": int(self.leads[n]),
                                "group": int(self.groups[n])}
                            for n in float_names(self.inner)}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> "QuantizedPayload":
        inner = str(meta["inner"])
        info = meta["tensors"]
        return cls(inner, dict(meta.get("inner_meta", {})), int(meta["bits"]), int(meta["group"]),
                   {n: tensors[n] for n in stored_names(inner)},
                   {n: tuple(int(x) for x in info[n]["shape"]) for n in float_names(inner)},
                   {n: int(info[n].get("lead", 0)) for n in float_names(inner)},
                   {n: int(info[n].get("group", meta["group"])) for n in float_names(inner)})


def quantize_payload(payload, bits: int, group: int) -> QuantizedPayload:
    """`payload` (any method) with its floating tensors quantized at `bits` in groups of `group`
    (see the module docstring for the axes); a payload already quantized is returned as it is."""
    if payload.method == METHOD:
        return payload
    check_codec(bits, group)
    inner = payload.method
    named = payload.tensors()
    data, shapes, groups = {}, {}, {}
    for name in float_names(inner):
        t, axis = named[name], GROUP_AXIS[inner][name]
        shapes[name] = tuple(t.shape)
        groups[name] = effective_group(t.shape[axis], bits, group)
        data[f"{name}.q"], data[f"{name}.scale"], data[f"{name}.zero"] = quantize(t, axis, bits, group)
    for name in int_names(inner):
        data[name] = named[name]
    return QuantizedPayload(inner, payload.meta(), bits, group, data, shapes, groups=groups)


def codec_fn(codec: dict | None):
    """The payload map of a policy's codec setting ({"bits": b, "group": g}), or None."""
    if not codec:
        return None
    bits, group = int(codec["bits"]), int(codec.get("group", 64))
    check_codec(bits, group)
    return lambda payload: quantize_payload(payload, bits, group)


def check_header(meta: dict, entries: dict) -> str | None:
    """What is wrong with a quantized item's header `meta` and its tensor-table `entries` (name ->
    {dtype, shape, ...}), or None. The names are checked by the caller (`stored_names`)."""
    try:
        inner = meta["inner"]
        bits, group = meta["bits"], meta["group"]
        check_codec(bits, group)
        if not isinstance(meta.get("inner_meta"), dict) or not isinstance(meta.get("tensors"), dict):
            return "inner_meta and tensors must be objects"
        info = meta["tensors"]
        if sorted(info) != sorted(float_names(inner)):
            return f"tensors {sorted(info)!r}, expected {sorted(float_names(inner))}"
        dtype = None
        for name, axis in GROUP_AXIS[inner].items():
            e = info[name]
            if not isinstance(e, dict) or not isinstance(e.get("shape"), list):
                return f"tensor {name!r}: needs a shape"
            shape, lead, g = e["shape"], e.get("lead", 0), e.get("group", group)
            if (len(shape) <= axis or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in (lead, g))
                    or not 0 < g <= group or g % (8 // bits) or not 0 <= lead < g):
                return f"tensor {name!r}: bad shape {shape!r}, lead {lead!r} or group {g!r}"
            codes, scales = grouped_shapes(shape, axis, bits, g, lead)
            q, s, z = (entries[f"{name}.{x}"] for x in _SUFFIXES)
            if q["dtype"] != "uint8" or tuple(q["shape"]) != codes:
                return f"tensor {name!r}: codes {q['dtype']} {q['shape']}, expected uint8 {list(codes)}"
            if tuple(s["shape"]) != scales or tuple(z["shape"]) != scales or s["dtype"] != z["dtype"]:
                return f"tensor {name!r}: scales/zeros {s['shape']}/{z['shape']}, expected {list(scales)}"
            if s["dtype"] not in ("bfloat16", "float16", "float32", "float64") or dtype not in (None, s["dtype"]):
                return f"tensor {name!r}: scale dtype {s['dtype']!r}"
            dtype = s["dtype"]
        if inner == "exact" and (len(info["keys"]["shape"]) != 4 or info["keys"]["shape"] != info["values"]["shape"]):
            return f"keys/values shapes {info['keys']['shape']}/{info['values']['shape']} differ or are not 4-d"
    except CodecError as exc:
        return str(exc)
    except (KeyError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
