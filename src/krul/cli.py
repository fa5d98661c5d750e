"""`krul` command line: models, data, replay, chat, evaluate, bench.

Thin: parses arguments, builds the engine from the library, prints rows. Bad options (tier, policy,
device, counts, conversation ids, --store) are refused before the model loads; errors from the library
(unknown model, bad data, a state that cannot be written) are printed as one line and exit with
status 2. A state that cannot be restored is recomputed by the engine (a warning, not an error).
`--store DIR` keeps the disk tier's states in DIR across processes; `krul chat --store DIR
--conversation ID` also keeps the conversation's messages there and resumes it in a later process.

Every command shows its work on stderr (`--no-progress` turns it off): what it loads, and tqdm bars
over the conversations and their turns with each turn's phase (restoring, prefilling, decoding,
scoring pairs, compressing, ...), observed from outside the engine (`factory.TurnPhases`). `krul chat`
streams its reply as it is generated and says when the reply hit --max-new-tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# the engine the commands share is built in `factory` (below evaluation, which builds it too); re-exported
from krul.factory import ConfigError, _device, build_engine, check_engine_args  # noqa: E402,F401

CHAT_MAX_NEW_TOKENS = 256  # a chat answer of a few paragraphs; replay/evaluate keep 32 (the greedy references')

CONVERSATIONS_FORMAT = """\
Your own conversations (--conversations FILE.jsonl): one JSON object per line,
  {"id": "trip-1", "messages": [{"role": "user", "content": "..."},
                                {"role": "assistant", "content": "..."}, ...]}
- id: 1-128 of A-Z a-z 0-9 _ . @ # -, unique in the file (it names the stored state)
- role: user | assistant | system; content: a non-empty string
- the first message that is not a system message is a user message; each user message is a turn,
  and the assistant message after it is the real reply (its nll is scored; the model's own answer
  is generated and shown). A conversation may end with a user message (nothing to score there).
- ShareGPT's shape works too: {"id": ..., "conversations": [{"from": "human" | "gpt", "value": ...}]}
- blank lines are skipped; an optional "meta": {...} object is kept.
Example: examples/three_turns.jsonl; the format in full: docs/conversations.md."""


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


def _check_ids(args) -> None:
    from krul.engine import check_conversation_id

    for cid in args.ids or ():
        check_conversation_id(cid)


def _conversations(args):
    from krul import data

    return data.load_conversations(args.conversations, split=args.split, ids=args.ids, limit=args.limit)


REPLAY_COLS = ["conversation_id", "turn_idx", "history_tokens", "new_input_tokens", "generated_tokens",
               "policy", "ttft_s", "restore_s", "stored_bytes", "generated_text"]


def cmd_replay(args) -> int:
    from krul.factory import ReplayBars, replay_all

    check_engine_args(args)
    _check_ids(args)
    conversations = _conversations(args)
    engine = build_engine(args)
    bars = ReplayBars(len(conversations), engine.policy.name, enabled=not args.no_progress)
    timings: list[dict] = []
    try:
        if not args.json:
            bars.write("  ".join(REPLAY_COLS))
        for _, result, phase_s in replay_all(engine, conversations, args.max_turns, bars=bars):
            row = result.to_json()
            row["phase_s"] = phase_s
            timings.append(phase_s)
            if args.json:
                bars.write(json.dumps(row))
                continue
            text = row["generated_text"].replace("\n", " ")
            row["generated_text"] = text[:60] + ("..." if len(text) > 60 else "")
            bars.write("  ".join(_fmt(row[c]) for c in REPLAY_COLS))
            if row.get("plan", {}).get("pairs"):
                bars.write(f"    plan: pairs={row['plan']['pairs']} sensitive={row['plan'].get('sensitive')} "
                           f"recompute_ratio={row['recompute_ratio']:.3f}")
                v = row["plan"].get("validation")
                if v and v.get("candidates", 1) > 1:
                    bars.write(f"    validated on {v['tokens']} tokens: stored the {v['chosen']} plan "
                               f"(KL own {v['kl_own']:.2e}, dev {v['kl_dev']:.2e})")
            offload = sum(phase_s.get(k, 0.0) for k in ("scoring pairs", "compressing", "validating"))
            if offload >= 0.5:  # where a slow turn's time went
                bars.write(f"    offload: scoring pairs {phase_s.get('scoring pairs', 0.0):.2f} s, "
                           f"compressing {phase_s.get('compressing', 0.0):.2f} s"
                           + (f", validating {phase_s['validating']:.2f} s" if "validating" in phase_s else ""))
    finally:
        bars.close()
    if timings and not args.no_progress:
        print(f"krul: {phase_summary(timings, engine.adapter.device)}", file=sys.stderr)
    return 0


def phase_summary(timings: list[dict], device) -> str:
    """Where the turns' time went: per phase the median seconds per turn and the range over turns,
    and the offload's compression cost (scoring pairs + compressing + validating) likewise."""
    import statistics

    import torch

    def stat(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    from krul.factory import PHASES

    phases = [p for p in PHASES if p != "other" and any(p in t for t in timings)]
    parts = [f"{p} {stat([t.get(p, 0.0) for t in timings])}" for p in phases]
    compress = [sum(t.get(p, 0.0) for p in ("scoring pairs", "compressing", "validating")) for t in timings]
    where = f"{device.type}" + (f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else "")
    return (f"seconds per turn over {len(timings)} turns on {where}, median (min-max): " + ", ".join(parts)
            + f"; offload compression (scoring pairs + compressing + validating) {stat(compress)}")


def _transcript_path(engine, conv_id: str):
    """Where `krul chat --store DIR` keeps a conversation's messages (next to its state file)."""
    return engine.store.path(conv_id).with_suffix(".chat.json")


def _load_transcript(path) -> list[dict]:
    try:
        messages = json.loads(path.read_text())
        if not (isinstance(messages, list) and len(messages) % 2 == 0 and all(
                isinstance(m, dict) and m.get("role") == role and isinstance(m.get("content"), str)
                for m, role in zip(messages, ["user", "assistant"] * (len(messages) // 2)))):
            raise ValueError("not alternating user/assistant messages")
        return messages
    except (OSError, ValueError) as exc:
        print(f"krul: could not read the saved conversation {path} ({exc}); starting it afresh",
              file=sys.stderr)
        return []


def _save_transcript(path, messages: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(messages))
    os.replace(tmp, path)


class _ChatView:
    """What `krul chat` shows of a turn: the phase before the reply and after it (a transient tqdm
    bar on stderr), the reply streamed to stdout as its tokens are sampled, and a cut reply said."""

    def __init__(self, engine, progress: bool):
        self.engine, self.progress = engine, progress
        self.bar = None
        self.ids: list[int] = []
        self.printed = ""

    def start(self) -> None:
        self.ids, self.printed = [], ""
        self._open("thinking")

    def _open(self, label: str) -> None:
        from tqdm.auto import tqdm

        if self.progress and self.bar is None:
            self.bar = tqdm(total=None, desc=label, bar_format="  [{desc}]", leave=False, file=sys.stderr)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_phase(self, phase: str, _phases) -> None:
        if phase == "decoding":
            return
        if self.ids and self.printed is not None and phase not in ("restoring", "prefilling"):
            # the reply is over (its history is being kept and stored now): the rest of its text
            self.end_stream(self.engine.adapter.tokenizer.decode(self.ids, skip_special_tokens=True))
        if self.bar is None and self.printed is None:
            self._open(phase)
        if self.bar is not None:
            self.bar.set_description_str(phase, refresh=True)

    def on_token(self, token: int, _phases) -> None:
        if self.printed is None:
            return
        if not self.ids:
            self._close_bar()
            print("model> ", end="", flush=True)
        self.ids.append(token)
        text = self.engine.adapter.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest of it
            return
        if text.startswith(self.printed):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text

    def end_stream(self, final: str | None = None) -> None:
        """Finish the streamed line (with the rest of `final`, the reply as the engine decoded it)."""
        if self.printed is None:
            return
        if not self.ids:
            self._close_bar()
            print("model> ", end="")
        if final is not None and final.startswith(self.printed):
            print(final[len(self.printed):], end="")
        print(flush=True)
        self.printed = None

    def finish(self, result) -> None:
        self._close_bar()
        self.end_stream(result.generated_text)
        ids = result.generated_ids
        if len(ids) >= self.engine.max_new_tokens and (not ids or ids[-1] not in self.engine.eos_ids):
            print(f"   [cut: the reply reached --max-new-tokens {self.engine.max_new_tokens} before it "
                  "ended; raise it for longer replies]")

    def abort(self) -> None:
        self._close_bar()
        if self.printed is not None and self.ids:
            print(flush=True)
        self.printed = None


def cmd_chat(args) -> int:
    from krul.engine import EngineError, check_conversation_id
    from krul.factory import TurnPhases

    conv_id = check_conversation_id(args.conversation)
    engine = build_engine(args)
    history: list[dict] = []
    persist = args.store is not None
    transcript = _transcript_path(engine, conv_id) if persist else None
    if persist and transcript.exists():
        history = _load_transcript(transcript)
    if not history:
        engine.store.delete(conv_id)  # no messages to continue: an old state under the id is stale
    turn_idx = len(history) // 2
    print(f"krul chat: {args.model}, policy {engine.policy.name}, tier {engine.store.tier}"
          + (f", conversation {conv_id!r} in {args.store}" if persist else "")
          + (f" (resumed after {turn_idx} turns)" if turn_idx else "")
          + f", replies up to {engine.max_new_tokens} tokens. Empty line or Ctrl-D quits.")
    view = _ChatView(engine, progress=not args.no_progress)
    with TurnPhases(engine, on_phase=view.on_phase, on_token=view.on_token):
        while True:
            try:
                text = input("you> ")
            except EOFError:
                break
            if not text.strip():
                break
            user = {"role": "user", "content": text}
            view.start()
            try:
                result = engine.turn(conv_id, turn_idx, history, user, reply=None)
            except EngineError as exc:  # e.g. longer than the model's context: drop the message, go on
                view.abort()
                print(f"krul: {exc}; message dropped, the conversation continues", file=sys.stderr)
                continue
            except BaseException:
                view.abort()
                raise
            view.finish(result)
            print(f"   [ttft {result.ttft_s * 1e3:.0f} ms, restore {result.restore_s * 1e3:.0f} ms, "
                  f"history {result.history_tokens} tokens, stored {result.stored_bytes / 1e6:.2f} MB"
                  + (", recomputed: the stored state could not be restored" if result.fallback else "") + "]")
            history += [user, {"role": "assistant", "content": result.generated_text}]
            turn_idx += 1
            if persist:
                _save_transcript(transcript, history)
    if not persist:
        engine.store.delete(conv_id)
    return 0


def cmd_evaluate(args) -> int:
    from krul.evaluation import describe, evaluate

    check_engine_args(args)
    _check_ids(args)
    summary = evaluate(args)
    print(f"krul: {describe(summary)}", file=sys.stderr)
    print(json.dumps(summary, default=float))
    return 0


def cmd_bench(args, rest: list[str]) -> int:
    from krul import bench

    if args.what != "ttft":
        raise SystemExit(f"krul: unknown benchmark {args.what!r}; known: ttft")
    return bench.main_ttft(rest)


def _engine_args(p: argparse.ArgumentParser, policy: bool = True, max_new_tokens: int = 32) -> None:
    p.add_argument("--model", default="smollm2-135m")
    if policy:
        p.add_argument("--policy", default="full-load")
        p.add_argument("--recompute-ratio", type=float, default=None,
                       help="fix the recompute split instead of the policy's (0 = load everything)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tier", default=None, help="pageable | pinned | disk (default: pageable, or disk "
                   "with --store)")
    p.add_argument("--store", metavar="DIR", default=None,
                   help="keep the disk tier's states in DIR, across processes (implies --tier disk)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens the model generates per turn, at least 1 (default {max_new_tokens})")
    p.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", default="teacher", choices=["teacher", "model"],
                   help="teacher: real replies form the history; model: the generated answers do")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (bars over conversations and turns, with each turn's phase)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conversations", default="sharegpt",
                   help="sharegpt | mtbench | FILE.jsonl (your own: one {\"id\", \"messages\"} object per "
                   "line, see below)")
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
    r = sub.add_parser("replay", help="replay conversations turn by turn", epilog=CONVERSATIONS_FORMAT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _engine_args(r)
    _data_args(r)
    c = sub.add_parser("chat", help="interactive multi-turn chat on the engine")
    _engine_args(c, max_new_tokens=CHAT_MAX_NEW_TOKENS)
    c.add_argument("--conversation", default="chat", metavar="ID",
                   help="the conversation's id (1-128 of A-Z a-z 0-9 _ . @ # -); with --store, a later "
                   "`krul chat` with the same id continues it")
    e = sub.add_parser("evaluate", help="quality and storage of a policy, and its nll ratio to full-load "
                       "(one JSON summary)", epilog=CONVERSATIONS_FORMAT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _engine_args(e)
    _data_args(e)
    e.add_argument("--rouge", action="store_true", help="also compute ROUGE-L (needs evaluate)")
    b = sub.add_parser("bench", help="benchmarks: `krul bench ttft --help`", add_help=False)
    b.add_argument("what", nargs="?", default="ttft")
    from krul import trace  # imports only the standard library at load

    trace.add_arguments(sub.add_parser("trace", help="many conversations as concurrent sessions over one store"))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser().parse_known_args(argv)
    if args.command != "bench" and rest:
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    from krul.data import DataError
    from krul.engine import EngineError
    from krul.factory import ConfigError
    from krul.models import ModelError
    from krul.policies import PolicyError
    from krul.store import StoreError

    try:
        if args.command == "bench":
            return cmd_bench(args, rest)
        if args.command == "trace":
            from krul.trace import run

            return run(args)
        return {"models": cmd_models, "data": cmd_data, "replay": cmd_replay, "chat": cmd_chat,
                "evaluate": cmd_evaluate}[args.command](args)
    except (ConfigError, DataError, EngineError, ModelError, PolicyError, StoreError) as exc:
        print(f"krul: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
