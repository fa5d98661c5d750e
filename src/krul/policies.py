"""Restore policies: one registry, named the same in configs, the CLI and the results.

A policy decides, at the end of a turn when the conversation goes inactive, what to store: which
layer pairs to compress (a selector from `selector.py`) and which leading tokens of each layer to
recompute instead of storing (a split from `scheduler.py`). Executing a restore is `restore.py`'s
job and the same for every policy.

Policies and the papers they implement:
- full-recompute: prefill the whole history again; stores only token ids.
- full-load: CachedAttention/AttentionStore (Gao et al., ATC'24): store and load every token's KV.
- partial-recompute: Pensieve-style fixed ratio (Yu et al., EuroSys'25): flat split, `recompute_ratio`.
- cake: Cake (Jin et al., ICML'25): compute from the front, load from the back until they meet:
  the flat split chosen by the cost model, no compression.
- minicache: MiniCache (Liu et al., NeurIPS'24): fixed adjacent pairs in the deeper half, merged.
- kvsharer: KVSharer (Yang et al., 2024): static pairs calibrated once on `dev`, DISsimilar first,
  shared.
- krul-fix: Krul's machinery with one plan calibrated on `dev` for every conversation.
- krul: per-conversation pairs (estimator + preemptive selector), merge, bubble-free pyramid split.
- ablations: krul-no-preempt, krul-fixed-split, krul-share.
- beyond the paper: krul-svd (krul's per-conversation pairs, stored as one joint low-rank token
  tensor per pair, xKV-style, sink token exact; see `compression.svd_pair`) and krul-fix-svd (its
  one-plan-for-all ablation); krul-svd-loss (each conversation's pairs ranked by what svd loses on
  its own KV, `compression.svd_pair_losses`) and krul-fix-svd-loss (the one plan of lowest mean
  svd loss on dev).
- storage codecs (issue 19; `quant.py`, a policy's `compress_params["codec"]` = {"bits", "group",
  optional "window"}: every stored payload quantized after `build_state`, except the newest `window`
  tokens, kept exact until the next offload quantizes them): int8 and int4 (FlexGen-style group-wise
  quantization of the stored KV, everything loaded), kivi (KIVI: int2, K per channel, V per token,
  the newest 128 tokens exact),
  krul-svd-loss-int8 and krul-svd-loss-int4 (krul-svd-loss with its payloads quantized; calibrated
  as krul-svd-loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from krul.pricing import PlanPricing
from krul.store import StoredItem, StoredState, build_state


class PolicyError(ValueError):
    """Unknown policy or a policy used without what it needs."""


PAIR_SCORES = ("attention", "svd-loss")


@dataclass(frozen=True)
class RestorePolicy:
    """What to store at the end of a turn.

    split : "load" (store everything: r = 0), "recompute" (store nothing: r = 1), "fixed"
        (`recompute_ratio` with pyramid `slope`), "scheduler" (the ratio minimising the larger
        stream time under the measured rates, pyramid `slope`).
    selector : registry name of the compression selector, or None (no cross-layer compression).
    """

    name: str
    cite: str
    split: str = "load"
    recompute_ratio: float = 0.0
    slope: float = 0.0
    selector: str | None = None
    selector_params: dict = field(default_factory=dict)
    compress_params: dict = field(default_factory=dict)
    needs_estimator: bool = False
    head_reduce: str = "mean"  # how per-head distances combine (the paper is silent): mean of per-head
    min_gain: float = 0.0  # scheduler: overlap only if predicted >= this fraction faster than one stream
    # beyond the paper's linear pyramid: steeper pyramid slopes the scheduler may choose instead of
    # `slope` when they are predicted faster (`scheduler.choose_split`); where a recomputed layer pays
    # a fixed host-issue floor (a GPU), recomputing long prefixes on few layers beats short ones on all
    extra_slopes: tuple = ()
    # what a per-conversation selector ranks pairs by: "attention" (the paper: the estimator's
    # attention distances) or "svd-loss" (beyond the paper: what `compression.svd_pair` would lose
    # on the new segment's own KV, `compression.svd_pair_losses`, with `loss_basis` of each
    # layer's principal axes kept, reduced by `loss_reduce`; the estimator then only feeds the
    # preemptive rule)
    pair_score: str = "attention"
    loss_basis: float = 0.5
    loss_reduce: str = "joint"  # "joint" | "layers" (see compression.svd_pair_losses)
    # per-layer nll cost of one unit of relative squared KV error, measured on dev
    # (`calibrate.layer_sensitivity`); when set, a pair's svd-loss score is the first-order nll
    # cost w_a e_a + w_b e_b of the two layers' own errors e (`score_segment`)
    layer_weights: tuple | None = None
    # shrinkage of a conversation's own svd-loss scores toward the dev mean (beyond the paper):
    # a pair's score is (1 - prior_weight) * own + prior_weight * pair_prior, with `pair_prior`
    # the (n_layers x n_layers) mean scores over dev (`calibrate.mean_pair_losses`); 0 = the
    # conversation alone, 1 = the dev plan (krul-fix-svd-loss). Calibrated on dev.
    prior_weight: float = 0.0
    pair_prior: tuple | None = None
    # plan validation (beyond the paper, `validation.py`): when > 0, the state of the selector's own
    # plan and that of the dev plan (the first pairs of `dev_pairs`, as many as the own plan has,
    # none on a layer the conversation protects) are both built, the model's predictions at the
    # history's last `validate_tokens` positions are compared with the exact KV's, and the state
    # of lower KL divergence is stored; 0 = the selector's plan, unchecked
    validate_tokens: int = 0
    dev_pairs: tuple | None = None

    def with_params(self, **changes) -> "RestorePolicy":
        """A copy with fields changed (e.g. `recompute_ratio`, `selector_params`)."""
        return replace(self, **changes)

    # -- decisions ---------------------------------------------------------------------------
    def plan(self, engine, conversation_id: str, n_layers: int, segment=None, offset: int = 0):
        """The compression plan for this conversation's new segment, or None.

        segment : per layer (keys, values) of the new segment, each (1, kv_heads, tokens,
            head_dim), at absolute position `offset`: what `pair_score="svd-loss"` scores (unless
            the engine holds recorded losses for this turn).
        """
        if self.selector is None:
            return None
        from krul.selector import SelectionInput, make_selector

        if self.pair_score not in PAIR_SCORES:
            raise PolicyError(f"policy {self.name!r}: unknown pair_score {self.pair_score!r}; "
                              f"known: {', '.join(PAIR_SCORES)}")
        stats = engine.similarity_stats(conversation_id)
        if stats is None:
            if self.needs_estimator:
                raise PolicyError(f"policy {self.name!r} needs the attention estimator; run the engine "
                                  "with estimate=True (the CLI does this for krul policies)")
            distances = torch.zeros(n_layers, n_layers, dtype=torch.float64)
            boundary = torch.ones(n_layers, dtype=torch.float64)
        else:
            distances = stats.distances(self.head_reduce)
            boundary = stats.boundary_ratio()
        selector = make_selector(self.selector, **self.selector_params)
        layer_bytes = float(engine.adapter.layer_kv_bytes_per_token())
        if self.pair_score == "svd-loss" and self.selector == "krul" and selector.n_pairs(n_layers, layer_bytes):
            if selector.method != "svd":
                raise PolicyError(f"policy {self.name!r}: pair_score 'svd-loss' ranks pairs by what svd "
                                  f"loses, but the pairs are stored with {selector.method!r}")
            distances = self.with_prior(self.pair_losses(engine, conversation_id, segment, offset))
        selection = SelectionInput(distances=distances, boundary_ratio=boundary, n_layers=n_layers,
                                   layer_bytes_per_token=layer_bytes)
        return selector.select(selection)

    def pair_losses(self, engine, conversation_id: str, segment, offset: int = 0) -> torch.Tensor:
        """(n_layers, n_layers) svd loss of every pair on the new segment: the engine's recorded
        losses for this turn when it holds them (calibration replays), else computed on `segment`."""
        recorded = engine.recorded_losses(conversation_id)
        if recorded is not None:
            return recorded
        if segment is None:
            raise PolicyError(f"policy {self.name!r} scores pairs by svd loss and needs the new "
                              "segment's KV (RestorePolicy.offload passes it)")
        return self.score_segment(segment, offset)

    def with_prior(self, scores: torch.Tensor) -> torch.Tensor:
        """(n_layers, n_layers) pair scores shrunk toward the dev mean by `prior_weight`."""
        if not 0.0 <= self.prior_weight <= 1.0:
            raise PolicyError(f"policy {self.name!r}: prior_weight must be in [0, 1], got {self.prior_weight}")
        if self.prior_weight == 0.0:
            return scores
        if self.pair_prior is None:
            raise PolicyError(f"policy {self.name!r} has prior_weight {self.prior_weight} but no dev mean "
                              "pair scores: calibrate it (python -m krul.calibrate --policy krul-svd-loss)")
        prior = torch.tensor(self.pair_prior, dtype=torch.float64)
        if prior.shape != scores.shape:
            raise PolicyError(f"policy {self.name!r}: dev mean pair scores of shape {tuple(prior.shape)} "
                              f"for {tuple(scores.shape)} scores: calibrate it for this model")
        return (1.0 - self.prior_weight) * scores.to(torch.float64) + self.prior_weight * prior

    def score_segment(self, segment, offset: int = 0) -> torch.Tensor:
        """(n_layers, n_layers) what storing each pair with svd would cost on `segment` (per layer
        (keys, values), each (batch, kv_heads, tokens, head_dim), at absolute `offset`): its svd
        loss, or with `layer_weights` w the weighted sum w_a e[a, b] + w_b e[b, a] of the layers'
        own relative errors (symmetric; NaN on the diagonal)."""
        from krul.compression import svd_pair_losses

        kwargs = self.loss_kwargs(segment)
        if self.layer_weights is None:
            return svd_pair_losses(segment, offset=offset, **kwargs)
        if len(self.layer_weights) != len(segment):
            raise PolicyError(f"policy {self.name!r} has {len(self.layer_weights)} layer weights for a "
                              f"{len(segment)}-layer model: calibrate it for this model")
        own = svd_pair_losses(segment, offset=offset, **{**kwargs, "reduce": "none"})
        weighted = torch.tensor(self.layer_weights, dtype=torch.float64)[:, None] * own
        return weighted + weighted.T

    def loss_kwargs(self, segment) -> dict:
        """`svd_pair_losses` options: the `svd_pair` parameters it models (rank, sink, K/V split),
        `loss_basis` of each layer's kv_heads * head_dim axes, and `loss_reduce`."""
        _, heads, _, head_dim = segment[0][0].shape
        keys = ("rank_ratio", "sink_tokens", "value_share")
        return {**{k: v for k, v in self.compress_params.items() if k in keys},
                "basis_dim": max(1, round(self.loss_basis * heads * head_dim)), "reduce": self.loss_reduce}

    def split_lengths(self, engine, n_tokens: int, n_layers: int, plan) -> tuple[tuple[int, ...], dict]:
        """Recompute lengths L_l for the state to store, and the scheduler's prediction."""
        from krul import scheduler

        if self.split == "load":
            return (0,) * n_layers, {}
        if self.split == "recompute":
            return (n_tokens,) * n_layers, {}
        if self.split == "fixed":
            s = scheduler.fixed_split(n_tokens, n_layers, self.recompute_ratio, slope=self.slope)
            return s.lengths, {}
        if self.split == "scheduler":
            if engine.rates is None:
                raise PolicyError(f"policy {self.name!r} needs measured restore rates "
                                  "(profile them: krul.profile.measure_rates)")
            # priced as stored: each candidate split's loaded bytes per layer, exactly (pricing.py)
            per_token = PlanPricing.for_adapter(engine.adapter, n_tokens, plan, self.compress_params).layer_bytes
            s = scheduler.choose_split(n_tokens, n_layers, engine.rates, per_token,
                                       slope=(self.slope, *self.extra_slopes), min_gain=self.min_gain)
            t_rec, t_load = scheduler.predict(s, engine.rates, per_token)
            return s.lengths, {"recompute_s": t_rec, "load_s": t_load}
        raise PolicyError(f"policy {self.name!r}: unknown split {self.split!r}")

    def offload(self, engine, conversation_id: str, token_ids: list[int], cache,
                previous: StoredState | None) -> int:
        """Build the state of the history `token_ids` from the live cache and store it; its bytes."""
        adapter = engine.adapter
        n_layers = adapter.n_layers
        layers_kv = adapter.kv_from_cache(cache)
        n_old = previous.n_tokens if previous is not None else 0
        segment = [(k[:, :, n_old:len(token_ids)], v[:, :, n_old:len(token_ids)]) for k, v in layers_kv]
        plan = self.plan(engine, conversation_id, n_layers, segment, n_old)
        state = self.build(engine, token_ids, layers_kv, previous, plan)
        if self.validate_tokens:
            with engine.model_work():  # forwards of the model
                state = self.validated(engine, token_ids, layers_kv, previous, plan, state)
        return engine.store.put(conversation_id, state)

    def build(self, engine, token_ids: list[int], layers_kv, previous: StoredState | None, plan) -> StoredState:
        """The state storing `plan` (or no compression when None) under this policy's split."""
        adapter = engine.adapter
        lengths, predicted = self.split_lengths(engine, len(token_ids), adapter.n_layers, plan)
        pairs = plan.pairs if plan is not None else ()
        method = plan.method if plan is not None else "merge"
        compress = {k: v for k, v in self.compress_params.items() if k != "codec"} if method != "share" else {}
        meta = {"policy": self.name, "plan": plan.to_dict() if plan is not None else {},
                "predicted": predicted}

        def state_of(n: int, prev: StoredState | None) -> StoredState:  # the first n tokens onto prev
            return build_state(adapter.fingerprint(), torch.tensor(token_ids[:n]), layers_kv,
                               [min(l, n) for l in lengths], prev, pairs=pairs, method=method,
                               compress_kwargs=compress, meta=meta)

        codec = self.compress_params.get("codec")
        if not codec:
            return state_of(len(token_ids), previous)
        from krul.quant import codec_fn

        # a storage codec: every payload quantized (items kept from `previous` already are), except
        # a window of the newest `codec["window"]` tokens (KIVI's residual), stored exact until the
        # next offload quantizes it: the one item a later offload compresses again
        quantize, window = codec_fn(codec), int(codec.get("window", 0))
        if not window:
            return state_of(len(token_ids), previous).map_payloads(quantize)
        cut = len(token_ids) - window
        n_old = previous.n_tokens if previous is not None else 0
        head = quantized_before(previous, quantize, cut) if previous is not None else None
        if cut > n_old:  # [n_old, cut) quantized now, [cut, n) exact
            head = quantized_before(state_of(cut, head), quantize, cut)
        return state_of(len(token_ids), head)

    def dev_plan(self, plan):
        """The dev plan as a candidate for `plan`: the first `len(plan.pairs)` of `dev_pairs` that
        avoid `plan`'s protected layers, or None (no dev pairs, too few, or the same pairs)."""
        from krul.selector import CompressionPlan

        if plan is None or not plan.pairs or not self.dev_pairs:
            return None
        blocked = set(plan.sensitive)
        pairs = [tuple(p) for p in self.dev_pairs if not blocked.intersection(p)][:len(plan.pairs)]
        if len(pairs) < len(plan.pairs) or set(pairs) == set(plan.pairs):
            return None
        return CompressionPlan(tuple(pairs), plan.sensitive, plan.method, plan.n_layers)

    def validated(self, engine, token_ids: list[int], layers_kv, previous: StoredState | None, plan,
                  state: StoredState) -> StoredState:
        """Of `state` (the selector's `plan`) and the dev plan's state, the one whose restored history
        changes the next-token predictions at the history's last positions least (`validation.py`);
        the divergences go in the state's meta["validation"]."""
        from krul import validation

        if not self.dev_pairs:
            raise PolicyError(f"policy {self.name!r} validates its plans against the dev plan but has no "
                              "dev pairs: calibrate it (python -m krul.calibrate --policy krul-svd-loss)")
        alternative = self.dev_plan(plan)
        n_window = validation.window(len(token_ids), len(token_ids) - (previous.n_tokens if previous else 0),
                                     self.validate_tokens)
        if alternative is None or n_window == 0:
            state.meta["validation"] = {"chosen": "own", "candidates": 1}
            return state
        reference = validation.next_token_logprobs(engine.adapter, token_ids, layers_kv, n_window)
        dev_state = self.build(engine, token_ids, layers_kv, previous, alternative)
        scores = {"own": validation.state_divergence(engine.adapter, state, reference),
                  "dev": validation.state_divergence(engine.adapter, dev_state, reference)}
        chosen = min(scores, key=scores.get)  # ties keep the own plan (first)
        out = state if chosen == "own" else dev_state
        out.meta["validation"] = {"chosen": chosen, "candidates": 2, "tokens": n_window,
                                  **{f"kl_{k}": v for k, v in scores.items()}}
        return out


def quantized_before(state: StoredState, quantize, cut: int) -> StoredState:
    """`state` with the payloads of its items that end at or before token `cut` quantized by
    `quantize` (`quant.codec_fn`; a payload already quantized stays as it is), the others as they are."""
    items = [StoredItem(it.layers, it.start, it.end, quantize(it.payload) if it.end <= cut else it.payload)
             for it in state.items]
    return StoredState(state.fingerprint, state.token_ids, state.recompute_lengths, items, state.meta)


def with_rank_ratio(policy: "RestorePolicy", rank_ratio: float) -> "RestorePolicy":
    """An svd policy at another `rank_ratio` (its selector's pair size follows:
    2 * (rank_ratio + retain_ratio) layers)."""
    if policy.selector_params.get("method") != "svd":
        raise PolicyError(f"policy {policy.name!r} does not compress with svd; rank_ratio is for svd")
    compress = {**policy.compress_params, "rank_ratio": rank_ratio}
    if policy.selector != "krul":  # fixed plans name their pairs: no pair size to follow
        return policy.with_params(compress_params=compress)
    return policy.with_params(compress_params=compress,
                              selector_params={**policy.selector_params, "pair_layer_equiv": svd_pair_size(compress)})


def with_rank_alloc(policy: "RestorePolicy", rank_alloc: str) -> "RestorePolicy":
    """An svd policy whose pairs of one segment share its rank budget by `rank_alloc`
    (`compression.RANK_ALLOCATIONS`; "uniform", xKV's equal ranks, is the default and drops the key).
    The stored bytes stay those of uniform ranks, so the selector's pair size does not change."""
    from krul.compression import RANK_ALLOCATIONS

    if policy.selector_params.get("method") != "svd":
        raise PolicyError(f"policy {policy.name!r} does not compress with svd; rank_alloc is for svd")
    if rank_alloc not in RANK_ALLOCATIONS:
        raise PolicyError(f"rank_alloc must be one of {RANK_ALLOCATIONS}; got {rank_alloc!r}")
    compress = {k: v for k, v in policy.compress_params.items() if k != "rank_alloc"}
    if rank_alloc != "uniform":
        compress["rank_alloc"] = rank_alloc
    return policy.with_params(compress_params=compress)


def svd_pair_size(compress_params: dict) -> float:
    """Stored size of one svd pair in layer-equivalents: 2 * (rank_ratio + retain_ratio)."""
    return 2.0 * (compress_params["rank_ratio"] + compress_params.get("retain_ratio", 0.0))


_MERGE = {"retain_ratio": 0.05}
# dev (smollm2, 8 conversations, 15 pairs): retaining 3% of the tokens exact beats spending those
# bytes on rank (nll ratio 1.0061 vs 1.0089 at 2.0x); more rank to K or to V, or retaining by
# absolute error, was worse (REPRODUCE.md, Calibrated parameters)
_SVD = {"rank_ratio": 0.47, "sink_tokens": 1, "retain_ratio": 0.03}
_SVD_PAIR = {"method": "svd", "pair_layer_equiv": svd_pair_size(_SVD)}
_MIN_GAIN = 0.1  # see scheduler.choose_split: a split must promise >= 10% over a single stream
_STEEP = {"extra_slopes": (4.0, 16.0, 64.0)}  # the krul family's scheduler may pick steeper pyramids
POLICIES: dict[str, RestorePolicy] = {p.name: p for p in [
    RestorePolicy("full-recompute", "prefill the whole history again", split="recompute"),
    RestorePolicy("full-load", "CachedAttention (Gao et al., ATC'24)", split="load"),
    RestorePolicy("partial-recompute", "Pensieve-style fixed ratio (Yu et al., EuroSys'25)",
                  split="fixed", recompute_ratio=0.4, slope=0.0),
    RestorePolicy("cake", "Cake (Jin et al., ICML'25): front recompute meets back load",
                  split="scheduler", slope=0.0, min_gain=_MIN_GAIN),
    RestorePolicy("minicache", "MiniCache (Liu et al., NeurIPS'24)", split="load",
                  selector="minicache", selector_params={"target_ratio": 1.5}, compress_params=_MERGE),
    RestorePolicy("kvsharer", "KVSharer (Yang et al., 2024): static dissimilar pairs, shared",
                  split="load", selector="fixed", selector_params={"pairs": (), "method": "share"}),
    RestorePolicy("krul-fix", "Krul (Wen et al., 2025) ablation: one plan calibrated on dev",
                  split="scheduler", slope=1.0, min_gain=_MIN_GAIN, **_STEEP, selector="fixed",
                  selector_params={"pairs": (), "method": "merge"}, compress_params=_MERGE),
    RestorePolicy("krul", "Krul (Wen et al., 2025)", split="scheduler", slope=1.0, min_gain=_MIN_GAIN, **_STEEP,
                  selector="krul", selector_params={"tau": 0.3, "target_ratio": 1.5}, compress_params=_MERGE,
                  needs_estimator=True),
    RestorePolicy("krul-no-preempt", "Krul ablation: no sensitive-layer protection", split="scheduler",
                  slope=1.0, min_gain=_MIN_GAIN, **_STEEP, selector="krul",
                  selector_params={"tau": 0.3, "target_ratio": 1.5, "preempt": False},
                  compress_params=_MERGE, needs_estimator=True),
    RestorePolicy("krul-fixed-split", "Krul ablation: fixed recompute ratio instead of the scheduler",
                  split="fixed", recompute_ratio=0.4, slope=1.0, selector="krul",
                  selector_params={"tau": 0.3, "target_ratio": 1.5}, compress_params=_MERGE,
                  needs_estimator=True),
    RestorePolicy("krul-share", "Krul ablation: share instead of merge", split="scheduler", slope=1.0,
                  min_gain=_MIN_GAIN, **_STEEP, selector="krul", selector_params={"tau": 0.3, "target_ratio": 1.5, "method": "share"},
                  needs_estimator=True),
    RestorePolicy("krul-svd", "Krul's per-conversation pairs, stored as xKV-style joint SVD (Chang et "
                  "al., 2025) with the sink token exact: beyond the paper", split="scheduler", slope=1.0,
                  min_gain=_MIN_GAIN, **_STEEP, selector="krul",
                  selector_params={"tau": 0.3, "target_ratio": 1.5, **_SVD_PAIR}, compress_params=_SVD,
                  needs_estimator=True),
    RestorePolicy("krul-fix-svd", "krul-svd ablation: one plan calibrated on dev", split="scheduler",
                  slope=1.0, min_gain=_MIN_GAIN, **_STEEP, selector="fixed", selector_params={"pairs": (), "method": "svd"},
                  compress_params=_SVD),
    RestorePolicy("krul-svd-loss", "krul-svd with each conversation's pairs ranked by what svd loses on "
                  "its own KV (compression.svd_pair_losses) instead of attention distance: beyond the paper",
                  split="scheduler", slope=1.0, min_gain=_MIN_GAIN, **_STEEP, selector="krul",
                  selector_params={"tau": 0.3, "target_ratio": 1.5, **_SVD_PAIR}, compress_params=_SVD,
                  needs_estimator=True, pair_score="svd-loss"),
    RestorePolicy("krul-fix-svd-loss", "krul-svd-loss ablation: one plan, the lowest mean svd loss on dev",
                  split="scheduler", slope=1.0, min_gain=_MIN_GAIN, **_STEEP, selector="fixed",
                  selector_params={"pairs": (), "method": "svd"}, compress_params=_SVD),
]}

_INT8 = {"bits": 8, "group": 64}
_INT4 = {"bits": 4, "group": 64}
_KIVI = {"bits": 2, "group": 32, "window": 128}  # KIVI's group size and its full-precision residual R
_FLEXGEN = "FlexGen (Sheng et al., ICML'23) group-wise asymmetric quantization"
POLICIES.update({p.name: p for p in [
    RestorePolicy("int8", f"full-load with the stored KV quantized to int8: {_FLEXGEN}, K per channel and V "
                  "per token as KIVI (Liu et al., 2024, arXiv 2402.02750), groups of 64", split="load",
                  compress_params={"codec": _INT8}),
    RestorePolicy("int4", f"full-load with the stored KV quantized to int4: {_FLEXGEN}, K per channel and V "
                  "per token as KIVI (Liu et al., 2024, arXiv 2402.02750), groups of 64", split="load",
                  compress_params={"codec": _INT4}),
    RestorePolicy("kivi", "KIVI (Liu et al., 2024, arXiv 2402.02750): the stored KV in int2, K per channel "
                  "and V per token, groups of 32, everything loaded (no full-precision residual window)",
                  split="load", compress_params={"codec": _KIVI}),
    POLICIES["krul-svd-loss"].with_params(
        name="krul-svd-loss-int8", cite="krul-svd-loss with every stored payload quantized to int8 "
        f"({_FLEXGEN}; K per channel, V per token as KIVI, Liu et al., 2024, arXiv 2402.02750): beyond the paper",
        compress_params={**_SVD, "codec": _INT8}),
    POLICIES["krul-svd-loss"].with_params(
        name="krul-svd-loss-int4", cite="krul-svd-loss with every stored payload quantized to int4 "
        f"({_FLEXGEN}; K per channel, V per token as KIVI, Liu et al., 2024, arXiv 2402.02750): beyond the paper",
        compress_params={**_SVD, "codec": _INT4}),
]})
# policies calibrated by another policy's dev record (the same plan and split, only the storage codec differs)
CALIBRATED_AS = {"krul-svd-loss-int8": "krul-svd-loss", "krul-svd-loss-int4": "krul-svd-loss"}

# the calibration record's key holding each fixed-plan policy's pairs (`calibrate.calibrate`)
FIXED_PLAN_KEYS = {"krul-fix": "krul_fix_pairs", "krul-fix-svd": "krul_fix_pairs",
                   "krul-fix-svd-loss": "krul_fix_loss_pairs", "kvsharer": "kvsharer_pairs"}


def calibrated(policy: RestorePolicy, model: str) -> RestorePolicy:
    """Fill a policy's calibrated values for `model` from `experiments/calibration/<model>.json`
    (`<model>.svd-loss.json` for the svd-loss policies; written by `python -m krul.calibrate` on
    the dev split): tau and the target ratio of the krul
    family, the fixed pairs of krul-fix and kvsharer (at krul's pair count), minicache's ratio, and
    the dev layer sensitivities that weight an svd-loss policy's pair scores."""
    from krul.records import load_calibration

    cal = load_calibration(model, CALIBRATED_AS.get(policy.name, policy.name))
    if cal is None or policy.selector is None:
        return policy
    n_pairs = int(cal.get("n_pairs", 0))
    if policy.pair_score == "svd-loss":
        policy = with_dev_scores(policy, cal)
    params = dict(policy.selector_params)
    if policy.selector == "krul":
        params.update(tau=cal["tau"], target_ratio=cal["target_ratio"])
    elif policy.name == "krul-fix-svd-loss" and cal.get("pairing", "greedy") != "greedy":
        params.update(pairs=fixed_loss_plan(cal, n_pairs, cal["tau"], cal["pairing"]))
    elif policy.name in FIXED_PLAN_KEYS and FIXED_PLAN_KEYS[policy.name] in cal:
        params.update(pairs=tuple(map(tuple, cal[FIXED_PLAN_KEYS[policy.name]][:n_pairs])))
    elif policy.selector == "minicache":
        params.update(target_ratio=cal["target_ratio"])
    return policy.with_params(selector_params=params)


def json_matrix(rows) -> tuple:
    """A score matrix from a record's nested lists (JSON null = NaN, the diagonal): tuples of floats."""
    return tuple(tuple(float("nan") if x is None else float(x) for x in row) for row in rows)


def with_dev_scores(policy: RestorePolicy, cal: dict, prior_weight: float | None = None,
                    pairing: str | None = None) -> RestorePolicy:
    """An svd-loss policy with what its dev calibration record `cal` holds: the layer
    sensitivities that weight its scores, the dev mean scores it shrinks toward, the shrinkage
    (`prior_weight`) and how a per-conversation selector pairs the layers (`pairing`: "greedy"
    or "matching"); each argument given overrides the record's, which overrides the policy's."""
    changes = {}
    if cal.get("layer_sensitivity"):
        changes["layer_weights"] = tuple(cal["layer_sensitivity"])
    if cal.get("mean_pair_loss"):
        changes["pair_prior"] = json_matrix(cal["mean_pair_loss"])
    if cal.get("krul_fix_loss_pairs"):
        changes["dev_pairs"] = tuple(tuple(int(x) for x in p) for p in cal["krul_fix_loss_pairs"])
    weight = prior_weight if prior_weight is not None else cal.get("prior_weight")
    if weight is not None:
        changes["prior_weight"] = float(weight)
    pairing = pairing or cal.get("pairing")
    if pairing is not None and policy.selector == "krul":
        changes["selector_params"] = {**policy.selector_params, "pairing": pairing}
    return policy.with_params(**changes)


def fixed_loss_plan(cal: dict, n_pairs: int, tau: float, pairing: str = "greedy") -> tuple:
    """krul-fix-svd-loss's `n_pairs` pairs from a dev record: the first of its greedy
    `krul_fix_loss_pairs`, or with `pairing="matching"` the exact least-total pairs of its
    mean scores (`mean_pair_loss`) over the layers not sensitive on dev mean at `tau`."""
    from krul.selector import SelectionInput, calibrate_fixed_pairs

    if pairing == "greedy":
        if "krul_fix_loss_pairs" not in cal:
            raise ValueError("the dev calibration has no 'krul_fix_loss_pairs' for krul-fix-svd-loss; "
                             "calibrate with python -m krul.calibrate --policy krul-svd-loss first")
        pairs = [tuple(p) for p in cal["krul_fix_loss_pairs"]]
        if len(pairs) < n_pairs:
            raise ValueError(f"the dev calibration holds {len(pairs)} krul-fix-svd-loss pairs, fewer than "
                             f"{n_pairs}; re-run python -m krul.calibrate with --pairs up to {n_pairs}")
        return tuple(pairs[:n_pairs])
    if not cal.get("mean_pair_loss"):
        raise ValueError("the dev calibration has no 'mean_pair_loss' to match on; re-run python -m "
                         "krul.calibrate --policy krul-svd-loss")
    prior = torch.tensor(json_matrix(cal["mean_pair_loss"]), dtype=torch.float64)
    n = prior.shape[0]
    boundary = torch.tensor(cal.get("mean_boundary_ratio") or [1.0] * n, dtype=torch.float64)
    return calibrate_fixed_pairs([SelectionInput(prior, boundary, n)], n_pairs, tau=tau, pairing=pairing)


def get_policy(name: str, recompute_ratio: float | None = None, model: str | None = None) -> RestorePolicy:
    """The registry's policy; `recompute_ratio` fixes the split instead (0 = load everything);
    `model` fills the values calibrated on dev for that model, when a calibration exists."""
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    policy = POLICIES[name]
    if model is not None:
        policy = calibrated(policy, model)
    if recompute_ratio is not None and policy.split != "recompute":
        if not 0.0 <= recompute_ratio <= 1.0:
            raise PolicyError(f"--recompute-ratio must be in [0, 1], got {recompute_ratio}")
        policy = policy.with_params(split="fixed", recompute_ratio=recompute_ratio)
    return policy


# -- H2O (issue 19, item 4): heavy-hitter eviction of the stored KV ------------------------------
@dataclass(frozen=True)
class H2OPolicy(RestorePolicy):
    """H2O (Zhang et al., NeurIPS'23, arXiv 2306.14048) as a restore policy: at each offload every
    layer keeps, per KV head, its share of `budget_ratio` of the history's full KV bytes (storage
    bytes, `pricing.storage_nbytes`: kept K and V plus the int32 kept positions and their scores):
    the `recent_ratio` most recent tokens and the heaviest hitters of accumulated attention
    (`h2o.AttentionScores`, over every forward of the conversation); the rest is dropped, and the
    restore loads what was kept (nothing is recomputed). Later turns evict again: the union of the
    kept (restored) tokens and the new turn's is re-scored and evicted to the new history's budget,
    the stored items rebuilt (the named exception to "a stored item is never compressed again").
    `budget_ratio` >= 1 keeps everything: the state full-load stores (no index, no scores, no
    attention capture), the same logits. See `krul.h2o`.
    """

    budget_ratio: float = 0.5
    recent_ratio: float = 0.5  # H2O: half recent, half heavy hitters
    score_heads: str = "kv"  # "kv": each KV head keeps its own tokens (H2O); "layer": one set per layer

    @property
    def scores_attention(self) -> bool:
        """Whether the engine must accumulate attention scores (`h2o.AttentionScores`) for this policy."""
        return self.budget_ratio < 1.0

    def offload(self, engine, conversation_id: str, token_ids: list[int], cache,
                previous: StoredState | None) -> int:
        from krul import h2o
        from krul.store import StoredItem

        if not 0.0 < self.budget_ratio:
            raise PolicyError(f"policy {self.name!r}: budget_ratio must be > 0; got {self.budget_ratio}")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise PolicyError(f"policy {self.name!r}: recent_ratio must be in [0, 1]; got {self.recent_ratio}")
        if self.recompute_ratio or self.split not in ("load", "fixed"):
            raise PolicyError(f"policy {self.name!r} loads what it keeps; it has no recompute split "
                              f"(got split {self.split!r}, recompute_ratio {self.recompute_ratio})")
        meta = {"policy": self.name, "plan": {}, "predicted": {}}
        if not self.scores_attention:  # everything kept: what full-load stores
            if previous is not None and h2o.holds_evicted(previous):
                raise PolicyError(f"policy {self.name!r} keeps everything but the conversation's state was "
                                  "evicted at a smaller budget; continue it at that budget, or replay it")
            state = build_state(engine.adapter.fingerprint(), torch.tensor(token_ids),
                                engine.adapter.kv_from_cache(cache), (0,) * engine.adapter.n_layers, previous,
                                meta=meta)
            return engine.store.put(conversation_id, state)
        scores = engine.scorer.scores(conversation_id, cache)
        layers, info = h2o.evict_layers(len(token_ids), cache, scores, self.budget_ratio, self.recent_ratio,
                                        self.score_heads)
        items = [StoredItem((layer_idx,), 0, len(token_ids), payload) for layer_idx, payload in enumerate(layers)]
        state = StoredState(engine.adapter.fingerprint(), torch.tensor(token_ids, dtype=torch.int64),
                            (0,) * len(layers), items, {**meta, "h2o": info})
        state.check_coverage()
        return engine.store.put(conversation_id, state)


def with_budget(policy: "H2OPolicy", budget_ratio: float | None = None, *,
                storage_ratio: float | None = None) -> "H2OPolicy":
    """An h2o policy keeping `budget_ratio` (in (0, 1]; 1 = everything) of each history's full KV bytes,
    or, given `storage_ratio` (>= 1) instead, 1 / storage_ratio of them: every stored state's
    `pricing.storage_ratio` is then at least that and within one token-layer of it."""
    if not isinstance(policy, H2OPolicy):
        raise PolicyError(f"policy {policy.name!r} is not an eviction policy; with_budget is for h2o")
    if (budget_ratio is None) == (storage_ratio is None):
        raise PolicyError("give with_budget one of budget_ratio (fraction kept) or storage_ratio (full / stored)")
    if storage_ratio is not None:
        if not storage_ratio >= 1.0:
            raise PolicyError(f"storage_ratio must be >= 1; got {storage_ratio}")
        budget_ratio = 1.0 / storage_ratio
    if not 0.0 < budget_ratio <= 1.0:
        raise PolicyError(f"budget_ratio must be in (0, 1]; got {budget_ratio}")
    return policy.with_params(budget_ratio=float(budget_ratio))


POLICIES["h2o"] = H2OPolicy(
    "h2o", "H2O (Zhang et al., NeurIPS'23, arXiv 2306.14048): heavy-hitter eviction, half recent, half "
    "heavy, per KV head; stored at budget_ratio of the full KV, loaded (nothing recomputed)", split="load")
