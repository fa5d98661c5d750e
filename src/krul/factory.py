"""The engine the `krul` commands and `krul evaluate` share, built from command-line arguments.

Below both `cli` (which parses the arguments) and `evaluation` (which builds a reference engine too),
so that neither imports the other's module; `cli.build_engine` re-exports it.

The arguments are checked (`check_engine_args`) before anything heavy is imported or loaded: a bad
tier, policy, device, token count or store folder is a one-line `ConfigError` at once.
`store_dir` (`--store DIR`) roots the disk tier at DIR, which persists across processes: a later
process restores the conversations an earlier one stored there.
"""
from __future__ import annotations

import os
from pathlib import Path

# as `cli` does (evaluation got these by importing cli before the engine moved here)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TIERS = ("pageable", "pinned", "disk")  # = store.TIERS (a test checks; not imported: no torch yet)
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """An unusable engine setting (tier, policy, device, counts, store folder): says what to use."""


def _device(name: str) -> str:
    import torch

    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available on this machine; use --device cpu (or auto)")
    return name


def resolve_tier(args) -> str:
    """The tier: --tier, or disk when --store is given, else pageable."""
    tier = getattr(args, "tier", None)
    store_dir = getattr(args, "store", None)
    if tier is None:
        tier = "disk" if store_dir else "pageable"
    return tier


def check_engine_args(args, policy_name: str | None = None) -> str:
    """Validate the engine's arguments without loading anything heavy; returns the device name.
    Raises `ConfigError` (or the registries' `ModelError`/`PolicyError`) with a one-line message.
    The checks that need no import come first (a typo fails in milliseconds)."""
    tier = resolve_tier(args)
    if tier not in TIERS:
        raise ConfigError(f"unknown tier {tier!r}; use one of: {', '.join(TIERS)}")
    store_dir = getattr(args, "store", None)
    if store_dir is not None:
        if tier != "disk":
            raise ConfigError(f"--store keeps disk states; it needs --tier disk, not {tier!r}")
        path = Path(store_dir)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--store {store_dir}: exists and is not a folder")
        parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--store {store_dir}: {parent} is not writable")
    ratio = getattr(args, "recompute_ratio", None)
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"--recompute-ratio must be between 0 and 1, not {ratio}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    for opt in ("limit", "max_turns"):
        value = getattr(args, opt, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{opt.replace('_', '-')} must be at least 1, not {value}")
    if getattr(args, "history", "teacher") not in ("teacher", "model"):
        raise ConfigError(f"--history must be teacher or model, not {args.history!r}")
    if args.device not in DEVICES:
        raise ConfigError(f"unknown device {args.device!r}; use auto, cpu or cuda")
    if tier == "pinned" and args.device == "cpu":
        raise ConfigError("--tier pinned needs CUDA (page-locked memory serves GPU copies); "
                          "use --tier pageable or disk")

    from krul import models
    from krul.policies import POLICIES

    name = policy_name or args.policy
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    models.require_real(args.model)
    device = _device(args.device)
    if tier == "pinned" and device != "cuda":
        raise ConfigError("--tier pinned needs CUDA (page-locked memory serves GPU copies); "
                          "use --tier pageable or disk")
    return device


def _load_adapter(model_name: str, device: str):
    """The real model on `device` (fp32 on the CPU, bf16 on CUDA) as an adapter."""
    import torch

    from krul import models
    from krul.adapter import ModelAdapter

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, tokenizer = models.load_model(model_name, device=device, dtype=dtype)
    return ModelAdapter(model, tokenizer, model_name)


def build_engine(args, policy_name: str | None = None):
    """The engine the replay/chat/evaluate commands share (arguments checked before the model loads).
    `args.store` (optional): the folder of a persistent disk tier."""
    from krul.engine import Engine
    from krul.policies import get_policy
    from krul.store import make_store

    device = check_engine_args(args, policy_name)
    tier = resolve_tier(args)
    store = make_store(tier, getattr(args, "store", None))
    adapter = _load_adapter(args.model, device)
    policy = get_policy(policy_name or args.policy, getattr(args, "recompute_ratio", None), model=args.model)
    estimator = None
    if policy.needs_estimator:
        from krul.estimator import AttentionEstimator

        estimator = AttentionEstimator(adapter)
    rates = None
    if policy.split == "scheduler":
        from krul.profile import measure_rates

        rates = measure_rates(adapter, tier)
    return Engine(adapter, policy, store, max_new_tokens=args.max_new_tokens,
                  do_sample=args.sample, seed=args.seed, history=args.history,
                  estimator=estimator, rates=rates)
