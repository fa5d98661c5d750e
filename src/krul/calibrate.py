"""Calibration on the `dev` split, and nll-vs-compression curves.

One base pass per conversation (full KV, attention estimator on, teacher-forced) records the
similarity statistics at the end of every turn and the reference nll; every policy and compression
level then replays the conversation with those recorded statistics (`Engine.recorded_stats`) at
recompute ratio 0, so that only compression can cost quality, and with one generated token per
turn (the nll needs no decoding). Calibration picks, on `dev` only, the preemptive threshold tau
and the largest target ratio whose nll stays within 1% of full KV (upper bound of the paired
bootstrap interval), plus the single best fixed plans for `krul-fix` (similar first) and
`kvsharer` (dissimilar first). For `krul-svd-loss` (pairs ranked by what svd loses on the
conversation's own KV) it first measures each layer's nll sensitivity to KV error
(`layer_sensitivity`), records every turn's pair scores once (`record_pair_losses`, reused by the
replays like the estimator statistics) and adds the plan of lowest mean score
(`krul_fix_loss_pairs`, for `krul-fix-svd-loss`). The result is written to
`experiments/calibration/<model>.json` and read by `policies.get_policy(..., model=...)`.

Usage: `python -m krul.calibrate --model smollm2-135m [--n-conversations 8]`; the curves on test:
`python -m krul.calibrate curves --model smollm2-135m --split test --n-conversations 30`.

Both resume from their `<stem>.partial.jsonl`, where every point carries a `stamp` of what produced
it (`krul.stamps`: code version, resolved policy and settings, the calibration record's and the
conversations' content): points of another stamp are recomputed (the run says so once; their lines
stay in the file), and so are points made before stamps unless `--adopt-unstamped` is given.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from krul import paths
from krul.stamps import Resume, conversations_digest, digest, read_jsonl, record_digest, resume, stamp
# the records' locations and reading live in `records`, below the policies that read them; re-exported
from krul.records import OWN_CALIBRATION, calibration_path, load_calibration  # noqa: F401


def _first_turns(conv, max_turns: int) -> list[dict]:
    """The messages of the conversation's first `max_turns` user turns (replies included)."""
    users = conv.user_turn_indices()
    return conv.messages[: users[max_turns] if len(users) > max_turns else len(conv.messages)]


def pick_conversations(split: str, n: int, max_tokens: int, tokenizer, max_turns: int = 3):
    """The first `n` conversations of `split` in hash order whose first `max_turns` turns
    (replies included) fit in `max_tokens` tokens and that have at least 2 user turns."""
    from krul import data

    out = []
    for conv in data.load_conversations("sharegpt", split=split):
        if len(conv.user_turn_indices()) < 2:
            continue
        ids = tokenizer.apply_chat_template(_first_turns(conv, max_turns), tokenize=True,
                                            return_dict=True)["input_ids"]
        if len(ids) > max_tokens:
            continue
        out.append(conv)
        if len(out) == n:
            break
    return out


def base_pass(adapter, conversations, max_turns: int = 3, progress: bool = True):
    """Full-KV replay with the estimator: (records conv -> [stats after turn t], rows)."""
    from tqdm.auto import tqdm

    from krul.engine import Engine
    from krul.estimator import AttentionEstimator
    from krul.similarity import SimilarityStats
    from krul.store import make_store

    estimator = AttentionEstimator(adapter)
    engine = Engine(adapter, "full-load", make_store("pageable"), max_new_tokens=1, estimator=estimator)
    records, rows = {}, []
    for conv in tqdm(conversations, desc="base pass", disable=not progress, leave=False):
        for result in engine.replay(conv, max_turns=max_turns):
            snap = SimilarityStats.from_state_dict(
                {k: (v.clone() if torch.is_tensor(v) else v) for k, v in estimator.stats(conv.id).state_dict().items()})
            records.setdefault(conv.id, []).append(snap)
            rows.append(result)
    return records, rows


def segment_ends(tokenizer, conv, max_turns: int = 3) -> list[int]:
    """Token count of the history after each of the first `max_turns` user turns (reply included):
    turn t's new segment is [ends[t-1], ends[t]), as the engine offloads it."""
    msgs = _first_turns(conv, max_turns)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    cuts = users[1:] + [len(msgs)]
    return [len(tokenizer.apply_chat_template(msgs[:c], tokenize=True, return_dict=True)["input_ids"])
            for c in cuts]


def record_pair_losses(adapter, policy, conversations, max_turns: int = 3, progress: bool = True) -> dict:
    """conv id -> per turn the (n_layers, n_layers) svd pair scores of that turn's new segment
    under `policy` (`RestorePolicy.score_segment`), from one full-KV forward of the conversation's
    first `max_turns` turns: the causal KV of a prefix is the prefix of the KV."""
    from tqdm.auto import tqdm

    out = {}
    for conv in tqdm(conversations, desc="svd pair losses", disable=not progress, leave=False):
        ends = segment_ends(adapter.tokenizer, conv, max_turns)
        ids = adapter.tokenizer.apply_chat_template(_first_turns(conv, max_turns), tokenize=True,
                                                    return_dict=True, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            kvs = adapter.kv_from_cache(adapter.model(ids.to(adapter.device), use_cache=True).past_key_values)
        mats, start = [], 0
        for end in ends:
            seg = [(k[:, :, start:end].cpu(), v[:, :, start:end].cpu()) for k, v in kvs]
            mats.append(policy.score_segment(seg, offset=start))
            start = end
        out[conv.id] = mats
    return out


def _truncate(x: torch.Tensor, rank_ratio: float, n_sink: int) -> tuple[torch.Tensor, float]:
    """x (1, kv_heads, tokens, head_dim) -> (its own rank-r truncation with the first `n_sink`
    tokens exact, the relative squared error on the others); r = svd_rank(tokens, width, ratio)."""
    from krul.compression import svd_rank

    _, h, n, d = x.shape
    flat = x[0].permute(1, 0, 2).reshape(n, h * d).double()
    fit = flat[n_sink:]
    u, sv, vh = torch.linalg.svd(fit, full_matrices=False)
    r = svd_rank(fit.shape[0], h * d, rank_ratio)
    approx = (u[:, :r] * sv[:r]) @ vh[:r]
    err = float((fit - approx).pow(2).sum() / fit.pow(2).sum().clamp_min(1e-30))
    out = torch.cat([flat[:n_sink], approx]).reshape(n, h, d).permute(1, 0, 2)[None].to(x.dtype)
    return out.contiguous(), err


def layer_sensitivity(adapter, conversations, rank_ratio: float = 0.47, max_turns: int = 3,
                      sink_tokens: int = 1, progress: bool = True, max_segments: int | None = None) -> dict:
    """How much reply nll one unit of relative squared KV error costs in each layer, on `dev`.

    For every conversation and turn t >= 2 (of the first `max_turns`), the history through turn
    t-1 is prefilled exactly; then, for each layer l alone, its history K and V are replaced by
    their own rank-r truncations (`svd_rank(tokens, width, rank_ratio)`, the first `sink_tokens`
    exact: the kind of error `svd_pair` makes) and turn t's real reply is scored teacher-forced
    (at most `max_segments` turns per conversation, the earliest: one model forward per layer and
    turn is what this costs).
    weight_l = sum of the nll increase over every reply token / sum of (the layer's relative
    squared error, mean of K and V) x reply tokens; floored at 1% of the largest weight.

    Returns {"weights": [n_layers], "delta_nll": [n_layers] (per reply token), "error": [n_layers]
    (token-weighted mean relative squared error), "reply_tokens": int}.
    """
    from tqdm.auto import tqdm

    n_layers = adapter.n_layers
    delta = torch.zeros(n_layers, dtype=torch.float64)
    err_tokens = torch.zeros(n_layers, dtype=torch.float64)
    n_reply = 0

    def reply_nll(cache_kv, seg_ids, first_reply):
        logits = adapter.forward(seg_ids, adapter.cache_from_kv(cache_kv))[0]
        logp = torch.log_softmax(logits[first_reply - 1:-1].float(), -1)
        target = seg_ids[0, first_reply:].to(logp.device)
        return float(-logp.gather(1, target[:, None]).sum())

    for conv in tqdm(conversations, desc="layer sensitivity", disable=not progress, leave=False):
        msgs = _first_turns(conv, max_turns)
        ends = segment_ends(adapter.tokenizer, conv, max_turns)
        ids = torch.tensor([adapter.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]])
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        for t in range(1, len(ends) if max_segments is None else min(len(ends), 1 + max_segments)):
            hist = ends[t - 1]
            ctx = len(adapter.tokenizer.apply_chat_template(msgs[: users[t] + 1], tokenize=True, return_dict=True,
                                                           add_generation_prompt=True)["input_ids"])
            seg = ids[:, hist:ends[t]]
            first_reply = ctx - hist
            if first_reply < 1 or first_reply >= seg.shape[1]:
                continue
            with torch.inference_mode():
                cache = adapter.model(ids[:, :hist].to(adapter.device), use_cache=True).past_key_values
                kvs = [(k.clone(), v.clone()) for k, v in adapter.kv_from_cache(cache)]
                base = reply_nll(kvs, seg, first_reply)
                tokens = seg.shape[1] - first_reply
                for l in range(n_layers):
                    (k_t, e_k), (v_t, e_v) = (_truncate(kvs[l][0], rank_ratio, sink_tokens),
                                              _truncate(kvs[l][1], rank_ratio, sink_tokens))
                    layers = list(kvs)
                    layers[l] = (k_t, v_t)
                    delta[l] += reply_nll(layers, seg, first_reply) - base
                    err_tokens[l] += 0.5 * (e_k + e_v) * tokens
            n_reply += tokens
    if n_reply == 0:
        raise ValueError("no reply tokens after turn 1 in these conversations: nothing to measure")
    weights = (delta / err_tokens.clamp_min(1e-30)).clamp_min(0.0)
    weights = weights.clamp_min(0.01 * float(weights.max()))
    return {"weights": weights.tolist(), "delta_nll": (delta / n_reply).tolist(),
            "error": (err_tokens / n_reply).tolist(), "reply_tokens": n_reply}


def mean_pair_losses(losses: dict, conversations, tokenizer, max_turns: int = 3) -> torch.Tensor:
    """(n_layers, n_layers): the mean over conversations of each one's token-weighted mean
    segment loss (`record_pair_losses`)."""
    per = []
    for conv in conversations:
        ends = segment_ends(tokenizer, conv, max_turns)
        w = torch.tensor([e - s for s, e in zip([0] + ends[:-1], ends)], dtype=torch.float64)
        mats = torch.stack(losses[conv.id])
        per.append((mats * w[:, None, None]).sum(0) / w.sum())
    return torch.stack(per).mean(0)


def matrix_json(m: torch.Tensor) -> list:
    """A score matrix as JSON-safe nested lists (NaN -> null; read back by `policies.json_matrix`)."""
    return [[None if math.isnan(x) else x for x in row] for row in m.tolist()]


class StorageMeter:
    """A store that counts, for every state the engine restores (`get`), its stored bytes and its
    history's full KV bytes as a bf16 deployment stores them (`pricing.state_storage_bytes`,
    2 bytes per unquantized element): the storage ratio independent of the compute dtype."""

    def __init__(self, inner):
        self.inner, self.stored, self.full = inner, 0, 0

    def get(self, key: str):
        from krul.pricing import full_storage_bytes, state_geometry, state_storage_bytes

        state = self.inner.get(key)
        heads, head_dim = state_geometry(state)
        self.full += full_storage_bytes(state.n_tokens, state.n_layers, heads, head_dim)
        self.stored += state_storage_bytes(state)
        return state

    def __contains__(self, key: str) -> bool:
        return key in self.inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def ratio(self) -> float | None:
        return self.full / self.stored if self.stored else None


def replay_with(adapter, policy, conversations, records, max_turns: int = 3, progress: bool = False,
                losses: dict | None = None, meter: StorageMeter | None = None):
    """Replay with recorded stats (and svd pair losses) at recompute ratio 0 and one generated
    token per turn (through `meter`'s store when given, else a pageable store)."""
    from krul.engine import Engine
    from krul.evaluation import run_policy
    from krul.store import make_store

    engine = Engine(adapter, policy, meter if meter is not None else make_store("pageable"), max_new_tokens=1)
    engine.recorded_stats = records
    engine.recorded_pair_losses = losses
    return run_policy(engine, conversations, max_turns, progress=progress)


def per_conv(rows) -> dict:
    out: dict[str, list] = {}
    for r in rows:
        if r.turn_idx >= 1:
            s = out.setdefault(r.conversation_id, [0.0, 0])
            s[0] += r.reply_nll_sum
            s[1] += r.reply_tokens
    return {k: tuple(v) for k, v in out.items() if v[1] > 0}


def curve_point(adapter, policy, conversations, records, base_rows, max_turns=3, losses=None) -> dict:
    """nll of `policy` vs the base pass (paired bootstrap ratio) and its compression."""
    from krul.evaluation import paired_ratio_ci, summarize

    from krul.store import make_store

    meter = StorageMeter(make_store("pageable"))
    rows = replay_with(adapter, policy, conversations, records, max_turns, losses=losses, meter=meter)
    summary = summarize(rows, adapter.name, policy.name)
    point, lo, hi = paired_ratio_ci(per_conv(rows), per_conv(base_rows))
    return {"policy": policy.name, "nll": summary["nll"], "nll_ratio": point, "nll_ratio_lo": lo,
            "nll_ratio_hi": hi, "compression_ratio": summary["compression_ratio"],
            "storage_ratio": meter.ratio, "storage_bytes": "bf16"}


def grid_policy(name: str, tau: float, n_pairs: int, n_layers: int, rank_ratio: float | None = None):
    """Krul-family policy `name` at threshold `tau` compressing `n_pairs` pairs, recompute ratio 0
    (for svd policies at `rank_ratio`, default the registry's)."""
    from krul.policies import get_policy, with_rank_ratio
    from krul.selector import pair_ratio

    policy = get_policy(name, recompute_ratio=0.0)
    if rank_ratio is not None:
        policy = with_rank_ratio(policy, rank_ratio)
    equiv = float(policy.selector_params.get("pair_layer_equiv", 1.0))
    return policy.with_params(selector_params={**policy.selector_params, "tau": tau,
                                               "target_ratio": pair_ratio(n_layers, n_pairs, equiv)})


def grid_key(tau: float, n_pairs: int, rank_ratio: float | None) -> tuple:
    """A dev-calibration grid point's place in the grid: (tau to 9 digits, pair count, rank ratio)."""
    return round(float(tau), 9), n_pairs, rank_ratio


def record_sha(path: str | Path) -> str | None:
    """The git sha in a written record's provenance (None when there is no readable record)."""
    try:
        return json.loads(Path(path).read_text()).get("provenance", {}).get("git_sha") or None
    except (OSError, ValueError, AttributeError):
        return None


def resume_points(partial: str | Path, expected: dict, key_of, legacy_ok, adopt_unstamped: bool = False,
                  record: str | Path | None = None, log=print) -> Resume:
    """The saved points of `partial` the run reuses (`stamps.resume`: the same stamp as `expected`'s,
    or, with `adopt_unstamped`, unstamped ones that pass `legacy_ok`); says once, through `log`, how
    many it does not reuse and why, and how many unstamped ones it adopts (with the provenance sha
    of `record`, the record those points went into)."""
    decision = resume(read_jsonl(partial), expected, key_of, legacy_ok, adopt_unstamped)
    for line in decision.notices(str(partial), provenance=record_sha(record) if record else None):
        log(line)
    return decision


def calibrate(model: str, n_conversations: int = 8, max_tokens: int = 2000, max_turns: int = 3,
              taus=None, protect_fractions=(0.0, 0.2, 0.4, 0.6), pair_counts=(1, 2, 4, 6, 8, 10), tolerance: float = 0.01,
              progress: bool = True, policy: str = "krul", rank_ratios=(None,),
              out: str | Path | None = None, sensitivity_from: str | Path | None = None,
              sensitivity_conversations: int | None = None, sensitivity_turns: int | None = None,
              adopt_unstamped: bool = False) -> dict:
    """Calibrate tau, the target ratio and the fixed plans on `dev`; write and return the record.

    `policy` is "krul" (the paper: merge) or "krul-svd" (then the grid also spans `rank_ratios`);
    the record goes to `out` (default `experiments/calibration/<model>.json`, which the registry
    reads) and every grid point to `<out stem>.partial.jsonl` as soon as it is measured. An svd-loss
    policy's layer sensitivity is measured on the first `sensitivity_conversations` (default all)
    at up to `sensitivity_turns` turns each, or read from `sensitivity_from` (a JSON with "weights",
    or an earlier record).

    Every grid point carries a `stamp` (`krul.stamps`): the code version and a digest of the grid
    policy as `grid_policy` resolves it, the conversations' content, max_turns and max_tokens, and for
    an svd-loss policy what its pair scores came from (the scoring policy, and the layer weights read
    from `sensitivity_from` or the settings they are measured with: measured floats may differ in
    their last bits from run to run, and must not stop a resume). A re-run resumes the points of
    the same stamp; points of another stamp are recomputed (said once; their lines stay in the
    partial file, an append-only log). Unstamped points (older code) are recomputed too, unless
    `adopt_unstamped`, which resumes those of the same conversations and policy (the older check)."""
    from tqdm.auto import tqdm

    from krul import models
    from krul.adapter import ModelAdapter
    from krul.selector import calibrate_fixed_pairs, SelectionInput

    t0 = time.time()
    model_obj, tok = models.load_model(model)
    adapter = ModelAdapter(model_obj, tok, model)
    convs = pick_conversations("dev", n_conversations, max_tokens, tok, max_turns)
    records, base_rows = base_pass(adapter, convs, max_turns, progress)
    n_layers = adapter.n_layers
    from krul.policies import get_policy

    scored = with_rank_ratio_or_self(get_policy(policy), rank_ratios[0])
    losses = sensitivity = None
    if scored.pair_score == "svd-loss":  # dev layer weights, then every turn's pair scores
        if len(rank_ratios) > 1:
            raise ValueError("calibrating an svd-loss policy takes one rank ratio (its scores depend on it)")
        if sensitivity_from:  # a measurement made before (its settings must match)
            sensitivity = json.loads(Path(sensitivity_from).read_text())
            sensitivity = sensitivity.get("layer_sensitivity_detail", sensitivity)
            if len(sensitivity["weights"]) != n_layers or sensitivity.get("model", model) != model:
                raise ValueError(f"{sensitivity_from} holds no {n_layers}-layer sensitivity of {model}")
        else:
            sens_convs = convs[:sensitivity_conversations] if sensitivity_conversations else convs
            sensitivity = layer_sensitivity(adapter, sens_convs, scored.compress_params["rank_ratio"], max_turns,
                                            scored.compress_params.get("sink_tokens", 1), progress,
                                            max_segments=sensitivity_turns)
        scored = scored.with_params(layer_weights=tuple(sensitivity["weights"]))
        losses = record_pair_losses(adapter, scored, convs, max_turns, progress)
    if taus is None:
        # tau grid from the dev layers' own boundary mass: protect 0%, 20%, 40%, 60% of the layers
        mean_boundary = torch.stack([recs[-1].boundary_ratio().cpu() for recs in records.values()]).mean(0)
        taus = sorted({0.0} | {float(torch.quantile(mean_boundary, q)) + 1e-9
                               for q in protect_fractions if q > 0})
    # resumable: every grid point is appended to a partial file as soon as it is measured, stamped
    path = Path(out) if out else calibration_path(model, policy)
    partial = path.with_suffix(".partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    settings = {"kind": "dev-calibration", "model": model, "split": "dev", "max_turns": max_turns,
                "max_tokens": max_tokens, "conversations": conversations_digest(convs), "scored": None}
    if losses is not None:  # what the pair scores came from: settings and read weights, never measured floats
        settings.update(scored=repr(with_rank_ratio_or_self(get_policy(policy), rank_ratios[0])),
                        sensitivity=digest(sensitivity["weights"]) if sensitivity_from else
                        {"conversations": sensitivity_conversations, "turns": sensitivity_turns})
    expected = {grid_key(tau, k, rr): stamp({**settings, "tau": tau, "n_pairs": k, "rank_ratio": rr,
                                              "policy": repr(grid_policy(policy, tau, k, n_layers, rr))})
                for tau in taus for rr in rank_ratios for k in pair_counts}
    ids = [c.id for c in convs]
    resumed = resume_points(partial, expected, lambda g: grid_key(g["tau"], g["n_pairs"], g.get("rank_ratio")),
                            lambda g: g.get("conversations") == ids and g.get("policy") == policy,
                            adopt_unstamped, record=path)
    done = resumed.done
    grid = []
    for tau in tqdm(taus, desc="tau", disable=not progress):
        for rank_ratio in rank_ratios:
            for k in pair_counts:
                key = grid_key(tau, k, rank_ratio)
                if key in done:
                    grid.append(done[key])
                    continue
                pol = grid_policy(policy, tau, k, n_layers, rank_ratio)
                point = curve_point(adapter, pol, convs, records, base_rows, max_turns, losses)
                point.update(tau=tau, n_pairs=k, target_ratio=pol.selector_params["target_ratio"],
                             rank_ratio=rank_ratio, conversations=ids, stamp=expected[key])
                grid.append(point)
                with open(partial, "a") as f:
                    f.write(json.dumps(point) + "\n")
    ok = [g for g in grid if g["nll_ratio_hi"] <= 1 + tolerance]
    best = max(ok, key=lambda g: (g["compression_ratio"] or 0, -g["tau"])) if ok else None
    finals = [recs[-1] for recs in records.values()]
    inputs = [SelectionInput.from_stats(s, normalize=True) for s in finals]
    max_k = max(pair_counts)
    tau = best["tau"] if best else max(taus)
    from krul.selector import KrulSelector

    best_rank = best.get("rank_ratio") if best else None
    chosen_policy = grid_policy(policy, tau, best["n_pairs"] if best else 0, n_layers, best_rank)
    chosen = KrulSelector(**{k: v for k, v in chosen_policy.selector_params.items()
                             if k in ("tau", "target_ratio", "method", "pair_layer_equiv", "preempt")})
    plans = []
    for conv_id, recs in records.items():  # krul's per-conversation plans at the calibrated point
        inp = SelectionInput.from_stats(recs[-1])
        if losses is not None:  # the plan of the conversation's first segment
            inp = SelectionInput(losses[conv_id][0], inp.boundary_ratio, inp.n_layers)
        plan = chosen.select(inp)
        plans.append({"model": model, "n_layers": n_layers, "conversation_id": conv_id,
                      "pairs": [list(p) for p in plan.pairs], "sensitive": list(plan.sensitive),
                      "method": plan.method})
    mean_boundary = torch.stack([recs[-1].boundary_ratio().cpu() for recs in records.values()]).mean(0)
    loss_pairs = mean_loss_matrix = None
    if losses is not None:  # krul-fix-svd-loss: the plan of lowest mean svd loss over dev
        mean_loss_matrix = mean_pair_losses(losses, convs, tok, max_turns)
        mean_loss = SelectionInput(mean_loss_matrix, mean_boundary, n_layers)
        loss_pairs = [list(p) for p in calibrate_fixed_pairs([mean_loss], max_k, order="ascending", tau=tau)]
    record = {
        "model": model, "split": "dev", "policy": policy, "conversations": [c.id for c in convs],
        "max_turns": max_turns, "tolerance": tolerance, "tau": tau, "rank_ratio": best_rank,
        "target_ratio": best["target_ratio"] if best else 1.0,
        "n_pairs": best["n_pairs"] if best else 0,
        "krul_fix_pairs": [list(p) for p in calibrate_fixed_pairs(inputs, max_k, order="ascending", tau=tau)],
        "kvsharer_pairs": [list(p) for p in calibrate_fixed_pairs(inputs, max_k, order="descending")],
        **({"krul_fix_loss_pairs": loss_pairs, "layer_sensitivity": sensitivity["weights"],
            "layer_sensitivity_detail": sensitivity, "mean_pair_loss": matrix_json(mean_loss_matrix)}
           if loss_pairs is not None else {}),
        "mean_boundary_ratio": [float(x) for x in mean_boundary],
        "plans": plans, "grid": grid, "runtime_s": time.time() - t0, "provenance": _provenance(),
    }
    path.write_text(json.dumps(record, indent=1))
    return record


# storage-codec policies with no pairs of their own (one curve point each, at n_pairs = 0)
CODEC_ONLY_POLICIES = ("int8", "int4", "kivi")
# krul-family policies whose payloads a codec quantizes: the pairs of the policy they are calibrated as
CODEC_PAIR_POLICIES = ("krul-svd-loss-int8", "krul-svd-loss-int4")
# eviction policies measured at target storage ratios (the curve's `k` is the ratio, n_pairs 0)
BUDGET_POLICIES = ("h2o",)
H2O_RATIOS = (2.0, 4.0)
CURVE_POLICIES = ("krul", "minicache", "kvsharer", "krul-fix", "krul-svd", "krul-fix-svd", "krul-svd-loss",
                  "krul-fix-svd-loss", *CODEC_PAIR_POLICIES, *CODEC_ONLY_POLICIES, *BUDGET_POLICIES)


def with_codec_group(policy, codec_group: int | None):
    """`policy` with its storage codec's group size set to `codec_group` (None, or no codec: as is)."""
    codec = policy.compress_params.get("codec")
    if codec_group is None or not codec:
        return policy
    return policy.with_params(compress_params={**policy.compress_params,
                                               "codec": {**codec, "group": int(codec_group)}})


def point_pair_counts(name: str, pair_counts, budget_ratios=H2O_RATIOS) -> tuple:
    """What a curve of policy `name` is measured at: its pair counts; (0,) for a codec-only policy;
    the target storage ratios `budget_ratios` for an eviction policy (h2o)."""
    if name in BUDGET_POLICIES:
        return tuple(float(r) for r in budget_ratios)
    return (0,) if name in CODEC_ONLY_POLICIES else tuple(pair_counts)


def point_key(point: dict) -> tuple:
    """A measured point's place on its curve: (policy, pair count or h2o's target storage ratio)."""
    return point["policy"], point.get("target_storage_ratio", point["n_pairs"])


def with_rank_ratio_or_self(policy, rank_ratio: float | None):
    """`policies.with_rank_ratio` when a rank ratio is given, else the policy unchanged."""
    from krul.policies import with_rank_ratio

    return policy if rank_ratio is None else with_rank_ratio(policy, rank_ratio)


def curve_policy(name: str, k: int, n_layers: int, cal: dict, tau: float, rank_ratio: float | None = None,
                 prior_weight: float | None = None, pairing: str | None = None, validate_tokens: int = 0,
                 rank_alloc: str = "uniform", codec_group: int | None = None):
    """Policy `name` compressing `k` layer pairs at recompute ratio 0.

    krul / krul-svd / krul-svd-loss: per-conversation greedy pairs at threshold `tau` (svd-loss
    scores weighted by the calibration's `layer_sensitivity` when it has one); minicache: the k
    deepest adjacent pairs; krul-fix / krul-fix-svd / krul-fix-svd-loss / kvsharer: the first k of
    the fixed plans calibrated on dev (`cal`). svd policies at `rank_ratio` (default: the
    calibration's, else the registry's); krul-svd-loss shrinks its scores toward the dev mean by
    `prior_weight` (default the calibration's, else 0); the svd-loss pair both pair their
    layers by `pairing` (default the calibration's, else greedy as the paper); krul-svd-loss
    validates its plan against the dev plan on the last `validate_tokens` positions (0: off); svd
    policies spread each segment's rank budget over its pairs by `rank_alloc`. Codec policies: int8 /
    int4 / kivi alone (`k` ignored), krul-svd-loss-int8 / -int4 as krul-svd-loss at `k` pairs with
    their payloads quantized; `codec_group` overrides the codec's group size."""
    from krul.policies import (CALIBRATED_AS, FIXED_PLAN_KEYS, fixed_loss_plan, get_policy, with_dev_scores,
                               with_rank_alloc, with_rank_ratio)
    from krul.selector import pair_ratio

    if name in CODEC_ONLY_POLICIES:
        return with_codec_group(get_policy(name, recompute_ratio=0.0), codec_group)
    if name in BUDGET_POLICIES:  # k: the target storage ratio
        from krul.policies import with_budget

        return with_budget(get_policy(name, recompute_ratio=0.0), storage_ratio=float(k))
    if name in CALIBRATED_AS:  # the pairs of the policy it is calibrated as, its own codec on top
        inner = curve_policy(CALIBRATED_AS[name], k, n_layers, cal, tau, rank_ratio, prior_weight, pairing,
                             validate_tokens, rank_alloc)
        codec = get_policy(name).compress_params["codec"]
        return with_codec_group(inner.with_params(name=name, compress_params={**inner.compress_params,
                                                                                "codec": codec}), codec_group)
    policy = get_policy(name, recompute_ratio=0.0)
    if policy.selector_params.get("method") == "svd":
        policy = with_rank_alloc(with_rank_ratio(policy, _rank_for(name, rank_ratio, cal)), rank_alloc)
    if policy.pair_score == "svd-loss":
        policy = with_dev_scores(policy, cal, prior_weight, pairing)
    if _validate_for(name, validate_tokens) is not None:
        policy = policy.with_params(validate_tokens=int(validate_tokens))
    params = dict(policy.selector_params)
    ratio = pair_ratio(n_layers, k, float(params.get("pair_layer_equiv", 1.0)))
    if policy.selector == "krul":
        params.update(tau=tau, target_ratio=ratio)
    elif policy.selector == "minicache":
        params.update(target_ratio=ratio)
    elif name == "krul-fix-svd-loss":
        params.update(pairs=fixed_loss_plan(cal, k, tau, _pairing_for(name, pairing, cal)))
    elif name in FIXED_PLAN_KEYS:
        key = FIXED_PLAN_KEYS[name]
        if key not in cal:
            raise ValueError(f"the dev calibration has no {key!r} for {name}; calibrate with "
                             f"python -m krul.calibrate --policy krul-svd-loss first")
        fixed = [tuple(p) for p in cal[key]]
        if len(fixed) < k:
            raise ValueError(f"the dev calibration holds {len(fixed)} {name} pairs, fewer than {k}; "
                             f"re-run python -m krul.calibrate with --pairs up to {k}")
        params.update(pairs=tuple(fixed[:k]))
    else:
        raise ValueError(f"no curve for policy {name!r}; known: {', '.join(CURVE_POLICIES)}")
    return policy.with_params(selector_params=params)


def curve_stamps(grid, model: str, split: str, n_layers: int, cal: dict, tau: float, conversations,
                 max_tokens: int, max_turns: int, rank_ratio: float | None = None,
                 prior_weight: float | None = None, pairing: str | None = None, validate_tokens: int = 0,
                 rank_alloc: str = "uniform", codec_group: int | None = None, code: str | None = None) -> dict:
    """(policy, k) -> the stamp of that curve point (`stamps.stamp`): the code version and a digest
    of the point's policy as `curve_policy` resolves it (every parameter, the dev plans and scores it
    takes from `cal` included), k, tau, max_turns, max_tokens, the content of the calibration record
    (`record_digest`: not its name, nor when it was written) and of the conversations."""
    common = {"kind": "curve", "model": model, "split": split, "tau": tau, "max_turns": max_turns,
              "max_tokens": max_tokens, "calibration": record_digest(cal),
              "conversations": conversations_digest(conversations)}
    out = {}
    for name, k in grid:
        try:
            policy = repr(curve_policy(name, k, n_layers, cal, tau, rank_ratio, prior_weight, pairing,
                                       validate_tokens, rank_alloc, codec_group))
        except Exception as e:  # noqa: BLE001 - the point itself fails with this message when it runs
            policy = f"unresolved: {type(e).__name__}: {e}"
        out[(name, k)] = stamp({**common, "policy_name": name, "k": k, "policy": policy}, code)
    return out


def kv_angle_summary(adapter, conversations, max_turns: int = 3) -> dict:
    """How far apart the layers' KV are on these conversations (`compression.layer_angles`)."""
    from krul.compression import layer_angles

    mats = []
    for conv in conversations:
        ids = adapter.tokenizer.apply_chat_template(_first_turns(conv, max_turns), tokenize=True,
                                                    return_dict=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = adapter.model(ids.to(adapter.device), use_cache=True)
        mats.append(layer_angles(adapter.kv_from_cache(out.past_key_values)))
    mean = torch.stack(mats).mean(0)
    n = mean.shape[0]
    off = mean[~torch.eye(n, dtype=torch.bool)]
    adjacent = [float(mean[i, i + 1]) for i in range(n - 1)]
    return {"n_conversations": len(conversations), "mean_rad": float(off.mean()), "min_rad": float(off.min()),
            "adjacent_rad": adjacent, "min_adjacent_rad": min(adjacent)}


def curves(model: str, split: str = "test", n_conversations: int = 30, max_tokens: int = 2000,
           max_turns: int = 3, policies=CURVE_POLICIES, pair_counts=(1, 2, 4), tau: float | None = None,
           calibration: str | Path | None = None, progress: bool = True,
           out_dir: str | Path | None = None, tag: str = "", rank_ratio: float | None = None,
           prior_weight: float | None = None, pairing: str | None = None, validate_tokens: int = 0,
           rank_alloc: str = "uniform", codec_group: int | None = None,
           budget_ratios=H2O_RATIOS, adopt_unstamped: bool = False) -> dict:
    """nll (ratio to full KV, paired bootstrap) against compression ratio for 1..K pairs.

    The fixed plans of krul-fix and kvsharer, and krul's tau (unless given), come from a dev
    calibration record; conversations from `split`. Resumable: every point is appended to
    `experiments/calibration/<model>.curves-<split>.partial.jsonl` as soon as it is measured, and
    the record is written to `<model>.curves-<split>.json` (and its plot to `.png`), all in
    `out_dir` (default: beside the calibrations); a `tag` names a separate set of files
    (`<model>.curves-<split>-<tag>.*`). svd policies run at `rank_ratio` (default: the calibration's),
    krul-svd-loss with `prior_weight` (default: the calibration's, else 0), the svd-loss pair with
    `pairing` (default: the calibration's, else greedy), krul-svd-loss validating its plans on
    `validate_tokens` positions (0: off), codec policies at `codec_group` (default: the registry's).
    Codec-only policies (int8, int4, kivi) have one point each, at n_pairs = 0. Every point's
    `storage_ratio` counts bytes as a bf16 deployment stores them (`StorageMeter`).

    Every point carries a `stamp` (`krul.stamps`, `curve_stamps`): the code version and a digest of
    the point's policy as `curve_policy` resolves it, its pair count (or h2o ratio), tau, max_turns,
    max_tokens, the calibration record's content (not its name) and the conversations' content. A
    re-run resumes the points of the same stamp; points of another stamp are recomputed and the run
    says how many, once (their lines stay in the partial file: an append-only log, the newest line
    of a point wins). Unstamped points (made before stamps) are recomputed too, unless
    `adopt_unstamped`: then those that pass the older field checks (conversations, tau, calibration
    name, rank ratio, compression, prior weight, pairing, validation) are resumed, and the run says
    how many and the provenance sha of the record they went into.
    """
    from tqdm.auto import tqdm

    from krul import models
    from krul.adapter import ModelAdapter

    cal_path = Path(calibration) if calibration else calibration_path(model)
    if not cal_path.exists():
        raise FileNotFoundError(f"no dev calibration at {cal_path}: run python -m krul.calibrate "
                                f"--model {model} first, or pass --calibration FILE")
    cal = json.loads(cal_path.read_text())
    if cal.get("split") != "dev":
        raise ValueError(f"{cal_path} was not calibrated on dev (split={cal.get('split')!r})")
    tau = float(cal["tau"]) if tau is None else float(tau)
    t0 = time.time()
    model_obj, tok = models.load_model(model)
    adapter = ModelAdapter(model_obj, tok, model)
    convs = pick_conversations(split, n_conversations, max_tokens, tok, max_turns)
    ids = [c.id for c in convs]
    out = Path(out_dir) if out_dir else calibration_path(model).parent
    stem = f"{model}.curves-{split}" + (f"-{tag}" if tag else "")
    partial = out / f"{stem}.partial.jsonl"
    partial.parent.mkdir(parents=True, exist_ok=True)
    grid = [(p, k) for p in policies for k in point_pair_counts(p, pair_counts, budget_ratios)]
    expected = curve_stamps(grid, model, split, adapter.n_layers, cal, tau, convs, max_tokens, max_turns,
                            rank_ratio, prior_weight, pairing, validate_tokens, rank_alloc, codec_group)

    def same(g) -> bool:  # the older field checks: what an unstamped point must match to be adopted
        return (g.get("conversations") == ids and g.get("max_turns", max_turns) == max_turns
                and g.get("tau") == tau and g.get("calibration") == cal_path.name
                and g.get("rank_ratio") == _rank_for(g["policy"], rank_ratio, cal)
                and _compress_for(g["policy"], rank_ratio, cal, rank_alloc, codec_group)
                in (None, g.get("compress"))
                and (g.get("prior_weight") or 0.0) == (_prior_for(g["policy"], prior_weight, cal) or 0.0)
                and g.get("pairing", _pairing_for(g["policy"], "greedy", cal))
                == _pairing_for(g["policy"], pairing, cal)
                and g.get("validate_tokens") == _validate_for(g["policy"], validate_tokens))

    done = resume_points(partial, expected, point_key, same, adopt_unstamped, record=out / f"{stem}.json").done
    todo = [(p, k) for p, k in grid if (p, k) not in done]
    points = [done[(p, k)] for p, k in grid if (p, k) in done]
    if todo:
        records, base_rows = base_pass(adapter, convs, max_turns, progress)
        scored = [curve_policy(n, k, adapter.n_layers, cal, tau, rank_ratio, prior_weight, pairing,
                               validate_tokens, rank_alloc, codec_group)
                  for n, k in todo]
        scored = [p for p in scored if p.pair_score == "svd-loss"]
        losses = record_pair_losses(adapter, scored[0], convs, max_turns, progress) if scored else None
        for name, k in tqdm(todo, desc="curve points", disable=not progress):
            policy = curve_policy(name, k, adapter.n_layers, cal, tau, rank_ratio, prior_weight, pairing,
                                  validate_tokens, rank_alloc, codec_group)
            point = curve_point(adapter, policy, convs, records, base_rows, max_turns, losses)
            if name in BUDGET_POLICIES:
                point.update(target_storage_ratio=k, budget_ratio=policy.budget_ratio)
            point.update(n_pairs=0 if name in BUDGET_POLICIES else k, tau=tau, calibration=cal_path.name, max_turns=max_turns, conversations=ids,
                         rank_ratio=_rank_for(name, rank_ratio, cal), compress=dict(policy.compress_params),
                         prior_weight=_prior_for(name, prior_weight, cal),
                         pairing=_pairing_for(name, pairing, cal),
                         validate_tokens=_validate_for(name, validate_tokens),
                         pairs=[list(q) for q in policy_pairs(policy)], stamp=expected[(name, k)])
            points.append(point)
            with open(partial, "a") as f:
                f.write(json.dumps(point) + "\n")
    angles = kv_angle_summary(adapter, convs[:5], max_turns)
    record = {"model": model, "split": split, "conversations": ids, "max_tokens": max_tokens,
              "max_turns": max_turns, "tau": tau, "calibration": cal_path.name, "rank_ratio": rank_ratio,
              "pair_counts": list(pair_counts), "points": points, "kv_angles": angles,
              "runtime_s": time.time() - t0, "provenance": _provenance()}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    from krul.plotting import plot_calibration_curves

    plot_calibration_curves(record).savefig(out / f"{stem}.png", dpi=130)
    return record


def _rank_for(name: str, rank_ratio: float | None, cal: dict) -> float | None:
    """The rank ratio a curve point of policy `name` runs at (None for policies without svd)."""
    from krul.policies import get_policy

    policy = get_policy(name)
    if policy.selector_params.get("method") != "svd":
        return None
    if rank_ratio is not None:
        return float(rank_ratio)
    return float(cal["rank_ratio"]) if cal.get("rank_ratio") is not None else float(policy.compress_params["rank_ratio"])


def _prior_for(name: str, prior_weight: float | None, cal: dict) -> float | None:
    """The shrinkage toward the dev mean a curve point of policy `name` runs with (None for the
    policies without one; 0.0, the conversation alone, is what older points ran with)."""
    from krul.policies import get_policy

    policy = get_policy(name)
    if policy.pair_score != "svd-loss" or policy.selector != "krul":
        return None
    if prior_weight is not None:
        return float(prior_weight)
    return float(cal.get("prior_weight", policy.prior_weight))


def _pairing_for(name: str, pairing: str | None, cal: dict) -> str | None:
    """How the layers of a curve point of policy `name` are paired (None for the policies other
    than the svd-loss pair, which always pair greedily or by a fixed list)."""
    if name not in ("krul-svd-loss", "krul-fix-svd-loss"):
        return None
    return pairing or cal.get("pairing", "greedy")


def _validate_for(name: str, validate_tokens: int) -> int | None:
    """The plan-validation window of a curve point of policy `name` (None for the policies that
    have no plan of their own to validate, and, as older points, for krul-svd-loss at 0)."""
    if name != "krul-svd-loss" or not validate_tokens:
        return None
    return int(validate_tokens)


def policy_pairs(policy) -> tuple:
    """A fixed-plan policy's pairs (empty for a per-conversation selector)."""
    return tuple(policy.selector_params.get("pairs", ())) if policy.selector != "krul" else ()


def _compress_for(name: str, rank_ratio: float | None, cal: dict, rank_alloc: str = "uniform",
                  codec_group: int | None = None) -> dict | None:
    """The compression parameters a curve point of policy `name` runs with (svd and codec policies
    only: older points of the other policies carry none and still resume)."""
    from krul.policies import get_policy, with_rank_alloc, with_rank_ratio

    policy = with_codec_group(get_policy(name), codec_group)
    if policy.selector_params.get("method") != "svd":
        return dict(policy.compress_params) if policy.compress_params.get("codec") else None
    policy = with_rank_ratio(policy, _rank_for(name, rank_ratio, cal))
    return dict(with_rank_alloc(policy, rank_alloc).compress_params)


def _provenance() -> dict:
    import platform
    import subprocess

    import transformers

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=paths.REPO_ROOT).stdout.strip()
    except OSError:
        sha = ""
    from krul.evaluation import code_version

    return {"git_sha": sha, "code_version": code_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "device": "cpu", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main_curves(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m krul.calibrate curves",
                                description="nll vs compression curves on a split, from a dev calibration")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--n-conversations", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--policies", nargs="+", default=list(CURVE_POLICIES), choices=list(CURVE_POLICIES))
    p.add_argument("--pairs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tau", type=float, default=None, help="krul's threshold (default: the calibration's)")
    p.add_argument("--calibration", default=None,
                   help="dev calibration JSON (default experiments/calibration/<model>.json)")
    p.add_argument("--rank-ratio", type=float, default=None,
                   help="svd policies' stored fraction of a pair (default: the calibration's)")
    p.add_argument("--tag", default="", help="write <model>.curves-<split>-<tag>.* instead")
    p.add_argument("--prior-weight", type=float, default=None,
                   help="krul-svd-loss: shrink each conversation's pair scores toward the dev mean by "
                        "this weight in [0, 1] (default: the calibration's, else 0)")
    p.add_argument("--pairing", default=None, choices=["greedy", "matching"],
                   help="krul-svd-loss / krul-fix-svd-loss: pair greedily (the paper) or by exact "
                        "least-total matching (default: the calibration's, else greedy)")
    p.add_argument("--validate-tokens", type=int, default=0,
                   help="krul-svd-loss: store, per segment, its own plan or the dev plan, whichever "
                        "changes the predictions at the history's last N positions less (0: off)")
    p.add_argument("--rank-alloc", default="uniform", choices=["uniform", "segment", "pairs"],
                   help="svd policies: every pair at the same rank (xKV, default), or each segment's "
                        "K (and V) rank budget spread over its pairs by their own spectra (pairs), "
                        "or over pairs and K/V together (segment); same bytes")
    p.add_argument("--h2o-ratios", type=float, nargs="+", default=list(H2O_RATIOS),
                   help="h2o: the target storage ratios (full / stored) its points are measured at")
    p.add_argument("--adopt-unstamped", action="store_true",
                   help="resume the partial file's unstamped points (made before stamps) that match the "
                        "older field checks, instead of recomputing them")
    p.add_argument("--codec-group", type=int, default=None,
                   help="codec policies (int8, int4, kivi, krul-svd-loss-int8/-int4): the quantization "
                        "group size (default: each policy's own)")
    args = p.parse_args(argv)
    rec = curves(args.model, args.split, args.n_conversations, args.max_tokens, policies=args.policies,
                 pair_counts=tuple(args.pairs), tau=args.tau, calibration=args.calibration,
                 tag=args.tag, rank_ratio=args.rank_ratio, prior_weight=args.prior_weight,
                 pairing=args.pairing, validate_tokens=args.validate_tokens, rank_alloc=args.rank_alloc,
                 codec_group=args.codec_group, budget_ratios=tuple(args.h2o_ratios),
                 adopt_unstamped=args.adopt_unstamped)
    for g in sorted(rec["points"], key=lambda g: (g["policy"], g["n_pairs"])):
        print(json.dumps({k: v for k, v in g.items() if k != "conversations"}))
    print(json.dumps({"kv_angles": rec["kv_angles"]}))
    return 0


def curve_table(record: dict, tolerance: float = 0.01) -> str:
    """Markdown table of a curves record: one row per pair count, one column per policy."""
    names = list(dict.fromkeys(p["policy"] for p in record["points"]))
    by = {(p["policy"], p["n_pairs"]): p for p in record["points"]}
    lines = ["| pairs | " + " | ".join(f"{n}: compression, nll ratio [95% CI]" for n in names) + " |",
             "| --- |" + " --- |" * len(names)]
    for k in sorted({p["n_pairs"] for p in record["points"]}):
        cells = []
        for n in names:
            p = by.get((n, k))
            if p is None:
                cells.append("-")
                continue
            ok = " (within 1%)" if p["nll_ratio_hi"] <= 1 + tolerance else ""
            cells.append(f"{p['compression_ratio']:.3f}x, {p['nll_ratio']:.3f} "
                         f"[{p['nll_ratio_lo']:.3f}, {p['nll_ratio_hi']:.3f}]{ok}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve(points, name: str) -> list[dict]:
    """`name`'s points ordered by storage ratio (one per storage ratio)."""
    return sorted((q for q in points if q["policy"] == name and q.get("storage_ratio")),
                  key=lambda q: q["storage_ratio"])


def interpolate(curve: list[dict], ratio: float) -> dict | None:
    """nll ratio and its interval bounds of a measured `curve` at storage `ratio`, linear in log
    storage ratio between the two measured points around it (None outside the measured range)."""
    x = math.log(ratio)
    for a, b in zip(curve, curve[1:] or curve):
        xa, xb = math.log(a["storage_ratio"]), math.log(b["storage_ratio"])
        if xa - 1e-12 <= x <= xb + 1e-12:
            t = 0.0 if xb - xa < 1e-12 else (x - xa) / (xb - xa)
            return {k: a[k] + t * (b[k] - a[k]) for k in ("nll_ratio", "nll_ratio_lo", "nll_ratio_hi")}
    return None


def largest_within(curve: list[dict], tolerance: float = 0.01) -> float | None:
    """The largest measured storage ratio whose interval's upper bound is at most 1 + `tolerance`."""
    ok = [q["storage_ratio"] for q in curve if q["nll_ratio_hi"] <= 1 + tolerance]
    return max(ok) if ok else None


def envelope_at(points, ratio: float) -> dict | None:
    """The lowest nll ratio (with its interval bounds) that any two measured `points` reach at storage
    `ratio` by interpolation between them (linear in log storage ratio; a point at `ratio` itself
    counts): the best mix of two codecs at those bytes. A codec storing less than another only at a
    far worse nll (kivi's 2.55x at 1.14 beside int4's 3.41x) cannot pull the curve up, and a codec
    beaten by another at noise level (qwen's int8 at 1.0000 beside int4 at 0.9998) still anchors it
    from below. None outside the measured range."""
    pts = [q for q in points if q.get("storage_ratio")]
    cands = [interpolate(sorted((a, b), key=lambda q: q["storage_ratio"]), ratio)
             for a in pts for b in pts if a["storage_ratio"] <= b["storage_ratio"]]
    cands = [c for c in cands if c is not None]
    return min(cands, key=lambda c: c["nll_ratio"]) if cands else None


def codec_comparison(points, crosslayer, quant_only) -> str:
    """Markdown table: every measured point of each cross-layer policy (`crosslayer`, e.g. the
    quantized krul-svd-loss) beside quantization alone (`quant_only`: int8, int4, kivi, joined into
    one curve, their lower envelope `envelope_at`) at the same stored bytes, interpolated in log
    storage ratio between measured points (interval bounds interpolated the same way); then every
    measured quantization-only point against each cross-layer curve. "-" where the other curve was
    not measured that far. The winner is the lower nll estimate, marked "(intervals overlap)" when
    the two intervals overlap: then the data do not separate the two."""
    quant = [q for q in points if q["policy"] in quant_only and q.get("storage_ratio")]
    fmt = lambda r: f"{r['nll_ratio']:.4f} [{r['nll_ratio_lo']:.4f}, {r['nll_ratio_hi']:.4f}]"
    lines = ["| measured point | storage ratio | its nll ratio [95% CI] | other side at the same bytes | "
             "its nll ratio (interpolated) | lower nll |", "| --- | --- | --- | --- | --- | --- |"]
    rows = [(q, lambda r: envelope_at(quant, r), "quantization alone")
            for name in crosslayer for q in _curve(points, name)]
    curves = {name: _curve(points, name) for name in crosslayer}
    rows += [(q, lambda r, c=c: interpolate(c, r), name)
             for name, c in curves.items() for q in sorted(quant, key=lambda q: q["storage_ratio"])
             if interpolate(c, q["storage_ratio"]) is not None]  # only where both were measured
    for q, other_at, other_name in rows:
        at = other_at(q["storage_ratio"])
        label = f"{q['policy']}" + (f" @ {q['n_pairs']} pairs" if q.get("n_pairs") else "")
        if at is None:
            lines.append(f"| {label} | {q['storage_ratio']:.3f}x | {fmt(q)} | {other_name} | - | - |")
            continue
        better = q["policy"] if q["nll_ratio"] < at["nll_ratio"] else other_name
        if q["nll_ratio_lo"] <= at["nll_ratio_hi"] and at["nll_ratio_lo"] <= q["nll_ratio_hi"]:
            better += " (intervals overlap)"
        lines.append(f"| {label} | {q['storage_ratio']:.3f}x | {fmt(q)} | {other_name} | {fmt(at)} | {better} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "curves":
        return main_curves(argv[1:])
    if argv and argv[0] == "compare":  # compare RECORD.json [...]: cross-layer + codec vs codec alone
        points = [q for path in argv[1:] for q in json.loads(Path(path).read_text())["points"]]
        print(codec_comparison(points, CODEC_PAIR_POLICIES, CODEC_ONLY_POLICIES))
        for name in dict.fromkeys(q["policy"] for q in points):
            best = largest_within(_curve(points, name))
            print(f"{name}: largest measured storage ratio with the nll interval's upper bound <= 1.01: "
                  + (f"{best:.3f}x" if best else "none"))
        return 0
    if argv and argv[0] == "table":
        for path in argv[1:]:
            print(curve_table(json.loads(Path(path).read_text())))
        return 0
    if argv and argv[0] == "plot":  # plot OUT.png RECORD.json [RECORD.json ...]: overlay curve records
        from krul.plotting import plot_calibration_curves

        if len(argv) < 3:
            raise SystemExit("usage: python -m krul.calibrate plot OUT.png CURVES.json [CURVES.json ...]")
        plot_calibration_curves(*[json.loads(Path(f).read_text()) for f in argv[2:]]).savefig(argv[1], dpi=130)
        return 0
    p = argparse.ArgumentParser(prog="python -m krul.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-conversations", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--taus", type=float, nargs="+", default=None,
                   help="default: quantiles of the dev layers' boundary mass (protect 0-60%%)")
    p.add_argument("--pairs", type=int, nargs="+", default=[1, 2, 4, 6, 8, 10])
    p.add_argument("--protect", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6],
                   help="fractions of layers the tau grid protects (when --taus is not given)")
    p.add_argument("--policy", default="krul", choices=["krul", "krul-svd", "krul-svd-loss"])
    p.add_argument("--rank-ratios", type=float, nargs="+", default=None,
                   help="krul-svd: stored fractions of a pair to grid (default: the registry's)")
    p.add_argument("--out", default=None, help="record path (default experiments/calibration/<model>.json)")
    p.add_argument("--sensitivity", default=None,
                   help="krul-svd-loss: reuse this layer-sensitivity JSON instead of measuring it")
    p.add_argument("--sensitivity-conversations", type=int, default=None,
                   help="krul-svd-loss: measure the sensitivity on the first N dev conversations (default all)")
    p.add_argument("--sensitivity-turns", type=int, default=None,
                   help="krul-svd-loss: at most this many turns (from turn 2) per conversation")
    p.add_argument("--adopt-unstamped", action="store_true",
                   help="resume the partial file's unstamped grid points (made before stamps) of the same "
                        "conversations and policy, instead of recomputing them")
    args = p.parse_args(argv)
    if args.rank_ratios and args.policy not in ("krul-svd", "krul-svd-loss"):
        p.error("--rank-ratios is for the svd policies (--policy krul-svd / krul-svd-loss)")
    rec = calibrate(args.model, args.n_conversations, args.max_tokens, taus=args.taus,
                    protect_fractions=tuple(args.protect), pair_counts=tuple(args.pairs),
                    policy=args.policy, rank_ratios=tuple(args.rank_ratios or (None,)), out=args.out,
                    sensitivity_from=args.sensitivity, sensitivity_conversations=args.sensitivity_conversations,
                    sensitivity_turns=args.sensitivity_turns, adopt_unstamped=args.adopt_unstamped)
    print(json.dumps({k: v for k, v in rec.items() if k != "grid"}))
    for g in rec["grid"]:
        print(json.dumps({k: v for k, v in g.items() if k != "conversations"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
