"""The per-turn loop: restore -> prefill the new input -> decode (+ estimate) -> compress -> offload.

At user turn t the model conditions on exactly the tokens of
`apply_chat_template(messages_before_turn_t + [user_t], add_generation_prompt=True)`. The history
restored from the store is the previous turn's state; the new input is what follows it. Replay is
teacher-forced by default: after the model's own answer is generated (and reported), the real
assistant reply is prefilled over the history, which also gives its likelihood (`reply_nll`), and
that history is offloaded. With `history="model"` the generated answer becomes the history.

A stored state that cannot be restored (missing, damaged, of another model: any `StoreError` from
the store or the restore) never costs the conversation: the engine deletes it, recomputes the history
from the turn's messages (a first turn's full prefill), produces the turn normally, counts it in
`engine.fallbacks`, names the error in the turn's `fallback` field, and warns once per conversation.

Timing: a turn's `restore_s` (and `ttft_s`) covers everything between the store and a history in the
cache: for the disk tier, opening the state file (checksummed header, token ids) and streaming and
verifying its body (`restore.DiskSource`, as the bench does), not a `get` done before the clock.

Eviction (H2O, `policies.H2OPolicy`): a policy whose `scores_attention` is true gets every forward
of the turn run through `h2o.AttentionScores` (attention captured, summed per held token), seeded at
the restore with the scores the state carried; its offload evicts with them. A restored evicted
history holds fewer tokens than its positions: the new input and the decoded tokens get their true
positions (`ModelAdapter.forward_evicted`), and a turn whose re-tokenised boundary falls inside such a
history (it cannot be cropped there) recomputes the history as a fallback does.

The engine knows nothing about file paths, plotting or where conversations come from.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from dataclasses import dataclass, field

import torch

from krul.adapter import BufferCache, ModelAdapter
from krul.h2o import AttentionScores
from krul.policies import RestorePolicy, get_policy
from krul.pricing import full_storage_bytes, state_geometry, state_storage_bytes
from krul.restore import DiskSource, OpenedFile, restore_cache, restore_into
from krul.store import DiskStore, KVStore, MissingStateError, StoreError

log = logging.getLogger("krul.engine")


class StateFallbackWarning(UserWarning):
    """A conversation's stored state could not be restored; its history was recomputed instead."""


class EngineError(ValueError):
    """Bad input to the engine (empty message, too long, wrong roles): the message says what to do."""


MAX_ID_CHARS = 128
_ID_RE = re.compile(r"[A-Za-z0-9_.@#-]+")


def check_conversation_id(conversation_id) -> str:
    """The id itself if it is a usable conversation id (a store key and a file name part): 1 to 128
    of the characters A-Z a-z 0-9 _ . @ # - and not only dots; otherwise an `EngineError`."""
    if not isinstance(conversation_id, str):
        raise EngineError(f"conversation id {conversation_id!r} is not a string")
    shown = repr(conversation_id if len(conversation_id) <= 40 else conversation_id[:40] + "...")
    if not conversation_id or len(conversation_id) > MAX_ID_CHARS:
        raise EngineError(f"conversation id {shown} has {len(conversation_id)} characters; use 1 to "
                          f"{MAX_ID_CHARS}")
    if not _ID_RE.fullmatch(conversation_id) or set(conversation_id) == {"."}:
        raise EngineError(f"conversation id {shown} has characters other than letters, digits and "
                          "_ . @ # - (no spaces, path separators or control characters), or only dots")
    return conversation_id


@dataclass
class TurnResult:
    """One user turn's record (the row `krul replay --json` prints)."""

    conversation_id: str
    turn_idx: int
    policy: str
    history_tokens: int
    new_input_tokens: int
    generated_tokens: int
    ttft_s: float
    restore_s: float
    prefill_s: float
    stored_bytes: int  # bytes of the state restored for this turn (0 at the first turn)
    full_kv_bytes: int  # bytes the full KV of that history would take in the model's dtype
    offloaded_bytes: int  # bytes stored at the end of this turn
    generated_text: str
    generated_ids: list = field(default_factory=list)
    reply_tokens: int = 0
    reply_nll_sum: float = 0.0  # sum of -log p over the real reply's tokens (teacher-forced)
    reply_token_nll: list = field(default_factory=list)
    recompute_ratio: float = 0.0  # fraction of history token-layers recomputed in this restore
    loaded_full_bytes: int = 0  # full KV bytes of the token-layers that were loaded
    loaded_stored_bytes: int = 0  # stored bytes of those (compression alone)
    restore_report: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)  # the plan of the state restored for this turn
    conversation_key: str = ""  # `Conversation.content_key`: id + digest of the messages (cache keys)
    storage_bytes: int = 0  # the restored state's KV as a bf16 deployment stores it (`pricing.state_storage_bytes`)
    full_storage_bytes: int = 0  # the full KV of that history at 2 bytes per element (storage ratio = full / stored)
    fallback: str = ""  # the store error whose state this turn recomputed instead of restoring ("" if none)

    def to_json(self, full: bool = False) -> dict:
        row = dict(self.__dict__)
        if not full:
            for key in ("generated_ids", "reply_token_nll", "restore_report"):
                row.pop(key)
        return row


class _OpenedSource(DiskSource):
    """A state file already opened (inside the engine's timed region): `restore_into` streams its body."""

    def __init__(self, opened: OpenedFile):
        super().__init__(opened.path)
        self.opened = opened

    def open(self) -> OpenedFile:
        return self.opened


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Engine:
    """Multi-turn chat over one model, one restore policy and one store.

    Parameters
    ----------
    adapter : the model.
    policy : a `RestorePolicy` or its registry name.
    store : where offloaded states live (a tier).
    max_new_tokens : generated tokens per turn (the model's own answer).
    do_sample, temperature, seed : greedy by default; sampling uses a seeded local generator.
    history : "teacher" (real replies form the history) or "model" (the generated answers do).
    """

    def __init__(self, adapter: ModelAdapter, policy: RestorePolicy | str, store: KVStore,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 seed: int = 0, history: str = "teacher", estimator=None, rates=None):
        if adapter.tokenizer is None:
            raise EngineError("the engine needs a model with a tokenizer (a real model)")
        if history not in ("teacher", "model"):
            raise EngineError(f"history must be 'teacher' or 'model', not {history!r}")
        self.adapter = adapter
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.store = store
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.history = history
        self.estimator = estimator
        self.rates = rates
        self.scorer: AttentionScores | None = None  # H2O's attention sums (created when the policy needs them)
        if getattr(self.policy, "scores_attention", False):
            if estimator is not None:
                raise EngineError(f"policy {self.policy.name!r} captures attention for its own scores; run it "
                                  "without the attention estimator")
            if hasattr(store, "take_active"):
                raise EngineError(f"policy {self.policy.name!r} evicts at each offload, but a tiered store's active "
                                  "tier would keep the unevicted live cache; use a single tier (pageable, pinned, disk)")
        # conversation id -> per-turn SimilarityStats recorded by an earlier full-KV pass with the
        # estimator (calibration and figure runs reuse one base pass across policies)
        self.recorded_stats: dict | None = None
        # conversation id -> per-turn (n_layers, n_layers) svd losses of that turn's new segment,
        # recorded by the same pass (`compression.svd_pair_losses`; for pair_score="svd-loss")
        self.recorded_pair_losses: dict | None = None
        self._turn_idx = 0
        # states that could not be restored (the turn recomputed the history instead): the count, one
        # record per fallback (conversation, turn, error), and the conversations already warned about
        self.fallbacks = 0
        self.fallback_log: list[dict] = []
        self._warned: set[str] = set()
        tok = adapter.tokenizer
        eos = {tok.eos_token_id}
        gen_eos = getattr(adapter.model.generation_config, "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
        self.eos_ids = {i for i in eos | {im_end} if i is not None}

    # -- tokens ------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        out = self.adapter.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True)
        return list(out["input_ids"])

    def _check_length(self, conversation_id: str, n_tokens: int) -> None:
        limit = self.adapter.max_tokens
        if n_tokens + self.max_new_tokens > limit:
            raise EngineError(f"conversation {conversation_id!r} needs {n_tokens} tokens + "
                              f"{self.max_new_tokens} new, more than the model's context of {limit}; "
                              "use --limit/--max-turns or a shorter conversation")

    def similarity_stats(self, conversation_id: str):
        """The conversation's attention statistics so far: recorded, or from the live estimator."""
        if self.recorded_stats is not None:
            turns = self.recorded_stats.get(conversation_id)
            return turns[min(self._turn_idx, len(turns) - 1)] if turns else None
        return self.estimator.stats(conversation_id) if self.estimator is not None else None

    def recorded_losses(self, conversation_id: str):
        """This turn's recorded svd pair losses of the new segment, or None when none are held."""
        if self.recorded_pair_losses is None:
            return None
        turns = self.recorded_pair_losses.get(conversation_id)
        return turns[min(self._turn_idx, len(turns) - 1)] if turns else None

    def _scores(self) -> AttentionScores | None:
        """The attention sums the policy evicts with, or None when it needs none."""
        if not getattr(self.policy, "scores_attention", False):
            return None
        if self.scorer is None:
            self.scorer = AttentionScores(self.adapter)
        return self.scorer

    def model_work(self):
        """A context holding the model and the attention estimator for one piece of work (a
        forward, a restore's recompute, a read of the estimator's sums, a policy's validation
        forwards) against other engines sharing them (`krul.trace`'s sessions lock it); none here,
        where one engine owns them. A policy's plan and build outside those need none."""
        return contextlib.nullcontext()

    def _forward(self, conversation_id: str, input_ids: torch.Tensor, cache, logits_to_keep: int = 0):
        """A forward of new tokens; through the attention estimator when the policy needs one, or
        the attention scores (H2O) when it evicts with them."""
        scorer = self._scores()
        if scorer is not None:
            return scorer.forward(conversation_id, input_ids, cache, logits_to_keep=logits_to_keep)
        if self.estimator is not None:
            return self.estimator.forward(conversation_id, input_ids, cache, logits_to_keep=logits_to_keep)
        return self.adapter.forward(input_ids, cache, logits_to_keep=logits_to_keep)

    # -- the turn ----------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor) -> int:
        """logits: (vocab,) float32 -> one token id."""
        if not self.do_sample:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.cpu() / self.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    @torch.inference_mode()
    def turn(self, conversation_id: str, turn_idx: int, messages_before: list[dict], user: dict,
             reply: str | None = None) -> TurnResult:
        """Run one user turn; `reply` is the real assistant reply (teacher-forced history)."""
        check_conversation_id(conversation_id)
        if not str(user.get("content", "")).strip():
            raise EngineError(f"conversation {conversation_id!r} turn {turn_idx}: empty user message")
        adapter, device = self.adapter, self.adapter.device
        self._turn_idx = turn_idx
        ctx_ids = self.render(messages_before + [user], add_generation_prompt=True)
        self._check_length(conversation_id, len(ctx_ids))

        # 1. restore the history (a state that cannot be restored: recompute it, as a first turn does)
        expect_state = turn_idx > 0 and bool(messages_before)
        # the history this turn will keep, when it is known now (teacher-forced): sizes the cache
        teacher = self.history == "teacher" and reply is not None
        end_ids = (self.render(messages_before + [user, {"role": "assistant", "content": reply}],
                               add_generation_prompt=False) if teacher else None)
        capacity = max(len(ctx_ids) + self.max_new_tokens, len(end_ids) if end_ids else 0)
        fallback = ""
        t_start = time.perf_counter()
        try:
            state, cache, report = self._restore(conversation_id, turn_idx, capacity, expect_state)
        except StoreError as exc:
            fallback = self._fall_back(conversation_id, turn_idx, exc)
            state, cache, report = None, None, None
        if state is not None:
            hist = state.token_ids.tolist()
            keep = min(_common_prefix(hist, ctx_ids), len(ctx_ids) - 1)
            if keep < len(hist) and getattr(cache, "evicted", False):  # an evicted history cannot be cropped: recompute it
                exc = StoreError(f"the restored history of {len(hist)} tokens holds evicted positions and the "
                                 f"turn's tokens leave it at {keep}; recomputed from the messages")
                fallback = self._fall_back(conversation_id, turn_idx, exc)
                state, cache, report, keep = None, BufferCache.for_adapter(adapter, capacity, grow=True), None, 0
            elif keep < len(hist):  # re-tokenisation changed the boundary: drop the tail, exact anyway
                adapter.crop(cache, keep)
        else:
            cache, keep = BufferCache.for_adapter(adapter, capacity, grow=True), 0
        scorer = self._scores()
        if scorer is not None:  # the sums start from what the restored (evicted) history carried
            scorer.begin(conversation_id, cache)
        restore_s = time.perf_counter() - t_start

        # 2. prefill the new input, first token
        new_ids = torch.tensor([ctx_ids[keep:]], dtype=torch.long)
        t_prefill = time.perf_counter()
        logits = self._forward(conversation_id, new_ids, cache, logits_to_keep=1)[0, -1]
        first = self._sample(logits)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        prefill_s, ttft_s = now - t_prefill, now - t_start
        last_ctx_logits = logits

        # 3. decode the model's own answer
        generated = [first]
        while len(generated) < self.max_new_tokens and generated[-1] not in self.eos_ids:
            step = self._forward(conversation_id, torch.tensor([[generated[-1]]]), cache,
                                 logits_to_keep=1)[0, -1]
            generated.append(self._sample(step))
        text = adapter.tokenizer.decode(generated, skip_special_tokens=True)

        # 4. the history to keep: the real reply (teacher-forced) or the generated answer
        adapter.crop(cache, len(ctx_ids))
        if end_ids is None:
            end_ids = self.render(messages_before + [user, {"role": "assistant", "content": text}],
                                  add_generation_prompt=False)
        keep2 = _common_prefix(ctx_ids, end_ids)
        if keep2 < len(ctx_ids):
            adapter.crop(cache, keep2)
        tail = torch.tensor([end_ids[keep2:]], dtype=torch.long)
        nll_sum, token_nll = 0.0, []
        if tail.shape[1]:
            tail_logits = self._forward(conversation_id, tail, cache)[0]
            if teacher and keep2 == len(ctx_ids):
                # position i's logits predict token i+1; the first reply token is predicted by the
                # last context position (from step 2)
                preds = torch.cat([last_ctx_logits[None].to(tail_logits.device), tail_logits[:-1]])
                logp = torch.log_softmax(preds.float(), dim=-1)
                token_nll = (-logp.gather(1, tail[0, :, None].to(logp.device))[:, 0]).tolist()
                nll_sum = float(sum(token_nll))

        # 5. compress and offload (onto the previous state's stored items: read whole now for a disk
        # state, which was streamed into the cache above; outside the timed region)
        full_kv_bytes = len(ctx_ids[:keep]) * adapter.n_layers * adapter.layer_kv_bytes_per_token()
        if state is not None and isinstance(self.store, DiskStore):
            try:
                state = self.store.get(conversation_id)
            except StoreError as exc:  # changed on the disk since the restore: store the live history anew
                fallback = self._fall_back(conversation_id, turn_idx, exc, before_turn=False)
                state = None
        offloaded = self.policy.offload(self, conversation_id, end_ids, cache, state)
        if scorer is not None:
            scorer.reset(conversation_id)
        if offloaded and hasattr(self.store, "keep_active"):  # store.TieredStore: the live cache may stay
            self.store.keep_active(conversation_id, cache)  # where the model runs (its active tier)
        del cache

        restored_plan = dict(state.meta.get("plan", {})) if state is not None else {}
        if state is not None and "validation" in state.meta:  # which candidate plan was stored, and why
            restored_plan["validation"] = state.meta["validation"]
        loaded_full, loaded_stored, rec_ratio, storage, full_storage = 0, 0, 0.0, 0, 0
        if state is not None:
            heads, head_dim = state_geometry(state)
            storage = state_storage_bytes(state)
            full_storage = full_storage_bytes(state.n_tokens, state.n_layers, heads, head_dim)
            n, lkb = state.n_tokens, adapter.layer_kv_bytes_per_token()
            loaded_full = sum(n - l for l in state.recompute_lengths) * lkb
            loaded_stored = state.kv_bytes()
            rec_ratio = sum(state.recompute_lengths) / max(1, n * state.n_layers)
        return TurnResult(
            conversation_id=conversation_id, turn_idx=turn_idx, policy=self.policy.name,
            history_tokens=keep, new_input_tokens=len(ctx_ids) - keep,
            generated_tokens=len(generated), ttft_s=ttft_s, restore_s=restore_s, prefill_s=prefill_s,
            stored_bytes=state.nbytes() if state is not None else 0, full_kv_bytes=full_kv_bytes,
            offloaded_bytes=offloaded, generated_text=text, generated_ids=generated,
            reply_tokens=len(token_nll), reply_nll_sum=nll_sum, reply_token_nll=token_nll,
            recompute_ratio=rec_ratio, loaded_full_bytes=loaded_full, loaded_stored_bytes=loaded_stored,
            restore_report=report.to_dict() if report is not None else {}, plan=restored_plan,
            fallback=fallback, storage_bytes=storage, full_storage_bytes=full_storage)

    def _restore(self, conversation_id: str, turn_idx: int, capacity: int, expect_state: bool):
        """(state, cache, report) of the conversation's stored history, or (None, None, None) when
        nothing is stored and nothing is expected. Called inside the turn's timed region: for the disk
        tier the state file is opened (checksummed header and token ids) and its body streamed and
        verified into the cache here (`DiskSource`), so `restore_s` includes reading the file.
        Raises `StoreError` (missing when expected, damaged, another model's): the caller recomputes."""
        adapter, store = self.adapter, self.store
        kept = store.take_active(conversation_id) if hasattr(store, "take_active") else None
        if kept is not None:  # store.TieredStore's active tier kept the live cache: nothing to restore
            state, cache = kept
            return state, cache, None
        if isinstance(store, DiskStore):
            path = store.path(conversation_id)
            if not expect_state and not path.exists():
                return None, None, None
            t0 = time.perf_counter()
            opened = DiskSource(path).open()  # MissingStateError / CorruptStateError
            open_s = time.perf_counter() - t0
            state = opened.state  # payloads still on the disk (`FilePayload`s)
            cache = BufferCache.for_adapter(adapter, max(capacity, state.n_tokens), grow=True)
            if adapter.device.type == "cuda":
                torch.cuda.synchronize(adapter.device)
            report = restore_into(adapter, _OpenedSource(opened), cache)
            report.fetch_s += open_s
            return state, cache, report
        if conversation_id not in store:
            if expect_state:
                raise MissingStateError(f"conversation {conversation_id!r}: no stored state for turn "
                                        f"{turn_idx} in the {store.tier} tier")
            return None, None, None
        state = store.get(conversation_id)
        # the same restore the bench times: into buffers the new input and decode write in place
        cache, report = restore_cache(adapter, state, extra_tokens=max(0, capacity - state.n_tokens), grow=True)
        return state, cache, report

    def _fall_back(self, conversation_id: str, turn_idx: int, exc: StoreError,
                   before_turn: bool = True) -> str:
        """Record a state that could not be restored, delete it, warn once per conversation; the turn
        then recomputes the history from its messages. Returns the error's one-line description."""
        what = f"{type(exc).__name__}: {exc}"
        self.fallbacks += 1
        self.fallback_log.append({"conversation_id": conversation_id, "turn_idx": turn_idx, "error": what})
        try:
            self.store.delete(conversation_id)
        except (OSError, StoreError) as err:
            log.warning("could not delete the state of conversation %r: %s", conversation_id, err)
        if before_turn and self.estimator is not None:  # its sums restart with the recomputed history
            self.estimator.reset(conversation_id)
        if conversation_id not in self._warned:
            self._warned.add(conversation_id)
            warnings.warn(f"krul: conversation {conversation_id!r} turn {turn_idx}: its stored state could "
                          f"not be restored ({what}); deleted it and recomputed the history from the "
                          "messages (the turn is exact; only its time is a full recompute's)",
                          StateFallbackWarning, stacklevel=3)
        return what

    def replay(self, conversation, max_turns: int | None = None, keep_state: bool | None = None):
        """Yield a `TurnResult` per user turn of a `data.Conversation`, from its first turn (a state
        stored earlier under its id is dropped first). The last turn's state is dropped after, unless
        `keep_state` (default: kept when the store persists, a `DiskStore` on a given folder, so that
        another engine or process can continue the conversation)."""
        if keep_state is None:
            keep_state = isinstance(self.store, DiskStore) and not getattr(self.store, "ephemeral", True)
        check_conversation_id(conversation.id)
        messages = conversation.messages
        user_idx = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if max_turns is not None:
            user_idx = user_idx[:max_turns]
        self.store.delete(conversation.id)
        if self.estimator is not None:
            self.estimator.reset(conversation.id)
        history: list[dict] = [m for m in messages[:user_idx[0]]] if user_idx else []
        try:
            for turn_idx, i in enumerate(user_idx):
                nxt = messages[i + 1] if i + 1 < len(messages) else None
                reply = nxt["content"] if nxt is not None and nxt["role"] == "assistant" else None
                result = self.turn(conversation.id, turn_idx, history, messages[i], reply)
                result.conversation_key = conversation.content_key
                yield result
                content = reply if (self.history == "teacher" and reply is not None) else result.generated_text
                history = history + [messages[i], {"role": "assistant", "content": content}]
        finally:  # the estimator's stats stay readable until the next replay of this id
            if not keep_state:
                self.store.delete(conversation.id)
