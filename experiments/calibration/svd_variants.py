"""Dev-split variants of krul-svd's compression parameters at a fixed pair count (session 3).

Usage: python experiments/calibration/svd_variants.py MODEL N_CONVERSATIONS N_PAIRS 'JSON' ['JSON' ...]
Each JSON overrides the policy's compress_params (rank_ratio, sink_tokens, retain_ratio, value_share,
retain_by; and "selector": selector params such as min_layer); one base pass, then one replay per variant at tau 0, recompute ratio 0.
Output of the runs quoted in REPRODUCE.md: smollm2-135m.svd-variants.dev.jsonl (the first eight lines ran when
the code defaulted to retain_ratio 0; the last three with retain_ratio 0.03).
"""
import json, sys, torch
from krul import models
from krul.adapter import ModelAdapter
from krul.calibrate import pick_conversations, base_pass, curve_point, grid_policy
model = sys.argv[1]; n = int(sys.argv[2]); k = int(sys.argv[3])
m, tok = models.load_model(model)
ad = ModelAdapter(m, tok, model)
convs = pick_conversations("dev", n, 2000, tok, 3)
records, base_rows = base_pass(ad, convs, 3, False)
for spec in sys.argv[4:]:
    kw = json.loads(spec)
    rr = kw.pop("rank_ratio", 0.5)
    pol = grid_policy("krul-svd", 0.0, k, ad.n_layers, rr)
    sel = kw.pop("selector", {})
    pol = pol.with_params(compress_params={**pol.compress_params, **kw},
                          selector_params={**pol.selector_params, **sel})
    pt = curve_point(ad, pol, convs, records, base_rows, 3)
    print(json.dumps({"rank_ratio": rr, **kw, "selector": sel, "pairs": k, **{x: round(pt[x], 4) for x in ("compression_ratio", "nll_ratio", "nll_ratio_lo", "nll_ratio_hi")}}), flush=True)
