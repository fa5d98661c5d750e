"""The conda environment mirrors the pip requirements."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _names(lines):
    out = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            out.add(re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return out


def test_environment_yml_matches_requirements():
    """environment.yml's pip list names exactly the packages of requirements*.txt."""
    pip_names = _names((ROOT / "requirements.txt").read_text().splitlines()) | \
        _names((ROOT / "requirements-nodeps.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _names(pip_section) == pip_names


def test_torch_pinned_everywhere():
    """torch is pinned to 2.13.0 in constraints.txt and environment.yml (other builds download GBs)."""
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in (ROOT / "environment.yml").read_text()
