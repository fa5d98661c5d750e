"""Throwaway probe behind the svd method (session 3): nll ratio on 8 dev conversations when the
15 adjacent layer pairs (2i, 2i+1) of the history KV are replaced by joint low-rank reconstructions.

Modes: `static` (a basis from the second moments of 6 other dev conversations), `seg` (a per-history
SVD whose basis is paid for, as `compression.svd_pair` does). Env: FS (byte fractions), KS (pairs,
deepest first), SINK (leading tokens kept exact), RET (fraction of worst tokens kept exact).
Usage: FS="0.75" KS="15" SINK=1 python experiments/calibration/probe_svd.py static seg
Output quoted in REPRODUCE.md (Deviations: sink_tokens).
"""
import torch, os, math, sys
torch.set_num_threads(2)
from krul.models import load_model
from krul.data import load_conversations
from krul.compression import merge_pair
M = os.environ.get("M","smollm2-135m")
model, tok = load_model(M)
from krul.calibrate import pick_conversations, _first_turns
dev = pick_conversations("dev", 14, 2000, tok, 3)
fit, evalc = dev[:6], dev[6:14]
def ids_of(msgs):
    return tok.apply_chat_template(msgs, return_tensors="pt", return_dict=True)["input_ids"]
def full_kv(msgs):
    with torch.no_grad():
        return model(ids_of(msgs), use_cache=True).past_key_values
L = model.config.num_hidden_layers
# static joint second moments for all layers (K and V): token vectors flattened over heads
mom = {"keys": None, "values": None}
for conv in fit:
    c = full_kv(_first_turns(conv, 3))
    for kind in mom:
        X = torch.cat([getattr(c.layers[l], kind)[0].permute(1,0,2).reshape(getattr(c.layers[l], kind).shape[2], -1) for l in range(L)], 1).double()
        G = X.T @ X
        mom[kind] = G if mom[kind] is None else mom[kind] + G
D = mom["keys"].shape[0] // L
def basis(kind, a, b):
    idx = torch.cat([torch.arange(a*D,(a+1)*D), torch.arange(b*D,(b+1)*D)])
    G = mom[kind][idx][:, idx]
    w, V = torch.linalg.eigh(G)
    return V.flip(1).float()  # 2D x 2D, descending
BAS = {}
def compress(cache, pairs, mode, f):
    for (a,b) in pairs:
        for kind in ("keys","values"):
            A = getattr(cache.layers[a], kind); B = getattr(cache.layers[b], kind)
            _, H, N, hd = A.shape
            Xa = A[0].permute(1,0,2).reshape(N,-1); Xb = B[0].permute(1,0,2).reshape(N,-1)
            Mx = torch.cat([Xa, Xb], 1)
            if mode == "static":
                key = (kind,a,b)
                if key not in BAS: BAS[key] = basis(kind,a,b)
                r = int(round(f*2*D)); P = BAS[key][:, :r]
                R = (Mx @ P) @ P.T
            elif mode == "seg":
                m = 2*D; r = int(f*N*m/(N+m))
                U,S,Vh = torch.linalg.svd(Mx, full_matrices=False)
                R = (U[:, :r]*S[:r]) @ Vh[:r]
            else:
                raise SystemExit(mode)
            SINK = int(os.environ.get("SINK", "0")); RET = float(os.environ.get("RET", "0"))
            if SINK: R[:SINK] = Mx[:SINK]
            if RET:
                res = ((R - Mx)**2).sum(1) / (Mx**2).sum(1).clamp_min(1e-12)
                top = torch.topk(res, max(1, int(RET*N))).indices
                R[top] = Mx[top]
            ra = R[:, :D].reshape(N,H,hd).permute(1,0,2).unsqueeze(0); rb = R[:, D:].reshape(N,H,hd).permute(1,0,2).unsqueeze(0)
            A.copy_(ra); B.copy_(rb)
def nll_turns(conv, pairs, mode, f):
    msgs = _first_turns(conv, 3)
    users = conv.user_turn_indices()
    tot, n = 0.0, 0
    for t in (1, 2):
        if t >= len(users) or users[t] + 1 >= len(msgs): break
        hist = msgs[:users[t]]
        cur = msgs[:users[t]+2]
        h_ids = ids_of(hist); c_ids = ids_of(cur)
        prompt_ids = tok.apply_chat_template(msgs[:users[t]+1], return_tensors="pt", return_dict=True, add_generation_prompt=True)["input_ids"]
        Nh = h_ids.shape[1]
        assert torch.equal(c_ids[:, :Nh], h_ids)
        with torch.no_grad():
            cache = model(h_ids, use_cache=True).past_key_values
            if pairs: compress(cache, pairs, mode, f)
            logits = model(c_ids[:, Nh:], past_key_values=cache).logits[0].float()
        P = prompt_ids.shape[1] - Nh
        tgt = c_ids[0, Nh+P:]
        lp = torch.log_softmax(logits[P-1:-1], -1).gather(1, tgt[:, None])
        tot += -lp.sum().item(); n += tgt.numel()
    return tot, n
base = [nll_turns(c, [], None, 1) for c in evalc]
import random
def ratio(res):
    return sum(r[0] for r in res)/sum(r[1] for r in res) / (sum(b[0] for b in base)/sum(b[1] for b in base))
allpairs = [(2*i, 2*i+1) for i in range(L//2)]
for mode in sys.argv[1:]:
    for f in [float(x) for x in os.environ.get("FS","0.5 0.625 0.75 0.875").split()]:
        for k in [int(x) for x in os.environ.get("KS","4 8 15").split()]:
            pairs = allpairs[-k:]
            res = [nll_turns(c, pairs, mode, f) for c in evalc]
            comp = L / (L - k*2*(1-f))
            print(f"{mode} f={f} pairs={k} nominal compression {comp:.3f}: nll ratio {ratio(res):.4f}", flush=True)
