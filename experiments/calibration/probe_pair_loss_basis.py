"""Exact vs truncated-basis svd pair losses on real SmolLM2 KV (session 4): time and rank agreement.

Usage: PYTHONPATH=src python experiments/calibration/probe_pair_loss_basis.py
The first 2 dev conversations, turn 1 (358 and 403 tokens), rank ratio 0.47, joint loss; prints per
basis_dim the seconds of the exact and the truncated computation, the largest over/under-estimate
and the Spearman correlation of the 435 pair losses. Quoted in REPRODUCE.md (loss_basis); it ran
while the data build of `make setup` shared the 2 cores, so its seconds are indicative only.
"""
import time, torch
from krul import models
from krul.adapter import ModelAdapter
from krul.calibrate import pick_conversations, _first_turns
from krul.compression import svd_pair_losses
m, tok = models.load_model("smollm2-135m")
ad = ModelAdapter(m, tok, "smollm2-135m")
convs = pick_conversations("dev", 2, 2000, tok, 3)
for conv in convs:
    ids = tok.apply_chat_template(_first_turns(conv, 1), tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ad.model(ids, use_cache=True)
    kvs = ad.kv_from_cache(out.past_key_values)
    print("tokens", ids.shape[1])
    t=time.perf_counter(); ex = svd_pair_losses(kvs, 0.47); te=time.perf_counter()-t
    for k in (128, 96, 64):
        t=time.perf_counter(); ap = svd_pair_losses(kvs, 0.47, basis_dim=k); ta=time.perf_counter()-t
        mask = ~torch.isnan(ex)
        e, a = ex[mask], ap[mask]
        rho = torch.corrcoef(torch.stack([e.argsort().argsort().double(), a.argsort().argsort().double()]))[0,1]
        print(f"k={k} exact {te:.1f}s approx {ta:.1f}s max over {float((a-e).max()):.4f} min over {float((a-e).min()):.5f} spearman {float(rho):.4f} exact range {float(e.min()):.3f}-{float(e.max()):.3f}")
