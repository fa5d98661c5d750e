"""Where the dev calibration records live, and reading them.

`python -m krul.calibrate` writes `experiments/calibration/<model>.json` (and `<model>.<suffix>.json`
for the policies calibrated by a record of their own); `policies.calibrated` reads them. Both import
this module, so the policies never import the calibration code that sits above the engine.
This module knows nothing about policies beyond their names.
"""
from __future__ import annotations

import json
from pathlib import Path

from krul import paths

# policies calibrated by a record of their own, `<model>.<suffix>.json` (the rest read `<model>.json`)
OWN_CALIBRATION = {"krul-svd-loss": "svd-loss", "krul-fix-svd-loss": "svd-loss"}


def calibration_path(model: str, policy: str | None = None) -> Path:
    """The dev calibration record `policy` (default: the paper's family) of `model` reads."""
    suffix = OWN_CALIBRATION.get(policy or "")
    return paths.experiments_dir() / "calibration" / (f"{model}.{suffix}.json" if suffix else f"{model}.json")


def load_calibration(model: str, policy: str | None = None) -> dict | None:
    path = calibration_path(model, policy)
    return json.loads(path.read_text()) if path.exists() else None
