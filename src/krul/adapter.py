"""The one module that touches transformers internals: layers, rotary embeddings, masks, caches.

Supported families: Llama-style decoders whose `model.model` has `embed_tokens`, `rotary_emb`,
`layers[i]` (a decoder layer callable on a slice of hidden states) and `norm`: Llama, Qwen2 (and
SmolLM2, which is a Llama). The adapter knows nothing about policies, stores or conversations: it
runs forwards, recomputes the KV of a prefix layer by layer (the pyramid restore; `recompute_into`
writes it into a `BufferCache`, a transformers `Cache` over preallocated per-layer buffers that
`krul.restore` fills and the model continues from), captures attention through a registered
attention function, and converts between `DynamicCache` and per-layer `(keys, values)` tuples of
shape `(batch, kv_heads, tokens, head_dim)`. A `BufferLayer` may hold an evicted history (H2O: some
of the history's positions, per KV head, `hold_evicted`); `forward` then gives the new tokens their
true positions and each layer its own causal mask (`forward_evicted`).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

KV = tuple[torch.Tensor, torch.Tensor]

SUPPORTED_FAMILIES = ("llama", "qwen2")
STATE_FORMAT_VERSION = 1


class AdapterError(ValueError):
    """The model is not one the adapter knows how to drive."""


class ModelAdapter:
    """Drive a causal LM at the granularity restoration needs.

    Parameters
    ----------
    model : a transformers `*ForCausalLM` of a supported family, in eval mode.
    tokenizer : its tokenizer, or None for timing-only models.
    name : the registry name, part of the fingerprint of stored states.
    """

    def __init__(self, model, tokenizer=None, name: str | None = None):
        config = model.config
        if config.model_type not in SUPPORTED_FAMILIES:
            raise AdapterError(f"model type {config.model_type!r} is not supported; supported: "
                               f"{', '.join(SUPPORTED_FAMILIES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(config, "name_or_path", "") or config.model_type
        self.config = config
        self.n_layers: int = config.num_hidden_layers
        self.n_heads: int = config.num_attention_heads
        self.n_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.max_tokens: int = config.max_position_embeddings

    # -- facts -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    def layer_kv_bytes_per_token(self) -> int:
        """Bytes of one layer's K and V for one token in the model's dtype."""
        return 2 * self.n_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def fingerprint(self) -> dict:
        """What a stored state must match to be restored into this model (computed once)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> dict:
        tok = ""
        if self.tokenizer is not None:
            vocab = self.tokenizer.get_vocab()
            blob = "\n".join(f"{k}\t{v}" for k, v in sorted(vocab.items(), key=lambda kv: kv[1]))
            blob += str(getattr(self.tokenizer, "chat_template", ""))
            tok = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return {"model": self.name, "tokenizer": tok, "dtype": str(self.dtype).replace("torch.", ""),
                "n_layers": self.n_layers, "kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "format_version": STATE_FORMAT_VERSION}

    # -- caches ------------------------------------------------------------------------------
    @staticmethod
    def cache_from_kv(layers: Sequence[KV]) -> DynamicCache:
        """A `DynamicCache` holding the given per-layer tensors (no copy)."""
        return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])

    @staticmethod
    def kv_from_cache(cache) -> list[KV]:
        """Per-layer `(keys, values)` of a cache: each `(batch, kv_heads, tokens, head_dim)`."""
        return [(layer.keys, layer.values) for layer in cache.layers]

    @staticmethod
    def crop(cache, n_keep: int) -> None:
        """Keep the first `n_keep` positions of every layer (crop's sign convention changed in 5.x).

        A `BufferLayer` holding an evicted history (`BufferLayer.hold_evicted`) keeps its history
        slots and the new tokens at positions < `n_keep` (`n_keep` below its history's length is an
        error: which evicted slots to keep would differ per head)."""
        for layer in cache.layers:
            if isinstance(layer, BufferLayer) and layer.n_dropped:
                layer.crop(int(n_keep))
                continue
            if layer.keys is not None and layer.keys.shape[-2] > n_keep:
                layer.keys = layer.keys[..., :n_keep, :]
                layer.values = layer.values[..., :n_keep, :]

    # -- forwards ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache, logits_to_keep: int = 0) -> torch.Tensor:
        """One forward over new tokens on top of `cache` (updated in place).

        input_ids : (1, q) ; returns logits (1, q or logits_to_keep, vocab) in float32.
        A cache holding an evicted history (`BufferCache.evicted`) runs through `forward_evicted`.
        """
        if getattr(cache, "evicted", False):
            return self.forward_evicted(input_ids, cache, logits_to_keep)
        out = self.model(input_ids=input_ids.to(self.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=logits_to_keep)
        return out.logits.float()

    @torch.inference_mode()
    def forward_evicted(self, input_ids: torch.Tensor, cache: "BufferCache", logits_to_keep: int = 0) -> torch.Tensor:
        """`forward` over a cache whose layers hold an evicted history (H2O, `krul.h2o`): layer l holds
        s_l of the history's H positions (any subset, per KV head; keys stored rotated at their true
        positions), so the KV length differs per layer and from the position counter.

        The new tokens get their true positions H + i (rotary), and each decoder layer its own causal
        mask over its own KV: every held history slot is visible to every new query, new token j to
        queries i >= j. transformers builds one mask per forward from layer 0's sizes, which cannot
        be right for layers of other lengths, so the decoder layers are run one by one here (the
        model's own `forward` is embed -> rotary -> layers -> norm for the supported families) with
        an additive mask each (None for one query: it sees everything). Under `capture_attention`
        the capturing attention receives these masks.

        input_ids : (1, q) ; returns logits (1, q or logits_to_keep, vocab) in float32.
        """
        if self.attn_implementation == "flash_attention_2" or self.attn_implementation == "flash_attention_3":
            raise AdapterError("an evicted cache needs per-layer 4D masks: load the model with sdpa or eager")
        inner = self.model.model
        ids = input_ids.to(self.device)
        n_q = ids.shape[1]
        seen = {layer.get_seq_length() for layer in cache.layers}
        if len(seen) != 1:
            raise ValueError(f"the cache's layers have seen different numbers of positions: {sorted(seen)}")
        first = seen.pop()
        positions = torch.arange(first, first + n_q, device=self.device)[None]
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, position_ids=positions)
        rows = torch.arange(n_q, device=self.device)[:, None]
        for layer_idx, decoder_layer in enumerate(inner.layers[:self.n_layers]):
            mask = None
            if n_q > 1:  # physical slot j is visible to query i iff j <= held + i
                held = cache.layers[layer_idx].length
                cols = torch.arange(held + n_q, device=self.device)[None, :]
                mask = torch.zeros((n_q, held + n_q), dtype=self.dtype, device=self.device).masked_fill(
                    cols > rows + held, torch.finfo(self.dtype).min)[None, None]
            hidden = decoder_layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                   use_cache=True, position_embeddings=(cos, sin))
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        hidden = inner.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.model.lm_head(hidden).float()

    def _causal_mask(self, n: int) -> torch.Tensor | None:
        """Mask for a full causal self-attention over n tokens; SDPA/flash take None (is_causal)."""
        if self.attn_implementation in ("sdpa", "flash_attention_2", "flash_attention_3"):
            return None
        mask = torch.full((n, n), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        return torch.triu(mask, diagonal=1)[None, None]

    @torch.inference_mode()
    def recompute_prefix(self, input_ids: torch.Tensor, lengths: Sequence[int]) -> list[KV | None]:
        """Recompute, layer by layer, the KV of layer l's first `lengths[l]` tokens (the pyramid).

        Layer l runs on the hidden states of tokens [0:L_l] produced by layer l-1, which exist
        because `lengths` is non-increasing; causal attention makes the result exact.

        input_ids : (1, >= lengths[0]) ; lengths : (n_layers,) non-increasing.
        Returns per layer `(keys, values)` of shape (1, kv_heads, L_l, head_dim), None where L_l = 0.
        """
        if len(lengths) != self.n_layers:
            raise ValueError(f"lengths has {len(lengths)} entries for {self.n_layers} layers")
        if any(b > a for a, b in zip(lengths, lengths[1:])):
            raise ValueError(f"recompute lengths must be non-increasing with depth: {list(lengths)}")
        out: list[KV | None] = [None] * self.n_layers
        n0 = int(lengths[0])
        if n0 == 0:
            return out
        inner = self.model.model
        ids = input_ids[:, :n0].to(self.device)
        positions = torch.arange(n0, device=self.device)[None]
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, position_ids=positions)
        capture = DynamicCache()
        last = max(i for i, n in enumerate(lengths) if n > 0)
        for layer_idx in range(last + 1):
            n = int(lengths[layer_idx])
            hidden = hidden[:, :n]
            hidden = inner.layers[layer_idx](
                hidden, attention_mask=self._causal_mask(n), position_ids=positions[:, :n],
                past_key_values=capture, use_cache=True,
                position_embeddings=(cos[:, :n], sin[:, :n]))
            layer = capture.layers[layer_idx]
            out[layer_idx] = (layer.keys, layer.values)
        return out

    # === attention capture, for krul.estimator ==================================================
    # (One block, appended; nothing above depends on it.) Attention probabilities are observed
    # through transformers' own extension point: a function registered in `AttentionInterface`
    # under CAPTURE_ATTENTION computes exactly what `eager_attention_forward` computes and hands
    # the float32 probabilities to the observer installed by `capture_attention`. Outside that
    # context the model runs its usual implementation (sdpa) again.
    CAPTURE_ATTENTION = "krul_estimate"
    # id(model config) -> observer(layer_idx, probs); class-wide, like transformers' registries.
    _capture_observers: dict = {}

    def attention_implementation(self, name: str):
        """Context manager: the model runs attention implementation `name` inside the block.

        Uses `PreTrainedModel.set_attn_implementation` (transformers >= 5.17 accepts any name
        registered in `AttentionInterface`; it sets the config of the model and its submodels) and
        restores the previous implementation in `finally`.
        """
        import contextlib

        @contextlib.contextmanager
        def _switch():
            previous = self.config._attn_implementation
            if previous == name:
                yield
                return
            self.model.set_attn_implementation(name)
            try:
                yield
            finally:
                self.model.set_attn_implementation(previous)

        return _switch()

    def capture_attention(self, observer):
        """Context manager: every attention layer hands its probabilities to `observer`.

        Inside the block attention is computed with eager attention's math (scaling, additive mask,
        softmax in float32; GQA by grouping the query heads instead of repeating K and V) and
        `observer(layer_idx, probs)` is called per layer with probs: (1, heads, q, k) float32 (one
        map per query head), before the cast to the model's dtype. The observer must not modify
        `probs`. Captures do not nest.
        """
        import contextlib

        self._register_capture_attention()

        @contextlib.contextmanager
        def _capture():
            key = id(self.config)
            if key in ModelAdapter._capture_observers:
                raise RuntimeError("attention capture is already on for this model; "
                                   "leave the enclosing capture_attention block first")
            ModelAdapter._capture_observers[key] = observer
            try:
                with self.attention_implementation(self.CAPTURE_ATTENTION):
                    yield
            finally:
                ModelAdapter._capture_observers.pop(key, None)

        return _capture()

    @classmethod
    def _register_capture_attention(cls) -> None:
        """Register the capturing attention function and its mask builder (idempotent)."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(cls.CAPTURE_ATTENTION, cls._capture_attention_forward)
        # For a name it does not know, `create_causal_mask` returns None (no mask at all, which
        # eager math would read as full attention); registering eager's mask builder under the same
        # name makes transformers pass the additive (batch, 1, q, k) float mask eager receives.
        AttentionMaskInterface.register(cls.CAPTURE_ATTENTION, eager_mask)

    @staticmethod
    def _capture_attention_forward(module, query, key, value, attention_mask, scaling,
                                   dropout: float = 0.0, **kwargs):
        """`eager_attention_forward`'s math, plus the hand-off of the probabilities.

        query: (batch, heads, q, head_dim); key, value: (batch, kv_heads, k, head_dim);
        attention_mask: additive float (batch, 1, q, k) (what transformers passes once the mask
        builder is registered), bool (True = attend), or None, in which case causal masking is
        built here from the lengths: query i sits at absolute position k - q + i.
        Returns (attn_output (batch, q, heads, head_dim), attn_weights (batch, heads, q, k)).
        """
        n_rep = module.num_key_value_groups
        batch, n_heads, n_q, head_dim = query.shape
        n_kv, n_k = key.shape[1], key.shape[-2]
        # Grouped-query attention without transformers' repeat_kv: query head h = g * n_rep + j
        # reads kv head g (repeat_kv's order), so the n_rep heads of group g are stacked as rows of
        # one (n_rep * q, head_dim) matrix against that group's keys. The same products as eager,
        # without materialising n_rep copies of K and V each step (what made decode slow).
        q_grouped = query.reshape(batch, n_kv, n_rep * n_q, head_dim)
        # scaled and masked in place: the same values as eager's out-of-place ops, without two more
        # (heads, q, k) allocations per layer (fresh pages on every call, a visible part of a CPU prefill)
        attn_weights = torch.matmul(q_grouped, key.transpose(2, 3)).mul_(scaling).view(batch, n_heads, n_q, n_k)
        if attention_mask is None and n_q > 1:
            rows = torch.arange(n_q, device=query.device)[:, None] + (n_k - n_q)
            attention_mask = torch.arange(n_k, device=query.device)[None, :] <= rows
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attn_weights.masked_fill_(~attention_mask, torch.finfo(attn_weights.dtype).min)
            elif attention_mask.dtype == attn_weights.dtype:
                attn_weights.add_(attention_mask)
            else:  # eager's type promotion (a float32 mask over bf16 scores gives float32)
                attn_weights = attn_weights + attention_mask
        probs = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32)
        observer = ModelAdapter._capture_observers.get(id(module.config))
        if observer is not None:
            observer(module.layer_idx, probs)
        attn_weights = probs.to(query.dtype)
        attn_weights = torch.nn.functional.dropout(attn_weights, p=dropout, training=module.training)
        attn_output = torch.matmul(attn_weights.view(batch, n_kv, n_rep * n_q, n_k), value)
        attn_output = attn_output.view(batch, n_heads, n_q, head_dim).transpose(1, 2).contiguous()
        return attn_output, attn_weights
    # === end of attention capture ===============================================================


# =============================================================================================
# Restore buffers: a Cache over preallocated per-layer buffers, and the pyramid recompute into it
# (used by krul.restore; everything there uses only the tensors)
# =============================================================================================
class BufferLayer(DynamicLayer):
    """One layer's K and V in preallocated buffers `(1, kv_heads, capacity, head_dim)`.

    `update` writes the new tokens in place at the current length and returns views of the
    buffers (no concatenation, no reallocation). `keys`/`values` are always the views
    `[:, :, :length]`; assigning a prefix view of the buffer (as `ModelAdapter.crop` does) sets the
    length, assigning another tensor copies it in.

    `grow` : when a write would pass the capacity, reallocate buffers of 1.5x (or what is needed)
    and copy the held tokens over, instead of raising. Off on timing paths, where a reallocation
    would be an unmeasured cost; on for the engine's decode and teacher-forced tail, whose lengths
    are not known before the turn runs.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, keys_buf: torch.Tensor, values_buf: torch.Tensor, grow: bool = False):
        self._k_buf, self._v_buf = keys_buf, values_buf
        self.grow = grow
        self.length = 0
        self.pending: list = []  # CUDA events the layer's restored tokens wait on (per-layer join)
        # an evicted history (`hold_evicted`): slots [0, s) hold s of the first `n_history` positions
        self.n_history = 0
        self.history_positions: torch.Tensor | None = None  # (groups, s) int64, per KV head (or 1)
        self.history_scores: torch.Tensor | None = None  # (groups, s) float32, what the state carried
        super().__init__()
        self.dtype, self.device = keys_buf.dtype, keys_buf.device
        self.is_initialized = True

    # -- an evicted history (H2O, `krul.h2o`) ---------------------------------------------------
    # Invariant: slots [0, s) hold history positions `history_positions` (< n_history, rotated at
    # those positions); slot s + i holds position n_history + i. So the layer has seen
    # length + n_dropped positions, and `get_seq_length`/`get_mask_sizes` say so as transformers'
    # sliding-window layers do (position counter, kv_offset) while `length` is the KV held.
    def hold_evicted(self, n_history: int, positions: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Declare slots [0, s) to hold the history positions `positions` (groups, s) of a history of
        `n_history` positions (`scores`: their carried H2O scores, (groups, s)); sets length s."""
        positions = positions.to(self._k_buf.device, torch.int64)
        s = positions.shape[-1]
        if s > n_history or positions.dim() != 2:
            raise ValueError(f"{tuple(positions.shape)} history positions for a history of {n_history}")
        self.n_history, self.history_positions = int(n_history), positions
        self.history_scores = None if scores is None else scores.to(self._k_buf.device, torch.float32)
        self.length = s

    def clear_evicted(self) -> None:
        self.n_history, self.history_positions, self.history_scores = 0, None, None

    @property
    def n_dropped(self) -> int:
        """History positions this layer does not hold (0 unless it holds an evicted history)."""
        if self.history_positions is None:
            return 0
        return self.n_history - self.history_positions.shape[-1]

    def positions(self) -> torch.Tensor:
        """(groups, length) int64: the position each held slot stands for (groups = 1 unless the layer
        holds an evicted history chosen per KV head)."""
        dev = self._k_buf.device
        if self.history_positions is None:
            return torch.arange(self.length, device=dev)[None]
        hist = self.history_positions
        s = hist.shape[-1]
        new = torch.arange(self.n_history, self.n_history + self.length - s, device=dev)
        return torch.cat([hist, new[None].expand(hist.shape[0], -1)], dim=1)

    # the views the rest of transformers reads
    def join(self) -> None:
        """Make the current stream wait until this layer's restored tokens are written."""
        if self.pending:
            stream = torch.cuda.current_stream(self._k_buf.device)
            for ev in self.pending:
                stream.wait_event(ev)
            self.pending = []

    @property
    def keys(self) -> torch.Tensor:
        return self._k_buf[:, :, :self.length]

    @keys.setter
    def keys(self, value) -> None:
        self._assign("_k_buf", value)

    @property
    def values(self) -> torch.Tensor:
        return self._v_buf[:, :, :self.length]

    @values.setter
    def values(self, value) -> None:
        self._assign("_v_buf", value)

    def _assign(self, name: str, value) -> None:
        if value is None:  # base-class initialisation
            return
        n = value.shape[-2]
        if n > self.capacity:
            if not self.grow:
                raise ValueError(f"{n} tokens do not fit a buffer of capacity {self.capacity}")
            self._reserve(n)
        buf = getattr(self, name)
        if value.data_ptr() != buf.data_ptr():
            buf[:, :, :n].copy_(value)
        self.length = n

    @property
    def capacity(self) -> int:
        return self._k_buf.shape[-2]

    def _reserve(self, n_tokens: int) -> None:
        """Reallocate both buffers to hold >= `n_tokens`, keeping the first `length` tokens."""
        self.join()
        cap = max(int(n_tokens), self.capacity + self.capacity // 2)
        for name in ("_k_buf", "_v_buf"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[:-2] + (cap, old.shape[-1]))
            new[:, :, :self.length].copy_(old[:, :, :self.length])
            setattr(self, name, new)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write `(1, kv_heads, q, head_dim)` new K/V at [length, length + q); return the full views."""
        start = self.length
        end = start + key_states.shape[-2]
        if end > self.capacity:
            if not self.grow:
                raise ValueError(f"the KV buffer holds {self.capacity} tokens; {end} needed. Size the "
                                 "BufferCache for history + new input (+ decoded tokens), or pass grow=True")
            self._reserve(end)
        self.join()
        self._k_buf[:, :, start:end].copy_(key_states)
        self._v_buf[:, :, start:end].copy_(value_states)
        self.length = end
        if start == 0 and key_states.dtype == self._k_buf.dtype:
            # the fresh (contiguous) tensors equal what was written; attention reads them directly
            return key_states, value_states
        return self.keys, self.values

    def get_seq_length(self, *args) -> int:
        """Positions seen: the tokens held, plus the evicted history positions not held."""
        return self.length + self.n_dropped

    def get_mask_sizes(self, query_length=None, *args) -> tuple[int, int]:
        """(kv_length, kv_offset); older transformers pass `cache_position` (a tensor) instead."""
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length or 0)
        return self.length + q, self.n_dropped

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.2x name
        return -1

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions (negative: drop that many of the newest)."""
        seen = self.get_seq_length()
        n_keep = max(0, seen + max_length) if max_length < 0 else min(seen, max_length)
        if self.n_dropped and n_keep < self.n_history:
            raise ValueError(f"cannot crop to {n_keep} positions inside an evicted history of "
                             f"{self.n_history}: recompute the history instead")
        self.length = n_keep - self.n_dropped

    def reset(self) -> None:
        self.length = 0
        self.clear_evicted()

    def offload(self):
        raise NotImplementedError("BufferCache layers live in preallocated device buffers; offload "
                                  "through krul.store instead")

    def prefetch(self):
        raise NotImplementedError("BufferCache layers live in preallocated device buffers")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("BufferCache holds one sequence (batch 1)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BufferCache holds one sequence (batch 1)")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("BufferCache holds one sequence (batch 1)")


class BufferCache(Cache):
    """A transformers `Cache` whose layers are preallocated buffers (see `BufferLayer`).

    Parameters
    ----------
    n_layers, n_kv_heads, head_dim : the model's KV geometry.
    capacity : tokens each layer holds (history + new input, + decoded tokens if any).
    dtype, device : the model's.
    grow : layers reallocate instead of raising when a write passes the capacity (`BufferLayer`).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, grow: bool = False):
        shape = (1, n_kv_heads, int(capacity), head_dim)
        layers = [BufferLayer(torch.empty(shape, dtype=dtype, device=device),
                              torch.empty(shape, dtype=dtype, device=device), grow=grow)
                  for _ in range(n_layers)]
        super().__init__(layers=layers)

    @classmethod
    def for_adapter(cls, adapter: ModelAdapter, capacity: int, grow: bool = False) -> "BufferCache":
        return cls(adapter.n_layers, adapter.n_kv_heads, adapter.head_dim, capacity, adapter.dtype,
                   adapter.device, grow=grow)

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def set_length(self, n_tokens: int) -> None:
        """Declare every layer to have seen `n_tokens` positions (the buffers are not touched): it
        holds them all, or, holding an evicted history, `n_tokens` minus the positions it dropped."""
        for layer in self.layers:
            held = int(n_tokens) - layer.n_dropped
            if not 0 <= held <= self.capacity:
                raise ValueError(f"length {n_tokens} (held {held}) outside [0, {self.capacity}]")
            layer.length = held

    @property
    def evicted(self) -> bool:
        """Whether a layer holds an evicted history (its KV length differs from its positions)."""
        return any(layer.n_dropped for layer in self.layers)

    def clear_evicted(self) -> None:
        for layer in self.layers:
            layer.clear_evicted()

    def join(self) -> None:
        """Make the current stream wait for every layer's pending restore (see `restore_into`)."""
        for layer in self.layers:
            layer.join()

    def buffers(self, layer_idx: int) -> KV:
        """The whole `(keys, values)` buffers of a layer, `(1, kv_heads, capacity, head_dim)`."""
        layer = self.layers[layer_idx]
        return layer._k_buf, layer._v_buf

    def kv(self) -> list[KV]:
        """Per layer `(keys, values)` views of the held tokens, `(1, kv_heads, length, head_dim)`."""
        self.join()
        return [(layer.keys, layer.values) for layer in self.layers]

    def fill_(self, value: float) -> "BufferCache":
        """Overwrite every buffer (tests and checks: unwritten regions then show up)."""
        self.join()
        for layer in self.layers:
            layer._k_buf.fill_(value)
            layer._v_buf.fill_(value)
        return self

    def nbytes(self) -> int:
        return sum(2 * layer._k_buf.numel() * layer._k_buf.element_size() for layer in self.layers)


@torch.inference_mode()
def recompute_into(adapter: ModelAdapter, token_ids: torch.Tensor, lengths: Sequence[int],
                   cache: BufferCache, on_layer: Callable[[int, str], None] | None = None) -> None:
    """Recompute layer l's KV of tokens [0:L_l] into `cache` layer by layer (the pyramid).

    Layer l runs on the hidden states of tokens [0:L_l] that layer l-1 produced, which exist
    because `lengths` is non-increasing; causal attention makes the result the plain forward's.
    Each recomputed layer's buffer region [0:L_l] is written by the layer's own `cache.update`;
    its length is L_l afterwards. Layers with L_l = 0 are not touched.

    token_ids : (1, >= L_0) on the adapter's device ; lengths : (n_layers,) non-increasing.
    on_layer : called as `on_layer(layer_idx, "start" | "end")` around each layer (timelines).
    """
    n_layers = adapter.n_layers
    if len(lengths) != n_layers:
        raise ValueError(f"lengths has {len(lengths)} entries for {n_layers} layers")
    if any(b > a for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"recompute lengths must be non-increasing with depth: {list(lengths)}")
    n0 = int(lengths[0])
    if n0 == 0:
        return
    inner = adapter.model.model
    ids = token_ids[:, :n0]
    positions = torch.arange(n0, device=ids.device)[None]
    hidden = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(hidden, position_ids=positions)
    last = max(i for i, n in enumerate(lengths) if n > 0)
    for layer_idx in range(last + 1):
        n = int(lengths[layer_idx])
        if on_layer is not None:
            on_layer(layer_idx, "start")
        cache.layers[layer_idx].length = 0
        hidden = hidden[:, :n]
        hidden = inner.layers[layer_idx](
            hidden, attention_mask=adapter._causal_mask(n), position_ids=positions[:, :n],
            past_key_values=cache, use_cache=True, position_embeddings=(cos[:, :n], sin[:, :n]))
        if isinstance(hidden, tuple):  # older decoder layers return (hidden, ...)
            hidden = hidden[0]
        if on_layer is not None:
            on_layer(layer_idx, "end")


class LayerwisePrefill:
    """The new input's forward over a restored `BufferCache`, one decoder layer at a time, each step
    replayable as its own CUDA graph; layer l starts once layer l of the history is in place.

    Steps: embedding and rotary tables of the new positions; decoder layer 0 .. L-1 (each writes its
    new K/V into the cache at [n_history, n_history + q) through `BufferLayer.update`); final norm
    and LM head on the last position, and the greedy token. `run()` makes the current stream wait for
    layer l's pending restore events (`BufferLayer.join`, left by `restore_into(join="layer")`) just
    before step l, so the shallow layers of the new input overlap the end of the restore. With
    `graphs=True` (CUDA) each step is captured once and replayed: L + 2 launches instead of ~40 ops
    per layer, which is what made the eager per-layer path cost ~20 ms of host issue for 128 tokens.
    The graphs share one memory pool and keep their outputs, so step l+1 reads step l's output at a
    fixed address.

    Parameters
    ----------
    adapter : the model (a supported family)
    cache : `BufferCache` with capacity >= n_history + q, holding the history's KV in [0:n_history)
    n_history : tokens of history the new input attends to
    input_ids : (1, q) new tokens
    graphs : capture CUDA graphs (raises on a CPU device)
    """

    def __init__(self, adapter: ModelAdapter, cache: BufferCache, n_history: int, input_ids: torch.Tensor,
                 graphs: bool = False):
        self.adapter, self.cache, self.n_history = adapter, cache, int(n_history)
        self.ids = input_ids.to(adapter.device)
        if self.ids.dim() != 2 or self.ids.shape[0] != 1:
            raise ValueError(f"input_ids must be (1, q); got {tuple(self.ids.shape)}")
        q = self.ids.shape[1]
        if self.n_history + q > cache.capacity:
            raise ValueError(f"cache capacity {cache.capacity} < history {self.n_history} + new {q}")
        self.inner = adapter.model.model
        dev = adapter.device
        self.positions = torch.arange(self.n_history, self.n_history + q, device=dev)[None]
        # additive causal mask (1, 1, q, n_history + q): query i sees keys j <= n_history + i
        keys = torch.arange(self.n_history + q, device=dev)
        allowed = keys[None, :] <= self.positions[0][:, None]
        self.mask = torch.zeros(allowed.shape, dtype=adapter.dtype, device=dev).masked_fill(
            ~allowed, torch.finfo(adapter.dtype).min)[None, None]
        self.graphs: list | None = None
        self._out: dict = {}
        if graphs:
            if dev.type != "cuda":
                raise ValueError("graphs=True needs a CUDA device")
            self._capture()

    # -- the steps (eager) ---------------------------------------------------------------------
    def _embed(self):
        hidden = self.inner.embed_tokens(self.ids)
        cos, sin = self.inner.rotary_emb(hidden, position_ids=self.positions)
        return hidden, cos, sin

    def _layer(self, layer_idx: int, hidden, cos, sin):
        out = self.inner.layers[layer_idx](hidden, attention_mask=self.mask, position_ids=self.positions,
                                           past_key_values=self.cache, use_cache=True,
                                           position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out

    def _head(self, hidden):
        logits = self.adapter.model.lm_head(self.inner.norm(hidden[:, -1:]))
        return logits, logits[0, -1].argmax()

    def _eager(self):
        hidden, cos, sin = self._embed()
        for layer_idx in range(self.adapter.n_layers):
            self.cache.layers[layer_idx].join()
            hidden = self._layer(layer_idx, hidden, cos, sin)
        return self._head(hidden)

    # -- graphs --------------------------------------------------------------------------------
    def _capture(self) -> None:
        dev = self.adapter.device
        with torch.inference_mode():
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up (lazy initialisation, cuBLAS handles)
                for _ in range(2):
                    self.cache.set_length(self.n_history)
                    self._eager()
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            self.cache.set_length(self.n_history)
            graphs = [torch.cuda.CUDAGraph() for _ in range(self.adapter.n_layers + 2)]
            pool = None
            with torch.cuda.graph(graphs[0]):
                hidden, cos, sin = self._embed()
            pool = graphs[0].pool()
            for layer_idx in range(self.adapter.n_layers):
                with torch.cuda.graph(graphs[layer_idx + 1], pool=pool):
                    hidden = self._layer(layer_idx, hidden, cos, sin)
            with torch.cuda.graph(graphs[-1], pool=pool):
                logits, tok = self._head(hidden)
            torch.cuda.synchronize(dev)
        self.graphs = graphs
        self._out = {"hidden": hidden, "cos": cos, "sin": sin, "logits": logits, "tok": tok}
        self.cache.set_length(self.n_history)

    @torch.inference_mode()
    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The new input's forward: ((1, 1, vocab) logits of the last position, the greedy token id
        as a 0-d device tensor). The cache holds n_history + q tokens afterwards."""
        self.cache.set_length(self.n_history)
        if self.graphs is None:
            logits, tok = self._eager()
        else:
            self.graphs[0].replay()
            for layer_idx in range(self.adapter.n_layers):
                self.cache.layers[layer_idx].join()  # wait for this layer's restore only
                self.graphs[layer_idx + 1].replay()
            self.graphs[-1].replay()
            logits, tok = self._out["logits"], self._out["tok"]
        self.cache.set_length(self.n_history + self.ids.shape[1])
        return logits, tok
