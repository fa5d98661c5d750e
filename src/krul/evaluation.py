"""Quality and storage of a restore policy over conversations: `krul evaluate`.

nll: mean over every token of every real assistant reply from turn 2 on (content and end-of-turn
token as the chat template renders them) of -log p(token | restored history, user message, earlier
reply tokens); `nll_ci95` by a bootstrap over conversations. Bytes are summed over the states
restored before each turn >= 2. `greedy_match_rate`: common prefix of the first 32 greedy tokens
with those of `full-load` (cached per model/conversation/turn), over 32. ROUGE-L against the
full-load answer and, for MT-Bench questions with GPT-4 references, against the reference.

Every summary also holds full-load's nll on the same conversations and the policy's ratio to it,
`nll_ratio_to_full_load`, with a paired bootstrap interval over conversations (`paired_ratio_ci`).
Full-load's per-turn nll and greedy answers are cached per conversation under
`$KRUL_HOME/cache/full-load/`, keyed by what produced them (`full_load_key`: the model, the
conversation's content, the turns, the history mode, the generation settings that shape a
model-made history, and `code_version()`, a digest of krul's source), so a second `krul evaluate`
on the same conversations does not recompute it and an edit of either the conversation or the code
does.
This module knows nothing about plotting or file layouts beyond its caches.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from krul import paths

GREEDY_TOKENS = 32


def bootstrap_ci(values_per_conv: list[tuple[float, int]], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """CI of a token-weighted mean, resampling conversations. values: (sum, count) per conversation."""
    if not values_per_conv:
        return float("nan"), float("nan")
    sums = np.array([s for s, _ in values_per_conv], dtype=float)
    counts = np.array([c for _, c in values_per_conv], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    stats = sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_ratio_ci(a: dict, b: dict, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Bootstrap CI of nll_a / nll_b over conversations present in both; a, b: id -> (sum, count)."""
    ids = sorted(set(a) & set(b))
    if not ids:
        return float("nan"), float("nan"), float("nan")
    sa = np.array([a[i][0] for i in ids]); ca = np.array([a[i][1] for i in ids])
    sb = np.array([b[i][0] for i in ids]); cb = np.array([b[i][1] for i in ids])
    point = (sa.sum() / ca.sum()) / (sb.sum() / cb.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    ratios = (sa[idx].sum(1) / ca[idx].sum(1)) / (sb[idx].sum(1) / cb[idx].sum(1))
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(point), float(lo), float(hi)


def _reference_path(model: str, conversation_id: str, turn_idx: int, history: str) -> str:
    """The cache file of a greedy reference; `conversation_id` is the conversation's `content_key`
    (id + digest of its messages), so an edited conversation under the same id gets its own; the key
    also holds `code_version()`, so a reference written by other code is never read back."""
    key = hashlib.sha256(f"{model}|{conversation_id}|{turn_idx}|{history}|{GREEDY_TOKENS}|{code_version()}"
                         .encode()).hexdigest()[:20]
    return str(paths.krul_home() / "cache" / "greedy" / f"{key}.json")


def load_reference(model, conversation_id, turn_idx, history="teacher"):
    from pathlib import Path

    p = Path(_reference_path(model, conversation_id, turn_idx, history))
    return json.loads(p.read_text()) if p.exists() else None


def save_reference(model, conversation_id, turn_idx, ids, text, history="teacher") -> None:
    from pathlib import Path

    p = Path(_reference_path(model, conversation_id, turn_idx, history))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"ids": ids, "text": text}))
    tmp.replace(p)


@dataclass
class Evaluation:
    summary: dict
    rows: list  # TurnResult per turn


def run_policy(engine, conversations, max_turns: int = 3, progress: bool = True, desc: str | None = None) -> list:
    """Replay every conversation; TurnResults, with full-load references cached on the way.
    Progress (a bar per conversation and per turn, with the turn's phase) on stderr unless
    `progress` is False."""
    from krul.factory import replay_all

    rows = []
    for conv, result, _ in replay_all(engine, conversations, max_turns, desc=desc, progress=progress):
        # a reference holds the first GREEDY_TOKENS greedy tokens: a shorter run would cut it
        if engine.policy.name == "full-load" and not engine.do_sample and engine.max_new_tokens >= GREEDY_TOKENS:
            save_reference(engine.adapter.name, conv.content_key, result.turn_idx,
                           result.generated_ids[:GREEDY_TOKENS], result.generated_text, engine.history)
        rows.append(result)
    return rows


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of krul's source: every `*.py` under the package, by relative path and content.
    What a cached result depends on: it changes with any edit of src/krul, committed or not (what the
    git sha plus the uncommitted diff of src/ tell apart), and not with commits elsewhere."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def full_load_key(model: str, conversation, max_turns: int, history: str, max_new_tokens: int,
                  do_sample: bool, seed: int) -> str:
    """The cache key of full-load's turns of `conversation`: model, content (`content_key`), turns,
    history mode and `code_version()`; with a model-made history (`history="model"`) also the
    generation settings, which shape that history."""
    parts = [model, conversation.content_key, str(max_turns), history, code_version()]
    if history == "model":
        parts += [str(max_new_tokens), str(bool(do_sample)), str(seed)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _full_load_path(key: str) -> Path:
    return paths.krul_home() / "cache" / "full-load" / f"{key}.json"


def load_full_load(key: str) -> dict | None:
    """The cached full-load record of a key, or None (missing or unreadable: recomputed)."""
    p = _full_load_path(key)
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except (OSError, ValueError):
        return None


def save_full_load(key: str, record: dict) -> None:
    p = _full_load_path(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(p)


def _full_load_record(conv, results: list, greedy: bool) -> dict:
    """What the cache keeps of a conversation's full-load turns: per turn the reply's nll sum and
    token count, and (greedy) the first GREEDY_TOKENS generated ids and the text."""
    return {"conversation_key": conv.content_key, "greedy": greedy, "turns": [
        {"turn_idx": r.turn_idx, "reply_nll_sum": r.reply_nll_sum, "reply_tokens": r.reply_tokens,
         "generated_ids": list(r.generated_ids[:GREEDY_TOKENS]), "generated_text": r.generated_text}
        for r in results]}


def per_conversation_nll(records: dict) -> dict:
    """conversation id -> (nll sum, tokens) over turns >= 2 (turn_idx >= 1) of full-load records."""
    out = {}
    for cid, rec in records.items():
        turns = [t for t in rec["turns"] if t["turn_idx"] >= 1]
        out[cid] = (float(sum(t["reply_nll_sum"] for t in turns)), int(sum(t["reply_tokens"] for t in turns)))
    return out


def full_load_references(args, conversations, max_turns: int, history: str, adapter=None,
                         need_greedy: bool = True, progress: bool = True):
    """Full-load's records of `conversations` (id -> record), from the cache or computed and cached;
    the greedy references `summarize` reads are (re)written from them. Returns (records, n_cached,
    adapter): `adapter` is the model when it had to be loaded here (else the one given)."""
    from krul.factory import build_engine, note

    max_new = max(args.max_new_tokens, GREEDY_TOKENS)
    keys = {c.id: full_load_key(args.model, c, max_turns, history, max_new, args.sample, args.seed)
            for c in conversations}
    records, missing = {}, []
    for conv in conversations:
        rec = load_full_load(keys[conv.id])
        if rec is None or (need_greedy and not args.sample and not rec.get("greedy")):
            missing.append(conv)
        else:
            records[conv.id] = rec
    n_cached = len(records)
    if n_cached:
        note(f"full-load reference: {n_cached} of {len(conversations)} conversations from the cache", progress)
    if missing:
        ref_engine = build_engine(args, policy_name="full-load", adapter=adapter)
        adapter = ref_engine.adapter
        ref_engine.max_new_tokens = max_new
        by_conv: dict[str, list] = {}
        for result in run_policy(ref_engine, missing, max_turns, progress=progress, desc="full-load (reference)"):
            by_conv.setdefault(result.conversation_id, []).append(result)
        for conv in missing:
            rec = _full_load_record(conv, by_conv.get(conv.id, []), greedy=not ref_engine.do_sample)
            save_full_load(keys[conv.id], rec)
            records[conv.id] = rec
    for conv in conversations:  # the greedy references summarize() compares with
        rec = records[conv.id]
        if rec.get("greedy"):
            for t in rec["turns"]:
                if load_reference(args.model, conv.content_key, t["turn_idx"], history) is None:
                    save_reference(args.model, conv.content_key, t["turn_idx"], t["generated_ids"],
                                   t["generated_text"], history)
    return records, n_cached, adapter


def summarize(rows: list, model: str, policy: str, references: dict | None = None,
              mtbench_refs: dict | None = None, rouge: bool = False, history: str = "teacher") -> dict:
    """The `krul evaluate` summary from TurnResults (turns >= 2 count for nll and bytes)."""
    per_conv: dict[str, list[float]] = {}
    stored = full = loaded_full = loaded_stored = rec_num = rec_den = storage = full_storage = 0
    matches, preds_ref, refs_ref, preds_gt, refs_gt = [], [], [], [], []
    for r in rows:
        if r.turn_idx < 1:
            continue
        s = per_conv.setdefault(r.conversation_id, [0.0, 0])
        s[0] += r.reply_nll_sum
        s[1] += r.reply_tokens
        stored += r.stored_bytes
        full += r.full_kv_bytes
        storage += getattr(r, "storage_bytes", 0)
        full_storage += getattr(r, "full_storage_bytes", 0)
        loaded_full += r.loaded_full_bytes
        loaded_stored += r.loaded_stored_bytes
        rec_num += r.recompute_ratio * r.history_tokens
        rec_den += r.history_tokens
        ref = load_reference(model, r.conversation_key or r.conversation_id, r.turn_idx, history)
        if ref is not None:
            a, b = r.generated_ids[:GREEDY_TOKENS], ref["ids"][:GREEDY_TOKENS]
            common = 0
            for x, y in zip(a, b):
                if x != y:
                    break
                common += 1
            matches.append(common / GREEDY_TOKENS)
            preds_ref.append(r.generated_text)
            refs_ref.append(ref["text"])
        if mtbench_refs and r.conversation_id in mtbench_refs:
            gt = mtbench_refs[r.conversation_id]
            if r.turn_idx < len(gt):
                preds_gt.append(r.generated_text)
                refs_gt.append(gt[r.turn_idx])
    tokens = sum(c for _, c in per_conv.values())
    nll = sum(s for s, _ in per_conv.values()) / tokens if tokens else None
    lo, hi = bootstrap_ci([tuple(v) for v in per_conv.values() if v[1] > 0]) if tokens else (None, None)
    summary = {
        "model": model, "policy": policy, "n_conversations": len({r.conversation_id for r in rows}),
        "n_turns": len(rows), "n_scored_tokens": tokens, "nll": nll, "nll_ci95": [lo, hi],
        "stored_bytes": stored, "full_kv_bytes": full,
        "compression_ratio": loaded_full / loaded_stored if loaded_stored else None,
        "recompute_ratio": rec_num / rec_den if rec_den else None,
        # full / stored KV, both at 2 bytes per unquantized element (`pricing.storage_ratio`); null
        # when no KV is stored
        "storage_ratio": full_storage / storage if storage else None,
        "greedy_match_rate": float(np.mean(matches)) if matches else None,
        "per_conversation": {k: tuple(v) for k, v in per_conv.items()},
    }
    if rouge:
        from krul.metrics import rouge_l

        summary["rougeL_vs_full_load"] = rouge_l(preds_ref, refs_ref)["rougeL"] if preds_ref else None
        summary["rougeL_vs_reference"] = rouge_l(preds_gt, refs_gt)["rougeL"] if preds_gt else None
    return summary


def with_full_load(summary: dict, full_load: dict, n_cached: int, n_boot: int = 2000, seed: int = 0) -> dict:
    """`summary` plus full-load's nll on the same conversations (`full_load`: id -> (sum, tokens)),
    its bootstrap interval, and the policy's nll ratio to it with a paired bootstrap interval
    (conversations resampled together, `paired_ratio_ci`)."""
    own = {k: tuple(v) for k, v in summary["per_conversation"].items() if v[1] > 0}
    base = {k: v for k, v in full_load.items() if v[1] > 0}
    tokens = sum(c for _, c in base.values())
    fl_nll = sum(s for s, _ in base.values()) / tokens if tokens else None
    fl_ci = list(bootstrap_ci(list(base.values()), n_boot=n_boot, seed=seed)) if tokens else [None, None]
    point = lo = hi = None
    if own and set(own) & set(base) and summary.get("nll") is not None:
        point, lo, hi = paired_ratio_ci(own, base, n_boot=n_boot, seed=seed)
    return {**summary, "full_load_nll": fl_nll, "full_load_nll_ci95": fl_ci,
            "nll_ratio_to_full_load": point, "nll_ratio_ci95": [lo, hi],
            "full_load_cached_conversations": n_cached}


def describe(summary: dict) -> str:
    """One line for a reader: the policy's nll, full-load's, the ratio and its paired interval."""
    if summary.get("nll") is None or summary.get("nll_ratio_to_full_load") is None:
        return (f"{summary['policy']}: no nll and no ratio to full-load: no real reply was scored (MT-Bench "
                "has none, --history model scores none, and a first turn has no restored history)")
    lo, hi = summary["nll_ratio_ci95"]
    return (f"{summary['policy']}: nll {summary['nll']:.4f}, full-load {summary['full_load_nll']:.4f}, "
            f"ratio {summary['nll_ratio_to_full_load']:.4f} (95% paired bootstrap over "
            f"{summary['n_conversations']} conversations: {lo:.4f} to {hi:.4f}), "
            f"{summary['n_scored_tokens']} reply tokens")


def evaluate(args) -> dict:
    """`krul evaluate`: build the engine from CLI args, run it and full-load (cached by content) on
    the same conversations, summarise (one JSON object). Progress on stderr unless args.no_progress."""
    from krul import data
    from krul.factory import build_engine

    progress = not getattr(args, "no_progress", False)
    conversations = data.load_conversations(args.conversations, split=args.split, ids=args.ids,
                                            limit=args.limit)
    history = args.history
    mtbench_refs = {c.id: c.meta.get("references") for c in conversations if c.meta.get("references")}
    if args.conversations == "mtbench":
        history = "model"  # MT-Bench has no real replies: the model's turn-1 answer is the history
        args.history = "model"
    max_turns = args.max_turns or 3
    adapter, records, n_cached = None, None, 0
    if args.policy != "full-load":  # full-load's nll and the greedy references, cached by content
        records, n_cached, adapter = full_load_references(args, conversations, max_turns, history,
                                                          progress=progress)
    engine = build_engine(args, adapter=adapter)
    rows = run_policy(engine, conversations, max_turns, progress=progress)
    summary = summarize(rows, args.model, engine.policy.name, mtbench_refs=mtbench_refs,
                        rouge=args.rouge, history=history)
    if records is None:  # full-load itself: its own rows are the reference (and fill the cache)
        by_conv: dict[str, list] = {}
        for r in rows:
            by_conv.setdefault(r.conversation_id, []).append(r)
        greedy = not engine.do_sample and engine.max_new_tokens >= GREEDY_TOKENS
        records = {c.id: _full_load_record(c, by_conv.get(c.id, []), greedy) for c in conversations}
        for c in conversations:
            save_full_load(full_load_key(args.model, c, max_turns, history, engine.max_new_tokens,
                                         args.sample, args.seed), records[c.id])
    summary = with_full_load(summary, per_conversation_nll(records), n_cached)
    if args.conversations == "mtbench":
        for k in ("nll", "full_load_nll", "nll_ratio_to_full_load"):
            summary[k] = None  # no real replies
        summary["nll_ci95"] = summary["full_load_nll_ci95"] = summary["nll_ratio_ci95"] = [None, None]
    if not args.json:
        summary.pop("per_conversation")
    return summary
