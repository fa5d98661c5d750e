"""Compression plans measured on real models, as the GPU benchmark takes them.

The 7B-class timing shapes of the bench (`llama-7b`, `llama3-8b`, `qwen1.5-7b`) have random weights:
their KV has no structure worth a plan. Their plans come from the dev calibration records of the
real small models (`experiments/calibration/<model>.<policy>.json`, written by `krul.calibrate`),
mapped by relative depth, by family: llama shapes take smollm2-135m's, qwen2 shapes
qwen2.5-coder-0.5b's. `write_plans` (`make plans`) turns the committed records into one file,
`results/plans/krul_plans.json`; every plan carries its policy, method and compression parameters,
so the bench stores it exactly as the policy would.

Imports only the standard library and `krul.models` (the GPU image has no datasets/evaluate).
Usage: `python -m krul.plans [--out results/plans/krul_plans.json]`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# policy -> record suffix, and the compression parameters it stores with (`policies.POLICIES`);
# a record's own rank_ratio, when it has one, wins (it is what the policy was calibrated at)
RECORD_POLICIES = {"krul-svd-loss": "svd-loss", "krul-svd": "svd"}
SOURCE_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
PLAN_METHODS = ("merge", "share", "svd")


class PlanError(ValueError):
    """A plan file or record that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class SourcePlan:
    """A compression plan measured on a real model (one conversation's, or a calibrated one)."""

    model: str
    n_layers: int
    pairs: tuple[tuple[int, int], ...]
    method: str
    plan_id: str
    policy: str | None = None  # the policy that chose it (None: any krul row may use it)
    params: dict = field(default_factory=dict, compare=False)  # compression parameters (`compress_pairs`)


def load_plan_file(path: str | Path) -> list[SourcePlan]:
    """Read plans from JSON, tolerant of layout.

    Accepted: a list of plan objects; {"plans": [...], "model": ..., "n_layers": ...}; or
    {model_name: plan | [plans] | {"plans": [...]}}. A plan object has "pairs" ([[a, b], ...]) and
    optionally "n_layers", "model", "method" ("merge" | "share" | "svd"), "policy", "params" (the
    compression parameters), "conversation_id"/"id"; missing keys are inherited from enclosing
    objects, and a missing n_layers is taken from the model registry.
    """
    from krul.models import REGISTRY

    data = json.loads(Path(path).read_text())
    out: list[SourcePlan] = []

    def visit(obj, ctx: dict, where: str) -> None:
        if isinstance(obj, list):
            for i, x in enumerate(obj):
                visit(x, ctx, f"{where}[{i}]")
            return
        if not isinstance(obj, dict):
            return
        ctx = {**ctx, **{k: obj[k] for k in ("model", "n_layers", "method", "policy", "params") if k in obj}}
        if "pairs" in obj:
            model = ctx.get("model")
            n = ctx.get("n_layers") or (REGISTRY[model].n_layers if model in REGISTRY else None)
            if not n:
                raise PlanError(f"{path}: plan at {where} has no n_layers and no known model")
            method = str(ctx.get("method", "merge"))
            if method not in PLAN_METHODS:
                raise PlanError(f"{path}: plan at {where} has method {method!r}; known: {', '.join(PLAN_METHODS)}")
            pid = str(obj.get("conversation_id", obj.get("id", where)))
            pairs = tuple((min(int(a), int(b)), max(int(a), int(b))) for a, b in obj["pairs"])
            out.append(SourcePlan(str(model or "?"), int(n), pairs, method, pid, ctx.get("policy"),
                                  dict(ctx.get("params") or {})))
            return
        for key, value in obj.items():
            if isinstance(value, (dict, list)) and key != "params":
                visit(value, {**ctx, "model": key} if key in REGISTRY else ctx, f"{where}.{key}")

    visit(data, {}, "$")
    if not out:
        raise PlanError(f"{path}: no plan (an object with 'pairs') found")
    return out


def choose_plan(plans: list[SourcePlan], family: str, source_model: str | None = None,
                policy: str | None = None) -> tuple[SourcePlan, str]:
    """The plan with the median number of pairs among those of `policy` (plans naming no policy
    serve any) and of `source_model` (or of the target's model family, else all); returns it and a
    description of the choice. Raises `PlanError` if no plan fits."""
    from krul.models import REGISTRY

    pool = [p for p in plans if policy is None or p.policy in (None, policy)]
    if not pool:
        raise PlanError(f"no plan of policy {policy!r} in the plan file; policies there: "
                        f"{sorted({str(p.policy) for p in plans})}")
    if source_model:
        pool = [p for p in pool if p.model == source_model]
        if not pool:
            raise PlanError(f"no plan of model {source_model!r} in the plan file; models there: "
                            f"{sorted({p.model for p in plans})}")
    else:
        same = [p for p in pool if p.model in REGISTRY and REGISTRY[p.model].family == family]
        pool = same or pool
    ordered = sorted(pool, key=lambda p: (len(p.pairs), p.plan_id))
    chosen = ordered[(len(ordered) - 1) // 2]
    return chosen, f"median #pairs of {len(pool)} plans of {sorted({p.model for p in pool})}"


def map_pairs(pairs, n_src: int, n_dst: int) -> tuple[tuple[int, int], ...]:
    """Map layer pairs of an n_src-layer model to n_dst layers by relative depth.

    Layer l goes to round((l + 0.5) n_dst / n_src - 0.5); a layer already taken moves to the
    nearest free one (deeper first), so the result is a valid plan with the same number of pairs
    (at most n_dst // 2: the first ones, in the plan's own order, which is the selector's).
    """
    def depth(l: int) -> int:
        return min(n_dst - 1, max(0, int(round((l + 0.5) * n_dst / n_src - 0.5))))

    used: set[int] = set()

    def place(l: int) -> int:
        for d in range(n_dst):
            for c in (l + d, l - d):
                if 0 <= c < n_dst and c not in used:
                    used.add(c)
                    return c
        raise PlanError(f"cannot map {len(pairs)} pairs onto {n_dst} layers")

    out = []
    for a, b in list(pairs)[:n_dst // 2]:
        ma, mb = place(depth(a)), place(depth(b))
        out.append((min(ma, mb), max(ma, mb)))
    return tuple(sorted(out))


# -- the plan file from the committed records --------------------------------------------------
def _policy_params(policy: str, record: dict) -> dict:
    from krul.policies import POLICIES

    params = dict(POLICIES[policy].compress_params)
    if "rank_ratio" in record:
        params["rank_ratio"] = float(record["rank_ratio"])
    return params


def plans_from_records(calibration_dir: str | Path) -> dict:
    """The plan file's content from the dev records under `calibration_dir`.

    For each policy of `RECORD_POLICIES` and each source model with a record: the per-conversation
    dev plans the record holds (`plans`), with the policy's method and compression parameters.
    """
    root = Path(calibration_dir)
    out = []
    for policy, suffix in RECORD_POLICIES.items():
        for model in SOURCE_MODELS:
            path = root / f"{model}.{suffix}.json"
            if not path.exists():
                continue
            rec = json.loads(path.read_text())
            plans = rec.get("plans")
            if isinstance(plans, str):  # some records hold a repr: not machine-readable
                raise PlanError(f"{path}: 'plans' is not a JSON list; re-run python -m krul.calibrate")
            if not plans:
                continue
            out.append({"policy": policy, "model": model, "n_layers": int(plans[0]["n_layers"]),
                        "method": str(plans[0].get("method", "svd")), "params": _policy_params(policy, rec),
                        "record": str(path.name), "n_pairs": rec.get("n_pairs"),
                        "target_ratio": rec.get("target_ratio"),
                        "plans": [{"conversation_id": p.get("conversation_id"), "pairs": p["pairs"]}
                                  for p in plans]})
    if not out:
        raise PlanError(f"no calibration record with plans under {root}; run python -m krul.calibrate")
    return {"generated_by": "python -m krul.plans", "families": {"llama": "smollm2-135m",
                                                                 "qwen2": "qwen2.5-coder-0.5b"},
            "provenance": _provenance(), "policies": out}


def _provenance() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"git_sha": sha or "unknown", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_plans(out: str | Path, calibration_dir: str | Path | None = None) -> Path:
    """Write `plans_from_records` to `out` (atomically); returns the path."""
    if calibration_dir is None:
        calibration_dir = Path(__file__).resolve().parents[2] / "experiments" / "calibration"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(plans_from_records(calibration_dir), indent=1))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m krul.plans", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/plans/krul_plans.json")
    p.add_argument("--calibration-dir", help="records folder (default experiments/calibration)")
    args = p.parse_args(argv)
    try:
        path = write_plans(args.out, args.calibration_dir)
    except PlanError as exc:
        print(f"krul plans: {exc}", file=sys.stderr)
        return 2
    plans = load_plan_file(path)
    print(f"wrote {path}: {len(plans)} plans of "
          + ", ".join(sorted({f'{p.policy}/{p.model}' for p in plans})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
