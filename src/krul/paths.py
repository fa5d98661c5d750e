"""Every filesystem location krul uses, in one place.

`KRUL_HOME` (default `~/.cache/krul`) holds what setup prepares outside the repository: converted
models keyed by the sha256 of their source. The repository holds processed data (`data/processed/`,
git-ignored: ShareGPT's text is not ours to redistribute) and results (`results/<slug>/`).
This module knows nothing about models, data formats or experiments.
"""
from __future__ import annotations

import os
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
