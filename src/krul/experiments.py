"""Figure configs -> tidy DataFrames, provenance, claim checks, and the papermill runner.

One YAML per figure in `experiments/<slug>.yaml` (the slug is also the notebook, the make target and
the results folder). A YAML holds `title`, `claim` (statement, the paper's number, and the predicate
`metric op threshold +- tolerance` that decides the verdict), `params` (shared) and `profiles`
(`smoke` | `default` | `full`, merged over `params`). `run_figure(cfg)` dispatches to
`run_<slug>(cfg) -> DataFrame`; `check_claim(cfg, df)` evaluates the predicate; `save_run` writes
`data.csv`, `config.yaml`, `env.json` and the figure (PNG + PDF) into `cfg["out_dir"]`.

Long loops cache one JSON line per finished unit (conversation x policy x model, ...) under
`<out_dir>/partial/`, so an interrupted notebook resumes where it stopped.

Command line (what `make` calls)::

    python -m krul.experiments run <slug> --profile smoke|default|full --device cpu|cuda --out DIR
    python -m krul.experiments redraw --all        # from results/<slug>/reference/*/data.csv

This module knows nothing about how a figure looks (`plotting.py`) and holds no notebook code.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from krul import paths

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROFILES = ("smoke", "default", "full")
KERNEL_NAME = "krul"


class ExperimentError(ValueError):
    """Bad config, unknown figure or profile: the message says what to do."""


class MissingComponent(RuntimeError):
    """A library piece a figure needs (estimator, profiler, bench) is not importable here."""


# ============================================================================================
# configs


def slugs() -> list[str]:
    """Every figure with a YAML config, sorted."""
    return sorted(p.stem for p in paths.experiments_dir().glob("fig*.yaml"))


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(slug: str, profile: str = "default", device: str = "auto", out_dir: str | None = None,
                seed: int = 0, **overrides) -> dict:
    """The resolved config of a figure: `params` merged with `profiles[profile]` and the overrides.

    Returns a flat dict with `slug`, `title`, `claim`, `profile`, `device` (resolved: cpu or cuda),
    `out_dir` (absolute; default a fresh `results/<slug>/interactive-<time>`, apart from the
    `results/<slug>/<device>-<profile>` that `make reproduce` passes), `seed`, and the parameters.
    """
    path = paths.experiments_dir() / f"{slug}.yaml"
    if not path.is_file():
        raise ExperimentError(f"unknown figure {slug!r}; known: {', '.join(slugs())}")
    if profile not in PROFILES:
        raise ExperimentError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    raw = yaml.safe_load(path.read_text())
    profiles = raw.get("profiles") or {}
    if profile not in profiles:
        raise ExperimentError(f"{path}: no profile {profile!r}; it has {', '.join(profiles)}")
    cfg = _deep_merge(raw.get("params") or {}, profiles[profile])
    cfg = _deep_merge(cfg, overrides)
    device = resolve_device(device)
    if out_dir is None:  # an interactive run (JupyterLab's Run All) gets a fresh folder of its own,
        # never the reference or make reproduce's folder
        out_dir = paths.results_dir() / slug / f"interactive-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out_dir)
    if not out.is_absolute():
        out = paths.REPO_ROOT / out
    cfg.update(slug=slug, title=raw.get("title", slug), claim=raw.get("claim") or {}, profile=profile,
               device=device, out_dir=str(out), seed=int(seed), run=f"{device}-{profile}")
    return cfg


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ExperimentError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ExperimentError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


# ============================================================================================
# provenance and saving


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=paths.REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git, not a repository: provenance says so
        return None


def env_record(device: str = "cpu") -> dict:
    """Git sha (and dirtiness), package versions, device, host and time of this run."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("krul", "torch", "transformers", "numpy", "pandas", "seaborn", "matplotlib",
                "papermill", "datasets", "evaluate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    rec = {
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "versions": versions, "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "device": device, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    try:
        import torch

        rec["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            rec["gpu"] = torch.cuda.get_device_name(0)
            rec["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return rec


def save_run(cfg: dict, df: pd.DataFrame, fig=None, verdict: dict | None = None) -> Path:
    """Write `data.csv`, `config.yaml`, `env.json` (and the figure as PNG + PDF) into out_dir."""
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "data.csv", index=False)
    (out / "config.yaml").write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))
    env = env_record(cfg.get("device", "cpu"))
    if verdict is not None:
        env["verdict"] = verdict
    (out / "env.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    if fig is not None:
        save_figure(fig, out, cfg["slug"])
    return out


def save_figure(fig, out_dir, slug: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{slug}.png", dpi=150, bbox_inches="tight")
    fig.savefig(out / f"{slug}.pdf", bbox_inches="tight")


def save_verdict(cfg: dict, verdict: dict) -> None:
    """Add the claim's verdict to env.json (called by the notebook's last cell)."""
    p = Path(cfg["out_dir"]) / "env.json"
    env = json.loads(p.read_text()) if p.exists() else env_record(cfg.get("device", "cpu"))
    env["verdict"] = verdict
    p.write_text(json.dumps(env, indent=1, default=str) + "\n")


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


def reference_runs(slug: str) -> dict[str, Path]:
    """Committed reference data: `results/<slug>/reference/<device>-<profile>/data.csv` by run name."""
    root = paths.results_dir() / slug / "reference"
    return {p.parent.name: p for p in sorted(root.glob("*/data.csv"))}


def with_references(df: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    """This run's rows (column `run` = `<device>-<profile>`) plus every committed reference run
    of another name (e.g. the GPU `h100-full` CSV), to draw them together."""
    df = df.copy()
    df["run"] = cfg.get("run", "this run")
    frames = [df]
    for name, p in reference_runs(cfg["slug"]).items():
        if name == cfg.get("run"):
            continue
        ref = pd.read_csv(p)
        ref["run"] = name
        frames.append(ref)
    return pd.concat(frames, ignore_index=True, sort=False)


# ============================================================================================
# claims


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def check_claim(cfg: dict, df: pd.DataFrame) -> dict:
    """Evaluate the YAML's predicate `metric op threshold` (+- tolerance) on the data.

    Returns {"metric", "value", "op", "threshold", "tolerance", "verdict", "text"}; the verdict is
    "holds", "does not hold", "not measured" (the metric could not be computed from these rows), or
    "smoke run: not a measurement": a smoke run's data is too small to judge a claim by, whichever way
    it would come out.
    """
    claim = cfg.get("claim") or {}
    name = claim.get("metric")
    fn = CLAIM_METRICS.get(name)
    if fn is None:
        raise ExperimentError(f"{cfg['slug']}: unknown claim metric {name!r}; known: {', '.join(CLAIM_METRICS)}")
    try:
        value = fn(df, cfg)
    except Exception as e:  # noqa: BLE001 - a metric that cannot be computed is "not measured"
        value, err = None, f"{type(e).__name__}: {e}"
    else:
        err = None
    op, thr, tol = claim.get("op", ">="), float(claim.get("threshold", 0)), float(claim.get("tolerance", 0))
    if not _finite(value):
        verdict = "not measured"
    elif cfg.get("profile") == "smoke":  # a smoke run checks that the pipeline runs, not the claim
        verdict = "smoke run: not a measurement"
    elif op == ">=":
        verdict = "holds" if value >= thr - tol else "does not hold"
    elif op == "<=":
        verdict = "holds" if value <= thr + tol else "does not hold"
    else:
        raise ExperimentError(f"{cfg['slug']}: claim op must be '>=' or '<=', not {op!r}")
    shown = f"{float(value):.4g}" if _finite(value) else "n/a"
    text = (f"{cfg['slug']} [{cfg.get('run', '')}]: {claim.get('statement', '')}\n"
            f"  paper: {claim.get('paper', '-')}\n"
            f"  ours: {name} = {shown}  (predicate: {op} {thr} +- {tol})\n"
            f"  verdict: {verdict.upper()}" + (f"  ({err})" if err else ""))
    return {"metric": name, "value": float(value) if _finite(value) else None, "op": op,
            "threshold": thr, "tolerance": tol, "verdict": verdict, "text": text}


def _largest(df: pd.DataFrame, col: str = "history_tokens") -> pd.DataFrame:
    return df[df[col] == df[col].max()]


def _m_fig1(df, cfg):
    """Mean Jaccard overlap of the selected pairs between two conversations (same model)."""
    vals = []
    for _, g in df.groupby("model"):
        sets = [frozenset(zip(s.layer_a, s.layer_b)) for _, s in g[g.selected].groupby("conversation_id")]
        for i in range(len(sets)):
            for j in range(i + 1, len(sets)):
                u = sets[i] | sets[j]
                vals.append(len(sets[i] & sets[j]) / len(u) if u else 1.0)
    return float(np.mean(vals)) if vals else None


def _ttft_speedup(df, base: str, policy: str = "krul"):
    d = df[df.policy.isin([base, policy])]
    if d.empty or policy not in set(d.policy) or base not in set(d.policy):
        return None
    d = _largest(d)
    t = d.groupby("policy").ttft_s.median()
    return float(t[base] / t[policy]) if base in t and policy in t else None


def _best_baseline_over_krul(df, cfg):
    """min over tiers, at the longest history, of TTFT(best baseline) / TTFT(krul): the strongest
    rival's TTFT median (the minimum over the claim's `baselines` present in that tier) over krul's.
    >= 1 means krul is at least as fast as every baseline on every tier; any one baseline can fail it."""
    claim = cfg["claim"]
    policy = claim.get("policy", "krul")
    rivals = claim.get("baselines", ["full-load", "cake", "partial-recompute", "minicache"])
    d = _largest(df)
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


def _m_fig2(df, cfg):
    return _ttft_speedup(df, cfg["claim"].get("baseline", "full-recompute"))


def _m_fig3(df, cfg):
    d = _largest(df[df.policy == cfg["claim"].get("policy", "krul")])
    if d.empty or d.stored_bytes.sum() == 0:
        return None
    return float(d.full_kv_bytes.sum() / d.stored_bytes.sum())


def _m_fig4(df, cfg):
    d = df[(df.policy == cfg["claim"].get("policy", "krul")) & (df.dataset == "sharegpt")]
    d = d[d.nll_ratio.notna()]
    return float(d.nll_ratio.max()) if not d.empty else None


def _m_fig5(df, cfg):
    """The scheduler's regret at each length, the largest over lengths: restore time at its split /
    the best swept ratio's, both medians of the interleaved pass (measured side by side); runs that
    predate the interleaved pass compare the sweep with the scheduler's later repeats."""
    if "pass" in df and (df["pass"] == "interleaved").any():
        df = df[df["pass"] == "interleaved"]
    regrets = []
    for _, g in df.groupby("history_tokens"):
        d, ch = g[g.kind == "sweep"], g[g.kind == "scheduler"]
        if d.empty or ch.empty:
            continue
        # restore time: the only part the split changes (the new-input prefill is the same for all)
        regrets.append(float(ch.restore_s.median() / d.groupby("recompute_ratio").restore_s.median().min()))
    return max(regrets) if regrets else None


def _m_fig6(df, cfg):
    t = df.groupby("variant").restore_s.max()
    if "fixed" not in t or "bubble-free" not in t:
        return None
    return float(t["fixed"] / t["bubble-free"])


def _m_fig7(df, cfg):
    d = df[(df.metric == "decode_step_s")]
    if d.empty:
        return None
    d = d[d.seq_len == d.seq_len.max()]
    t = d.groupby("mode").value.median()
    return float(t["estimator"] / t["plain"]) if {"estimator", "plain"} <= set(t.index) else None


def _m_fig8(df, cfg):
    d = df.set_index("policy")
    if "krul" not in d.index or "krul-no-preempt" not in d.index:
        return None
    a, b = d.loc["krul", "nll"], d.loc["krul-no-preempt", "nll"]
    if isinstance(a, pd.Series):
        a, b = a.mean(), b.mean()
    return float(a / b) if _finite(a) and _finite(b) else None


def _m_fig9(df, cfg):
    return _ttft_speedup(df, cfg["claim"].get("baseline", "full-recompute"))


CLAIM_METRICS = {
    "mean_pair_jaccard": _m_fig1, "ttft_speedup_at_longest": _m_fig2, "storage_ratio_at_longest": _m_fig3,
    "max_nll_ratio_vs_full": _m_fig4, "scheduler_regret": _m_fig5, "fixed_over_bubble_free": _m_fig6,
    "decode_overhead_at_longest": _m_fig7, "nll_krul_over_no_preempt": _m_fig8,
    "ttft_speedup_vs_length": _m_fig9, "best_baseline_over_krul_at_longest": _best_baseline_over_krul,
}


# ============================================================================================
# shared machinery: models, engines, conversations, resumable partial results

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


class PartialResults:
    """Finished units of a long loop as JSON lines (`{"key": ..., "value": ...}`), for resuming."""

    def __init__(self, out_dir, name: str):
        self.path = Path(out_dir) / "partial" / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, object] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the interruption: redo that unit
                    continue
                self.done[rec["key"]] = rec["value"]

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


def _progress(iterable, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=2.0)


def _turn_json(result) -> dict:
    from krul.evaluation import GREEDY_TOKENS

    row = result.to_json(full=True)
    row["generated_ids"] = list(row["generated_ids"][:GREEDY_TOKENS])
    row.pop("reply_token_nll", None)
    rep = row.pop("restore_report", {}) or {}
    row["restore_report"] = {k: rep.get(k) for k in ("restore_s", "recompute_s", "load_s", "fetch_s",
                                                      "loaded_bytes")}
    return row


def _turns_from_json(rows: list[dict]) -> list:
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
        rows.append(_turn_json(r))
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


# ============================================================================================
# quality (fig4, fig8) and storage (fig3)


def _quality_summary(rows_by_policy: dict, model: str, dataset: str, history: str, mtbench_refs=None,
                     rouge: bool = True, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """One row per policy: nll (+ bootstrap CI), ratio to full-load (paired bootstrap CI), greedy
    agreement (+ bootstrap CI over turns), ROUGE-L, bytes."""
    from krul.evaluation import paired_ratio_ci, summarize

    base = None
    if "full-load" in rows_by_policy:
        base = summarize(_turns_from_json(rows_by_policy["full-load"]), model, "full-load", history=history)
    out = []
    for policy, rows in rows_by_policy.items():
        turns = _turns_from_json(rows)
        s = summarize(turns, model, policy, mtbench_refs=mtbench_refs, rouge=rouge, history=history)
        if dataset == "mtbench":
            s["nll"], s["nll_ci95"] = None, [None, None]
        ratio = (None, None, None)
        if base is not None and s["nll"] is not None and base["nll"]:
            ratio = paired_ratio_ci(s["per_conversation"], base["per_conversation"], n_boot=n_boot, seed=seed)
        # greedy agreement per scored turn, bootstrap over turns
        from krul.evaluation import GREEDY_TOKENS, load_reference

        agree = []
        for r in turns:
            if r.turn_idx < 1:
                continue
            ref = load_reference(model, r.conversation_key or r.conversation_id, r.turn_idx, history)
            if ref is None:
                continue
            # over the reference's first GREEDY_TOKENS tokens (fewer when the profile decodes fewer)
            width = min(GREEDY_TOKENS, len(ref["ids"]))
            if width == 0:
                continue
            n = 0
            for a, b in zip(r.generated_ids[:width], ref["ids"][:width]):
                if a != b:
                    break
                n += 1
            agree.append(n / width)
        g_lo, g_hi = _bootstrap_mean(agree, n_boot, seed)
        out.append({
            "model": model, "dataset": dataset, "policy": policy, "n_conversations": s["n_conversations"],
            "n_scored_tokens": s["n_scored_tokens"], "nll": s["nll"], "nll_ci_lo": s["nll_ci95"][0],
            "nll_ci_hi": s["nll_ci95"][1], "nll_ratio": ratio[0], "nll_ratio_ci_lo": ratio[1],
            "nll_ratio_ci_hi": ratio[2], "greedy_match_rate": float(np.mean(agree)) if agree else None,
            "greedy_ci_lo": g_lo, "greedy_ci_hi": g_hi,
            "rougeL_vs_full_load": s.get("rougeL_vs_full_load"),
            "rougeL_vs_reference": s.get("rougeL_vs_reference"),
            "stored_bytes": s["stored_bytes"], "full_kv_bytes": s["full_kv_bytes"],
            "storage_ratio": s["storage_ratio"], "compression_ratio": s["compression_ratio"],
            "recompute_ratio": s["recompute_ratio"],
        })
    return out


def _bootstrap_mean(values, n_boot=2000, seed=0, level=0.95):
    if not values:
        return None, None
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _policy_list(cfg: dict) -> list[str]:
    policies = list(cfg["policies"])
    if "full-load" in policies:  # its greedy answers are the references of the others
        policies.remove("full-load")
        policies.insert(0, "full-load")
    return policies


def _quality(cfg: dict, datasets: list[dict], cache_name: str) -> pd.DataFrame:
    """Replay each dataset's conversations under each policy and model; summarise per policy."""
    cache = PartialResults(cfg["out_dir"], cache_name)
    out, skipped = [], []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        for ds in datasets:
            if model in ds.get("skip_models", []):
                continue
            n = ds.get("n_per_model", {}).get(model, ds.get("n", 2))
            convs = select_conversations(ds.get("spec", "sharegpt"), ds.get("split", "test"), n=n,
                                         min_turns=ds.get("min_turns", 2), max_turns=ds.get("max_turns", 2),
                                         max_chars=ds.get("max_chars"), min_chars=ds.get("min_chars", 0),
                                         clip_chars=ds.get("clip_chars"))
            history = "model" if ds["name"] == "mtbench" else "teacher"
            rows_by_policy = {}
            for policy_name in _policy_list(cfg):
                try:
                    policy = make_policy(policy_name, cfg.get("policy_overrides", {}).get(policy_name), model)
                    engine = make_engine(adapter, policy, tier=cfg.get("tier", "pageable"),
                                         max_new_tokens=cfg.get("max_new_tokens", 32), seed=cfg["seed"],
                                         history=history)
                except MissingComponent as e:
                    skipped.append(f"{model}/{policy_name}: {e}")
                    continue
                rows = []
                for conv in _progress(convs, f"{model} {ds['name']} {policy_name}"):
                    key = f"{model}|{ds['name']}|{policy_key(engine.policy)}|{conv.content_key}"
                    if ds.get("protocol") == "long_context":
                        if key not in cache:
                            r = long_context_turn(engine, conv, ds.get("new_input_tokens", 128),
                                                  ds.get("max_context_tokens"))
                            cache.add(key, [_turn_json(r)])
                        rows.extend(cache.get(key))
                    else:
                        rows.extend(replay_cached(cache, key, engine, conv, ds.get("max_turns", 2)))
                rows_by_policy[policy_name] = rows
            refs = {c.id: c.meta.get("references") for c in convs if c.meta.get("references")}
            out.extend(_quality_summary(rows_by_policy, model, ds["name"], history, mtbench_refs=refs,
                                        rouge=cfg.get("rouge", True), n_boot=cfg.get("n_boot", 2000),
                                        seed=cfg["seed"]))
    for s in skipped:
        print(f"skipped (not measured): {s}")
    return pd.DataFrame(out)


def run_fig4_accuracy(cfg: dict) -> pd.DataFrame:
    """nll / ROUGE-L / greedy agreement per policy: ShareGPT test, MT-Bench turn 2, long-context."""
    return _quality(cfg, cfg["datasets"], "fig4_quality")


def run_fig8_ablation(cfg: dict) -> pd.DataFrame:
    """Krul vs its ablations (nll, bytes); krul-fix gets one plan calibrated on `dev` here."""
    cfg = copy.deepcopy(cfg)
    if "krul-fix" in cfg["policies"] and cfg.get("calibrate_fix", True):
        try:
            pairs = calibrate_fix_pairs(cfg)
            cfg.setdefault("policy_overrides", {})["krul-fix"] = {
                "selector_params": {"pairs": [list(p) for p in pairs], "method": "merge"}}
            print(f"krul-fix pairs calibrated on dev: {pairs}")
        except MissingComponent as e:
            print(f"krul-fix not calibrated (not measured): {e}")
            cfg["policies"] = [p for p in cfg["policies"] if p != "krul-fix"]
    return _quality(cfg, cfg["datasets"], "fig8_ablation")


def calibrate_fix_pairs(cfg: dict):
    """One plan for every conversation from estimator stats of `dev` conversations (Krul(Fix))."""
    from krul.selector import SelectionInput, calibrate_fixed_pairs, n_pairs_for_ratio

    model = cfg["models"][0]
    adapter = get_adapter(model, cfg["device"])
    krul = make_policy("krul", model=model)
    cal = cfg.get("calibration", {})
    stats = _estimator_stats(adapter, select_conversations("sharegpt", "dev", n=cal.get("n", 2),
                                                          max_turns=cal.get("max_turns", 2),
                                                          max_chars=cal.get("max_chars"),
                                                          clip_chars=cal.get("clip_chars")),
                             cal.get("max_turns", 2), cfg, cache_name=f"fig8_calibration_{model}")
    inputs = [SelectionInput(distances=torch_tensor(s["distances"]), boundary_ratio=torch_tensor(s["boundary"]),
                             n_layers=adapter.n_layers,
                             layer_bytes_per_token=float(adapter.layer_kv_bytes_per_token())) for s in stats]
    n_pairs = n_pairs_for_ratio(adapter.n_layers, krul.selector_params.get("target_ratio", 1.5))
    return calibrate_fixed_pairs(inputs, n_pairs, order="ascending", tau=krul.selector_params.get("tau"))


def torch_tensor(x):
    import torch

    return torch.tensor(x, dtype=torch.float64)


def run_fig3_storage(cfg: dict) -> pd.DataFrame:
    """Stored bytes of each restored state per policy and model vs its history length (turn rows)."""
    cache = PartialResults(cfg["out_dir"], "fig3_storage")
    ds = cfg["conversations"]
    out, skipped = [], []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        n = ds.get("n_per_model", {}).get(model, ds.get("n", 2))
        convs = select_conversations("sharegpt", ds.get("split", "test"), n=n, min_turns=ds.get("max_turns", 3),
                                     max_turns=ds.get("max_turns", 3), max_chars=ds.get("max_chars"),
                                     min_chars=ds.get("min_chars", 0), clip_chars=ds.get("clip_chars"))
        for policy_name in cfg["policies"]:
            try:
                engine = make_engine(adapter, policy_name, tier=cfg.get("tier", "pageable"), max_new_tokens=1,
                                     seed=cfg["seed"])
            except MissingComponent as e:
                skipped.append(f"{model}/{policy_name}: {e}")
                continue
            for conv in _progress(convs, f"{model} {policy_name}"):
                key = f"{model}|{policy_key(engine.policy)}|{conv.content_key}"
                for r in replay_cached(cache, key, engine, conv, ds.get("max_turns", 3)):
                    if r["turn_idx"] < 1:
                        continue
                    out.append({"model": model, "policy": policy_name, "conversation_id": conv.id,
                                "turn_idx": r["turn_idx"], "history_tokens": r["history_tokens"],
                                "stored_bytes": r["stored_bytes"], "full_kv_bytes": r["full_kv_bytes"],
                                "recompute_ratio": r["recompute_ratio"],
                                "n_pairs": len((r.get("plan") or {}).get("pairs", []) or [])})
    for s in skipped:
        print(f"skipped (not measured): {s}")
    df = pd.DataFrame(out)
    if not df.empty:
        df["storage_ratio"] = df.full_kv_bytes / df.stored_bytes.where(df.stored_bytes > 0)
    return df


# ============================================================================================
# estimator figures (fig1, fig7)


def _estimator_stats(adapter, convs, max_turns: int, cfg: dict, cache_name: str) -> list[dict]:
    """Per conversation: layer-pair distances, boundary ratios and the krul selector's pairs, from
    replaying it with the estimator (policy `krul-fixed-split`: krul's selector, no rates needed)."""
    cache = PartialResults(cfg["out_dir"], cache_name)
    engine = None
    out = []
    for conv in _progress(convs, f"{adapter.name} estimator"):
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


def run_fig1_similarity_variability(cfg: dict) -> pd.DataFrame:
    """One row per (model, conversation, layer pair i<j): distance, whether krul selected it."""
    rows = []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        for split in cfg.get("splits", ["dev", "test"]):
            n = cfg.get("n_per_model", {}).get(model, cfg.get("n", 2))
            convs = select_conversations("sharegpt", split, n=n, max_turns=cfg.get("max_turns", 2),
                                         max_chars=cfg.get("max_chars"), clip_chars=cfg.get("clip_chars"))
            for rec in _estimator_stats(adapter, convs, cfg.get("max_turns", 2), cfg, f"fig1_{model}_{split}"):
                d = np.asarray(rec["distances"])
                chosen = {tuple(sorted(p)) for p in rec["pairs"]}
                for i in range(d.shape[0]):
                    for j in range(i + 1, d.shape[0]):
                        rows.append({"model": model, "split": split, "conversation_id": rec["conversation_id"],
                                     "n_tokens": rec["n_tokens"], "layer_a": i, "layer_b": j,
                                     "distance": float(d[i, j]), "selected": (i, j) in chosen,
                                     "boundary_a": float(rec["boundary"][i]),
                                     "sensitive_a": i in set(rec["sensitive"])})
    return pd.DataFrame(rows)


def run_fig7_estimator_overhead(cfg: dict) -> pd.DataFrame:
    """Prefill (with similarity) and decode-step latency with/without the estimator vs sequence
    length; the estimator's peak map bytes vs keeping every layer's maps (n_layers*heads*n*n*4)."""
    import torch
    from transformers import DynamicCache

    try:
        from krul.estimator import AttentionEstimator
    except ImportError as e:
        raise MissingComponent(f"krul.estimator is not available ({e})") from None
    rows = []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        conv = select_conversations("sharegpt", "test", n=1, min_turns=1, max_turns=10,
                                    min_chars=cfg.get("min_chars", 20000))[0]
        text_ids = adapter.tokenizer(" ".join(m["content"] for m in conv.messages))["input_ids"]
        for n in _progress(cfg["seq_lens"], f"{model} seq lens"):
            ids = torch.tensor([text_ids[:n]], dtype=torch.long)
            for rep in range(cfg.get("repeats", 1)):
                with torch.inference_mode():
                    est = AttentionEstimator(adapter)
                    cid = f"fig7-{n}-{rep}"
                    est.reset(cid)
                    t_sim0 = dict(est.time_s)
                    c1, c2 = DynamicCache(), DynamicCache()
                    t0 = time.perf_counter()
                    out1 = est.forward(cid, ids, c1, logits_to_keep=1)
                    t1 = time.perf_counter()
                    out2 = adapter.forward(ids, c2, logits_to_keep=1)
                    t2 = time.perf_counter()
                    rows += [dict(model=model, seq_len=n, rep=rep, metric="prefill_s", mode="estimator", value=t1 - t0),
                             dict(model=model, seq_len=n, rep=rep, metric="prefill_s", mode="plain", value=t2 - t1)]
                    tok1, tok2 = int(out1[0, -1].argmax()), int(out2[0, -1].argmax())
                    step_e, step_p = [], []
                    for _ in range(cfg.get("decode_steps", 8)):
                        t0 = time.perf_counter()
                        tok1 = int(est.forward(cid, torch.tensor([[tok1]]), c1, logits_to_keep=1)[0, -1].argmax())
                        t1 = time.perf_counter()
                        tok2 = int(adapter.forward(torch.tensor([[tok2]]), c2, logits_to_keep=1)[0, -1].argmax())
                        t2 = time.perf_counter()
                        step_e.append(t1 - t0)
                        step_p.append(t2 - t1)
                    est.stats(cid)
                    t_sim = est.time_s
                    sim_prefill = t_sim.get("prefill_cpu", 0.0) - t_sim0.get("prefill_cpu", 0.0)
                    sim_decode = (t_sim.get("decode_device", 0.0) - t_sim0.get("decode_device", 0.0)) / max(1, len(step_e))
                    rows += [dict(model=model, seq_len=n, rep=rep, metric="decode_step_s", mode="estimator",
                                  value=statistics.median(step_e)),
                             dict(model=model, seq_len=n, rep=rep, metric="decode_step_s", mode="plain",
                                  value=statistics.median(step_p)),
                             dict(model=model, seq_len=n, rep=rep, metric="prefill_similarity_s", mode="estimator",
                                  value=sim_prefill),
                             dict(model=model, seq_len=n, rep=rep, metric="decode_similarity_s", mode="estimator",
                                  value=sim_decode),
                             dict(model=model, seq_len=n, rep=rep, metric="map_bytes", mode="estimator",
                                  value=float(est.peak_map_bytes)),
                             dict(model=model, seq_len=n, rep=rep, metric="map_bytes", mode="all maps",
                                  value=float(adapter.n_layers * adapter.n_heads * n * n * 4))]
    return pd.DataFrame(rows)


# ============================================================================================
# restore timing (fig2, fig5, fig6, fig9)


def run_bench(cfg: dict) -> pd.DataFrame:
    """Rows of `krul.bench.run_ttft(cfg["bench"])` (its own warm-up, repeats and hardware record)."""
    try:
        from krul import bench
    except ImportError as e:
        raise MissingComponent(f"krul.bench is not available ({e})") from None
    bcfg = dict(cfg["bench"])
    bcfg.setdefault("device", cfg["device"])
    bcfg.setdefault("seed", cfg["seed"])
    out = Path(cfg["out_dir"]) / "partial" / "bench.csv"  # the bench appends rows and skips done ones
    out.parent.mkdir(parents=True, exist_ok=True)
    bcfg.setdefault("out", str(out))
    rows = bench.run_ttft(bcfg)
    if out.exists():  # every row of the sweep, including those of an interrupted earlier run
        return pd.read_csv(out)
    return pd.DataFrame(rows).apply(_numeric)


def _numeric(col: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(col)
    except (TypeError, ValueError):
        return col


def _bench_or_reference(cfg: dict) -> pd.DataFrame:
    try:
        return run_bench(cfg)
    except MissingComponent as e:
        print(f"not measured here: {e}; drawing committed reference data only")
        return pd.DataFrame(columns=["device", "model", "tier", "history_tokens", "policy", "ttft_s",
                                     "restore_s", "stored_bytes", "full_kv_bytes"])


def run_fig2_ttft(cfg: dict) -> pd.DataFrame:
    return _bench_or_reference(cfg)


def run_fig9_history_length(cfg: dict) -> pd.DataFrame:
    return _bench_or_reference(cfg)


def _history_ids(adapter, n_tokens: int) -> list[int]:
    conv = select_conversations("sharegpt", "test", n=1, min_turns=1, max_turns=20, min_chars=8 * n_tokens)[0]
    ids = adapter.tokenizer(" ".join(m["content"] for m in conv.messages))["input_ids"]
    if len(ids) < n_tokens:
        raise ExperimentError(f"no conversation with {n_tokens} tokens found; lower history_tokens")
    return ids


def _prefill_kv(adapter, ids: list[int]):
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        adapter.forward(torch.tensor([ids], dtype=torch.long), cache, logits_to_keep=1)
        return adapter.kv_from_cache(cache)


def _time_restore(adapter, store, key: str, new_ids: list[int], repeats: int, warmup: int = 1) -> list[dict]:
    """Restore a stored state and prefill `new_ids` over it; per repeat restore_s, ttft_s, the report."""
    import torch

    from krul.restore import restore_cache

    out = []
    for rep in range(warmup + repeats):
        with torch.inference_mode():
            t0 = time.perf_counter()
            state = store.get(key)
            cache, report = restore_cache(adapter, state, extra_tokens=len(new_ids))
            t1 = time.perf_counter()
            logits = adapter.forward(torch.tensor([new_ids], dtype=torch.long), cache, logits_to_keep=1)
            int(logits[0, -1].argmax())
            t2 = time.perf_counter()
        if rep >= warmup:
            out.append({"restore_s": t1 - t0, "ttft_s": t2 - t0, "report": report})
    return out


def _rates_or_fit(adapter, tier: str, fitted=None):
    try:
        return get_rates(adapter, tier), "profile"
    except MissingComponent:
        if fitted is None:
            raise
        return fitted, "fitted from the endpoints of this sweep"


def run_fig5_ratio_sweep(cfg: dict) -> pd.DataFrame:
    """TTFT vs the recompute ratio r (flat split, no compression) and the scheduler's choice."""
    from krul import scheduler
    from krul.policies import get_policy
    from krul.store import build_state, make_store

    # the scheduler as krul runs it: a split must promise min_gain over one stream (policies._MIN_GAIN)
    min_gain = float(cfg.get("min_gain", get_policy("krul").min_gain))
    rows = []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        for n in cfg["history_tokens"]:
            ids = _history_ids(adapter, n + cfg["new_input_tokens"])
            hist, new = ids[:n], ids[n:n + cfg["new_input_tokens"]]
            kv = _prefill_kv(adapter, hist)
            store = make_store(cfg.get("tier", "pageable"))
            import torch

            ends = {}
            for r in _progress(cfg["ratios"], f"{model} n={n}"):
                split = scheduler.fixed_split(n, adapter.n_layers, r, slope=cfg.get("slope", 0.0))
                store.put("s", build_state(adapter.fingerprint(), torch.tensor(hist), kv, split.lengths, None))
                for rep, t in enumerate(_time_restore(adapter, store, "s", new, cfg.get("repeats", 1))):
                    rows.append({"model": model, "history_tokens": n, "kind": "sweep", "recompute_ratio": r,
                                 "rep": rep, "restore_s": t["restore_s"], "ttft_s": t["ttft_s"],
                                 "recompute_s": t["report"].recompute_s, "load_s": t["report"].load_s})
                    ends.setdefault(r, []).append(t["report"])
            fitted = None
            if 0.0 in ends and 1.0 in ends:
                rec = statistics.median(x.recompute_s for x in ends[1.0])
                load = statistics.median(x.load_s for x in ends[0.0])
                nbytes = n * adapter.n_layers * adapter.layer_kv_bytes_per_token()
                fitted = scheduler.RestoreRates(recompute_s_per_token=rec / (n * adapter.n_layers),
                                                load_bytes_per_s=nbytes / max(load, 1e-9))
            try:
                rates, source = _rates_or_fit(adapter, cfg.get("tier", "pageable"), fitted)
            except MissingComponent as e:
                print(f"scheduler choice not measured: {e}")
                continue
            choice = scheduler.choose_split(n, adapter.n_layers, rates, adapter.layer_kv_bytes_per_token(),
                                            slope=cfg.get("slope", 0.0), min_gain=min_gain)
            # the regret's two sides measured side by side: every swept ratio and the scheduler's split
            # stored at once and timed round-robin, so drift and noise fall on all of them alike
            splits = {("sweep", r): scheduler.fixed_split(n, adapter.n_layers, r, slope=cfg.get("slope", 0.0))
                      for r in cfg["ratios"]}
            splits[("scheduler", choice.recompute_ratio)] = choice
            for (kind, r), split in splits.items():
                store.put(f"{kind}-{r}", build_state(adapter.fingerprint(), torch.tensor(hist), kv,
                                                     split.lengths, None))
                _time_restore(adapter, store, f"{kind}-{r}", new, 0)  # warm-up
            for rep in range(cfg.get("repeats", 1)):
                for (kind, r), split in splits.items():
                    t = _time_restore(adapter, store, f"{kind}-{r}", new, 1, warmup=0)[0]
                    rows.append({"model": model, "history_tokens": n, "kind": kind, "pass": "interleaved",
                                 "recompute_ratio": r, "rep": rep, "restore_s": t["restore_s"],
                                 "ttft_s": t["ttft_s"], "recompute_s": t["report"].recompute_s,
                                 "load_s": t["report"].load_s,
                                 "predicted_s": choice.t_restore_s if kind == "scheduler" else None,
                                 "rates_source": source if kind == "scheduler" else None})
            for (kind, r) in splits:
                store.delete(f"{kind}-{r}")
    return pd.DataFrame(rows)


def run_fig6_restore_timeline(cfg: dict) -> pd.DataFrame:
    """Per-layer events of the two streams of one restore: fixed ratio vs the bubble-free split,
    both over a state whose deeper layers are merged in pairs (unequal per-layer load bytes)."""
    import torch

    from krul import scheduler
    from krul.pricing import PlanPricing
    from krul.selector import MiniCacheSelector, SelectionInput
    from krul.store import build_state, make_store

    model, n, tier = cfg["model"], cfg["history_tokens"], cfg.get("tier", "pageable")
    adapter = get_adapter(model, cfg["device"])
    ids = _history_ids(adapter, n + cfg["new_input_tokens"])
    hist, new = ids[:n], ids[n:n + cfg["new_input_tokens"]]
    kv = _prefill_kv(adapter, hist)
    L = adapter.n_layers
    lb = float(adapter.layer_kv_bytes_per_token())
    plan = MiniCacheSelector(target_ratio=cfg.get("target_ratio", 1.5)).select(
        SelectionInput(distances=torch.zeros(L, L, dtype=torch.float64), boundary_ratio=torch.ones(L, dtype=torch.float64),
                       n_layers=L, layer_bytes_per_token=lb))
    retain = cfg.get("retain_ratio", 0.05)
    per_token = [b / n for b in PlanPricing.for_adapter(adapter, n, plan, {"retain_ratio": retain}).layer_bytes([0] * L)]
    store = make_store(tier)
    # endpoints measured here give the fallback rates when krul.profile is absent
    fitted = None
    ends = {}
    for r in (0.0, 1.0):
        split = scheduler.fixed_split(n, L, r)
        store.put("s", build_state(adapter.fingerprint(), torch.tensor(hist), kv, split.lengths, None,
                                   pairs=plan.pairs, compress_kwargs={"retain_ratio": retain}))
        ends[r] = _time_restore(adapter, store, "s", new, 1)[0]["report"]
    fitted = scheduler.RestoreRates(recompute_s_per_token=ends[1.0].recompute_s / (n * L),
                                    load_bytes_per_s=max(ends[0.0].loaded_bytes, 1) / max(ends[0.0].load_s, 1e-9))
    rates, source = _rates_or_fit(adapter, tier, fitted)
    splits = {"fixed": scheduler.fixed_split(n, L, cfg.get("fixed_ratio", 0.4), slope=cfg.get("slope", 1.0)),
              "bubble-free": scheduler.choose_split(n, L, rates, per_token, slope=cfg.get("slope", 1.0))}
    rows = []
    for variant, split in splits.items():
        store.put("s", build_state(adapter.fingerprint(), torch.tensor(hist), kv, split.lengths, None,
                                   pairs=plan.pairs, compress_kwargs={"retain_ratio": retain}))
        timed = _time_restore(adapter, store, "s", new, cfg.get("repeats", 1))
        best = min(timed, key=lambda t: t["report"].restore_s)
        rep = best["report"]
        for ev in rep.events:
            stream, layer_idx, s0, s1 = ev[:4]  # milliseconds from the restore's start
            rows.append({"model": model, "variant": variant, "stream": stream, "layer_idx": layer_idx,
                         "start_s": s0 / 1e3, "end_s": s1 / 1e3, "restore_s": rep.restore_s, "recompute_s": rep.recompute_s,
                         "load_s": rep.load_s, "recompute_ratio": split.recompute_ratio,
                         "history_tokens": n, "rates_source": source})
        if not rep.events:  # no per-layer events on this device: one bar per stream
            for stream, t in (("recompute", rep.recompute_s), ("load", rep.load_s)):
                rows.append({"model": model, "variant": variant, "stream": stream, "layer_idx": -1,
                             "start_s": 0.0, "end_s": t, "restore_s": rep.restore_s,
                             "recompute_s": rep.recompute_s, "load_s": rep.load_s,
                             "recompute_ratio": split.recompute_ratio, "history_tokens": n,
                             "rates_source": source})
    return pd.DataFrame(rows)


RUNNERS = {
    "fig1_similarity_variability": run_fig1_similarity_variability,
    "fig2_ttft": run_fig2_ttft,
    "fig3_storage": run_fig3_storage,
    "fig4_accuracy": run_fig4_accuracy,
    "fig5_ratio_sweep": run_fig5_ratio_sweep,
    "fig6_restore_timeline": run_fig6_restore_timeline,
    "fig7_estimator_overhead": run_fig7_estimator_overhead,
    "fig8_ablation": run_fig8_ablation,
    "fig9_history_length": run_fig9_history_length,
}


def run_figure(cfg: dict) -> pd.DataFrame:
    """`run_<slug>(cfg)`: the figure's tidy DataFrame (empty when a needed component is missing)."""
    import torch

    torch.manual_seed(cfg.get("seed", 0))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    t0 = time.perf_counter()
    try:
        df = RUNNERS[cfg["slug"]](cfg)
    except MissingComponent as e:
        print(f"{cfg['slug']}: not measured: {e}")
        df = pd.DataFrame()
    print(f"{cfg['slug']}: {len(df)} rows in {time.perf_counter() - t0:.1f} s")
    return df


# ============================================================================================
# papermill runner and redraw


def ensure_kernel() -> None:
    """Install a Jupyter kernel spec named `krul` for this interpreter's prefix if it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    prefix_spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME
    if KERNEL_NAME in specs and Path(specs[KERNEL_NAME]).resolve() == prefix_spec.resolve():
        return
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL_NAME,
                    "--display-name", "krul (.venv)"], check=True, capture_output=True)


def run_notebook(slug: str, profile: str = "default", device: str = "auto", out: str | None = None,
                 seed: int = 0, log_output: bool = True) -> Path:
    """Execute notebooks/<slug>.ipynb with papermill into `<out>/<slug>.ipynb` (kept)."""
    import papermill as pm

    nb = paths.REPO_ROOT / "notebooks" / f"{slug}.ipynb"
    if not nb.is_file():
        raise ExperimentError(f"no notebook {nb}; known figures: {', '.join(slugs())}")
    device = resolve_device(device)
    out_dir = Path(out) if out else paths.results_dir() / slug / f"{device}-{profile}"
    out_dir = out_dir if out_dir.is_absolute() else paths.REPO_ROOT / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_kernel()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    pm.execute_notebook(str(nb), str(out_dir / f"{slug}.ipynb"), kernel_name=KERNEL_NAME,
                        parameters={"profile": profile, "device": device, "out_dir": str(out_dir), "seed": seed},
                        cwd=str(paths.REPO_ROOT), progress_bar=False, log_output=log_output)
    wall = time.perf_counter() - t0
    env_path = out_dir / "env.json"
    if env_path.exists():  # the notebook wrote it; add the papermill wall time (kernel start included)
        env = json.loads(env_path.read_text())
        env["notebook_wall_s"] = round(wall, 1)
        env_path.write_text(json.dumps(env, indent=1, default=str) + "\n")
    print(f"{slug}: executed in {wall:.1f} s -> {out_dir}")
    return out_dir


def summary_rows() -> list[dict]:
    """One row per committed reference run: its verdict (metric, value, holds?) and wall time."""
    rows = []
    for slug in slugs():
        for name, csv in reference_runs(slug).items():
            env_path = csv.parent / "env.json"
            env = json.loads(env_path.read_text()) if env_path.exists() else {}
            v = env.get("verdict") or {}
            rows.append({"slug": slug, "run": name, "metric": v.get("metric"), "value": v.get("value"),
                         "op": v.get("op"), "threshold": v.get("threshold"), "tolerance": v.get("tolerance"),
                         "verdict": v.get("verdict"),
                         "notebook_wall_s": env.get("notebook_wall_s"), "git_sha": env.get("git_sha")})
    return rows


def format_value(x) -> str:
    """How REPRODUCE.md quotes a verdict value (3 decimals); 'not measured' for a missing one."""
    return "not measured" if x is None or not _finite(x) else f"{float(x):.3f}"


def redraw(slug: str) -> Path | None:
    """Redraw a figure from its committed reference runs (all overlaid), into results/<slug>/redraw/."""
    from krul import plotting

    refs = reference_runs(slug)
    if not refs:
        print(f"{slug}: no committed reference data under results/{slug}/reference/; skipped")
        return None
    frames = []
    for name, p in refs.items():
        df = pd.read_csv(p)
        df["run"] = name
        frames.append(df)
    df = pd.concat(frames, ignore_index=True, sort=False)
    fig = getattr(plotting, f"plot_{slug}")(df)
    out = paths.results_dir() / slug / "redraw"
    save_figure(fig, out, slug)
    print(f"{slug}: redrawn from {', '.join(refs)} -> {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m krul.experiments", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute a figure's notebook with papermill")
    r.add_argument("slug")
    r.add_argument("--profile", default="default", choices=PROFILES)
    r.add_argument("--device", default="auto")
    r.add_argument("--out", default=None, help="output folder (default results/<slug>/<device>-<profile>)")
    r.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("redraw", help="redraw figures from committed reference data")
    d.add_argument("slugs", nargs="*")
    d.add_argument("--all", action="store_true")
    sub.add_parser("list", help="the figures")
    sub.add_parser("summary", help="verdicts and wall times of the committed reference runs")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            if args.slug not in slugs():
                raise ExperimentError(f"unknown figure {args.slug!r}; known: {', '.join(slugs())}")
            run_notebook(args.slug, args.profile, args.device, args.out, args.seed)
        elif args.cmd == "redraw":
            for slug in (slugs() if args.all or not args.slugs else args.slugs):
                redraw(slug)
        elif args.cmd == "summary":
            print("| figure | run | metric | ours | predicate | holds? | notebook wall (s) | git sha |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for r in summary_rows():
                print(f"| {r['slug']} | {r['run']} | {r['metric']} | {format_value(r['value'])} | "
                      f"{r['op']} {r['threshold']} +- {r['tolerance']} | {r['verdict']} | {r['notebook_wall_s'] or '-'} | "
                      f"{(r['git_sha'] or '-')[:10]} |")
        else:
            print("\n".join(slugs()))
    except ExperimentError as e:
        print(f"krul.experiments: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
