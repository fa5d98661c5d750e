"""Figure 7: what the attention estimator costs.

`run` times prefill and decode steps with and without the estimator against sequence length and
records its peak map bytes; `claim` is the decode-step latency with / without it at the longest
sequence.
"""
from __future__ import annotations

import statistics
import time

import pandas as pd

from krul.figures.common import MissingComponent, get_adapter, progress, select_conversations

METRIC = "decode_overhead_at_longest"  # the name experiments/fig7_estimator_overhead.yaml gives `claim`


def run(cfg: dict) -> pd.DataFrame:
    """Prefill (with similarity) and decode-step latency with/without the estimator vs sequence
    length; the estimator's peak map bytes vs keeping every layer's maps (n_layers*heads*n*n*4)."""
    import torch
    from transformers import DynamicCache

    try:
        from krul.estimator import AttentionEstimator
    except ImportError as e:
        raise MissingComponent(f"krul.estimator is not available ({e})") from None
    rows = []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        conv = select_conversations("sharegpt", "test", n=1, min_turns=1, max_turns=10,
                                    min_chars=cfg.get("min_chars", 20000))[0]
        text_ids = adapter.tokenizer(" ".join(m["content"] for m in conv.messages))["input_ids"]
        for n in progress(cfg["seq_lens"], f"{model} seq lens"):
            ids = torch.tensor([text_ids[:n]], dtype=torch.long)
            for rep in range(cfg.get("repeats", 1)):
                with torch.inference_mode():
                    est = AttentionEstimator(adapter)
                    cid = f"fig7-{n}-{rep}"
                    est.reset(cid)
                    t_sim0 = dict(est.time_s)
                    c1, c2 = DynamicCache(), DynamicCache()
                    t0 = time.perf_counter()
                    out1 = est.forward(cid, ids, c1, logits_to_keep=1)
                    t1 = time.perf_counter()
                    out2 = adapter.forward(ids, c2, logits_to_keep=1)
                    t2 = time.perf_counter()
                    rows += [dict(model=model, seq_len=n, rep=rep, metric="prefill_s", mode="estimator", value=t1 - t0),
                             dict(model=model, seq_len=n, rep=rep, metric="prefill_s", mode="plain", value=t2 - t1)]
                    tok1, tok2 = int(out1[0, -1].argmax()), int(out2[0, -1].argmax())
                    step_e, step_p = [], []
                    for _ in range(cfg.get("decode_steps", 8)):
                        t0 = time.perf_counter()
                        tok1 = int(est.forward(cid, torch.tensor([[tok1]]), c1, logits_to_keep=1)[0, -1].argmax())
                        t1 = time.perf_counter()
                        tok2 = int(adapter.forward(torch.tensor([[tok2]]), c2, logits_to_keep=1)[0, -1].argmax())
                        t2 = time.perf_counter()
                        step_e.append(t1 - t0)
                        step_p.append(t2 - t1)
                    est.stats(cid)
                    t_sim = est.time_s
                    sim_prefill = t_sim.get("prefill_cpu", 0.0) - t_sim0.get("prefill_cpu", 0.0)
                    sim_decode = (t_sim.get("decode_device", 0.0) - t_sim0.get("decode_device", 0.0)) / max(1, len(step_e))
                    rows += [dict(model=model, seq_len=n, rep=rep, metric="decode_step_s", mode="estimator",
                                  value=statistics.median(step_e)),
                             dict(model=model, seq_len=n, rep=rep, metric="decode_step_s", mode="plain",
                                  value=statistics.median(step_p)),
                             dict(model=model, seq_len=n, rep=rep, metric="prefill_similarity_s", mode="estimator",
                                  value=sim_prefill),
                             dict(model=model, seq_len=n, rep=rep, metric="decode_similarity_s", mode="estimator",
                                  value=sim_decode),
                             dict(model=model, seq_len=n, rep=rep, metric="map_bytes", mode="estimator",
                                  value=float(est.peak_map_bytes)),
                             dict(model=model, seq_len=n, rep=rep, metric="map_bytes", mode="all maps",
                                  value=float(adapter.n_layers * adapter.n_heads * n * n * 4))]
    return pd.DataFrame(rows)


def claim(df, cfg):
    """Median decode step with the estimator over without it, at the longest sequence."""
    d = df[(df.metric == "decode_step_s")]
    if d.empty:
        return None
    d = d[d.seq_len == d.seq_len.max()]
    t = d.groupby("mode").value.median()
    return float(t["estimator"] / t["plain"]) if {"estimator", "plain"} <= set(t.index) else None
