# krul: `make reproduce` (every figure) and `make test` are all a newcomer needs.
# Make is the dependency graph: setup -> data/models -> notebooks -> results.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMPS := .stamps
PROFILE ?= default
DEVICE ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

FIGURES := $(patsubst notebooks/%.ipynb,%,$(wildcard notebooks/fig*.ipynb))

.PHONY: setup test test-fast test-notebooks reproduce figures lab clean-results calibrate curves plans $(FIGURES)

# --- setup: venv, packages, models, data; each step skipped when done ----------------------
$(STAMPS)/venv: requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name krul --display-name "krul (.venv)" > /dev/null
	@touch $@

$(STAMPS)/models: $(STAMPS)/venv src/krul/models.py
	$(PY) -m krul models --prepare smollm2-135m qwen2.5-coder-0.5b
	@touch $@

$(STAMPS)/data: $(STAMPS)/venv src/krul/data.py
	$(PY) -m krul data > /dev/null
	@touch $@

setup: $(STAMPS)/venv $(STAMPS)/models $(STAMPS)/data

# --- tests: unit (seconds), integration (real SmolLM2), notebooks (papermill smoke) --------
test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests/unit

test-notebooks: setup
	$(PY) -m pytest -q -m notebooks tests/notebooks

# --- figures --------------------------------------------------------------------------------
RUN_NAME ?= $(DEVICE)-$(PROFILE)

# a figure depends on its notebook, its YAML, its own module, the modules the figures share and the library
FIGURE_SHARED := $(filter-out src/krul/figures/fig%.py,$(wildcard src/krul/figures/*.py)) $(wildcard src/krul/*.py)
results/%/$(RUN_NAME)/done: notebooks/%.ipynb experiments/%.yaml src/krul/figures/%.py $(FIGURE_SHARED) | setup
	@mkdir -p $(@D)
	$(PY) -m krul.experiments run $* --profile $(PROFILE) --device $(DEVICE) --out $(@D)
	@touch $@

$(FIGURES): %: results/%/$(RUN_NAME)/done

reproduce: setup $(FIGURES)
	@echo "figures under results/<figure>/$(RUN_NAME)/ ; summary in REPRODUCE.md"

figures: setup
	$(PY) -m krul.experiments redraw --all

# --- dev calibration and test curves (slow on a CPU: ~100 s per curve point on smollm2) ----------
MODEL ?= smollm2-135m
CAL_ARGS ?= --n-conversations 6 --pairs 1 2 4 --protect 0
CURVE_ARGS ?= --n-conversations 30 --pairs 1 2 4
calibrate: setup
	$(PY) -m krul.calibrate --model $(MODEL) $(CAL_ARGS)

curves: setup
	$(PY) -m krul.calibrate curves --model $(MODEL) --split test $(CURVE_ARGS)

# --- plans for the GPU bench, from the committed dev records (bench_gpu.sh accept runs this too) --
plans: results/plans/krul_plans.json

results/plans/krul_plans.json: $(wildcard experiments/calibration/*.svd*.json) src/krul/plans.py | setup
	$(PY) -m krul.plans --out $@

LAB_ARGS ?=
lab: setup
	.venv/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_ARGS)

clean-results:
	rm -rf results/*/$(RUN_NAME)
