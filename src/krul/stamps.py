"""What produced a saved result, and whether a resumed run may reuse it.

A *stamp* is `<code version>-<digest of the settings>`: `evaluation.code_version()` (a digest of
krul's source, committed or not: what the git sha plus the uncommitted diff of src/ tell apart,
the same digest the figures' partial results and the full-load cache use) and a digest of a JSON
blob of everything else the result depends on (the resolved policy as the registry builds it,
the content of the records and conversations it read, the run's settings). The resumable logs
(`krul.calibrate`'s grid and curve points, `krul.bench`'s rows) stamp every result they write;
`resume` decides, from the saved results and the stamps the current run would write, which to
reuse:

* a result whose stamp equals the current one is reused;
* a result with another stamp is not (made by other code or settings): it is recomputed and the
  run says how many, once;
* a result without a stamp (made before stamps) is not reused either, unless the caller adopts
  unstamped results (`adopt_unstamped`, the `--adopt-unstamped` flags), which resumes those that
  still pass the caller's older field checks (`legacy_ok`) and says how many, once.

Knows nothing about models or files beyond reading JSON lines.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable, Mapping

# fields of a written record that say when and where it was made, not what it holds
VOLATILE_RECORD_FIELDS = ("runtime_s", "provenance")


def digest(obj, n: int = 16) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys; non-JSON values by `str`), first `n` hex digits."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def file_digest(path: str | Path | None, n: int = 16) -> str | None:
    """sha256 of a file's bytes (None for no path)."""
    if not path:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:n]


def record_digest(record: Mapping, volatile: Iterable[str] = VOLATILE_RECORD_FIELDS) -> str:
    """The digest of what a written record holds: every field but those that say when and where it
    was made (`runtime_s`, `provenance`), so re-writing the same results does not change it."""
    drop = set(volatile)
    return digest({k: v for k, v in record.items() if k not in drop})


def conversations_digest(conversations) -> str:
    """The digest of the conversations' content, in order (their `content_key`s: id + messages)."""
    return digest([c.content_key for c in conversations])


def stamp(settings: Mapping, code: str | None = None) -> str:
    """`<code version>-<digest of settings>`; `code` defaults to `evaluation.code_version()`."""
    if code is None:
        from krul.evaluation import code_version

        code = code_version()
    return f"{code}-{digest(dict(settings))}"


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a log, one a line; a line cut by an interruption (or not an object) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


@dataclass
class Resume:
    """What `resume` decided: `done` (key -> the saved result reused) and, by key, how many saved
    results were not reused because of another stamp (`stale`) or none (`unstamped`), and how many
    unstamped ones were adopted (`adopted`)."""

    done: dict = field(default_factory=dict)
    stale: int = 0
    unstamped: int = 0
    adopted: int = 0
    stale_keys: set = field(default_factory=set)

    def notices(self, where: str, what: str = "points", provenance: str | None = None) -> list[str]:
        """One line per kind of saved result not reused as is (empty when every one matched)."""
        out = []
        if self.stale:
            out.append(f"{self.stale} {what} were made by other code/settings: recomputing them (see {where})")
        if self.unstamped:
            out.append(f"{self.unstamped} {what} in {where} carry no stamp (made before stamps, by unknown "
                       f"code): recomputing them; --adopt-unstamped resumes them")
        if self.adopted:
            out.append(f"adopting {self.adopted} unstamped {what} from {where} (made before stamps; "
                       f"their record's provenance: git {provenance or 'unknown'})")
        return out


def resume(saved: Iterable[Mapping], expected: Mapping[Hashable, str], key_of: Callable[[Mapping], Hashable],
           legacy_ok: Callable[[Mapping], bool] = lambda _: True, adopt_unstamped: bool = False) -> Resume:
    """Which saved results the current run reuses.

    `expected`: key -> the stamp the current run gives the result at that key (its grid; saved
    results at other keys are not this run's business and are ignored). A saved result is reused
    when its stamp is the expected one (the last such line wins); one without a stamp only with
    `adopt_unstamped` and `legacy_ok(result)` (the older field checks). Counted by key: a key that
    has a matching result is never counted as stale, so a log that keeps its stale lines says so
    only until they are recomputed."""
    matched: dict = {}
    legacy: dict = {}
    other: set = set()
    for g in saved:
        try:
            key = key_of(g)
        except (KeyError, TypeError, ValueError):
            continue
        if key not in expected:
            continue
        s = g.get("stamp") or None  # a CSV's empty cell: no stamp
        if s is None:
            if legacy_ok(g):
                legacy[key] = g
        elif s == expected[key]:
            matched[key] = g
        else:
            other.add(key)
    out = Resume(done=dict(matched))
    if adopt_unstamped:
        for key, g in legacy.items():
            if key not in out.done:
                out.done[key] = g
                out.adopted += 1
    else:
        out.unstamped = len(set(legacy) - set(matched))
    out.stale_keys = other - set(out.done) - set(legacy)
    out.stale = len(out.stale_keys)
    return out
