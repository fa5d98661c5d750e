"""Throwaway probe (session 3): relative error of a joint SVD of two layers' token vectors
[layer a | layer b] (all heads) vs separate per-layer SVDs at the same total rank, on one dev
conversation (first N=600 tokens). Quoted in the session note: joint 0.07-0.15 vs separate 0.10-0.25 at half
the dims. Usage: M=smollm2-135m N=600 python experiments/calibration/probe_svd_spectrum.py
"""
import torch, os
torch.set_num_threads(1)
from krul.models import load_model
from krul.data import load_conversations
model, tok = load_model(os.environ.get("M","smollm2-135m"))
conv = load_conversations("sharegpt", split="dev")[0]
ids = tok.apply_chat_template(conv.messages[:4], return_tensors="pt", return_dict=True)["input_ids"][:, :int(os.environ.get("N","600"))]
with torch.no_grad():
    c = model(ids, use_cache=True).past_key_values
L = len(c.layers); N = ids.shape[1]
print("N", N, "L", L, "dtype", c.layers[0].keys.dtype, c.layers[0].keys.shape)
def flat(x):  # (1,H,T,D) -> (T, H*D)
    return x[0].permute(1,0,2).reshape(x.shape[2], -1).float()
def err_at(M, r):
    U,S,Vh = torch.linalg.svd(M, full_matrices=False)
    e = (S[r:]**2).sum()/(S**2).sum()
    return e.sqrt().item()
for kind in ("keys","values"):
    X = [flat(getattr(c.layers[i], kind)) for i in range(L)]
    D = X[0].shape[1]
    print(kind, "D", D)
    for (a,b) in [(3,4),(10,11),(20,21),(27,28),(5,20)]:
        M = torch.cat([X[a], X[b]], 1)
        row = []
        for frac in (0.5, 0.625, 0.75):
            r = int(frac*2*D)
            joint = err_at(M, r)
            sep = ((err_at(X[a], r//2)**2*(X[a]**2).sum() + err_at(X[b], r//2)**2*(X[b]**2).sum())/((X[a]**2).sum()+(X[b]**2).sum())).sqrt().item()
            row.append(f"r={r}: joint {joint:.3f} separate {sep:.3f}")
        print(f"  ({a},{b})", "; ".join(row))
