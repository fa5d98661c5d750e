"""Benchmark of scoring every layer pair by svd loss (compression.svd_pair_losses) on the CPU.

Usage: python experiments/calibration/bench_pair_losses.py [OUT.json]
Random KV of the two models' shapes (smollm2-135m: 30 layers, 3 KV heads; qwen2.5-coder-0.5b: 24
layers, 2 KV heads; head_dim 64), segments of 128/512/1024 tokens, rank ratio 0.47; exact basis
vs half the axes (the policies' loss_basis 0.5), eigenvalues only ("joint") vs the per-layer errors
the weighted score needs ("none"). One warm-up, then 3 timed repeats: median and min/max seconds.
The scoring runs at offload, off the TTFT path; this says what it costs there.
"""
import json, platform, statistics, sys, time

import torch

from krul.compression import svd_pair_losses

rows = []
for model, n_layers, heads in (("smollm2-135m", 30, 3), ("qwen2.5-coder-0.5b", 24, 2)):
    w = heads * 64
    for tokens in (128, 512, 1024):
        g = torch.Generator().manual_seed(0)
        seg = [(torch.randn(1, heads, tokens, 64, generator=g), torch.randn(1, heads, tokens, 64, generator=g))
               for _ in range(n_layers)]
        for basis in (None, w // 2):
            for reduce in ("joint", "none"):
                run = lambda: svd_pair_losses(seg, rank_ratio=0.47, basis_dim=basis, reduce=reduce)
                run()
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t)
                row = {"model": model, "tokens": tokens, "basis_dim": basis or w, "reduce": reduce,
                       "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
                rows.append(row)
                print(json.dumps(row), flush=True)
rec = {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
       "machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()}
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(json.dumps(rec, indent=1))
