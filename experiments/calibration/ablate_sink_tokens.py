"""Dev-split ablation: does keeping the first tokens (attention sinks) exact reduce the merge's nll cost?

Run: PYTHONPATH=src .venv/bin/python experiments/calibration/ablate_sink_tokens.py smollm2-135m 6
     > experiments/calibration/sink_tokens.dev.jsonl   (one JSON line per point; 2-core CPU ~5 min)
"""
import json, sys, torch
from krul import models
from krul.adapter import ModelAdapter
from krul.calibrate import pick_conversations, base_pass, curve_point
from krul.policies import get_policy
name = sys.argv[1]; n = int(sys.argv[2])
m, tok = models.load_model(name); ad = ModelAdapter(m, tok, name)
convs = pick_conversations("dev", n, 2000, tok, 3)
rec, base = base_pass(ad, convs, 3, progress=False)
L = ad.n_layers
for k in (1, 2):
    for params in ({"retain_ratio": 0.05}, {"retain_ratio": 0.05, "sink_tokens": 4}, {"retain_ratio": 0.05, "sink_tokens": 32}):
        pol = get_policy("krul", recompute_ratio=0.0).with_params(
            selector_params={"tau": 0.0, "target_ratio": L / (L - k)}, compress_params=params)
        pt = curve_point(ad, pol, convs, rec, base, 3)
        print(json.dumps({"k": k, **params, **{x: round(pt[x], 4) for x in ("nll_ratio", "nll_ratio_lo", "nll_ratio_hi", "compression_ratio")}}), flush=True)
