"""The engine the `krul` commands and `krul evaluate` share, built from command-line arguments.

Below both `cli` (which parses the arguments) and `evaluation` (which builds a reference engine too),
so that neither imports the other's module; `cli.build_engine` re-exports it.
"""
from __future__ import annotations

import os

# as `cli` does (evaluation got these by importing cli before the engine moved here)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("krul: --device cuda but CUDA is not available on this machine; "
                         "use --device cpu (or auto)")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"krul: unknown device {name!r}; use auto, cpu or cuda")
    return name


def build_engine(args, policy_name: str | None = None):
    """The engine the replay/chat/evaluate commands share."""
    import torch

    from krul import models
    from krul.adapter import ModelAdapter
    from krul.engine import Engine
    from krul.policies import get_policy
    from krul.store import make_store

    device = _device(args.device)
    if args.tier == "pinned" and device != "cuda":
        raise SystemExit("krul: --tier pinned needs CUDA (page-locked memory serves GPU copies); "
                         "use --tier pageable or disk")
    models.require_real(args.model)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, tokenizer = models.load_model(args.model, device=device, dtype=dtype)
    adapter = ModelAdapter(model, tokenizer, args.model)
    policy = get_policy(policy_name or args.policy, getattr(args, "recompute_ratio", None), model=args.model)
    estimator = None
    if policy.needs_estimator:
        from krul.estimator import AttentionEstimator

        estimator = AttentionEstimator(adapter)
    rates = None
    if policy.split == "scheduler":
        from krul.profile import measure_rates

        rates = measure_rates(adapter, args.tier)
    return Engine(adapter, policy, make_store(args.tier), max_new_tokens=args.max_new_tokens,
                  do_sample=args.sample, seed=args.seed, history=args.history,
                  estimator=estimator, rates=rates)
