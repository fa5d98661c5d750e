"""`krul bench ttft`: time-to-first-token of a restored conversation, per policy, tier and length.

For each model shape, history length N and tier, in one process: the history's KV is computed once
(the reference), each policy's state is built from it (its split, its compression plan) and stored
in the tier (pinned or pageable CPU memory, or a file on disk whose pages are dropped before every
read), then timed: restore (`restore.restore_into` into preallocated per-layer buffers) + prefill
of the new input (same tokens, same `NewInputPrefill` for every policy: a CUDA graph over the
buffers where it captures, eager otherwise) + the first token. Warm-up, repeats, median, min and max.
Beside it, in the same process: the plain prefill rate P of the shape at that length, the tier's best
bandwidth B, and the bound min_r max(r N / P, (1 - r) N b / B) (`scheduler.bound_s`); the scheduler's
rates are measured at run time (`profile.measure_rates`).

Plans are earned: `krul` compresses only with a plan measured on a real model (`--plan-file`, pairs
mapped by relative depth); without one it stores uncompressed KV and every row says so
(`plan_source`). MiniCache uses deeper-half adjacent pairs at krul's compression ratio.

Rows go to a CSV as they finish (existing rows are skipped, so a sweep resumes across commands),
each with a `stamp` of what produced it (`bench_stamp`: krul's code version, the device, torch, the
timing settings, the plan file's content and the row's policy, plan and parameters as resolved).
A rerun skips only rows of the same stamp; rows of its grid made by other code or settings (or
before stamps, unless `--adopt-unstamped`) are moved to `<out stem>.stale.csv` (their timelines to
`<out stem>.stale.timeline.jsonl`: nothing is deleted), recomputed, and the run says so once;
with an environment record (`<out>.env.json`) and per-layer stream timelines
(`<out>.timeline.jsonl`). Without CUDA the benchmark runs the real small model `smollm2-135m` in
fp32 on the CPU with short histories and says so in the `note` column.

Imports only torch, transformers, numpy, the standard library and krul modules that do the same
(the GPU image has nothing else). Usage: `python -m krul.bench ttft --help`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from krul import profile, scheduler  # noqa: E402
from krul.adapter import BufferCache, ModelAdapter, recompute_into  # noqa: E402
from krul.plans import PlanError, SourcePlan, choose_plan, load_plan_file, map_pairs  # noqa: E402,F401
from krul.policies import POLICIES  # noqa: E402
from krul.pricing import PlanPricing  # noqa: E402
from krul.restore import ISSUE_MODES, DiskSource, drop_page_cache, host_pool, restore_into  # noqa: E402
from krul.selector import CompressionPlan, MiniCacheSelector, n_pairs_for_ratio  # noqa: E402
from krul.store import DiskStore, MemoryStore, build_state  # noqa: E402

COLUMNS = [
    "device", "model", "tier", "history_tokens", "new_input_tokens", "policy", "compression_ratio",
    "recompute_ratio", "ttft_s", "ttft_s_min", "ttft_s_max", "restore_s", "restore_s_min",
    "restore_s_max", "prefill_s", "bound_s", "restore_over_bound", "stored_bytes", "full_kv_bytes",
    "predicted_recompute_s", "predicted_load_s", "measured_recompute_s", "measured_load_s",
    "plan_source", "repeats",
    # beyond the required columns
    "ttft_speedup_vs_full_recompute", "restore_speedup_vs_full_recompute", "new_input_prefill_s",
    "plain_prefill_s", "plain_ttft_s", "prefill_tokens_per_s", "tier_bytes_per_s",
    "bound_bytes_per_token", "bound_recompute_ratio", "loaded_bytes", "kv_max_abs_err",
    "first_token", "prefill_path", "prefill_mode", "restore_mode", "read_s", "hash_s", "verify", "dtype",
    "prefill_best_tokens_per_s", "predicted_restore_s", "predicted_error", "estimator_prefill_s",
    "estimator_plain_eager_s", "note", "stamp",
]
DEFAULT_POLICIES = ["full-recompute", "full-load", "partial-recompute", "cake", "krul-svd-loss", "krul",
                    "krul-fixed-split", "minicache", "kvsharer"]
BENCH_POLICIES = set(DEFAULT_POLICIES)
TINY_SHAPES = ("tiny-llama", "tiny-qwen2")  # random 4-layer models for tests
DISK_SUSPICIOUS_BYTES_PER_S = 8e9  # faster "disk" reads than this are most likely the page cache
MINICACHE_DEFAULT_RATIO = 1.5  # MiniCache's own setting, used only when krul has no plan to match

PROFILES = {
    "smoke": {
        "cuda": dict(shapes=["llama-7b"], lengths=[1000], tiers=["pinned", "disk"], new_tokens=128,
                     repeats=2, warmup=1),
        "cpu": dict(shapes=["smollm2-135m"], lengths=[96], tiers=["pageable", "disk"], new_tokens=16,
                    repeats=2, warmup=1, load_profile_bytes=8 << 20, threads=1),
    },
    "default": {
        "cuda": dict(shapes=["llama-7b", "llama3-8b"], lengths=[1000, 4000],
                     tiers=["pinned", "pageable", "disk"], new_tokens=128, repeats=5, warmup=2),
        "cpu": dict(shapes=["smollm2-135m"], lengths=[128, 512], tiers=["pageable", "disk"],
                    new_tokens=32, repeats=3, warmup=1),
    },
    "full": {
        "cuda": dict(shapes=["llama-7b", "llama3-8b", "qwen1.5-7b"],
                     lengths=[500, 1000, 2000, 4000, 8000, 16000], tiers=["pinned", "pageable", "disk"],
                     new_tokens=128, repeats=5, warmup=2),
        "cpu": dict(shapes=["smollm2-135m"], lengths=[128, 256, 512, 1024], tiers=["pageable", "disk"],
                    new_tokens=32, repeats=3, warmup=1),
    },
}


class BenchError(ValueError):
    """A bad benchmark configuration; the message says what to change."""


# -- models ----------------------------------------------------------------------------------------
def build_adapter(shape: str, device: torch.device) -> tuple[ModelAdapter, str]:
    """The model of a shape on `device`; returns the adapter and a note on what it is."""
    from krul import models

    if shape in TINY_SHAPES:
        from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

        cls = LlamaConfig if shape == "tiny-llama" else Qwen2Config
        cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
                  tie_word_embeddings=False)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        return ModelAdapter(model.eval(), name=shape), f"{shape}: random 4-layer test model"
    spec = models.get_spec(shape)
    if spec.real:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, tok = models.load_model(shape, device=device, dtype=dtype)
        return ModelAdapter(model, tok, name=shape), f"{shape}: real weights, {str(dtype)[6:]}"
    if device.type != "cuda":
        raise BenchError(f"{shape} is a timing-only 7B-class shape; it needs CUDA")
    model = models.build_timing_model(shape, device=device, dtype=torch.bfloat16)
    return ModelAdapter(model, name=shape), f"{shape}: random weights, bf16"


# -- the new-input path (one for every policy) -----------------------------------------------------
PREFILL_PATHS = ("graph", "eager", "eager-overlap", "layer-graphs")


class NewInputPrefill:
    """Prefill of the new input over a restored `BufferCache`, and the first token (greedy).

    One instance serves every policy of a (model, history length): the same tokens, the same
    buffers. "graph" (CUDA): the forward is captured once in a CUDA graph over the static buffers
    and replayed after the restore has joined (checked against an eager forward; on any failure or
    mismatch it falls back to eager and says why in `self.mode`). "eager": a plain forward through
    the cache after the restore has joined. "eager-overlap" (CUDA): the restore returns without
    joining (`restore_into(join="layer")`) and the eager forward's layer l waits only for layer l,
    so its launches and shallow layers overlap the end of the restore. "layer-graphs" (CUDA): both,
    the per-layer wait and few launches: one CUDA graph per decoder layer (`adapter.LayerwisePrefill`),
    each replayed as soon as its layer is restored (checked against an eager forward like "graph").
    """

    def __init__(self, adapter: ModelAdapter, cache: BufferCache, n_history: int, new_ids: torch.Tensor,
                 mode: str = "graph"):
        self.adapter, self.cache, self.n_history = adapter, cache, n_history
        self.ids = new_ids.to(adapter.device)
        self.q = self.ids.shape[1]
        if n_history + self.q > cache.capacity:
            raise BenchError(f"cache capacity {cache.capacity} < history {n_history} + new {self.q}")
        self.graph = None
        self.layered = None  # adapter.LayerwisePrefill with per-layer graphs ("layer-graphs")
        self.static_tok = None
        self.mode = "eager"
        self.overlap = False  # restore with per-layer joins (restore_into(join="layer"))
        if mode not in PREFILL_PATHS:
            raise BenchError(f"unknown prefill path {mode!r}; known: {', '.join(PREFILL_PATHS)}")
        if adapter.device.type != "cuda":
            self.mode = "eager (no CUDA)"
        elif mode == "graph":
            self._capture()
        elif mode == "eager-overlap":
            self.mode, self.overlap = "eager-overlap", True
        elif mode == "layer-graphs":
            self._capture_layers()

    def _eager_logits(self) -> torch.Tensor:
        self.cache.set_length(self.n_history)
        return self.adapter.forward(self.ids, self.cache, logits_to_keep=1)

    def _capture(self) -> None:
        device = self.adapter.device
        try:
            with torch.inference_mode():
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._eager_logits()
                torch.cuda.current_stream(device).wait_stream(side)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                self.cache.set_length(self.n_history)
                with torch.cuda.graph(graph):
                    logits = self.adapter.forward(self.ids, self.cache, logits_to_keep=1)
                    tok = logits[0, -1].argmax()
                self.cache.set_length(self.n_history)
                graph.replay()
                torch.cuda.synchronize(device)
                replayed = logits.clone()
                eager = self._eager_logits()
                torch.cuda.synchronize(device)
                diff = float((replayed - eager).abs().max())
                scale = max(1.0, float(eager.abs().max()))
                if not math.isfinite(diff) or diff > 1e-2 * scale:
                    self.mode = f"eager (graph replay differs from eager by {diff:.3g})"
                    return
                self.graph, self.static_logits, self.static_tok = graph, logits, tok
                self.mode = "graph"
        except Exception as exc:  # capture is best effort: the eager path is always correct
            self.graph = None
            self.mode = f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:160]})"
            torch.cuda.synchronize(device)
            with torch.inference_mode():
                self._eager_logits()  # the device must still work eagerly; raises if it does not
            torch.cuda.synchronize(device)
        finally:
            self.cache.set_length(self.n_history)

    def _capture_layers(self) -> None:
        from krul.adapter import LayerwisePrefill

        device = self.adapter.device
        try:
            layered = LayerwisePrefill(self.adapter, self.cache, self.n_history, self.ids, graphs=True)
            with torch.inference_mode():
                replayed = layered.run()[0][0, -1].float().clone()
                torch.cuda.synchronize(device)
                eager = self._eager_logits()[0, -1]
                torch.cuda.synchronize(device)
            diff = float((replayed - eager).abs().max())
            scale = max(1.0, float(eager.abs().max()))
            if not math.isfinite(diff) or diff > 1e-2 * scale:
                self.mode = f"eager-overlap (layer graphs differ from eager by {diff:.3g})"
            else:
                self.layered, self.mode = layered, "layer-graphs"
        except Exception as exc:  # best effort, like the whole-graph capture
            self.mode = f"eager-overlap (layer graph capture failed: {type(exc).__name__}: {str(exc)[:160]})"
            torch.cuda.synchronize(device)
        finally:
            self.overlap = True
            self.cache.set_length(self.n_history)

    @torch.inference_mode()
    def run(self) -> int:
        """Prefill the new input over the restored history; the first token's id (synchronizes)."""
        self.cache.set_length(self.n_history)
        if self.layered is not None:
            tok = int(self.layered.run()[1].item())
            self.cache.set_length(self.n_history + self.q)
            return tok
        if self.graph is not None:
            self.graph.replay()
            tok = int(self.static_tok.item())
        else:
            tok = int(self._eager_logits()[0, -1].argmax().item())
        self.cache.set_length(self.n_history + self.q)
        return tok


# -- measurements ----------------------------------------------------------------------------------
def _stats(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def _plain_prefill(adapter: ModelAdapter, ids: torch.Tensor, repeats: int) -> list[float]:
    """Times of a plain transformers forward over `ids` (DynamicCache) to the first token."""
    from transformers import DynamicCache

    def once():
        with torch.inference_mode():
            out = adapter.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True,
                                logits_to_keep=1)
            return int(out.logits[0, -1].argmax().item())

    return profile.time_it(once, adapter.device, repeats=repeats, warmup=1)


def stored_bytes_per_token(adapter: ModelAdapter, plan: CompressionPlan | None, params: dict | None = None,
                           n_tokens: int = 4096) -> float:
    """Bytes per history token if every token of an `n_tokens` history were stored in the plan's
    format with compression `params` (the bound's b): `pricing.PlanPricing`, which equals the stored
    state's `kv_bytes()` (an svd pair's rank, and so its bytes per token, depend on the length)."""
    return PlanPricing.for_adapter(adapter, n_tokens, plan, params).bytes_per_token()


def _git_sha() -> str:
    if os.environ.get("KRUL_GIT_SHA"):
        return os.environ["KRUL_GIT_SHA"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def filesystem_of(path: Path) -> tuple[str, str, str]:
    """(mount point, filesystem type, device) holding `path`, from /proc/mounts (Linux)."""
    best = ("", "unknown", "")
    try:
        target = str(Path(path).resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    return best


def env_record(device: torch.device, cfg: dict) -> dict:
    """Hardware, versions and the command: what a figure redrawn from the CSV must cite."""
    import numpy
    import transformers

    rec = {"device": profile.device_label(device), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "git_sha": _git_sha(), "command": " ".join([sys.executable, "-m", "krul.bench"] + sys.argv[1:]),
           "argv": sys.argv, "config": {k: v for k, v in cfg.items() if k != "log"},
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update({"gpu": props.name, "gpu_memory_bytes": props.total_memory,
                    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,pcie.link.gen.max,"
                                  "pcie.link.width.max", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            rec["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            rec["nvidia_smi"] = "unavailable"
    return rec


# -- output ----------------------------------------------------------------------------------------
def _row_key(row: dict) -> tuple:
    return (str(row["device"]), str(row["model"]), str(row["tier"]), int(float(row["history_tokens"])),
            int(float(row["new_input_tokens"])), str(row["policy"]), str(row["plan_source"]),
            str(row.get("prefill_path") or "graph"))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """Append one row (header first if the file is new); keeps an existing file's columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = COLUMNS
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            fields = next(csv.reader(f))
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerow(row)
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerow(row)


def issue_rates(rates: scheduler.RestoreRates, issue: str) -> scheduler.RestoreRates:
    """The rates the scheduler prices a restore with under `restore_into(issue=...)`: with the loads
    issued by a thread of their own, no recomputed layer carries their issue cost
    (`load_issue_lookahead` 0); interleaved, the probed coupling stays."""
    from dataclasses import replace

    return replace(rates, load_issue_lookahead=0.0) if issue == "thread" else rates


def _sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


# settings of a run that shape its rows' numbers (the row's key holds device, model, tier, lengths,
# policy, plan source and prefill path; the history lengths of a run are not among them: a resumed
# run may be left with fewer)
STAMP_SETTINGS = ("new_tokens", "repeats", "warmup", "repeats_disk", "warmup_disk", "verify", "seed",
                  "rates_grid", "load_profile_bytes", "bandwidth_bytes", "torch_threads", "time_estimator",
                  "plan_model", "loader_issue")


def bench_stamp(cfg: dict, variant: dict, dev_label: str, code: str | None = None) -> str:
    """The stamp of a row of `variant` (`stamps.stamp`): krul's code version, the device, torch, the
    run's `STAMP_SETTINGS`, the plan file's content (not when it was written), and the variant's
    policy (every parameter), plan and compression parameters."""
    from krul.stamps import stamp

    plan = variant.get("plan")
    return stamp({"kind": "bench-ttft", "device": dev_label, "torch": torch.__version__,
                  "settings": {k: cfg.get(k) for k in STAMP_SETTINGS},
                  "plan_file": _plan_file_digest(cfg.get("plan_file")), "policy": repr(variant["policy"]),
                  "plan": None if plan is None else [[list(p) for p in plan.pairs], plan.method],
                  "params": variant.get("params")}, code)


def _plan_file_digest(path) -> str | None:
    """The plan file's content: its JSON but its provenance (`krul.plans` stamps when it was
    written), else its bytes."""
    from krul.stamps import file_digest, record_digest

    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return file_digest(path) if Path(path).exists() else f"missing: {path}"
    return record_digest(data) if isinstance(data, dict) else record_digest({"plans": data})


def settle_rows(out: Path | None, expected: dict, adopt_unstamped: bool = False, log=print) -> tuple[list, set]:
    """(the rows of `out` kept, the keys a rerun skips): rows whose stamp is `expected`'s for their
    key (`stamps.resume`; unstamped ones too with `adopt_unstamped`). The other rows at the keys of
    `expected` are moved to `<stem>.stale.csv` and their timelines to `<stem>.stale.timeline.jsonl`
    (nothing is deleted) and the run says how many, once. A file from before stamps gets the
    `stamp` column (its rows stay, with an empty one), so the rows appended now keep theirs."""
    from krul.stamps import resume

    prior = read_rows(out) if out else []
    if not prior:
        return [], set()
    decision = resume(prior, expected, _row_key, adopt_unstamped=adopt_unstamped)

    def moved(key) -> bool:
        return key in expected and key not in decision.done

    stale = [r for r in prior if moved(_safe_key(r))]
    kept = [r for r in prior if not moved(_safe_key(r))]
    with open(out, newline="") as f:
        fields = next(csv.reader(f))
    if stale or "stamp" not in fields:
        if stale:
            for row in stale:
                append_row(_sidecar(out, ".stale.csv"), row)
            tl = _sidecar(out, ".timeline.jsonl")
            if tl.exists():
                lines = tl.read_text().splitlines(keepends=True)
                gone = [line for line in lines if moved(_timeline_key(line))]
                if gone:
                    with open(_sidecar(out, ".stale.timeline.jsonl"), "a") as f:
                        f.writelines(gone)
                    tmp = tl.with_name(tl.name + ".tmp")
                    tmp.write_text("".join(line for line in lines if not moved(_timeline_key(line))))
                    tmp.replace(tl)
        fields = fields + [c for c in ("stamp",) if c not in fields]
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept)
        tmp.replace(out)
    where = f"{out}; moved to {_sidecar(out, '.stale.csv').name}"
    for line in decision.notices(where, what="rows"):
        log(line)
    return kept, set(decision.done)


def _safe_key(row: dict):
    try:
        return _row_key(row)
    except (KeyError, TypeError, ValueError):
        return None


def _timeline_key(line: str):
    try:
        return _row_key(json.loads(line))
    except (ValueError, KeyError, TypeError):
        return None


# -- the benchmark ---------------------------------------------------------------------------------
def resolve_config(cfg: dict) -> dict:
    """Fill a config from its profile and the device: lists, device, notes."""
    cfg = dict(cfg)
    want = cfg.get("device", "auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but CUDA is not available; use --device cpu or auto")
    cfg["device"] = want
    prof = cfg.get("profile", "default")
    if prof not in PROFILES:
        raise BenchError(f"unknown profile {prof!r}; known: {', '.join(PROFILES)}")
    base = PROFILES[prof]["cuda" if want == "cuda" else "cpu"]
    for key, value in base.items():
        if cfg.get(key) in (None, [], ""):
            cfg[key] = value
    notes = []
    if want == "cpu":
        from krul.models import REGISTRY

        notes.append("no CUDA: CPU run (fp32, short histories, real small model); the paper's "
                     "setting needs the GPU")

        swapped = [s for s in cfg["shapes"] if s in REGISTRY and not REGISTRY[s].real]
        if swapped:
            cfg["shapes"] = [s for s in cfg["shapes"] if s not in swapped] or ["smollm2-135m"]
            cfg["shapes"] = list(dict.fromkeys(cfg["shapes"]))
            notes.append(f"no CUDA: {', '.join(swapped)} replaced by the real smollm2-135m in fp32 on "
                         "the CPU with short histories; timings are not the paper's setting")
        if "pinned" in cfg["tiers"]:
            cfg["tiers"] = [t for t in cfg["tiers"] if t != "pinned"]
            notes.append("no CUDA: tier 'pinned' skipped (page-locked memory serves GPU copies)")
    if not cfg["tiers"]:
        raise BenchError("no tier left to run")
    cfg.setdefault("policies", None)
    cfg["policies"] = cfg["policies"] or list(DEFAULT_POLICIES)
    unknown = [p for p in cfg["policies"] if p not in BENCH_POLICIES]
    if unknown:
        raise BenchError(f"policies {unknown} are not benchmarked here; known: {', '.join(DEFAULT_POLICIES)}")
    if cfg.get("warmup_disk") is None:
        cfg["warmup_disk"] = min(1, int(cfg["warmup"]))
    if cfg.get("repeats_disk") is None:
        cfg["repeats_disk"] = int(cfg["repeats"])
    paths = cfg.get("prefill") or ["graph"]
    cfg["prefill"] = [paths] if isinstance(paths, str) else list(paths)
    bad = [x for x in cfg["prefill"] if x not in PREFILL_PATHS]
    if bad:
        raise BenchError(f"unknown prefill paths {bad}; known: {', '.join(PREFILL_PATHS)}")
    cfg["loader_issue"] = cfg.get("loader_issue") or "interleaved"
    if cfg["loader_issue"] not in ISSUE_MODES:
        raise BenchError(f"unknown loader issue {cfg['loader_issue']!r}; known: {', '.join(ISSUE_MODES)}")
    cfg.setdefault("verify", True)
    cfg.setdefault("timeline", True)
    cfg.setdefault("seed", 0)
    cfg.setdefault("time_budget_s", None)
    cfg.setdefault("out", None)
    cfg.setdefault("disk_root", None)
    cfg.setdefault("plan_file", None)
    cfg.setdefault("plan_model", None)
    cfg.setdefault("rates_grid", None)
    cfg.setdefault("load_profile_bytes", None)
    cfg.setdefault("bandwidth_bytes", None)
    cfg.setdefault("threads", None)
    cfg["notes"] = notes + list(cfg.get("notes", []))
    return cfg


def _geometry(shape: str) -> tuple[int, str]:
    """(n_layers, family) of a shape, without building it."""
    if shape in TINY_SHAPES:
        return 4, "llama" if shape == "tiny-llama" else "qwen2"
    from krul.models import get_spec

    spec = get_spec(shape)
    return spec.n_layers, spec.family


KRUL_ROWS = ("krul", "krul-svd-loss", "krul-fixed-split")  # rows that take a plan from --plan-file


def _policy_variants(cfg: dict, n_layers: int, family: str) -> list[dict]:
    """(policy name, RestorePolicy, plan, compression params, plan_source) for every row to time.

    A krul row takes its own policy's plans from the plan file (plans naming no policy serve any krul
    row), stored with the plan's compression parameters (else the policy's), and runs a second time
    without a plan (uncompressed: the same split and scheduler, nothing compressed) so the two can be
    compared side by side. MiniCache and KVSharer take as many pairs as the main krul row's plan.
    """
    none_src = "none: no --plan-file; krul stores uncompressed KV (pyramid + measured-rate scheduler only)"
    plans = load_plan_file(cfg["plan_file"]) if cfg["plan_file"] else []
    krul_plans: dict[str, list[tuple]] = {}
    for name in cfg["policies"]:
        if name not in KRUL_ROWS:
            continue
        policy = POLICIES[name]
        variants = []
        if plans:
            try:
                chosen, why = choose_plan(plans, family, cfg["plan_model"], policy=name)
            except PlanError as exc:
                chosen, why = None, str(exc)
            if chosen is not None:
                pairs = map_pairs(chosen.pairs, chosen.n_layers, n_layers) if chosen.n_layers != n_layers \
                    else chosen.pairs
                plan = CompressionPlan(pairs, (), chosen.method, n_layers)
                params = dict(chosen.params) if chosen.params else dict(policy.compress_params)
                if chosen.method == "share":
                    params = {}
                mapped = (f"; mapped {chosen.n_layers}->{n_layers} layers by relative depth"
                          if chosen.n_layers != n_layers else "")
                src = (f"plan-file {Path(cfg['plan_file']).name}: {chosen.model} plan {chosen.plan_id} "
                       f"({len(chosen.pairs)} pairs, {chosen.method} {_params_text(params)}; {why}){mapped}")
                variants.append((plan, params, src))
            else:
                none_src_p = f"none: {why}; krul stores uncompressed KV"
                variants.append((None, {}, none_src_p))
        if not variants or variants[0][0] is not None:
            variants.append((None, {}, none_src))
        krul_plans[name] = variants if name != "krul-fixed-split" else variants[:1]
    main = next((v[0][0] for n, v in krul_plans.items() if v and v[0][0] is not None), None)
    if main is not None and main.pairs:
        n_pairs = len(main.pairs)
        mc_src = f"deeper-half adjacent pairs, {n_pairs} pairs = krul's plan count"
    else:
        n_pairs = n_pairs_for_ratio(n_layers, MINICACHE_DEFAULT_RATIO)
        mc_src = (f"deeper-half adjacent pairs, {n_pairs} pairs: MiniCache's target ratio "
                  f"{MINICACHE_DEFAULT_RATIO} (no krul plan to match)")
    mc_pairs = MiniCacheSelector.candidates(n_layers)[:n_pairs]
    out = []
    for name in cfg["policies"]:
        policy = POLICIES[name]
        if name in krul_plans:
            for plan, params, src in krul_plans[name]:
                out.append(dict(name=name, policy=policy.with_params(compress_params=params), plan=plan,
                                params=params, plan_source=src))
        elif name == "minicache":
            params = dict(policy.compress_params)
            out.append(dict(name=name, policy=policy, plan=CompressionPlan(mc_pairs, (), "merge", n_layers),
                            params=params, plan_source="minicache: " + mc_src))
        elif name == "kvsharer":
            out.append(dict(name=name, policy=policy.with_params(compress_params={}),
                            plan=CompressionPlan(mc_pairs, (), "share", n_layers), params={},
                            plan_source=("kvsharer (timing only: positions do not change a full load): "
                                         + mc_src + ", shared")))
        else:
            out.append(dict(name=name, policy=policy, plan=None, params={}, plan_source="n/a (no compression)"))
    return out


def _params_text(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(params.items())) or "no params"


def run_ttft(cfg: dict) -> list[dict]:
    """Run the TTFT benchmark described by `cfg`; return the rows it produced (also appended to
    `cfg["out"]` if set). Keys: see `main_ttft --help` (argument names with underscores)."""
    cfg = resolve_config(cfg)
    log = cfg.get("log") or (lambda msg: print(msg, flush=True))
    device = torch.device(cfg["device"])
    if cfg["threads"]:  # CPU runs on shared cores: fewer threads spin less when others compete
        torch.set_num_threads(int(cfg["threads"]))
    cfg["torch_threads"] = torch.get_num_threads()
    dev_label = profile.device_label(device)
    out = Path(cfg["out"]) if cfg["out"] else None
    q = int(cfg["new_tokens"])
    shape_variants = {}
    for shape in cfg["shapes"]:
        shape_variants[shape] = _policy_variants(cfg, *_geometry(shape))
        for v in shape_variants[shape]:
            v["stamp"] = bench_stamp(cfg, v, dev_label)
    expected = {(dev_label, shape, tier, int(n), q, v["name"], v["plan_source"], p): v["stamp"]
                for shape, variants in shape_variants.items() for v in variants for n in cfg["lengths"]
                for tier in cfg["tiers"] for p in cfg["prefill"]}
    prior, done = settle_rows(out, expected, bool(cfg.get("adopt_unstamped")), log)
    t_begin = time.perf_counter()
    budget = cfg["time_budget_s"]
    env = env_record(device, {k: v for k, v in cfg.items() if not k.startswith("_")})
    env.update(notes=cfg["notes"], blocks=[], rates=[])  # the same list: later notes land too
    for note in cfg["notes"]:
        log(f"note: {note}")
    rows: list[dict] = []
    disk_root = Path(cfg["disk_root"] or tempfile.mkdtemp(prefix="krul-bench-states-"))
    disk_root.mkdir(parents=True, exist_ok=True)
    fs = filesystem_of(disk_root)
    env["disk_root"] = {"path": str(disk_root), "filesystem": fs}
    if "disk" in cfg["tiers"] and fs[1] in ("tmpfs", "ramfs"):
        cfg["notes"].append(f"disk root {disk_root} is on {fs[1]}: the disk tier reads RAM, not a disk")
        log(f"note: {cfg['notes'][-1]}")
    stopped = None

    def over_budget() -> bool:
        return budget is not None and time.perf_counter() - t_begin > budget

    try:
        for shape in cfg["shapes"]:
            variants = shape_variants[shape]
            work = []
            for n_hist in (int(x) for x in cfg["lengths"]):
                for tier in cfg["tiers"]:
                    todo = []
                    for v in variants:
                        paths = [p for p in cfg["prefill"] if (dev_label, shape, tier, n_hist, q, v["name"],
                                                               v["plan_source"], p) not in done]
                        if paths:
                            todo.append((v, paths))
                    if todo:
                        work.append((n_hist, tier, todo))
                    else:
                        log(f"[{shape} N={n_hist} {tier}] all rows present, skipped")
            if not work or stopped:
                continue
            if over_budget():
                stopped = f"time budget of {budget:.0f} s spent"
                break
            t = time.perf_counter()
            adapter, model_note = build_adapter(shape, device)
            log(f"[{shape}] built in {time.perf_counter() - t:.1f} s: {model_note}")
            block = None
            for n_hist, tier, todo in work:
                if over_budget():
                    stopped = f"time budget of {budget:.0f} s spent"
                    break
                if block is None or block["n_hist"] != n_hist:
                    block = None  # free the previous length's buffers and graph first
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    block = _setup_block(adapter, cfg, n_hist, q, log)
                    env["blocks"].append({"model": shape, **{k: block[k] for k in (
                        "n_hist", "prefill_mode", "plain_prefill_s", "plain_ttft_s", "recompute_all_s",
                        "new_input_prefill_s", "prefill_tokens_per_s")}})
                stopped = _run_tier(adapter, shape, tier, block, todo, cfg, disk_root, dev_label,
                                    model_note, rows, prior, out, log, over_budget)
                details = profile.rates_details(adapter, tier, cfg["verify"])
                if details not in env["rates"]:
                    env["rates"].append(details)
                if stopped:
                    break
            block = None
            del adapter
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if stopped:
                break
    finally:
        if cfg["disk_root"] is None:
            shutil.rmtree(disk_root, ignore_errors=True)
        env["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        env["stopped"] = stopped
        env["raw_bandwidth_bytes_per_s"] = {f"{k[0]}|{k[1]}": v for k, v in profile._RAW.items()}
        if out is not None:
            env_path = _sidecar(out, ".env.json")
            runs = json.loads(env_path.read_text()).get("runs", []) if env_path.exists() else []
            env_path.write_text(json.dumps({"runs": runs + [env]}, indent=1, default=str))
    if stopped:
        log(f"stopped early: {stopped}; run the same command again to resume")
    new_keys = {_row_key(r) for r in rows}
    for line in summarize([r for r in prior if _row_key(r) not in new_keys] + rows)["lines"]:
        log(line)
    return rows


def _setup_block(adapter: ModelAdapter, cfg: dict, n_hist: int, q: int, log) -> dict:
    """Per (model, history length): reference KV, plain prefill rate, new-input prefill path."""
    device = adapter.device
    g = torch.Generator(device="cpu").manual_seed(int(cfg["seed"]) + n_hist)
    vocab = adapter.config.vocab_size
    hist = torch.randint(0, vocab, (1, n_hist), generator=g)
    new = torch.randint(0, vocab, (1, q), generator=g)
    cache = BufferCache.for_adapter(adapter, n_hist + q)
    hist_dev = hist.to(device)
    lengths = [n_hist] * adapter.n_layers
    reps = max(2, int(cfg["repeats"]) // 2)
    with torch.inference_mode():
        rec_times = profile.time_it(lambda: recompute_into(adapter, hist_dev, lengths, cache), device,
                                    repeats=reps)
        ref = [(k[:, :, :n_hist].clone(), v[:, :, :n_hist].clone()) for k, v in cache.kv()]
    plain = _plain_prefill(adapter, hist_dev, reps)
    plain_ttft = _plain_prefill(adapter, torch.cat([hist, new], 1).to(device), reps)
    best = min(min(plain), min(rec_times))
    prefills, alone = {}, {}
    for path in cfg["prefill"]:
        prefills[path] = NewInputPrefill(adapter, cache, n_hist, new, path)
        with torch.inference_mode():
            for (k, v), layer in zip(ref, cache.layers):  # the history the prefill runs over
                layer._k_buf[:, :, :n_hist].copy_(k)
                layer._v_buf[:, :, :n_hist].copy_(v)
        alone[path] = statistics.median(profile.time_it(prefills[path].run, device,
                                                        repeats=max(3, int(cfg["repeats"])), warmup=1))
    estimator_s = None
    if cfg.get("time_estimator") and any(POLICIES[p].needs_estimator for p in cfg["policies"]):
        estimator_s = _estimator_prefill_s(adapter, cache, n_hist, new, max(3, int(cfg["repeats"])))
    block = {"n_hist": n_hist, "hist": hist, "new": new, "cache": cache, "ref": ref, "prefills": prefills,
             "estimator_prefill_s": estimator_s,
             "prefill_mode": {p: x.mode for p, x in prefills.items()}, "new_input_prefill_s": alone,
             "plain_prefill_s": statistics.median(plain), "plain_ttft_s": statistics.median(plain_ttft),
             "recompute_all_s": statistics.median(rec_times), "prefill_tokens_per_s": n_hist / best}
    best_rates = cfg.setdefault("_prefill_best", {})
    if adapter.name not in best_rates:
        best_rates[adapter.name] = _best_prefill_rate(adapter, _prefill_grid(cfg), reps, int(cfg["seed"]))
    block["prefill_best_tokens_per_s"] = max(best_rates[adapter.name], block["prefill_tokens_per_s"])
    log(f"[{adapter.name} N={n_hist}] plain prefill {block['plain_prefill_s'] * 1e3:.1f} ms "
        f"(P = {block['prefill_tokens_per_s']:.0f} tok/s), full-context TTFT {block['plain_ttft_s'] * 1e3:.1f} ms, "
        "new-input prefill " + ", ".join(f"{alone[p] * 1e3:.1f} ms [{prefills[p].mode}]" for p in prefills)
        + (f"; through the estimator {estimator_s['estimator_s'] * 1e3:.1f} ms vs eager "
           f"{estimator_s['plain_eager_s'] * 1e3:.1f} ms" if estimator_s else ""))
    return block


def _estimator_prefill_s(adapter: ModelAdapter, cache: BufferCache, n_hist: int, new: torch.Tensor,
                         repeats: int) -> dict:
    """The new-input prefill as the engine runs it for krul policies (through the attention
    estimator, `AttentionEstimator.forward`, eager) beside the same eager forward without it.

    The bench's rows time the plain new-input path for every policy alike; this says what the
    estimator adds on krul's first-token path (its share is reported, not folded into the rows)."""
    from krul.estimator import AttentionEstimator

    est = AttentionEstimator(adapter)
    ids = new.to(adapter.device)

    def plain():
        with torch.inference_mode():
            cache.set_length(n_hist)
            adapter.forward(ids, cache, logits_to_keep=1)

    def through():
        with torch.inference_mode():
            cache.set_length(n_hist)
            est.forward("bench", ids, cache, logits_to_keep=1)
            est.reset("bench")

    out = {"plain_eager_s": statistics.median(profile.time_it(plain, adapter.device, repeats=repeats)),
           "estimator_s": statistics.median(profile.time_it(through, adapter.device, repeats=repeats))}
    cache.set_length(n_hist)
    return out


def _prefill_grid(cfg: dict) -> list[int]:
    """History lengths over which the bound's P is the best prefill rate: the run's lengths and the
    full profile's up to the longest (so P does not depend on which lengths a resumed run has left)."""
    full = PROFILES["full"]["cuda" if cfg["device"] == "cuda" else "cpu"]["lengths"]
    longest = max(int(x) for x in cfg["lengths"])
    return sorted({int(x) for x in cfg["lengths"]} | {int(x) for x in full if x <= longest})


def _best_prefill_rate(adapter: ModelAdapter, grid: list[int], repeats: int, seed: int) -> float:
    """The shape's best plain prefill rate (tokens/s) over `grid`: the bound's P (a lower bound on
    any recompute's time, whatever prefix length it runs at)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    best = 0.0
    for n in grid:
        ids = torch.randint(0, adapter.config.vocab_size, (1, n), generator=g).to(adapter.device)
        best = max(best, n / min(_plain_prefill(adapter, ids, repeats)))
    return best


def _kv_error(cache: BufferCache, ref: list, n_hist: int) -> float:
    err = 0.0
    for (k, v), (rk, rv) in zip(cache.kv(), ref):
        for a, b in ((k[:, :, :n_hist], rk), (v[:, :, :n_hist], rv)):
            d = (a.float() - b.float()).abs().max()
            if not torch.isfinite(d):
                raise RuntimeError("restore left some history tokens unwritten (NaN in the buffers); "
                                   "this is a bug in krul.restore")
            err = max(err, float(d))
    return err


def _run_tier(adapter, shape, tier, block, todo, cfg, disk_root, dev_label, model_note, rows, prior,
              out, log, over_budget) -> str | None:
    """Time every (policy variant, prefill path) of `todo` on one tier; append rows. Returns a
    reason if it stopped early (time budget)."""
    device = adapter.device
    n_hist, q, cache = block["n_hist"], block["new"].shape[1], block["cache"]
    n_layers = adapter.n_layers
    layer_bytes = adapter.layer_kv_bytes_per_token()
    longest = max(int(x) for x in cfg["lengths"])
    grid = cfg["rates_grid"] or sorted({max(16, longest // d) for d in (8, 4, 2, 1)})
    t = time.perf_counter()
    rates = profile.measure_rates(adapter, tier, grid, root=disk_root, load_bytes=cfg["load_profile_bytes"],
                                  verify=cfg["verify"])
    if cfg["loader_issue"] == "thread":  # the loads' issue work runs on its own thread, not in the layers
        rates = issue_rates(rates, cfg["loader_issue"])
    raw_bw = profile.raw_bandwidth(tier, device, nbytes=cfg["bandwidth_bytes"], root=disk_root)
    bw = raw_bw  # the bound's B: the best of repeated raw large copies, never a fitted slope
    log(f"[{shape} {tier}] rates ({time.perf_counter() - t:.1f} s): recompute {rates.recompute_s_per_token * 1e6:.2f} "
        f"us/token-layer, host {rates.recompute_host_s_per_layer * 1e3:.2f} ms/layer + "
        f"{rates.recompute_host_s_per_job * 1e3:.2f} ms/issued job, load {rates.load_bytes_per_s / 1e9:.2f} GB/s (raw {raw_bw / 1e9:.2f} GB/s)")
    if tier == "disk" and bw > DISK_SUSPICIOUS_BYTES_PER_S:
        note = (f"disk reads ran at {bw / 1e9:.1f} GB/s: dropping the page cache may not work on this "
                f"filesystem ({filesystem_of(disk_root)[1]}); the disk rows may be reading RAM")
        if note not in cfg["notes"]:
            cfg["notes"].append(note)
            log("note: " + note)
    if tier == "disk":
        store = DiskStore(disk_root / f"{shape}-{n_hist}", drop_page_cache=True)
        warmup, repeats = int(cfg["warmup_disk"]), int(cfg["repeats_disk"])
    else:
        store = MemoryStore(pinned=tier == "pinned")
        warmup, repeats = int(cfg["warmup"]), int(cfg["repeats"])
    host_pool(device)  # the staging pool exists before anything is timed
    shim = SimpleNamespace(adapter=adapter, rates=rates)
    full_kv_bytes = n_hist * n_layers * layer_bytes
    hist_ids = block["hist"][0]
    base = {(r["policy"], str(r.get("prefill_path") or "graph")): r for r in rows + prior
            if r["device"] == dev_label and r["model"] == shape and r["tier"] == tier
            and int(float(r["history_tokens"])) == n_hist and int(float(r["new_input_tokens"])) == q}
    failed = cfg.setdefault("_failed_paths", {})
    for v, paths in todo:
        if over_budget():
            return f"time budget of {cfg['time_budget_s']:.0f} s spent"
        name, policy, plan = v["name"], v["policy"], v["plan"]
        params = v["params"]
        lengths, _ = policy.split_lengths(shim, n_hist, n_layers, plan)
        split = scheduler.RestoreSplit(lengths, n_hist)
        pricing = PlanPricing.for_adapter(adapter, n_hist, plan, params)
        pred_rec, pred_load = scheduler.predict(split, rates, pricing.layer_bytes)
        compress = params if (plan and plan.method != "share") else {}
        t_build = time.perf_counter()
        with torch.inference_mode():
            state = build_state(adapter.fingerprint(), hist_ids, block["ref"], lengths, None,
                                pairs=plan.pairs if plan else (), method=plan.method if plan else "merge",
                                compress_kwargs=compress, meta={"policy": name})
        key = f"{shape}-{n_hist}-{name}"
        store.put(key, state)
        kv_bytes, nbytes = state.kv_bytes(), state.nbytes()
        loaded_full = sum(n_hist - l for l in lengths) * layer_bytes
        compression_ratio = loaded_full / kv_bytes if kv_bytes else 1.0
        del state
        if tier == "disk":
            file_path = store.path(key)
            source = DiskSource(file_path)
        else:
            file_path, source = None, store.get(key)
        build_s = time.perf_counter() - t_build
        if pricing.total_bytes(lengths) != kv_bytes:  # the scheduler priced what is stored, exactly
            raise RuntimeError(f"{name}: priced {pricing.total_bytes(lengths)} bytes, stored {kv_bytes}; "
                               "pricing.PlanPricing no longer mirrors the compression functions")
        b_tok = pricing.bytes_per_token()
        p_best = block["prefill_best_tokens_per_s"]
        bound = scheduler.bound_s(n_hist, p_best, b_tok, raw_bw)
        r_star = scheduler.bound_recompute_ratio(n_hist, p_best, b_tok, raw_bw)
        try:
            for path in paths:
                if path in failed:
                    continue
                prefill, prefill_mode = block["prefills"][path], block["prefill_mode"][path]
                join = "layer" if prefill.overlap else "end"

                def once(timeline: bool = False):
                    if file_path is not None:
                        drop_page_cache(file_path)
                    profile.sync(device)
                    t0 = time.perf_counter()
                    rep = restore_into(adapter, source, cache, timeline=timeline, verify=cfg["verify"],
                                       join=join, issue=cfg["loader_issue"])
                    t1 = time.perf_counter()
                    tok = prefill.run()
                    t2 = time.perf_counter()
                    rep.finalize()
                    # join "end": restore_into returned once the device finished (host time); "layer":
                    # the device time until the last layer was ready; the rest of the TTFT is the prefill's
                    restore = t1 - t0 if join == "end" else rep.restore_s
                    return t2 - t0, restore, t2 - t0 - restore, rep, tok

                try:
                    with torch.inference_mode():
                        cache.fill_(float("nan"))
                        once()
                        err = _kv_error(cache, block["ref"], n_hist)
                        for _ in range(max(0, warmup - 1)):
                            once()
                        timeline = once(timeline=True)[3].events if cfg["timeline"] else None
                        runs = [once() for _ in range(repeats)]
                except Exception as exc:  # one broken path must not take the other rows with it
                    import traceback

                    failed[path] = f"{name}: {type(exc).__name__}: {exc}"
                    cfg["notes"].append(f"prefill path {path} failed on {shape} N={n_hist} {tier} "
                                        f"({failed[path][:300]}); its rows are missing")
                    log("FAILED " + failed[path] + "\n" + traceback.format_exc())
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # raises if the device itself is broken
                    continue
                ttft, ttft_min, ttft_max = _stats([r[0] for r in runs])
                rest, rest_min, rest_max = _stats([r[1] for r in runs])
                reps = [r[3] for r in runs]
                notes = [model_note] + list(cfg["notes"])
                if prefill_mode != path:
                    notes.append(f"new-input prefill {prefill_mode}")
                row = {
                    "device": dev_label, "model": shape, "tier": tier, "history_tokens": n_hist,
                    "new_input_tokens": q, "policy": name, "compression_ratio": round(compression_ratio, 4),
                    "recompute_ratio": round(split.recompute_ratio, 4), "ttft_s": ttft, "ttft_s_min": ttft_min,
                    "ttft_s_max": ttft_max, "restore_s": rest, "restore_s_min": rest_min,
                    "restore_s_max": rest_max, "prefill_s": statistics.median([r[2] for r in runs]),
                    "bound_s": bound, "restore_over_bound": rest / bound if bound > 0 else float("nan"),
                    "stored_bytes": nbytes, "full_kv_bytes": full_kv_bytes, "predicted_recompute_s": pred_rec,
                    "predicted_load_s": pred_load,
                    "measured_recompute_s": statistics.median([r.recompute_s for r in reps]),
                    "measured_load_s": statistics.median([r.load_s for r in reps]),
                    "plan_source": v["plan_source"], "repeats": len(runs),
                    "new_input_prefill_s": block["new_input_prefill_s"][path],
                    "plain_prefill_s": block["plain_prefill_s"], "plain_ttft_s": block["plain_ttft_s"],
                    "prefill_tokens_per_s": block["prefill_tokens_per_s"], "tier_bytes_per_s": bw,
                    "bound_bytes_per_token": b_tok, "bound_recompute_ratio": r_star,
                    "loaded_bytes": reps[0].loaded_bytes, "kv_max_abs_err": err, "first_token": runs[-1][4],
                    "prefill_path": path, "prefill_mode": prefill_mode,
                    "restore_mode": reps[0].mode + ("+layer-join" if join == "layer" else ""),
                    "read_s": statistics.median([r.read_s for r in reps]),
                    "hash_s": statistics.median([r.hash_s for r in reps]),
                    "prefill_best_tokens_per_s": block["prefill_best_tokens_per_s"],
                    "estimator_prefill_s": (block["estimator_prefill_s"] or {}).get("estimator_s", ""),
                    "estimator_plain_eager_s": (block["estimator_prefill_s"] or {}).get("plain_eager_s", ""),
                    "predicted_restore_s": max(pred_rec, pred_load),
                    "predicted_error": max(pred_rec, pred_load) / rest - 1.0 if rest > 0 else float("nan"),
                    "verify": bool(cfg["verify"]) if tier == "disk" else "", "dtype": str(adapter.dtype)[6:],
                    "note": "; ".join(notes), "stamp": v["stamp"],
                }
                ref_row = row if name == "full-recompute" else base.get(("full-recompute", path))
                if ref_row is not None:
                    row["ttft_speedup_vs_full_recompute"] = float(ref_row["ttft_s"]) / ttft
                    row["restore_speedup_vs_full_recompute"] = float(ref_row["restore_s"]) / rest
                base.setdefault((name, path), row)
                rows.append(row)
                if out is not None:
                    append_row(out, row)
                    if timeline is not None:
                        with open(_sidecar(out, ".timeline.jsonl"), "a") as f:
                            f.write(json.dumps({"device": dev_label, "model": shape, "tier": tier,
                                                "history_tokens": n_hist, "new_input_tokens": q,
                                                "policy": name, "plan_source": v["plan_source"],
                                                "prefill_path": path, "stamp": v["stamp"],
                                                "columns": ["stream", "layer", "start_ms", "end_ms"],
                                                "events": timeline}) + "\n")
                log(f"[{shape} N={n_hist} {tier} {path}] {name:18s} ttft {ttft * 1e3:8.1f} ms  "
                    f"restore {rest * 1e3:8.1f} ms (bound {bound * 1e3:7.1f}, x{row['restore_over_bound']:.2f}; "
                    f"predicted {max(pred_rec, pred_load) * 1e3:.1f}, {row['predicted_error']:+.0%})  "
                    f"prefill {row['prefill_s'] * 1e3:6.1f} ms  r={split.recompute_ratio:.2f} "
                    f"c={compression_ratio:.2f} err={err:.2g} build {build_s:.1f} s")
        finally:
            store.delete(key)
            source = None
    return None


# -- summaries -------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> dict:
    """Ratios of krul against the baselines per (device, model, tier, N), and the issue's targets
    (H100, llama-7b, 4000 tokens, pinned); reported, never enforced."""
    blocks: dict[tuple, dict] = {}
    # a krul row with a measured plan is "krul"; the uncompressed variant only stands in without one
    ordered = sorted(rows, key=lambda r: str(r["plan_source"]).startswith("none"))
    for r in ordered:
        key = (r["device"], r["model"], r["tier"], int(float(r["history_tokens"])),
               str(r.get("prefill_path") or "graph"))
        blocks.setdefault(key, {})
        name = r["policy"]
        if name in ("krul", "krul-svd-loss") and str(r["plan_source"]).startswith("none") and name in blocks[key]:
            name += " (uncompressed)"
        blocks[key].setdefault(name, r)
    lines, checks = [], []
    for key, by in sorted(blocks.items()):
        k = by.get("krul-svd-loss") or by.get("krul")  # the quality-validated policy when it ran
        if k is None:
            continue
        parts = []
        for base in ("full-recompute", "partial-recompute", "full-load", "cake", "minicache", "kvsharer"):
            if base in by:
                tt = float(by[base]["ttft_s"]) / float(k["ttft_s"])
                rr = float(by[base]["restore_s"]) / float(k["restore_s"])
                parts.append(f"vs {base}: ttft x{tt:.2f} restore x{rr:.2f}")
        lines.append(f"{key[1]} {key[2]} N={key[3]} [{key[4]}]: krul ttft {float(k['ttft_s']) * 1e3:.1f} ms, "
                     f"restore/bound {float(k['restore_over_bound']):.2f}; " + "; ".join(parts))
        if key[1] == "llama-7b" and key[2] == "pinned" and key[3] == 4000:
            def ratio(b):
                return float(by[b]["ttft_s"]) / float(k["ttft_s"]) if b in by else float("nan")
            checks.append({"device": key[0], "prefill_path": key[4], "plan_source": k["plan_source"],
                           "ttft_x_vs_full_recompute": ratio("full-recompute"),
                           "target_ge_2.65": ratio("full-recompute") >= 2.65,
                           "ttft_x_vs_partial_recompute": ratio("partial-recompute"),
                           "target_ge_1.5": ratio("partial-recompute") >= 1.5,
                           "lower_than_full_load": ratio("full-load") > 1,
                           "lower_than_cake": ratio("cake") > 1,
                           "restore_over_bound": float(k["restore_over_bound"]),
                           "target_le_1.15": float(k["restore_over_bound"]) <= 1.15})
    return {"lines": lines, "targets": checks}


# -- command line ----------------------------------------------------------------------------------
def _csv_list(text: str | None, cast=str):
    if text is None:
        return None
    return [cast(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="krul bench ttft", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="default", choices=list(PROFILES),
                   help="smoke (about a minute), default, full (the paper's sweep); lists below override")
    p.add_argument("--shapes", help="comma list: llama-7b,llama3-8b,qwen1.5-7b (CUDA), smollm2-135m, "
                                    "tiny-llama, tiny-qwen2")
    p.add_argument("--lengths", help="history lengths, comma list (e.g. 500,1000,4000,16000)")
    p.add_argument("--tiers", help="comma list of pinned,pageable,disk")
    p.add_argument("--policies", help=f"comma list; default {','.join(DEFAULT_POLICIES)}")
    p.add_argument("--new-tokens", type=int, help="new input tokens (default 128 on CUDA)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int, help="warm-up runs per policy (the first checks the KV)")
    p.add_argument("--repeats-disk", type=int, help="repeats on the disk tier (default --repeats)")
    p.add_argument("--warmup-disk", type=int, help="warm-up runs on the disk tier (default 1)")
    p.add_argument("--plan-file", help="krul plans measured on real models (results/plans/krul_plans.json)")
    p.add_argument("--plan-model", help="use the plan file's plans of this model only")
    p.add_argument("--out", help="CSV to append rows to (resumes: rows present are skipped)")
    p.add_argument("--disk-root", help="folder for the disk tier's state files (default: a temp dir)")
    p.add_argument("--prefill", default="graph",
                   help=f"new-input prefill path(s), comma list of {','.join(PREFILL_PATHS)}: the same for "
                        "every policy (see NewInputPrefill); each path is its own set of rows")
    p.add_argument("--loader-issue", default="interleaved", choices=list(ISSUE_MODES),
                   help="who enqueues pinned CUDA loads while layers are recomputed: the recompute loop "
                        "between layers (interleaved) or a loader thread of its own (thread); "
                        "restore_into's `issue`")
    p.add_argument("--no-verify", action="store_true", help="skip the disk body's sha256 check")
    p.add_argument("--no-timeline", action="store_true", help="skip the extra per-layer timeline run")
    p.add_argument("--time-estimator", action="store_true",
                   help="also time the new-input prefill through the attention estimator (as the engine runs "
                        "krul policies; its maps take q * history * heads * layers floats)")
    p.add_argument("--adopt-unstamped", action="store_true",
                   help="skip the --out rows made before stamps (no stamp column) as done, instead of "
                        "recomputing them")
    p.add_argument("--time-budget-s", type=float, help="start no new policy after this many seconds")
    p.add_argument("--rates-grid", help="history lengths for the recompute-rate fit (comma list)")
    p.add_argument("--bandwidth-mib", type=int,
                   help="size of the raw tier-bandwidth probe (default 256 MiB copies, 1 GiB file)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (the CPU smoke profile uses 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main_ttft(argv: list[str]) -> int:
    """`krul bench ttft ...`: run, append rows, print a summary and one JSON line last."""
    args = build_parser().parse_args(argv)
    cfg = {"profile": args.profile, "shapes": _csv_list(args.shapes), "lengths": _csv_list(args.lengths, int),
           "tiers": _csv_list(args.tiers), "policies": _csv_list(args.policies),
           "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup,
           "repeats_disk": args.repeats_disk, "warmup_disk": args.warmup_disk,
           "plan_file": args.plan_file, "plan_model": args.plan_model, "out": args.out,
           "disk_root": args.disk_root, "prefill": _csv_list(args.prefill), "verify": not args.no_verify,
           "timeline": not args.no_timeline, "time_budget_s": args.time_budget_s,
           "time_estimator": args.time_estimator,
           "rates_grid": _csv_list(args.rates_grid, int), "device": args.device, "seed": args.seed,
           "bandwidth_bytes": args.bandwidth_mib << 20 if args.bandwidth_mib else None,
           "threads": args.threads, "adopt_unstamped": args.adopt_unstamped,
           "loader_issue": args.loader_issue}
    try:
        rows = run_ttft(cfg)
    except BenchError as exc:
        print(f"krul bench: {exc}", file=sys.stderr)
        return 2
    summary = summarize(read_rows(Path(args.out)) if args.out else rows)
    print(json.dumps({"rows": len(rows), "out": args.out, "targets": summary["targets"]}, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "ttft":
        print("usage: python -m krul.bench ttft [options]  (see --help)", file=sys.stderr)
        return 2
    return main_ttft(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
