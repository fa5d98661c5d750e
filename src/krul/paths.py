"""Every filesystem location krul uses, in one place.

`KRUL_HOME` (default `~/.cache/krul`) holds what setup prepares outside the repository: converted
models keyed by the sha256 of their source. The repository holds processed data (`data/processed/`,
git-ignored: ShareGPT's text is not ours to redistribute) and results (`results/<slug>/`).
It also says which commit the repository is at (`git_state`, for results' provenance).
This module knows nothing about models, data formats or experiments.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def krul_home() -> Path:
    """Root of the prepared-artifact cache (`$KRUL_HOME`, default `~/.cache/krul`)."""
    return Path(os.environ.get("KRUL_HOME", Path.home() / ".cache" / "krul")).expanduser()


def models_dir() -> Path:
    return krul_home() / "models"


def data_dir() -> Path:
    """Processed data folder: `$KRUL_DATA`, default `<repo>/data/processed`."""
    return Path(os.environ.get("KRUL_DATA", REPO_ROOT / "data" / "processed"))


def results_dir() -> Path:
    return Path(os.environ.get("KRUL_RESULTS", REPO_ROOT / "results"))


def experiments_dir() -> Path:
    return REPO_ROOT / "experiments"


def git(*args: str) -> str | None:
    """`git ARGS` in the repository: its stripped stdout, None when empty or git cannot run."""
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):  # no git, not a repository: provenance says so
        return None


def git_state() -> dict:
    """{"git_sha", "git_dirty"} of the repository: dirty = tracked changes outside results/ (a run
    writing into a committed reference folder does not change what ran)."""
    return {"git_sha": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"))}
