"""The engine the `krul` commands and `krul evaluate` share, built from command-line arguments.

Below both `cli` (which parses the arguments) and `evaluation` (which builds a reference engine too),
so that neither imports the other's module; `cli.build_engine` re-exports it.

The arguments are checked (`check_engine_args`) before anything heavy is imported or loaded: a bad
tier, policy, device, token count or store folder is a one-line `ConfigError` at once.
`store_dir` (`--store DIR`) roots the disk tier at DIR, which persists across processes: a later
process restores the conversations an earlier one stored there.

The commands show their work through `TurnPhases` and `replay_all`: the phases of each turn (restoring,
prefilling, decoding, scoring pairs, compressing, ...) observed from outside the engine, drawn as tqdm
bars on stderr (one over the conversations, one over the turns of the current one) and timed. The
engine knows nothing of this; the wrapping is undone when the `with` block ends.
"""
from __future__ import annotations

import copy
import os
import sys
import time
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


def note(message: str, enabled: bool = True) -> None:
    """One line of what a command is doing on stderr (`krul: ...`), unless disabled (--no-progress)."""
    if enabled:
        print(f"krul: {message}", file=sys.stderr, flush=True)


def build_engine(args, policy_name: str | None = None, adapter=None):
    """The engine the replay/chat/evaluate commands share (arguments checked before the model loads).
    `args.store` (optional): the folder of a persistent disk tier. `adapter`: a model already loaded
    (a second engine on the same model, e.g. `krul evaluate`'s full-load reference), else loaded here.
    Says on stderr what takes seconds (loading the model, measuring restore rates) unless
    `args.no_progress`."""
    from krul.engine import Engine
    from krul.policies import get_policy
    from krul.store import make_store

    device = check_engine_args(args, policy_name)
    tier = resolve_tier(args)
    show = not getattr(args, "no_progress", False)
    store = make_store(tier, getattr(args, "store", None))
    if adapter is None:
        note(f"loading {args.model} on {device}", show)
        adapter = _load_adapter(args.model, device)
    policy = get_policy(policy_name or args.policy, getattr(args, "recompute_ratio", None), model=args.model)
    estimator = None
    if policy.needs_estimator:
        from krul.estimator import AttentionEstimator

        estimator = AttentionEstimator(adapter)
    rates = None
    if policy.split == "scheduler":
        from krul.profile import measure_rates

        note(f"measuring the {tier} tier's restore rates for {policy.name}'s scheduler", show)
        rates = measure_rates(adapter, tier)
    return Engine(adapter, policy, store, max_new_tokens=args.max_new_tokens,
                  do_sample=args.sample, seed=args.seed, history=args.history,
                  estimator=estimator, rates=rates)


# -- showing the work: the phases of a turn, observed from outside the engine --------------------

# what each wrapped method is doing, as the bars name it
_POLICY_PHASES = {"offload": "offloading", "pair_losses": "scoring pairs", "build": "compressing",
                  "validated": "validating"}
# every phase, in a turn's order ("other": the rest of the turn)
PHASES = ("restoring", "prefilling", "decoding", "prefilling reply", "offloading", "scoring pairs", "compressing",
          "packing", "validating", "storing", "other")


class TurnPhases:
    """The phases of an engine's turns, observed from outside it, for progress bars and timings.

    Inside `with TurnPhases(engine, on_phase, on_token):` bound methods of this engine's own objects
    are shadowed by timed wrappers (instance attributes; no class is touched, so other engines are
    not): the engine's `turn`, `_restore`, `_forward` and `_sample`; the policy's `offload`,
    `pair_losses`, `build` and `validated` (on a copy: the policy is frozen and may be the registry's
    own); the store's `put`. `finally` puts everything back. The engine's results are unchanged.

    Phases: restoring, prefilling (the new input), decoding, prefilling reply (the real reply, or the
    generated one, read over the history to keep), offloading (the plan, outside its scoring),
    scoring pairs, compressing (building the state; "packing" for a policy that compresses nothing),
    validating, storing; "other" is the rest of the turn (tokenizing,
    sampling, bookkeeping). A phase nested in another is charged alone (compressing inside
    validating counts as compressing).

    on_phase(phase, phases) : called at each change of the innermost phase (not for "other").
    on_token(token_id, phases) : called with each generated token as it is sampled.
    `seconds`: phase -> seconds of the current turn; `last`: those of the last finished turn;
    `n_generated`: tokens generated in the current turn.
    """

    def __init__(self, engine, on_phase=None, on_token=None):
        self.engine = engine
        self.on_phase = on_phase
        self.on_token = on_token
        self.stack: list[str] = []
        self.seconds: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.n_generated = 0
        self._t = 0.0
        self._patched: list[tuple] = []
        self._policy = None

    @property
    def phase(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def _charge(self) -> None:
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] = self.seconds.get(self.stack[-1], 0.0) + now - self._t
        self._t = now

    def _enter(self, phase: str) -> None:
        self._charge()
        self.stack.append(phase)
        if self.on_phase is not None and phase != "other":
            self.on_phase(phase, self)

    def _exit(self) -> None:
        self._charge()
        self.stack.pop()
        if self.on_phase is not None and self.phase not in (None, "other"):
            self.on_phase(self.phase, self)

    def _timed(self, fn, phase_of):
        def wrapped(*args, **kwargs):
            phase = phase_of(*args, **kwargs) if callable(phase_of) else phase_of
            self._enter(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()
        return wrapped

    def _patch(self, obj, name: str, new) -> None:
        had = name in vars(obj)
        self._patched.append((obj, name, had, vars(obj).get(name)))
        object.__setattr__(obj, name, new)  # object's: the policy is a frozen dataclass

    # the phase of a forward: the new input before the first token, a decode step (one token, last
    # logits) after it, else the reply read over the history
    def _forward_phase(self, conversation_id, input_ids, cache, logits_to_keep: int = 0) -> str:
        if self.n_generated == 0:
            return "prefilling"
        return "decoding" if logits_to_keep == 1 and input_ids.shape[-1] == 1 else "prefilling reply"

    def __enter__(self) -> "TurnPhases":
        engine = self.engine
        turn = engine.turn

        def observed_turn(*args, **kwargs):
            self.seconds, self.n_generated, self.stack = {}, 0, []
            self._enter("other")
            try:
                return turn(*args, **kwargs)
            finally:
                self._exit()
                self.last = dict(self.seconds)

        sample = engine._sample

        def observed_sample(logits):
            token = sample(logits)
            self.n_generated += 1
            if self.on_token is not None:
                self.on_token(token, self)
            return token

        self._patch(engine, "turn", observed_turn)
        self._patch(engine, "_restore", self._timed(engine._restore, "restoring"))
        self._patch(engine, "_forward", self._timed(engine._forward, self._forward_phase))
        self._patch(engine, "_sample", observed_sample)
        self._policy = engine.policy
        policy = copy.copy(engine.policy)
        compresses = policy.selector is not None or bool(policy.compress_params.get("codec"))
        for name, phase in _POLICY_PHASES.items():
            if name == "build" and not compresses:
                phase = "packing"  # the state as it is (full-load, recompute splits): nothing to compress
            self._patch(policy, name, self._timed(getattr(policy, name), phase))
        engine.policy = policy
        self._patch(engine.store, "put", self._timed(engine.store.put, "storing"))
        return self

    def __exit__(self, *exc) -> None:
        self.engine.policy = self._policy
        for obj, name, had, old in reversed(self._patched):
            if had:
                object.__setattr__(obj, name, old)
            else:
                object.__delattr__(obj, name)
        self._patched = []


def n_turns(conversation, max_turns: int | None = None) -> int:
    """The user turns `Engine.replay` runs of `conversation`."""
    n = len(conversation.user_turn_indices())
    return n if max_turns is None else min(n, max_turns)


class ReplayBars:
    """tqdm bars on stderr: one over the conversations, one over the turns of the current
    conversation showing the turn's phase (`decoding 12/32`), refreshed at each phase change and at
    most every `min_s` seconds while decoding. `write(line)` prints a line (stdout) above the bars."""

    def __init__(self, n_conversations: int, desc: str, enabled: bool = True, min_s: float = 0.2):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.enabled = enabled
        self.min_s = min_s
        self.outer = tqdm(total=n_conversations, desc=desc, unit="conv", disable=not enabled,
                          file=sys.stderr, dynamic_ncols=True, position=0)
        self.inner = None
        self._shown = ("", 0.0)

    def start(self, conversation_id: str, total_turns: int) -> None:
        self.close_inner()
        self.inner = self._tqdm(total=total_turns, desc=f"  {conversation_id}", unit="turn", leave=False,
                                disable=not self.enabled, file=sys.stderr, dynamic_ncols=True, position=1)

    def on_phase(self, phase: str, phases: TurnPhases) -> None:
        if self.inner is None or not self.enabled:
            return
        now = time.perf_counter()
        if phase == "decoding":
            if self._shown[0] == "decoding" and now - self._shown[1] < self.min_s:
                return
            label = f"decoding {phases.n_generated}/{phases.engine.max_new_tokens}"
        else:
            label = phase
        self._shown = (phase, now)
        self.inner.set_postfix_str(label, refresh=True)

    def turn_done(self) -> None:
        if self.inner is not None:
            self.inner.update(1)

    def conversation_done(self) -> None:
        self.close_inner()
        self.outer.update(1)

    def write(self, line: str) -> None:
        if self.enabled:
            self._tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def close_inner(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None

    def close(self) -> None:
        self.close_inner()
        self.outer.close()


def replay_all(engine, conversations, max_turns: int | None = None, desc: str | None = None,
               progress: bool = True, bars: ReplayBars | None = None):
    """Replay every conversation turn by turn with its progress on stderr.

    Yields (conversation, TurnResult, phase_s), phase_s: {phase: seconds} of that turn (`TurnPhases`).
    `bars`: bars to draw on (their `write` prints rows above them); else made here, shown unless
    `progress` is False, and closed at the end.
    """
    own = bars is None
    if own:
        bars = ReplayBars(len(conversations), desc or engine.policy.name, enabled=progress)
    try:
        with TurnPhases(engine, on_phase=bars.on_phase) as phases:
            for conv in conversations:
                bars.start(conv.id, n_turns(conv, max_turns))
                for result in engine.replay(conv, max_turns=max_turns):
                    bars.turn_done()
                    yield conv, result, {k: round(v, 6) for k, v in phases.last.items()}
                bars.conversation_done()
    finally:
        if own:
            bars.close()
