"""`krul trace`: many conversations at once, as concurrent sessions over one model and one store.

It replays N ShareGPT conversations (the test split by default) as sessions: each conversation
arrives at a Poisson time, and after each turn its user "thinks" for an exponential time before the
next message (both seeded). A pool of worker threads serves the turns that are due, in order of due
time, through one `store.TieredStore` under byte budgets (so states are evicted, demoted down the
tiers, deleted and recomputed as the budgets require). One model serves every worker: its forwards
(the restore's recompute, the prefill, the decode, the attention estimator's capture and the reads
of its sums, a policy's validation forwards: `Engine.model_work`) are serialized by one lock,
because attention capture and the attention implementation are per model and concurrent forwards
would collide; store reads and writes, a policy's planning and compression, and tokenization of
other sessions run meanwhile.

A turn prefills the real user message over the restored history and produces its first token (the
history is teacher-forced: the data's real replies); a seeded sample of turns (`spot_ratio`) decodes
`spot_tokens` greedy tokens instead, which a lossless policy must reproduce exactly (the spot check,
against a full recompute computed before the trace, outside its timing).

The report (one JSON object) gives per policy: TTFT p50/p95/p99 from the turn's due time (queueing
included) and the engine's own (restore + prefill, lock waits included), throughput (turns/s and
prefill tokens/s, where the restored history counts as prefill: every turn's history + new input),
bytes, hits and hit rates per tier, evictions, demotions, deletions, drops and fallbacks, lost
conversations (a turn that raised) and the spot check; and, when full-recompute ran in the same run,
each of these as a ratio to it. Policies run one after another over the same schedule. Provenance:
git sha, versions, device, config and seed.

The trace knows nothing about how a policy decides what to store, nor how a tier stores it.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_POLICIES = ("full-recompute", "full-load", "cake", "krul-svd-loss")
DEFAULT_BUDGETS = "active=0,pinned=2GiB,pageable=4GiB,disk=16GiB"


class TraceError(ValueError):
    """A bad trace setting: the message says what to use."""


@dataclass
class TraceConfig:
    """Everything a trace run depends on (recorded in its report).

    n_conversations : sessions replayed (ShareGPT `split`, in the data's hash order).
    max_turns, max_context_tokens : each conversation is cut at this many user turns, and before the
        first turn whose history + message + reply (+ `spot_tokens`) would pass this many tokens.
    workers : threads serving due turns (the model's forwards are serialized anyway).
    arrival_rate : conversations per second (Poisson arrivals); think_s : mean think time (s) between
        a turn's end and the conversation's next message (exponential).
    spot_ratio, spot_tokens : the fraction of turns (seeded, > first turns) decoding `spot_tokens`
        greedy tokens for the spot check; the others produce their first token only.
    budgets : `store.parse_budgets` text: tiers and their bytes ('pinned' is left out on the CPU,
        'active=0' leaves the active tier out).
    ttl_s : every tier's TTL (None: none).
    """

    model: str = "smollm2-135m"
    data: str = "sharegpt"
    split: str = "test"
    n_conversations: int = 200
    max_turns: int = 4
    max_context_tokens: int = 1024
    policies: tuple = DEFAULT_POLICIES
    workers: int = 4
    arrival_rate: float = 4.0
    think_s: float = 0.5
    spot_ratio: float = 0.1
    spot_tokens: int = 16
    budgets: str = DEFAULT_BUDGETS
    ttl_s: float | None = None
    seed: int = 0
    device: str = "cpu"
    store_dir: str | None = None

    def check(self) -> "TraceConfig":
        from krul.policies import POLICIES
        from krul.store import parse_budgets

        for name in ("n_conversations", "max_turns", "max_context_tokens", "workers", "spot_tokens"):
            if getattr(self, name) < 1:
                raise TraceError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.arrival_rate <= 0 or self.think_s < 0:
            raise TraceError(f"arrival_rate must be > 0 and think_s >= 0 (got {self.arrival_rate}, {self.think_s})")
        if not 0.0 <= self.spot_ratio <= 1.0:
            raise TraceError(f"spot_ratio must be in [0, 1], not {self.spot_ratio}")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise TraceError(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
        parse_budgets(self.budgets)
        return self


@dataclass
class Turn:
    """One user turn of a session: what the engine is given."""

    conv_idx: int
    turn_idx: int
    before: list
    user: dict
    reply: str | None
    spot: bool = False


@dataclass
class Schedule:
    """The sessions' arrivals (s from the start), think times and spot turns (same for every policy)."""

    arrivals: list
    think: list  # per conversation, per turn: the think time after it
    turns: list  # per conversation: its `Turn`s
    conversation_ids: list
    references: dict = field(default_factory=dict)  # (conv_idx, turn_idx) -> full recompute's greedy ids


# -- the sessions -------------------------------------------------------------------------------
def session_turns(engine, conversation, conv_idx: int, cfg: TraceConfig) -> list[Turn]:
    """The conversation's user turns (teacher-forced), cut by `max_turns` and `max_context_tokens`."""
    messages = conversation.messages
    user_idx = [i for i, m in enumerate(messages) if m["role"] == "user"][:cfg.max_turns]
    history = list(messages[:user_idx[0]]) if user_idx else []
    out = []
    limit = min(cfg.max_context_tokens, engine.adapter.max_tokens)
    for turn_idx, i in enumerate(user_idx):
        nxt = messages[i + 1] if i + 1 < len(messages) else None
        reply = nxt["content"] if nxt is not None and nxt["role"] == "assistant" else None
        if not str(messages[i].get("content", "")).strip():
            break
        end = history + [messages[i]] + ([{"role": "assistant", "content": reply}] if reply else [])
        if len(engine.render(end, add_generation_prompt=reply is None)) + cfg.spot_tokens > limit:
            break
        out.append(Turn(conv_idx, turn_idx, history, messages[i], reply))
        if reply is None:
            break
        history = history + [messages[i], {"role": "assistant", "content": reply}]
    return out


def make_schedule(engine, conversations, cfg: TraceConfig) -> Schedule:
    """Seeded Poisson arrivals, exponential think times and the spot turns (never a first turn)."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    turns = [session_turns(engine, c, i, cfg) for i, c in enumerate(conversations)]
    arrivals = np.cumsum(rng.exponential(1.0 / cfg.arrival_rate, len(conversations))).tolist()
    think = [rng.exponential(cfg.think_s, len(t)).tolist() if cfg.think_s > 0 else [0.0] * len(t) for t in turns]
    for conv_turns in turns:
        for t in conv_turns:
            t.spot = t.turn_idx > 0 and bool(rng.random() < cfg.spot_ratio)
    return Schedule(arrivals, think, turns, [c.id for c in conversations])


def reference_greedy(engine, turn: Turn, n_tokens: int) -> list[int]:
    """The full recompute's greedy tokens for `turn`: the whole context prefilled in a fresh cache."""
    import torch

    from krul.adapter import BufferCache

    adapter = engine.adapter
    ids = engine.render(turn.before + [turn.user], add_generation_prompt=True)
    with torch.inference_mode():
        cache = BufferCache.for_adapter(adapter, len(ids) + n_tokens, grow=True)
        logits = adapter.forward(torch.tensor([ids]), cache, logits_to_keep=1)[0, -1]
        out = [int(torch.argmax(logits))]
        while len(out) < n_tokens and out[-1] not in engine.eos_ids:
            out.append(int(torch.argmax(adapter.forward(torch.tensor([[out[-1]]]), cache, logits_to_keep=1)[0, -1])))
    return out


def is_lossless(policy) -> bool:
    """No cross-layer compression and no codec: the restored KV is the exact KV (split or not)."""
    return policy.selector is None and not policy.compress_params.get("codec")


def _locked_engine_class():
    from krul.engine import Engine

    class TraceEngine(Engine):
        """An engine whose model work runs under the trace's shared lock (one model, many sessions)."""

        lock: threading.RLock = None

        def model_work(self):
            return self.lock

        def _forward(self, *args, **kwargs):
            with self.model_work():
                return super()._forward(*args, **kwargs)

        def _restore(self, *args, **kwargs):  # the restore's recompute runs the model
            with self.model_work():
                return super()._restore(*args, **kwargs)

        def similarity_stats(self, conversation_id: str):  # waits on the estimator's reductions
            with self.model_work():
                return super().similarity_stats(conversation_id)

    return TraceEngine


def _percentiles(values) -> dict:
    import numpy as np

    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def run_policy(adapter, policy, schedule: Schedule, cfg: TraceConfig, *, rates=None, estimator=None,
               progress: bool = True, root: str | Path | None = None) -> dict:
    """Serve the schedule's sessions with `policy` over a fresh tiered store; the policy's report."""
    import warnings

    from krul.engine import StateFallbackWarning
    from krul.store import StoreSpaceWarning, make_tiered_store, parse_budgets

    budgets = {k: v for k, v in parse_budgets(cfg.budgets).items() if not (k == "active" and v == 0)}
    ttl = {k: cfg.ttl_s for k in budgets} if cfg.ttl_s else None
    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="krul-trace-")
        root = tmp.name
    store = make_tiered_store(budgets, root=Path(root) / policy.name, ttl_s=ttl)
    lock = threading.RLock()
    TraceEngine = _locked_engine_class()
    engines = []
    for _ in schedule.turns:
        e = TraceEngine(adapter, policy, store, max_new_tokens=1, estimator=estimator, rates=rates)
        e.lock = lock
        engines.append(e)
    n_total = sum(len(t) for t in schedule.turns)
    heap = [(schedule.arrivals[ci], ci, 0) for ci, t in enumerate(schedule.turns) if t]
    heapq.heapify(heap)
    cond = threading.Condition()
    rows, errors, peak = [], [], {name: 0 for name in store.specs}
    state = {"done": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_total, desc=f"trace {policy.name}", file=sys.stderr, unit="turn")
    t0 = time.perf_counter()

    def serve():
        while True:
            with cond:
                while True:
                    if state["done"] >= n_total:
                        return
                    if heap:
                        due, ci, ti = heap[0]
                        wait = due - (time.perf_counter() - t0)
                        if wait <= 0:
                            heapq.heappop(heap)
                            break
                        cond.wait(wait)
                    else:
                        cond.wait(1.0)
            turn = schedule.turns[ci][ti]
            engine, conv_id = engines[ci], schedule.conversation_ids[ci]
            start = time.perf_counter() - t0
            lost = False
            try:
                if ti == 0 and estimator is not None:
                    with lock:
                        estimator.reset(conv_id)
                engine.max_new_tokens = cfg.spot_tokens if turn.spot else 1
                res = engine.turn(conv_id, ti, turn.before, turn.user, turn.reply)
                end = time.perf_counter() - t0
                row = {"conv_idx": ci, "turn_idx": ti, "due_s": due, "start_s": start, "end_s": end,
                       "queue_s": start - due, "ttft_s": start - due + res.ttft_s,
                       "engine_ttft_s": res.ttft_s, "restore_s": res.restore_s, "prefill_s": res.prefill_s,
                       "history_tokens": res.history_tokens, "new_input_tokens": res.new_input_tokens,
                       "stored_bytes": res.stored_bytes, "offloaded_bytes": res.offloaded_bytes,
                       "fallback": bool(res.fallback), "active_hit": ti > 0 and not res.fallback
                       and res.history_tokens > 0 and not res.restore_report, "spot": turn.spot}
                if turn.spot:
                    ref = schedule.references.get((ci, ti))
                    row["spot_match"] = ref is not None and res.generated_ids == ref
            except Exception as exc:  # noqa: BLE001 - a lost turn is counted and reported, not raised
                end = time.perf_counter() - t0
                errors.append({"conversation_id": conv_id, "turn_idx": ti, "error": f"{type(exc).__name__}: {exc}"})
                row, lost = None, True
            with cond:
                if row is not None:
                    rows.append(row)
                for name in peak:
                    peak[name] = max(peak[name], store.used_bytes(name))
                n_left = len(schedule.turns[ci]) - ti - 1
                state["done"] += 1 + n_left if lost else 1  # a lost conversation's later turns never come
                if n_left and not lost:
                    heapq.heappush(heap, (end + schedule.think[ci][ti], ci, ti + 1))
                else:  # the conversation is over: its state goes
                    store.delete(conv_id)
                cond.notify_all()
            if bar is not None:
                bar.update(1 + (len(schedule.turns[ci]) - ti - 1 if lost else 0))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StateFallbackWarning)
        warnings.simplefilter("always", StoreSpaceWarning)
        threads = [threading.Thread(target=serve, name=f"trace-worker-{i}", daemon=True) for i in range(cfg.workers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    wall_s = (max((r["end_s"] for r in rows), default=0.0) - min((r["due_s"] for r in rows), default=0.0))
    if bar is not None:
        bar.close()
    stats = store.stats()
    if tmp is not None:
        tmp.cleanup()
    n_restores = sum(1 for r in rows if r["turn_idx"] > 0)
    prefill_tokens = sum(r["history_tokens"] + r["new_input_tokens"] for r in rows)
    spots = [r for r in rows if r["spot"]]
    tiers = {}
    for name, t in stats["tiers"].items():
        tiers[name] = {**t, "peak_bytes": peak[name],
                       "hit_rate": t["hits"] / n_restores if n_restores else None}
    lost_convs = sorted({e["conversation_id"] for e in errors})
    return {
        "policy": policy.name, "lossless": is_lossless(policy), "turns": len(rows), "turns_planned": n_total,
        "conversations": sum(1 for t in schedule.turns if t), "lost_conversations": len(lost_convs),
        "errors": errors[:20], "wall_s": wall_s,
        "turns_per_s": len(rows) / wall_s if wall_s > 0 else None,
        "prefill_tokens": prefill_tokens, "restored_history_tokens": sum(r["history_tokens"] for r in rows),
        "prefill_tokens_per_s": prefill_tokens / wall_s if wall_s > 0 else None,
        "ttft_s": _percentiles([r["ttft_s"] for r in rows]),
        "engine_ttft_s": _percentiles([r["engine_ttft_s"] for r in rows]),
        "queue_s": _percentiles([r["queue_s"] for r in rows]),
        "restores": n_restores, "fallbacks": sum(e.fallbacks for e in engines),
        "fallback_rate": (sum(e.fallbacks for e in engines) / n_restores) if n_restores else None,
        "tiers": tiers, "evictions": sum(t["evictions"] + t["expired"] for t in stats["tiers"].values()),
        "demotions": stats["demotions"], "deletions": stats["deletions"], "dropped": stats["dropped"],
        "full_tier_errors": sum(t["full_errors"] for t in stats["tiers"].values()),
        "warnings": sorted({str(w.message)[:200] for w in caught})[:10],
        "spot_turns": len(spots), "spot_mismatches": sum(1 for r in spots if not r["spot_match"]),
        "rows": rows,
    }


RATIO_KEYS = ("ttft_s", "engine_ttft_s")


def with_ratios(reports: list[dict], baseline: str = "full-recompute") -> list[dict]:
    """Each report's TTFT percentiles and throughput as ratios to `baseline`'s of the same run
    (TTFT: policy / baseline, lower is better; throughput: policy / baseline, higher is better)."""
    base = next((r for r in reports if r["policy"] == baseline), None)
    if base is None:
        return reports
    for r in reports:
        ratios = {}
        for key in RATIO_KEYS:
            for p in ("p50", "p95", "p99"):
                b, v = base[key][p], r[key][p]
                ratios[f"{key}_{p}"] = v / b if b and v is not None else None
        for key in ("turns_per_s", "prefill_tokens_per_s"):
            ratios[key] = r[key] / base[key] if base[key] and r[key] is not None else None
        r["vs_" + baseline.replace("-", "_")] = ratios
    return reports


def provenance(cfg: TraceConfig, adapter) -> dict:
    """Git sha (and dirtiness), package versions, device, host, config and seed of this run."""
    import importlib.metadata as md

    import torch

    from krul.paths import git_state

    versions = {}
    for pkg in ("krul", "torch", "transformers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    device = str(adapter.device)
    rec = {**git_state(),
           "versions": versions, "python": sys.version.split()[0], "platform": platform.platform(),
           "processor": platform.processor(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": device, "model": adapter.name, "dtype": str(adapter.dtype),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": asdict(cfg), "seed": cfg.seed,
           "command": " ".join(sys.argv)}
    if adapter.device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(adapter.device)
    return rec


def run_trace(adapter, conversations, cfg: TraceConfig, *, progress: bool = True, rates=None) -> dict:
    """The trace of `conversations` under every policy of `cfg` (full-recompute first when present):
    the report with provenance, per-policy results (rows included) and ratios to full-recompute."""
    from krul.engine import Engine
    from krul.policies import get_policy
    from krul.store import make_store

    cfg.check()
    helper = Engine(adapter, "full-recompute", make_store("pageable"), max_new_tokens=cfg.spot_tokens)
    schedule = make_schedule(helper, conversations, cfg)
    spot_turns = [t for ts in schedule.turns for t in ts if t.spot]
    for t in spot_turns:  # before the clock, outside every policy's timing
        schedule.references[(t.conv_idx, t.turn_idx)] = reference_greedy(helper, t, cfg.spot_tokens)
    names = sorted(cfg.policies, key=lambda n: n != "full-recompute")
    policies = [get_policy(n, model=adapter.name) for n in names]
    estimator = None
    if any(p.needs_estimator for p in policies):
        from krul.estimator import AttentionEstimator

        estimator = AttentionEstimator(adapter)
    if rates is None and any(p.split == "scheduler" for p in policies):
        from krul.profile import measure_rates
        from krul.store import parse_budgets

        budgets = parse_budgets(cfg.budgets)
        tier = next((t for t in ("pinned", "pageable", "disk") if budgets.get(t, 1) != 0
                     and not (t == "pinned" and adapter.device.type != "cuda")), "pageable")
        rates = measure_rates(adapter, tier)
    reports = []
    for policy in policies:
        reports.append(run_policy(adapter, policy, schedule, cfg, rates=rates,
                                  estimator=estimator if policy.needs_estimator else None,
                                  progress=progress, root=cfg.store_dir))
    with_ratios(reports)
    return {"kind": "krul-trace", "provenance": provenance(cfg, adapter),
            "schedule": {"conversations": len(conversations), "turns": sum(len(t) for t in schedule.turns),
                         "spot_turns": len(spot_turns), "last_arrival_s": schedule.arrivals[-1] if schedule.arrivals else 0},
            "policies": reports}


def summary(report: dict) -> list[str]:
    """One line per policy: the headline numbers and ratios to full-recompute."""
    lines = []
    for r in report["policies"]:
        vs = r.get("vs_full_recompute", {})

        def ratio(k):
            return f"{vs[k]:.2f}x" if vs.get(k) is not None else "-"

        lines.append(f"{r['policy']:>16}: {r['turns']}/{r['turns_planned']} turns, lost {r['lost_conversations']}, "
                     f"TTFT p50/p95/p99 {r['ttft_s']['p50']:.3f}/{r['ttft_s']['p95']:.3f}/{r['ttft_s']['p99']:.3f} s "
                     f"({ratio('ttft_s_p50')}/{ratio('ttft_s_p95')}/{ratio('ttft_s_p99')}), "
                     f"{r['prefill_tokens_per_s']:.0f} prefill tok/s ({ratio('prefill_tokens_per_s')}), "
                     f"fallbacks {r['fallbacks']}, evictions {r['evictions']}, deletions {r['deletions']}, "
                     f"spot mismatches {r['spot_mismatches']}/{r['spot_turns']}"
                     + ("" if r["lossless"] else " (lossy)"))
    return lines


# -- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The trace's options (shared by `python -m krul.trace` and `krul trace`)."""
    d = TraceConfig()
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--data", default=d.data, help="sharegpt, or a JSONL file of conversations")
    parser.add_argument("--split", default=d.split, choices=("dev", "test", "all"))
    parser.add_argument("-n", "--conversations", type=int, default=d.n_conversations, dest="n_conversations")
    parser.add_argument("--max-turns", type=int, default=d.max_turns)
    parser.add_argument("--max-context-tokens", type=int, default=d.max_context_tokens)
    parser.add_argument("--policies", default=",".join(d.policies), help="comma-separated restore policies")
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--arrival-rate", type=float, default=d.arrival_rate, help="conversations per second")
    parser.add_argument("--think-s", type=float, default=d.think_s, help="mean think time between turns (s)")
    parser.add_argument("--spot-ratio", type=float, default=d.spot_ratio)
    parser.add_argument("--spot-tokens", type=int, default=d.spot_tokens)
    parser.add_argument("--budgets", default=d.budgets, help="TIER=BYTES,... over active, pinned, pageable, disk")
    parser.add_argument("--ttl-s", type=float, default=None)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--store", default=None, dest="store_dir", help="folder of the disk tier (default: temporary)")
    parser.add_argument("--out", default=None, help="write the JSON report here (default: stdout only)")
    parser.add_argument("--no-rows", action="store_true", help="leave the per-turn rows out of the report")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def config_from_args(args) -> TraceConfig:
    return TraceConfig(model=args.model, data=args.data, split=args.split, n_conversations=args.n_conversations,
                       max_turns=args.max_turns, max_context_tokens=args.max_context_tokens,
                       policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
                       workers=args.workers, arrival_rate=args.arrival_rate, think_s=args.think_s,
                       spot_ratio=args.spot_ratio, spot_tokens=args.spot_tokens, budgets=args.budgets,
                       ttl_s=args.ttl_s, seed=args.seed, device=args.device, store_dir=args.store_dir).check()


def run(args) -> int:
    """Run the trace the parsed `args` describe; print the summary to stderr and the JSON report last."""
    from krul.data import load_conversations
    from krul.factory import _device, _load_adapter
    from krul.store import StoreError

    try:  # every setting checked before the model loads; ConfigError, ModelError, DataError are ValueErrors
        cfg = config_from_args(args)
        from krul import models

        models.require_real(cfg.model)
        device = _device(cfg.device)
        conversations = load_conversations(cfg.data, split=None if cfg.split == "all" else cfg.split,
                                           limit=cfg.n_conversations)
        if not conversations:
            raise TraceError(f"no conversations in {cfg.data!r} (split {cfg.split})")
    except (TraceError, StoreError, ValueError) as exc:
        print(f"krul trace: {exc}", file=sys.stderr)
        return 2
    adapter = _load_adapter(cfg.model, device)
    report = run_trace(adapter, conversations, cfg, progress=not args.no_progress)
    for line in summary(report):
        print(line, file=sys.stderr)
    if args.no_rows:
        for r in report["policies"]:
            r.pop("rows", None)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"report: {args.out}", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "policies"}
                     | {"policies": [{k: v for k, v in r.items() if k != "rows"} for r in report["policies"]]}))
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="krul trace", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
