"""`krul` command line: models, data, replay, chat, evaluate, bench.

Thin: parses arguments, builds the engine from the library, prints rows. Errors from the library
(unknown model, bad data, corrupted state) are printed as one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# the engine the commands share is built in `factory` (below evaluation, which builds it too); re-exported
from krul.factory import _device, build_engine  # noqa: E402,F401


def cmd_models(args) -> int:
    from krul import models

    if args.path:
        spec = models.require_real(args.path)
        folder = models.model_path(spec.name) or models.prepare(spec.name)
        print(folder)
        return 0
    if args.prepare:
        for name in args.prepare:
            print(f"{name}: {models.prepare(name)}")
        return 0
    rows = models.models_table()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    cols = ["name", "family", "layers", "heads", "kv_heads", "kind", "prepared", "path"]
    _table(rows, cols)
    return 0


def cmd_data(args) -> int:
    from krul import data

    manifest = data.build(force=args.force)
    print(json.dumps(manifest, indent=1, default=str))
    return 0


def _table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "-"
    return str(v)


def _conversations(args):
    from krul import data

    return data.load_conversations(args.conversations, split=args.split, ids=args.ids, limit=args.limit)


REPLAY_COLS = ["conversation_id", "turn_idx", "history_tokens", "new_input_tokens", "generated_tokens",
               "policy", "ttft_s", "restore_s", "stored_bytes", "generated_text"]


def cmd_replay(args) -> int:
    engine = build_engine(args)
    conversations = _conversations(args)
    if not args.json:
        print("  ".join(REPLAY_COLS))
    for conv in conversations:
        for result in engine.replay(conv, max_turns=args.max_turns):
            row = result.to_json()
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                text = row["generated_text"].replace("\n", " ")
                row["generated_text"] = text[:60] + ("..." if len(text) > 60 else "")
                print("  ".join(_fmt(row[c]) for c in REPLAY_COLS), flush=True)
                if row.get("plan", {}).get("pairs"):
                    print(f"    plan: pairs={row['plan']['pairs']} sensitive={row['plan'].get('sensitive')} "
                          f"recompute_ratio={row['recompute_ratio']:.3f}")
                    v = row["plan"].get("validation")
                    if v and v.get("candidates", 1) > 1:
                        print(f"    validated on {v['tokens']} tokens: stored the {v['chosen']} plan "
                              f"(KL own {v['kl_own']:.2e}, dev {v['kl_dev']:.2e})")
    return 0


def cmd_chat(args) -> int:
    engine = build_engine(args)
    history: list[dict] = []
    conv_id, turn_idx = "chat", 0
    print(f"krul chat: {args.model}, policy {engine.policy.name}, tier {engine.store.tier}. "
          "Empty line or Ctrl-D quits.")
    while True:
        try:
            text = input("you> ")
        except EOFError:
            break
        if not text.strip():
            break
        user = {"role": "user", "content": text}
        result = engine.turn(conv_id, turn_idx, history, user, reply=None)
        print(f"model> {result.generated_text}")
        print(f"   [ttft {result.ttft_s * 1e3:.0f} ms, restore {result.restore_s * 1e3:.0f} ms, "
              f"history {result.history_tokens} tokens, stored {result.stored_bytes / 1e6:.2f} MB]")
        history += [user, {"role": "assistant", "content": result.generated_text}]
        turn_idx += 1
    engine.store.delete(conv_id)
    return 0


def cmd_evaluate(args) -> int:
    from krul.evaluation import evaluate

    summary = evaluate(args)
    print(json.dumps(summary, default=float))
    return 0


def cmd_bench(args, rest: list[str]) -> int:
    from krul import bench

    if args.what != "ttft":
        raise SystemExit(f"krul: unknown benchmark {args.what!r}; known: ttft")
    return bench.main_ttft(rest)


def _engine_args(p: argparse.ArgumentParser, policy: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m")
    if policy:
        p.add_argument("--policy", default="full-load")
        p.add_argument("--recompute-ratio", type=float, default=None,
                       help="fix the recompute split instead of the policy's (0 = load everything)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tier", default="pageable", help="pageable | pinned | disk")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", default="teacher", choices=["teacher", "model"],
                   help="teacher: real replies form the history; model: the generated answers do")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conversations", default="sharegpt", help="sharegpt | mtbench | FILE.jsonl")
    p.add_argument("--split", default=None, choices=["dev", "test"])
    p.add_argument("--ids", nargs="*", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-turns", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="krul", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="list the model registry")
    m.add_argument("--path", metavar="NAME", help="print the prepared local folder of NAME")
    m.add_argument("--prepare", nargs="+", metavar="NAME", help="prepare (convert) these models")
    m.add_argument("--json", action="store_true")
    d = sub.add_parser("data", help="build data/processed from the installed packages")
    d.add_argument("--force", action="store_true")
    r = sub.add_parser("replay", help="replay conversations turn by turn")
    _engine_args(r)
    _data_args(r)
    c = sub.add_parser("chat", help="interactive multi-turn chat on the engine")
    _engine_args(c)
    e = sub.add_parser("evaluate", help="quality and storage of a policy (one JSON summary)")
    _engine_args(e)
    _data_args(e)
    e.add_argument("--rouge", action="store_true", help="also compute ROUGE-L (needs evaluate)")
    b = sub.add_parser("bench", help="benchmarks: `krul bench ttft --help`", add_help=False)
    b.add_argument("what", nargs="?", default="ttft")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser().parse_known_args(argv)
    if args.command != "bench" and rest:
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    from krul.data import DataError
    from krul.engine import EngineError
    from krul.models import ModelError
    from krul.policies import PolicyError
    from krul.store import StoreError

    try:
        if args.command == "bench":
            return cmd_bench(args, rest)
        return {"models": cmd_models, "data": cmd_data, "replay": cmd_replay, "chat": cmd_chat,
                "evaluate": cmd_evaluate}[args.command](args)
    except (DataError, EngineError, ModelError, PolicyError, StoreError) as exc:
        print(f"krul: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
