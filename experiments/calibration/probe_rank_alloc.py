"""Where rank allocation moves the svd rank budget, on one out-of-sample dev conversation.

Usage: python experiments/calibration/probe_rank_alloc.py [MODEL] [PAIRS]
The first dev conversation outside the svd-loss record's, its first turn (user + reply) through
the full model; the record's dev plan (`krul_fix_loss_pairs`, first PAIRS); per pair, the (K, V)
ranks of `allocate_svd_ranks` with one budget ("segment") and with K's and V's apart ("pairs"),
against svd_rank's uniform rank.
"""
import json, sys

import torch
from krul import models
from krul.adapter import ModelAdapter
from krul.calibrate import pick_conversations
from krul.compression import allocate_svd_ranks, svd_rank
from krul.policies import fixed_loss_plan

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
k = int(sys.argv[2]) if len(sys.argv) > 2 else 8
cal = json.load(open(f"experiments/calibration/{model}.svd-loss.json"))
m, tok = models.load_model(model)
ad = ModelAdapter(m, tok, model)
conv = [c for c in pick_conversations("dev", len(cal["conversations"]) + 4, 2000, tok, 3)
        if c.id not in cal["conversations"]][0]
ids = tok.apply_chat_template(conv.messages[:2], tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
with torch.no_grad():
    kvs = ad.kv_from_cache(m(ids, use_cache=True).past_key_values)
pairs = fixed_loss_plan(cal, k, cal["tau"], "greedy")
jobs = [(kvs[a], kvs[b], 0, None) for a, b in pairs]
width = 2 * kvs[0][0].shape[1] * kvs[0][0].shape[3]
print(json.dumps({"conversation": conv.id, "tokens": ids.shape[1],
                  "uniform_rank": svd_rank(ids.shape[1] - 1, width, cal["rank_ratio"])}))
for name, split in (("segment", False), ("pairs", True)):
    r = allocate_svd_ranks(jobs, rank_ratio=cal["rank_ratio"], sink_tokens=1, split_kv=split)
    print(json.dumps({"rank_alloc": name, "ranks": {f"{a}-{b}": list(x) for (a, b), x in zip(pairs, r)},
                      "k_total": sum(x[0] for x in r), "v_total": sum(x[1] for x in r)}))
