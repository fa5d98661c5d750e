"""What every figure's runner shares: errors, models, engines, conversations, resumable partial
results, the replay helpers, and the predicate helpers that more than one claim uses.

Each figure's own loop lives in `krul.figures.<slug>`; the quality loop of fig4 and fig8 in
`krul.figures.quality`, the restore timing of fig2, fig5, fig6 and fig9 in `krul.figures.timing`.
This module knows nothing about configs on disk, provenance or notebooks (`krul.experiments`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class ExperimentError(ValueError):
    """Bad config, unknown figure or profile: the message says what to do."""


class NotApplicable(ValueError):
    """A claim whose premise the data does not meet (say, an ablation of a component that never
    acted): its verdict is "not applicable", with this message as the reason."""


class MissingComponent(RuntimeError):
    """A library piece a figure needs (estimator, profiler, bench) is not importable here."""



# ============================================================================================
# predicate helpers (shared by more than one figure's claim)


def finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def largest(df: pd.DataFrame, col: str = "history_tokens") -> pd.DataFrame:
    return df[df[col] == df[col].max()]


def best_baseline_over_krul(df, cfg):
    """min over tiers, at the longest history, of TTFT(best baseline) / TTFT(krul): the strongest
    rival's TTFT median (the minimum over the claim's `baselines` present in that tier) over krul's.
    >= 1 means krul is at least as fast as every baseline on every tier; any one baseline can fail it."""
    claim = cfg["claim"]
    policy = claim.get("policy", "krul")
    rivals = claim.get("baselines", ["full-load", "cake", "partial-recompute", "minicache"])
    d = largest(df)
    if "tier" not in d:
        d = d.assign(tier="-")
    ratios = []
    for _, t in d.groupby("tier"):
        med = t.groupby("policy").ttft_s.median()
        present = [b for b in rivals if b in med]
        if policy not in med or not present:
            continue
        ratios.append(float(min(med[b] for b in present) / med[policy]))
    return min(ratios) if ratios else None



# ============================================================================================
# models, engines, conversations, resumable partial results

_ADAPTERS: dict = {}


_RATES: dict = {}


_CONVS: dict = {}



def get_adapter(model: str, device: str = "cpu"):
    """The real model `model` on `device` (fp32 on CPU, bf16 on CUDA), loaded once per process."""
    key = (model, device)
    if key not in _ADAPTERS:
        import torch

        from krul import models
        from krul.adapter import ModelAdapter

        torch.manual_seed(0)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        m, tok = models.load_model(model, device=device, dtype=dtype)
        _ADAPTERS[key] = ModelAdapter(m, tok, model)
    return _ADAPTERS[key]


def get_rates(adapter, tier: str):
    """Measured restore rates of this machine (`krul.profile.measure_rates`), once per model/tier."""
    key = (adapter.name, str(adapter.device), tier)
    if key not in _RATES:
        try:
            from krul.profile import measure_rates
        except ImportError as e:
            raise MissingComponent(f"krul.profile is not available ({e}); the scheduler policies need it") from None
        _RATES[key] = measure_rates(adapter, tier)
    return _RATES[key]


def make_policy(name: str, overrides: dict | None = None, model: str | None = None):
    """A registry policy, with `model`'s dev calibration (`experiments/calibration/<model>.json`,
    when one exists) and then `overrides` applied (e.g. `{"selector_params": {"tau": 0.2}}`)."""
    from krul.policies import get_policy

    policy = get_policy(name, model=model)
    if overrides:
        changes = {}
        for k, v in overrides.items():
            cur = getattr(policy, k)
            changes[k] = {**cur, **v} if isinstance(cur, dict) and isinstance(v, dict) else v
        policy = policy.with_params(**changes)
    return policy


def make_engine(adapter, policy, tier: str = "pageable", max_new_tokens: int = 32, seed: int = 0,
                history: str = "teacher"):
    """An engine with the estimator and measured rates the policy needs (MissingComponent if absent)."""
    from krul.engine import Engine
    from krul.store import make_store

    if isinstance(policy, str):
        policy = make_policy(policy, model=adapter.name)
    estimator = None
    if policy.needs_estimator:
        try:
            from krul.estimator import AttentionEstimator
        except ImportError as e:
            raise MissingComponent(f"krul.estimator is not available ({e}); policy {policy.name!r} needs it") from None
        estimator = AttentionEstimator(adapter)
    rates = get_rates(adapter, tier) if policy.split == "scheduler" else None
    return Engine(adapter, policy, make_store(tier), max_new_tokens=max_new_tokens, seed=seed,
                  history=history, estimator=estimator, rates=rates)


def _all_conversations(spec: str, split: str | None):
    key = (spec, split)
    if key not in _CONVS:
        from krul import data

        _CONVS[key] = data.load_conversations(spec, split=split)
    return _CONVS[key]


def select_conversations(spec: str = "sharegpt", split: str | None = "test", n: int = 2, min_turns: int = 2,
                         max_turns: int = 2, max_chars: int | None = None, min_chars: int = 0,
                         clip_chars: int | None = None, offset: int = 0) -> list:
    """The first `n` conversations (hash order) with >= `min_turns` user turns whose first
    `max_turns` exchanges hold between `min_chars` and `max_chars` characters; `clip_chars` clips every
    message to that many characters (tiny profiles only; a deviation recorded in the config)."""
    from krul.data import Conversation

    out = []
    for conv in _all_conversations(spec, split)[offset:]:
        users = conv.user_turn_indices()
        if len(users) < min_turns:
            continue
        end = users[max_turns] if len(users) > max_turns else len(conv.messages)
        msgs = conv.messages[:end]
        if clip_chars:
            msgs = [{**m, "content": m["content"][:clip_chars]} for m in msgs]
        size = sum(len(m["content"]) for m in msgs)
        if size < min_chars or (max_chars is not None and size > max_chars):
            continue
        out.append(Conversation(conv.id, msgs, conv.source, conv.meta) if clip_chars or end < len(conv.messages)
                   else conv)
        if len(out) >= n:
            break
    return out


def policy_key(policy) -> str:
    """`name#digest` of a policy with every parameter (its dataclass repr): a resumed run never
    reuses a unit computed under other parameters (an edited `target_ratio`, say)."""
    import hashlib

    return f"{policy.name}#{hashlib.sha256(repr(policy).encode()).hexdigest()[:12]}"


def resolved_policies(cfg: dict | None) -> dict[str, str]:
    """Every parameter of the run's policies as the registry resolves them (`make_policy`: the
    registry entry, the model's dev calibration, the config's `policy_overrides`), by `model|policy`:
    what the source digest misses (a calibration file re-written, a registry entry patched in a
    session). The run's policies: its `policies`, its bench's, and those it overrides."""
    cfg = cfg or {}
    names = [*(cfg.get("policies") or []), *((cfg.get("bench") or {}).get("policies") or []),
             *(cfg.get("policy_overrides") or {})]
    if not names:
        return {}
    models = list(cfg.get("models") or ([cfg["model"]] if cfg.get("model") else [None]))
    out = {}
    for model in models:
        for name in dict.fromkeys(names):
            try:
                out[f"{model}|{name}"] = repr(make_policy(name, (cfg.get("policy_overrides") or {}).get(name), model))
            except Exception as e:  # noqa: BLE001 - an unknown policy fails in the run itself, with its message
                out[f"{model}|{name}"] = f"unresolved: {type(e).__name__}: {e}"
    return out


def run_stamp(cfg: dict | None) -> str:
    """What a figure's finished units depend on beyond their own keys: the library's source
    (`evaluation.code_version`, any edit of src/krul, committed or not), the resolved config
    (without where it is written) and the resolved parameters of its policies (`resolved_policies`)."""
    import hashlib

    from krul.evaluation import code_version

    conf = {k: v for k, v in (cfg or {}).items() if k not in ("out_dir", "overrides")}
    conf["_policies"] = resolved_policies(cfg)
    blob = json.dumps(conf, sort_keys=True, default=str)
    return f"{code_version()}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


class PartialResults:
    """Finished units of a long loop as JSON lines (`{"key": ..., "value": ...}`), for resuming.

    The file's first line stamps what produced it (`run_stamp(cfg)`: source digest and resolved
    config). A file with another stamp, or none, is not reused: it is moved aside to
    `<name>.stale-<stamp>.jsonl` (nothing is deleted), the units are recomputed, and this is said
    once on stdout."""

    def __init__(self, out_dir, name: str, cfg: dict | None = None):
        self.path = Path(out_dir) / "partial" / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stamp = run_stamp(cfg)
        self.done: dict[str, object] = {}
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            try:
                stamp = json.loads(lines[0]).get("stamp") if lines else None
            except (json.JSONDecodeError, AttributeError):
                stamp = None
            if stamp != self.stamp:
                aside = self.path.with_name(f"{name}.stale-{stamp or 'unstamped'}.jsonl")
                self.path.replace(aside)
                print(f"{name}: the saved partial results were made by other code or settings "
                      f"(stamp {stamp or 'none'}, now {self.stamp}); recomputing them (old file kept as {aside.name})")
                lines = []
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the interruption: redo that unit
                    continue
                self.done[rec["key"]] = rec["value"]
        if not self.path.exists():
            self.path.write_text(json.dumps({"stamp": self.stamp}) + "\n")

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def get(self, key: str):
        return self.done[key]

    def add(self, key: str, value) -> None:
        self.done[key] = value
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "value": value}, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def progress(iterable, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=2.0)


def turn_json(result) -> dict:
    from krul.evaluation import GREEDY_TOKENS

    row = result.to_json(full=True)
    row["generated_ids"] = list(row["generated_ids"][:GREEDY_TOKENS])
    row.pop("reply_token_nll", None)
    rep = row.pop("restore_report", {}) or {}
    row["restore_report"] = {k: rep.get(k) for k in ("restore_s", "recompute_s", "load_s", "fetch_s",
                                                      "loaded_bytes")}
    return row


def turns_from_json(rows: list[dict]) -> list:
    from krul.engine import TurnResult

    return [TurnResult(**r) for r in rows]


def replay_cached(cache: PartialResults, key: str, engine, conv, max_turns: int) -> list[dict]:
    """Replay one conversation (or take its cached rows); saves full-load greedy references."""
    from krul.evaluation import GREEDY_TOKENS, save_reference

    if key in cache:
        return cache.get(key)
    rows = []
    for r in engine.replay(conv, max_turns=max_turns):
        if engine.policy.name == "full-load" and not engine.do_sample:
            save_reference(engine.adapter.name, conv.content_key, r.turn_idx, r.generated_ids[:GREEDY_TOKENS],
                           r.generated_text, engine.history)
        rows.append(turn_json(r))
    cache.add(key, rows)
    return rows


def long_context_turn(engine, conv, new_input_tokens: int = 128, max_context_tokens: int | None = None,
                      conv_suffix: str = "#lc"):
    """The paper's LongBench protocol on one long conversation: every token of the context before
    the last `new_input_tokens` is history (prefilled, compressed and stored by the policy), the last
    `new_input_tokens` are the new input; the real final reply is teacher-forced for its nll.

    The context is the conversation up to its last user message (optionally cut from the left to the
    whole exchanges that fit `max_context_tokens`). Returns the TurnResult (turn_idx 1).
    """
    import torch
    from transformers import DynamicCache

    from krul.evaluation import GREEDY_TOKENS, save_reference

    msgs = list(conv.messages)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    last = next(i for i in reversed(users) if i + 1 < len(msgs))  # the last user turn with a reply
    before, user, reply = msgs[:last], msgs[last], msgs[last + 1]["content"]
    while max_context_tokens and len(before) >= 2:
        n = len(engine.render(before + [user], add_generation_prompt=True))
        if n <= max_context_tokens:
            break
        before = before[2:]
    ctx = engine.render(before + [user], add_generation_prompt=True)
    hist = ctx[:max(1, len(ctx) - new_input_tokens)]
    cid = conv.id + conv_suffix
    engine.store.delete(cid)
    if engine.estimator is not None:
        engine.estimator.reset(cid)
    with torch.inference_mode():
        cache = DynamicCache()
        engine._forward(cid, torch.tensor([hist], dtype=torch.long), cache, logits_to_keep=1)
        engine.policy.offload(engine, cid, hist, cache, None)
        del cache
        result = engine.turn(cid, 1, before, user, reply)
    engine.store.delete(cid)
    result.conversation_key = conv.content_key + conv_suffix
    if engine.policy.name == "full-load" and not engine.do_sample:
        save_reference(engine.adapter.name, result.conversation_key, 1, result.generated_ids[:GREEDY_TOKENS],
                       result.generated_text, engine.history)
    return result


def estimator_stats(adapter, convs, max_turns: int, cfg: dict, cache_name: str) -> list[dict]:
    """Per conversation: layer-pair distances, boundary ratios and the krul selector's pairs, from
    replaying it with the estimator (policy `krul-fixed-split`: krul's selector, no rates needed)."""
    # stamped with the policy these units replay (its resolved parameters), not the figure's list
    cache = PartialResults(cfg["out_dir"], cache_name, {**cfg, "policies": ["krul-fixed-split"]})
    engine = None
    out = []
    for conv in progress(convs, f"{adapter.name} estimator"):
        key = f"{adapter.name}|{conv.content_key}|{max_turns}"
        if key not in cache:
            if engine is None:
                policy = make_policy("krul-fixed-split", cfg.get("policy_overrides", {}).get("krul"), adapter.name)
                engine = make_engine(adapter, policy, tier="pageable", max_new_tokens=cfg.get("max_new_tokens", 16),
                                     seed=cfg["seed"])
            n_tokens = 0
            for r in engine.replay(conv, max_turns=max_turns):
                n_tokens = r.history_tokens + r.new_input_tokens
            stats = engine.estimator.stats(conv.id)
            plan = engine.policy.plan(engine, conv.id, adapter.n_layers)
            cache.add(key, {"distances": stats.distances(normalize=cfg.get("normalize", False)).tolist(),
                            "boundary": stats.boundary_ratio().tolist(),
                            "pairs": [list(p) for p in (plan.pairs if plan is not None else ())],
                            "sensitive": list(getattr(plan, "sensitive", ()) or ()),
                            "n_tokens": n_tokens, "n_queries": int(stats.n_queries)})
        rec = dict(cache.get(key))
        rec["conversation_id"] = conv.id
        out.append(rec)
    return out

