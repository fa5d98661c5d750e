"""Figure configs -> the figure's runner, provenance, claim checks, and the papermill runner.

One YAML per figure in `experiments/<slug>.yaml` (the slug is also the notebook, the make target,
the results folder and the module `krul.figures.<slug>`). A YAML holds `title`, `claim` (statement,
the paper's number, and the predicate `metric op threshold +- tolerance` that decides the verdict),
`params` (shared) and `profiles` (`smoke` | `default` | `full`, merged over `params`).
`run_figure(cfg)` dispatches to `krul.figures.<slug>.run(cfg) -> DataFrame`; `check_claim(cfg, df)`
evaluates the predicate with the figure's `claim(df, cfg)`; `save_run` writes `data.csv`,
`config.yaml`, `env.json` and the figure (PNG + PDF) into `cfg["out_dir"]`.

Long loops cache one JSON line per finished unit (conversation x policy x model, ...) under
`<out_dir>/partial/` (`krul.figures.common.PartialResults`), so an interrupted notebook resumes
where it stopped.

Command line (what `make` calls)::

    python -m krul.experiments run <slug> --profile smoke|default|full --device cpu|cuda --out DIR \
        [--set models='[smollm2-135m]' --set conversations.n=3 ...]   # any setting of the YAML
    python -m krul.experiments redraw --all        # from results/<slug>/reference/*/data.csv
    python -m krul.experiments summary [--run DIR] # the reference verdicts; DIR (a run's --out) beside them

This module knows nothing about how a figure looks (`plotting.py`) or how it is measured
(`krul.figures`), and holds no notebook code.
"""
from __future__ import annotations

import argparse
import ast
import copy
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from krul import paths
from krul.figures import (fig1_similarity_variability, fig2_ttft, fig3_storage, fig4_accuracy, fig5_ratio_sweep,
                          fig6_restore_timeline, fig7_estimator_overhead, fig8_ablation, fig9_history_length,
                          fig10_throughput)
from krul.figures.common import ExperimentError, MissingComponent, NotApplicable, finite
from krul.figures.common import PartialResults, policy_key  # noqa: F401 - re-exported for notebooks and tests

PROFILES = ("smoke", "default", "full")
RUN_PARAMETERS = ("profile", "device", "out_dir", "seed")  # what every notebook takes besides its YAML's settings
KERNEL_NAME = "krul"


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


def _raw_config(slug: str) -> dict:
    path = paths.experiments_dir() / f"{slug}.yaml"
    if not path.is_file():
        raise ExperimentError(f"unknown figure {slug!r}; known: {', '.join(slugs())}")
    return yaml.safe_load(path.read_text())


def _examples(slug: str) -> dict:
    """Each setting of a figure, in YAML order, with its first value in `params` or a profile."""
    raw = _raw_config(slug)
    out: dict = {}
    for part in [raw.get("params") or {}, *(raw.get("profiles") or {}).values()]:
        for k, v in (part or {}).items():
            if out.get(k) is None:
                out[k] = v
    return out


def settings(slug: str) -> list[str]:
    """The settings of a figure, in YAML order: every key of its `params` and of any of its profiles.
    Each one is a notebook parameter and a `--set` key."""
    return list(_examples(slug))


def check_overrides(slug: str, overrides: dict) -> dict:
    """The overrides, each checked against the figure's YAML: a name that is not one of its settings
    is an ExperimentError naming the known ones; a string where the YAML has a list, dict, number or
    bool is parsed as YAML (papermill's `-p models '[a, b]'` passes a string); then the type must be
    the YAML's (a list for a list, a number for a number, ...), so `-p models smollm2-135m` does not
    iterate over characters. None values are dropped (None: the profile's value)."""
    examples = _examples(slug)
    unknown = sorted(k for k in overrides if k not in examples)
    if unknown:
        raise ExperimentError(f"{slug}: unknown parameter(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join([*RUN_PARAMETERS, *examples])}")
    out = {}
    for k, v in overrides.items():
        was = examples[k]
        if isinstance(v, str) and was is not None and not isinstance(was, str):
            try:
                v = yaml.safe_load(v)
            except yaml.YAMLError as e:
                raise ExperimentError(f"{slug}: parameter {k!r}: {v!r} is not YAML/JSON ({e})") from None
        if v is None:
            continue
        if was is not None:
            kind, kinds = (("true or false", (bool,)) if isinstance(was, bool) else
                           ("number", (int, float)) if isinstance(was, (int, float)) else
                           ("list", (list, tuple)) if isinstance(was, (list, tuple)) else
                           ("dict", (dict,)) if isinstance(was, dict) else ("string", (str,)))
            if not isinstance(v, kinds) or (isinstance(v, bool) and not isinstance(was, bool)):
                raise ExperimentError(f"{slug}: parameter {k!r} must be a {kind} (the YAML has "
                                      f"{json.dumps(_plain(was))}), not {v!r}")
        out[k] = v
    return out


def load_config(slug: str, profile: str = "default", device: str = "auto", out_dir: str | None = None,
                seed: int = 0, **overrides) -> dict:
    """The resolved config of a figure: `params` merged with `profiles[profile]` and the overrides.

    An override is one of the YAML's settings (`settings(slug)`, checked by `check_overrides`); None
    keeps the profile's value, a dict is merged over the YAML's, anything else replaces it.

    Returns a flat dict with `slug`, `title`, `claim`, `profile`, `device` (resolved: cpu or cuda),
    `out_dir` (absolute; default a fresh `results/<slug>/interactive-<time>`, apart from the
    `results/<slug>/<device>-<profile>` that `make reproduce` passes), `seed`, the parameters, and
    `overrides` (what was set beyond the YAML, when anything was).
    """
    raw = _raw_config(slug)
    path = paths.experiments_dir() / f"{slug}.yaml"
    if profile not in PROFILES:
        raise ExperimentError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    profiles = raw.get("profiles") or {}
    if profile not in profiles:
        raise ExperimentError(f"{path}: no profile {profile!r}; it has {', '.join(profiles)}")
    cfg = _deep_merge(raw.get("params") or {}, profiles[profile])
    overrides = check_overrides(slug, overrides)
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
    if overrides:
        cfg["overrides"] = copy.deepcopy(overrides)
    return cfg


def injected_parameters() -> set[str] | None:
    """The names papermill injected into this Jupyter kernel (its cell that starts `# Parameters`,
    found in the kernel's input history), or None outside a kernel. papermill only warns about a
    name the notebook does not declare; `notebook_config` makes it an error."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None:
        return None
    names: set[str] = set()
    for source in shell.user_ns.get("In", []):
        if not source.lstrip().startswith("# Parameters"):
            continue
        try:
            body = ast.parse(source).body
        except SyntaxError:  # not papermill's cell after all
            continue
        for node in body:
            if isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def notebook_config(slug: str, namespace: dict) -> dict:
    """`load_config` from a notebook's parameters (`namespace` is its `globals()`): the run parameters
    and every YAML setting declared there (None: the profile's value). A parameter papermill injected
    that is neither is an ExperimentError listing the known ones."""
    known = [*RUN_PARAMETERS, *settings(slug)]
    unknown = sorted((injected_parameters() or set()) - set(known))
    if unknown:
        raise ExperimentError(f"{slug}: unknown parameter(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(known)}")
    run = {k: namespace[k] for k in RUN_PARAMETERS if k in namespace}
    return load_config(slug, **run, **{k: namespace.get(k) for k in settings(slug)})


def parse_sets(items: list[str]) -> dict:
    """`--set KEY=VALUE` arguments as overrides: VALUE parsed as YAML (so JSON too: `[a, b]`, `3`,
    `{n: 3}`); a dotted KEY (`conversations.n=3`) sets one entry of a dict setting."""
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ExperimentError(f"--set {item!r}: write KEY=VALUE, e.g. --set models='[smollm2-135m]'")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ExperimentError(f"--set {item!r}: the value is not YAML/JSON ({e})") from None
        *parents, leaf = key.strip().split(".")
        node = {leaf: value}
        for k in reversed(parents):
            node = {k: node}
        out = _deep_merge(out, node)
    return out


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


def env_record(device: str = "cpu") -> dict:
    """Git sha (and tracked changes outside results/), package versions, device, host and time of this run."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("krul", "torch", "transformers", "numpy", "pandas", "seaborn", "matplotlib",
                "papermill", "datasets", "evaluate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    rec = {
        **paths.git_state(),
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

def check_claim(cfg: dict, df: pd.DataFrame) -> dict:
    """Evaluate the YAML's predicate `metric op threshold` (+- tolerance) on the data.

    Returns {"metric", "value", "op", "threshold", "tolerance", "verdict", "text"}; the verdict is
    "holds", "does not hold", "not measured" (the metric could not be computed from these rows),
    "not applicable" (the metric raised `NotApplicable`: the data does not meet the claim's premise;
    the reason is in the text), or
    "smoke run: not a measurement": a smoke run's data is too small to judge a claim by, whichever way
    it would come out.
    """
    claim = cfg.get("claim") or {}
    name = claim.get("metric")
    fn = CLAIM_METRICS.get(name)
    if fn is None:
        raise ExperimentError(f"{cfg['slug']}: unknown claim metric {name!r}; known: {', '.join(CLAIM_METRICS)}")
    applicable = True
    try:
        value = fn(df, cfg)
    except NotApplicable as e:  # the data does not meet the claim's premise: say why
        value, err, applicable = None, str(e), False
    except Exception as e:  # noqa: BLE001 - a metric that cannot be computed is "not measured"
        value, err = None, f"{type(e).__name__}: {e}"
    else:
        err = None
    op, thr, tol = claim.get("op", ">="), float(claim.get("threshold", 0)), float(claim.get("tolerance", 0))
    if cfg.get("profile") == "smoke" and (finite(value) or not applicable):
        verdict = "smoke run: not a measurement"  # a smoke run checks that the pipeline runs, not the claim
    elif not applicable:
        verdict = "not applicable"
    elif not finite(value):
        verdict = "not measured"
    elif op == ">=":
        verdict = "holds" if value >= thr - tol else "does not hold"
    elif op == "<=":
        verdict = "holds" if value <= thr + tol else "does not hold"
    else:
        raise ExperimentError(f"{cfg['slug']}: claim op must be '>=' or '<=', not {op!r}")
    shown = f"{float(value):.4g}" if finite(value) else "n/a"
    text = (f"{cfg['slug']} [{cfg.get('run', '')}]: {claim.get('statement', '')}\n"
            f"  paper: {claim.get('paper', '-')}\n"
            f"  ours: {name} = {shown}  (predicate: {op} {thr} +- {tol})\n"
            f"  verdict: {verdict.upper()}" + (f"  ({err})" if err else ""))
    return {"metric": name, "value": float(value) if finite(value) else None, "op": op,
            "threshold": thr, "tolerance": tol, "verdict": verdict, "text": text}



# ============================================================================================
# the figures: one module each (krul.figures.<slug>), with its runner and its claim

FIGURES = {m.__name__.rsplit(".", 1)[-1]: m for m in (
    fig1_similarity_variability, fig2_ttft, fig3_storage, fig4_accuracy, fig5_ratio_sweep, fig6_restore_timeline,
    fig7_estimator_overhead, fig8_ablation, fig9_history_length, fig10_throughput)}
RUNNERS = {slug: m.run for slug, m in FIGURES.items()}
CLAIM_METRICS = {m.METRIC: m.claim for m in FIGURES.values()}  # the YAML's `claim.metric` -> the predicate's value

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
                 seed: int = 0, log_output: bool = True, overrides: dict | None = None) -> Path:
    """Execute notebooks/<slug>.ipynb with papermill into `<out>/<slug>.ipynb` (kept).

    `overrides` (settings of the YAML, e.g. `{"models": ["smollm2-135m"]}`) become notebook
    parameters; they are checked here first (`load_config`), before a kernel starts.
    """
    import papermill as pm

    nb = paths.REPO_ROOT / "notebooks" / f"{slug}.ipynb"
    if not nb.is_file():
        raise ExperimentError(f"no notebook {nb}; known figures: {', '.join(slugs())}")
    device = resolve_device(device)
    out_dir = Path(out) if out else paths.results_dir() / slug / f"{device}-{profile}"
    out_dir = out_dir if out_dir.is_absolute() else paths.REPO_ROOT / out_dir
    overrides = check_overrides(slug, overrides or {})  # refuse bad ones before a kernel starts
    load_config(slug, profile, device=device, out_dir=str(out_dir), seed=seed, **overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_kernel()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    pm.execute_notebook(str(nb), str(out_dir / f"{slug}.ipynb"), kernel_name=KERNEL_NAME,
                        parameters={"profile": profile, "device": device, "out_dir": str(out_dir), "seed": seed,
                                    **overrides},
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


def judge(slug: str, csv, run: str, profile: str = "default", policy: str | None = None) -> dict:
    """The verdict of the rows in `csv` (a run's data.csv) under its figure's current claim (the YAML's
    predicate at `profile`; `policy` replaces the claim's policy); nothing is written. An empty CSV
    (nothing measured) is judged "not measured"."""
    cfg = load_config(slug, profile, device="cpu", out_dir=str(Path(csv).parent))
    cfg["run"] = run
    if policy:
        cfg["claim"] = {**cfg["claim"], "policy": policy}
    try:
        df = pd.read_csv(csv)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    verdict = check_claim(cfg, df)
    if policy:
        verdict["policy"] = policy
    return verdict


def judge_reference(slug: str, run: str, policy: str | None = None) -> dict:
    """The verdict of the committed reference run `results/<slug>/reference/<run>/data.csv` under its
    figure's claim (the default profile's config; `policy` replaces the claim's policy), saved into
    that run's env.json beside its provenance."""
    refs = reference_runs(slug)
    if run not in refs:
        raise ExperimentError(f"{slug}: no reference run {run!r}; known: {', '.join(refs) or 'none'}")
    verdict = judge(slug, refs[run], run, policy=policy)
    save_verdict({"out_dir": str(refs[run].parent), "device": "cpu"}, verdict)
    return verdict


# ============================================================================================
# summary: the committed reference runs, and a user's own run beside them

# per figure, the per-policy number shown side by side: rows grouped `by`, `value` aggregated by
# `agg`, over the rows at the run's own longest `longest` (when set) that match `where`
SIDE_BY_SIDE = {
    "fig1_similarity_variability": dict(by="model", value="distance", agg="mean", where=None, longest=None),
    "fig2_ttft": dict(by="policy", value="ttft_s", agg="median", where=None, longest="history_tokens"),
    "fig3_storage": dict(by="policy", value="storage_ratio", agg="mean", where=None, longest="history_tokens"),
    "fig4_accuracy": dict(by="policy", value="nll_ratio", agg="mean", where={"dataset": "sharegpt"}, longest=None),
    "fig5_ratio_sweep": dict(by="kind", value="restore_s", agg="median", where=None, longest=None),
    "fig6_restore_timeline": dict(by="variant", value="restore_s", agg="max", where=None, longest=None),
    "fig7_estimator_overhead": dict(by="mode", value="value", agg="median", where={"metric": "decode_step_s"},
                                    longest="seq_len"),
    "fig8_ablation": dict(by="policy", value="nll", agg="mean", where=None, longest=None),
    "fig9_history_length": dict(by="policy", value="ttft_s", agg="median", where=None, longest="history_tokens"),
    "fig10_throughput": dict(by="policy", value="prefill_tokens_per_s", agg="min", where=None, longest=None),
}


def provenance(env: dict) -> tuple[str, str]:
    """(git sha, device) of a run's env.json: a notebook run's own fields, or those of the bench
    runs a GPU reference was assembled from (`runs`); '-' where absent."""
    runs = [env, *(r for r in env.get("runs") or [] if isinstance(r, dict))]
    shas = list(dict.fromkeys(str(r["git_sha"])[:10] for r in runs if r.get("git_sha")))
    devices = list(dict.fromkeys(str(r.get("gpu") or r["device"]) for r in runs if r.get("gpu") or r.get("device")))
    return ", ".join(shas) or "-", ", ".join(devices) or "-"


def _env(folder: Path) -> dict:
    p = Path(folder) / "env.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def reference_verdicts(slug: str) -> list[dict]:
    """Each committed reference run of a figure judged now from its data.csv by the figure's current
    claim (the policy its saved verdict names, if any), with its provenance; nothing is written."""
    rows = []
    for name, csv in reference_runs(slug).items():
        env = _env(csv.parent)
        v = judge(slug, csv, name, policy=(env.get("verdict") or {}).get("policy"))
        sha, device = provenance(env)
        rows.append({**v, "slug": slug, "run": f"reference {name}", "csv": csv, "git_sha": sha, "device": device})
    return rows


def read_run(folder) -> tuple[str, dict]:
    """A run folder written by `python -m krul.experiments run SLUG --out DIR` (or a notebook):
    (its figure's slug, its config.yaml); an ExperimentError saying what is wrong otherwise."""
    d = Path(folder)
    how = ("pass a folder written by `python -m krul.experiments run SLUG --out DIR` (it holds data.csv, "
           "config.yaml and env.json)")
    if not d.exists():
        raise ExperimentError(f"--run {folder}: no such folder; {how}")
    if not d.is_dir():
        raise ExperimentError(f"--run {folder}: not a folder; {how}")
    missing = [f for f in ("data.csv", "config.yaml") if not (d / f).is_file()]
    if missing:
        hint = " (the run may have stopped before its save cell; re-run it)" if (d / "partial").is_dir() else ""
        raise ExperimentError(f"--run {folder}: not a run folder, it has no {' and no '.join(missing)}{hint}; {how}")
    try:
        cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise ExperimentError(f"--run {folder}: config.yaml is not YAML ({e}); {how}") from None
    slug = cfg.get("slug") if isinstance(cfg, dict) else None
    if slug not in slugs():
        raise ExperimentError(f"--run {folder}: config.yaml names no known figure (slug {slug!r}; known: "
                              f"{', '.join(slugs())}); {how}")
    return slug, cfg


def judge_run(folder) -> dict:
    """A user's run folder judged by its figure's current claim at the run's profile (a smoke run:
    "smoke run: not a measurement"), with its provenance."""
    slug, cfg = read_run(folder)
    d = Path(folder)
    profile = cfg.get("profile") if cfg.get("profile") in PROFILES else "default"
    v = judge(slug, d / "data.csv", cfg.get("run") or d.name, profile=profile)
    sha, device = provenance(_env(d))
    return {**v, "slug": slug, "run": f"your run {d}", "csv": d / "data.csv", "git_sha": sha,
            "device": device if device != "-" else str(cfg.get("device", "-"))}


def side_by_side(slug: str, rows: list[dict]) -> list[str]:
    """The figure's main per-policy number (`SIDE_BY_SIDE`) of each judged row's data, one column
    per run, as text-table lines; none when the data lack its columns."""
    spec = SIDE_BY_SIDE.get(slug)
    if not spec:
        return []
    cols, header = {}, []
    for r in rows:
        try:
            df = pd.read_csv(r["csv"])
        except pd.errors.EmptyDataError:
            df = pd.DataFrame()
        for k, v in (spec["where"] or {}).items():
            df = df[df[k] == v] if k in df else df.iloc[0:0]
        if spec["by"] not in df or spec["value"] not in df or df.empty:
            continue
        label = r["run"]
        if spec["longest"] and spec["longest"] in df:
            df = df[df[spec["longest"]] == df[spec["longest"]].max()]
            label += f" ({spec['longest']} {df[spec['longest']].iloc[0]})"
        cols[label] = pd.to_numeric(df[spec["value"]], errors="coerce").groupby(df[spec["by"]]).agg(spec["agg"])
    if not cols:
        return []
    table = pd.DataFrame(cols)
    where = "".join(f", {k} = {v}" for k, v in (spec["where"] or {}).items())
    out = [f"{spec['value']} ({spec['agg']}{', at the longest ' + spec['longest'] if spec['longest'] else ''}"
           f"{where}) by {spec['by']}:", "", f"| {spec['by']} | " + " | ".join(table.columns) + " |",
           "| --- |" + " --- |" * len(table.columns)]
    for key, vals in table.iterrows():
        out.append(f"| {key} | " + " | ".join(f"{float(x):.4g}" if finite(x) else "-" for x in vals) + " |")
    return out


def summary_text(run_dir=None) -> str:
    """`python -m krul.experiments summary [--run DIR]`: per figure, its committed reference runs judged
    by its current claim (value, predicate, verdict, provenance); with `run_dir`, only that run's
    figure, the run judged the same way beside its reference rows, and the per-policy numbers side
    by side."""
    mine = judge_run(run_dir) if run_dir is not None else None
    lines = []
    for slug in ([mine["slug"]] if mine else slugs()):
        rows = [*reference_verdicts(slug), *([mine] if mine else [])]
        claim = load_config(slug, "default", device="cpu", out_dir=str(paths.results_dir() / slug))["claim"]
        lines += [f"## {slug}", "", f"claim: {claim.get('statement', '')}", ""]
        if not rows:
            lines += ["no committed reference run", ""]
            continue
        lines += ["| run | metric | value | predicate | verdict | git sha | device |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            metric = r["metric"] + (f" (policy {r['policy']})" if r.get("policy") else "")
            lines.append(f"| {r['run']} | {metric} | {format_value(r['value'])} | {r['op']} {r['threshold']} +- "
                         f"{r['tolerance']} | {r['verdict']} | {r['git_sha']} | {r['device']} |")
        lines.append("")
        if mine:
            extra = side_by_side(slug, rows)
            lines += [*extra, ""] if extra else []
    return "\n".join(lines).rstrip() + "\n"


def format_value(x) -> str:
    """How REPRODUCE.md quotes a verdict value (3 decimals); 'not measured' for a missing one."""
    return "not measured" if x is None or not finite(x) else f"{float(x):.3f}"


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
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the figure's YAML (VALUE as YAML/JSON; KEY.SUB for one entry of "
                        "a dict), e.g. --set models='[smollm2-135m]' --set conversations.n=3; repeatable")
    d = sub.add_parser("redraw", help="redraw figures from committed reference data")
    d.add_argument("slugs", nargs="*")
    d.add_argument("--all", action="store_true")
    sub.add_parser("list", help="the figures")
    m = sub.add_parser("summary", help="the committed reference runs judged by their figures' claims, with "
                                       "provenance; with --run DIR, your run beside its figure's reference")
    m.add_argument("--run", default=None, metavar="DIR",
                   help="a run folder written by `run SLUG --out DIR` (data.csv, config.yaml, env.json): judged "
                        "by its figure's claim and shown beside the reference rows")
    v = sub.add_parser("verdict", help="judge a committed reference run (say a GPU one) by its figure's claim "
                                       "and save the verdict in its env.json")
    v.add_argument("slug")
    v.add_argument("run", help="the folder under results/<slug>/reference/ (e.g. h200-37ed210)")
    v.add_argument("--policy", default=None,
                   help="the policy the claim is about in this run (default the YAML's; e.g. krul-svd-loss "
                        "where the bench's krul row is that policy)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            if args.slug not in slugs():
                raise ExperimentError(f"unknown figure {args.slug!r}; known: {', '.join(slugs())}")
            run_notebook(args.slug, args.profile, args.device, args.out, args.seed, overrides=parse_sets(args.set))
        elif args.cmd == "redraw":
            for slug in (slugs() if args.all or not args.slugs else args.slugs):
                redraw(slug)
        elif args.cmd == "verdict":
            print(judge_reference(args.slug, args.run, args.policy)["text"])
        elif args.cmd == "summary":
            print(summary_text(args.run), end="")
        else:
            print("\n".join(slugs()))
    except ExperimentError as e:
        print(f"krul.experiments: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
