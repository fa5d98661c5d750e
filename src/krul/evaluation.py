"""Quality and storage of a restore policy over conversations: `krul evaluate`.

nll: mean over every token of every real assistant reply from turn 2 on (content and end-of-turn
token as the chat template renders them) of -log p(token | restored history, user message, earlier
reply tokens); `nll_ci95` by a bootstrap over conversations. Bytes are summed over the states
restored before each turn >= 2. `greedy_match_rate`: common prefix of the first 32 greedy tokens
with those of `full-load` (cached per model/conversation/turn), over 32. ROUGE-L against the
full-load answer and, for MT-Bench questions with GPT-4 references, against the reference.
This module knows nothing about plotting or file layouts beyond its reference cache.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

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
    (id + digest of its messages), so an edited conversation under the same id gets its own."""
    key = hashlib.sha256(f"{model}|{conversation_id}|{turn_idx}|{history}|{GREEDY_TOKENS}".encode()).hexdigest()[:20]
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


def run_policy(engine, conversations, max_turns: int = 3, progress: bool = True) -> list:
    """Replay every conversation; TurnResults, with full-load references cached on the way."""
    from tqdm.auto import tqdm

    rows = []
    for conv in tqdm(conversations, desc=f"{engine.policy.name}", disable=not progress, leave=False):
        for result in engine.replay(conv, max_turns=max_turns):
            if engine.policy.name == "full-load" and not engine.do_sample:
                save_reference(engine.adapter.name, conv.content_key, result.turn_idx,
                               result.generated_ids[:GREEDY_TOKENS], result.generated_text, engine.history)
            rows.append(result)
    return rows


def summarize(rows: list, model: str, policy: str, references: dict | None = None,
              mtbench_refs: dict | None = None, rouge: bool = False, history: str = "teacher") -> dict:
    """The `krul evaluate` summary from TurnResults (turns >= 2 count for nll and bytes)."""
    per_conv: dict[str, list[float]] = {}
    stored = full = loaded_full = loaded_stored = rec_num = rec_den = 0
    matches, preds_ref, refs_ref, preds_gt, refs_gt = [], [], [], [], []
    for r in rows:
        if r.turn_idx < 1:
            continue
        s = per_conv.setdefault(r.conversation_id, [0.0, 0])
        s[0] += r.reply_nll_sum
        s[1] += r.reply_tokens
        stored += r.stored_bytes
        full += r.full_kv_bytes
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
        "storage_ratio": full / stored if loaded_stored else None,  # null when no KV is stored
        "greedy_match_rate": float(np.mean(matches)) if matches else None,
        "per_conversation": {k: tuple(v) for k, v in per_conv.items()},
    }
    if rouge:
        from krul.metrics import rouge_l

        summary["rougeL_vs_full_load"] = rouge_l(preds_ref, refs_ref)["rougeL"] if preds_ref else None
        summary["rougeL_vs_reference"] = rouge_l(preds_gt, refs_gt)["rougeL"] if preds_gt else None
    return summary


def evaluate(args) -> dict:
    """`krul evaluate`: build the engine from CLI args, run, summarise (one JSON object)."""
    from krul import data
    from krul.factory import build_engine

    conversations = data.load_conversations(args.conversations, split=args.split, ids=args.ids,
                                            limit=args.limit)
    history = args.history
    mtbench_refs = {c.id: c.meta.get("references") for c in conversations if c.meta.get("references")}
    if args.conversations == "mtbench":
        history = "model"  # MT-Bench has no real replies: the model's turn-1 answer is the history
        args.history = "model"
    max_turns = args.max_turns or 3
    if args.policy != "full-load":  # make sure the greedy references exist
        missing = [c for c in conversations
                   if any(load_reference(args.model, c.content_key, t, history) is None for t in range(1, max_turns))]
        if missing:
            ref_engine = build_engine(args, policy_name="full-load")
            ref_engine.max_new_tokens = max(ref_engine.max_new_tokens, GREEDY_TOKENS)
            run_policy(ref_engine, missing, max_turns)
    engine = build_engine(args)
    rows = run_policy(engine, conversations, max_turns)
    summary = summarize(rows, args.model, engine.policy.name, mtbench_refs=mtbench_refs,
                        rouge=args.rouge, history=history)
    if args.conversations == "mtbench":
        summary["nll"] = None  # no real replies
        summary["nll_ci95"] = [None, None]
    if not args.json:
        summary.pop("per_conversation")
    return summary
