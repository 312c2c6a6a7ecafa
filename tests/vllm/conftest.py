"""Fixtures for the vLLM connector tests (run in .venv-vllm: ``python -m pytest tests/vllm``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (converted once from the packaged GGUF)."""
    from streamkv.adapters.vllm.model_folder import smollm2_folder

    try:
        return smollm2_folder()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def store_extra(tmp_path: Path) -> dict:
    """kv_connector_extra_config for a memory + disk store in a fresh directory."""
    return {"memory_gb": 0.25, "disk_dir": str(tmp_path / "disk"), "disk_gb": 1.0, "tiers": ["memory", "disk"]}
