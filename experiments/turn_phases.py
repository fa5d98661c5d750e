"""Where a policy's turn goes: seconds per turn in each phase (`krul.factory.TurnPhases`), serially.

fig10's trace measures throughput with many sessions over one serialized model, where a phase's
cost shows only as queueing. This replays the same kind of turns one at a time, per policy, and
splits each turn into its phases (restoring, prefilling the new input, prefilling the
teacher-forced reply, compressing, storing, ...). Policies alternate within each repeat (same
process, same warm model), after one warm-up pass; the table gives the median over repeats of each
phase's mean seconds per turn, with the min-max spread of the total.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python experiments/turn_phases.py \
        --policies full-load,krul -n 20 --repeats 3 --out results/turn_phases.json

The conversations are ShareGPT `test` ones cut as fig10's `full` profile cuts them (`--max-turns`,
`--max-context-tokens`); the tier is pageable. Output: a markdown table on stdout and, with
`--out`, a JSON record with every repeat and the provenance (git sha, versions, host).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(policies, n_conversations, repeats, max_turns, max_context_tokens, model="smollm2-135m", progress=True):
    """{policy: [per repeat: {phase: mean seconds per turn}]}, and the number of turns per pass."""
    from tqdm.auto import tqdm

    from krul.data import load_conversations
    from krul.factory import TurnPhases, build_engine
    from krul.trace import TraceConfig, session_turns

    convs = load_conversations("sharegpt", split="test", limit=n_conversations)
    cfg = TraceConfig(model=model, n_conversations=n_conversations, max_turns=max_turns,
                      max_context_tokens=max_context_tokens)
    engines, adapter = {}, None
    for name in policies:
        args = argparse.Namespace(model=model, policy=name, recompute_ratio=None, device="cpu", tier="pageable",
                                  store=None, max_new_tokens=1, sample=False, seed=0, history="teacher",
                                  no_progress=True)
        engines[name] = build_engine(args, adapter=adapter)
        adapter = engines[name].adapter
    any_engine = next(iter(engines.values()))
    jobs = [(c, t) for i, c in enumerate(convs) for t in session_turns(any_engine, c, i, cfg)]
    if not jobs:
        raise SystemExit("turn_phases: no turn fits --max-context-tokens; raise it")
    out = {name: [] for name in policies}
    bar = tqdm(total=(repeats + 1) * len(policies) * len(jobs), desc="turn phases", disable=not progress,
               file=sys.stderr, unit="turn")
    for rep in range(repeats + 1):  # pass 0 warms up and is dropped
        for name, engine in engines.items():
            totals: dict[str, float] = {}
            with TurnPhases(engine) as phases:
                for conv, turn in jobs:
                    cid = f"{conv.id}-r{rep}"
                    engine.turn(cid, turn.turn_idx, turn.before, turn.user, turn.reply)
                    for k, v in phases.last.items():
                        totals[k] = totals.get(k, 0.0) + v
                    bar.update(1)
            for conv in convs:  # this pass's states go
                engine.store.delete(f"{conv.id}-r{rep}")
            if rep:
                out[name].append({k: v / len(jobs) for k, v in totals.items()})
    bar.close()
    return out, len(jobs)


def table(result: dict) -> str:
    phases = sorted({k for reps in result.values() for r in reps for k in r},
                    key=lambda k: -max(statistics.median([r.get(k, 0.0) for r in reps]) for reps in result.values()))
    lines = ["| policy | " + " | ".join(phases) + " | total s/turn (median, min-max) |",
             "| --- |" + " --- |" * (len(phases) + 1)]
    for name, reps in result.items():
        cells = [f"{statistics.median([r.get(k, 0.0) for r in reps]):.3f}" for k in phases]
        totals = [sum(r.values()) for r in reps]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {statistics.median(totals):.3f} ({min(totals):.3f}-{max(totals):.3f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="full-load,krul", help="comma-separated registry names")
    p.add_argument("-n", "--n-conversations", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed passes (after one warm-up pass)")
    p.add_argument("--max-turns", type=int, default=2)
    p.add_argument("--max-context-tokens", type=int, default=768)
    p.add_argument("--out", default=None, help="JSON record of every repeat")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.n_conversations < 1:
        p.error("--repeats and --n-conversations must be at least 1")
    policies = [x for x in a.policies.split(",") if x]
    t0 = time.perf_counter()
    result, n_turns = run(policies, a.n_conversations, a.repeats, a.max_turns, a.max_context_tokens)
    print(f"{n_turns} turns per pass, {a.repeats} timed passes per policy, "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print(table(result))
    if a.out:
        from krul.experiments import env_record

        record = {"config": vars(a), "turns_per_pass": n_turns, "repeats": result,
                  "provenance": env_record("cpu")}
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
