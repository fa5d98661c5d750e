"""What the out-of-sample dev scripts (pairing_dev.py, validate_dev.py) share: the N_EVAL dev
conversations after the svd-loss calibration record's own, their full-KV pass and recorded svd
pair losses, and one scored replay per policy."""
import json
from pathlib import Path

from krul import models
from krul.adapter import ModelAdapter
from krul.calibrate import base_pass, per_conv, pick_conversations, record_pair_losses, replay_with
from krul.evaluation import paired_ratio_ci, summarize
from krul.policies import get_policy, with_dev_scores, with_rank_ratio


def out_of_sample(model: str, n_eval: int):
    """(cal, adapter, conversations, records, base_rows, losses); prints the conversation ids."""
    cal = json.loads(Path(f"experiments/calibration/{model}.svd-loss.json").read_text())
    m, tok = models.load_model(model)
    ad = ModelAdapter(m, tok, model)
    pool = pick_conversations("dev", len(cal["conversations"]) + n_eval, 2000, tok, cal["max_turns"])
    convs = [c for c in pool if c.id not in cal["conversations"]][:n_eval]
    print(json.dumps({"eval": [c.id for c in convs]}), flush=True)
    scorer = with_dev_scores(with_rank_ratio(get_policy("krul-svd-loss"), cal["rank_ratio"]), cal, 0.0)
    records, base_rows = base_pass(ad, convs, cal["max_turns"], False)
    losses = record_pair_losses(ad, scorer, convs, cal["max_turns"], False)
    return cal, ad, convs, records, base_rows, losses


def scored_replay(ad, policy, convs, records, base_rows, losses, max_turns: int):
    """(rows, the point's JSON fields: compression, nll ratio [paired 95% CI], per-conversation sums)."""
    rows = replay_with(ad, policy, convs, records, max_turns, losses=losses)
    s = summarize(rows, ad.name, policy.name)
    pt, lo, hi = paired_ratio_ci(per_conv(rows), per_conv(base_rows))
    return rows, {"compression_ratio": round(s["compression_ratio"], 4), "nll_ratio": round(pt, 5),
                  "nll_ratio_lo": round(lo, 5), "nll_ratio_hi": round(hi, 5),
                  "per_conv": {c: [round(x[0], 4), x[1]] for c, x in per_conv(rows).items()}}
