"""Notebook tier: every figure notebook is thin and runs end to end under papermill (profile=smoke)."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("fig*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_every_figure_has_config_and_notebook():
    """Each experiments/<slug>.yaml has notebooks/<slug>.ipynb and the other way round."""
    configs = {p.stem for p in (ROOT / "experiments").glob("fig*.yaml")}
    assert configs == set(IDS) and configs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_thin(path):
    """One `parameters`-tagged cell of scalar or None defaults (lists live in the YAML); no function or
    class definitions."""
    cells = _cells(path)
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters`"
    tree = ast.parse("".join(tagged[0]["source"]))
    assert all(isinstance(n, ast.AnnAssign) and isinstance(n.value, ast.Constant) for n in tree.body), \
        "each parameter is `name: type = scalar  # what it is`"
    for c in cells:
        if c["cell_type"] == "code":
            code = "".join(c["source"])
            assert "def " not in code and "class " not in code and "lambda" not in code
    assert cells[0]["cell_type"] == "markdown"


@pytest.mark.parametrize("slug", IDS)
def test_parameters_are_the_yaml_settings(slug):
    """The parameters papermill reads (`--help-notebook`) are profile, device, out_dir, seed and every
    setting of the YAML, each with a type and a help text; the YAML's settings default to None."""
    import papermill as pm

    from krul.experiments import RUN_PARAMETERS, settings

    params = pm.inspect_notebook(str(ROOT / "notebooks" / f"{slug}.ipynb"))
    assert list(params) == [*RUN_PARAMETERS, *settings(slug)]
    for name, p in params.items():
        assert p["inferred_type_name"] != "None" and p["help"], f"{name}: declare `name: type = ...  # help`"
        if name not in RUN_PARAMETERS:
            assert p["default"] == "None", f"{name}: None means the profile's value"


@pytest.mark.parametrize("slug", IDS)
def test_notebook_states_the_yaml_claim(slug):
    """The notebook's first cell quotes its YAML's claim statement and predicate."""
    import yaml

    claim = yaml.safe_load((ROOT / "experiments" / f"{slug}.yaml").read_text())["claim"]
    md = "".join(_cells(ROOT / "notebooks" / f"{slug}.ipynb")[0]["source"])
    assert claim["statement"].rstrip(".") in md
    assert f"`{claim['metric']} {claim['op']} {claim['threshold']}` (tolerance {claim['tolerance']})" in md


@pytest.mark.parametrize("slug", IDS)
def test_config_profiles_load(slug):
    """Every profile of every figure's YAML resolves, and its claim metric is known."""
    from krul.experiments import CLAIM_METRICS, PROFILES, load_config

    for profile in PROFILES:
        cfg = load_config(slug, profile, device="cpu")
        assert cfg["slug"] == slug and cfg["profile"] == profile
        assert cfg["claim"]["metric"] in CLAIM_METRICS
        assert cfg["claim"]["op"] in (">=", "<=")


@pytest.mark.notebooks
@pytest.mark.parametrize("slug", IDS)
def test_notebook_smoke(slug, tmp_path):
    """The notebook executes with profile=smoke and writes data, config, env, figure and a verdict."""
    from krul.experiments import run_notebook

    os.environ["HF_HUB_OFFLINE"] = "1"
    out = run_notebook(slug, profile="smoke", device="cpu", out=str(tmp_path), log_output=False)
    for name in ("data.csv", "config.yaml", "env.json", f"{slug}.png", f"{slug}.pdf", f"{slug}.ipynb"):
        assert (out / name).is_file(), f"{name} missing"
    env = json.loads((out / "env.json").read_text())
    assert env["verdict"]["verdict"] in ("smoke run: not a measurement", "not measured")  # smoke never judges
    assert env["device"] == "cpu" and "torch" in env["versions"]


@pytest.mark.notebooks
def test_papermill_parameters_override_the_yaml(tmp_path):
    """`papermill -p models ... -p policies ...` (strings, as the command line passes them) run the
    figure on exactly those; the saved config holds them and records the overrides."""
    import pandas as pd
    import yaml

    from krul.experiments import KERNEL_NAME, ensure_kernel

    ensure_kernel()
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "fig3_storage.ipynb"),
           str(tmp_path / "fig3_storage.ipynb"), "-k", KERNEL_NAME, "--cwd", str(ROOT),
           "-p", "profile", "smoke", "-p", "device", "cpu", "-p", "out_dir", str(out),
           "-p", "models", '["smollm2-135m"]', "-p", "policies", '["full-load", "krul"]']
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    df = pd.read_csv(out / "data.csv")
    assert set(df.policy) == {"full-load", "krul"} and set(df.model) == {"smollm2-135m"}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["policies"] == ["full-load", "krul"] and cfg["models"] == ["smollm2-135m"]
    assert cfg["overrides"] == {"models": ["smollm2-135m"], "policies": ["full-load", "krul"]}


@pytest.mark.notebooks
def test_unknown_papermill_parameter_fails(tmp_path):
    """A parameter the notebook does not declare (papermill itself only warns) stops the run with a
    message that lists the known ones."""
    from krul.experiments import KERNEL_NAME, ensure_kernel

    ensure_kernel()
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "fig3_storage.ipynb"),
           str(tmp_path / "fig3_storage.ipynb"), "-k", KERNEL_NAME, "--cwd", str(ROOT),
           "-p", "profile", "smoke", "-p", "device", "cpu", "-p", "out_dir", str(tmp_path / "run"),
           "-p", "n_convs", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert re.search(r"unknown parameter\(s\) 'n_convs'; known: profile, device, out_dir, seed, models, "
                     r"policies, tier, conversations", done.stdout + done.stderr)
    assert not (tmp_path / "run" / "data.csv").exists()


@pytest.mark.notebooks
def test_a_headless_run_through_the_krul_kernel_writes_an_interactive_folder(tmp_path):
    """A notebook run without `out_dir` (JupyterLab's Run All, here executed headless through the
    `krul` kernel) writes to a fresh `results/<slug>/interactive-<time>` folder, never to
    `make reproduce`'s `cpu-default` or a reference."""
    from krul.experiments import KERNEL_NAME, ensure_kernel

    ensure_kernel()
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "fig3_storage.ipynb"),
           str(tmp_path / "fig3_storage.ipynb"), "-k", KERNEL_NAME, "--cwd", str(ROOT),
           "-p", "profile", "smoke", "-p", "device", "cpu",
           "-p", "models", '["smollm2-135m"]', "-p", "policies", '["full-load"]']
    subprocess.run(cmd, check=True, capture_output=True, text=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "KRUL_RESULTS": str(results)})
    runs = sorted((results / "fig3_storage").iterdir())
    assert [r.name.startswith("interactive-") for r in runs] == [True], runs
    assert (runs[0] / "data.csv").is_file() and (runs[0] / "config.yaml").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.notebooks
def test_make_lab_starts_and_stops(tmp_path):
    """`make lab` (as root too: the Makefile adds --allow-root) serves JupyterLab, which answers on
    its port, and stops on SIGTERM."""
    import signal
    import time
    import urllib.request

    if not (ROOT / ".stamps" / "venv").exists():
        pytest.skip("make lab needs make setup first")
    port = _free_port()
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(["make", "-s", "lab", f"LAB_ARGS=--no-browser --port={port} --ServerApp.port_retries=0 "
                             f"--ServerApp.root_dir={ROOT} --ServerApp.runtime_dir={tmp_path}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")})
    try:
        deadline, answered = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2) as r:
                    answered = json.loads(r.read())
                break
            except OSError:
                time.sleep(1)
        assert answered and "version" in answered, (tmp_path / "lab.log").read_text()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode is not None
