"""--hicache-storage-backend-extra-config: what is accepted, and what fails the launch with the key named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sglang", reason="needs the sglang environment (.venv-sglang, `make test-sglang`)")

import torch  # noqa: E402

from streamkv.errors import ConfigError  # noqa: E402

from .conftest import LOAD_KEYS  # noqa: E402
from .pools import mha_pool, mla_pool  # noqa: E402


def test_unknown_key_is_rejected_by_name(extra: dict, make_backend: Any) -> None:
    with pytest.raises(ConfigError, match="disk_size_gb"):
        make_backend({**extra, "disk_size_gb": 10}, mha_pool())


def test_bad_streamkv_value_names_the_field(extra: dict, make_backend: Any) -> None:
    with pytest.raises(ConfigError, match="disk_gb"):
        make_backend({**extra, "disk_gb": -1}, mha_pool())


def test_chunk_size_is_the_page_size(extra: dict, make_backend: Any) -> None:
    with pytest.raises(ConfigError, match="chunk_size"):
        make_backend({**extra, "chunk_size": 256}, mha_pool())
    backend = make_backend(extra, mha_pool(page_size=16))
    assert backend.engine.layout.chunk_size == 16


def test_sglang_own_keys_are_accepted(extra: dict, make_backend: Any) -> None:
    backend = make_backend({**extra, "prefetch_threshold": 256, "hicache_storage_pass_prefix_keys": True}, mha_pool())
    assert backend.settings.interface_v1 is True


def test_yaml_config_file_with_inline_overrides(tmp_path: Path, make_backend: Any) -> None:
    yaml_file = tmp_path / "streamkv.yaml"
    yaml_file.write_text(f"disk_dir: {tmp_path / 'from-yaml'}\ndisk_gb: 3\ntiers: [disk]\n")
    backend = make_backend({**LOAD_KEYS, "config": str(yaml_file), "disk_gb": 2}, mha_pool())
    cfg = backend.engine.config
    assert cfg.disk_dir == str(tmp_path / "from-yaml") and cfg.disk_gb == 2 and cfg.tiers == ("disk",)


def test_missing_yaml_file_names_config(tmp_path: Path, make_backend: Any) -> None:
    with pytest.raises(ConfigError, match="config"):
        make_backend({**LOAD_KEYS, "config": str(tmp_path / "nope.yaml")}, mha_pool())


@pytest.mark.parametrize("layout", ["page_head"])
def test_unsupported_host_layout_names_the_flag(layout: str, extra: dict, make_backend: Any) -> None:
    with pytest.raises(ConfigError, match="--hicache-mem-layout"):
        make_backend(extra, mha_pool(layout))


def test_fp8_pool_stored_as_bytes_needs_kv_dtype(extra: dict, make_backend: Any) -> None:
    """SGLang keeps fp8 KV in uint8 buffers; the namespace needs the real dtype."""
    with pytest.raises(ConfigError, match="kv_dtype"):
        make_backend(extra, mla_pool(dtype=torch.uint8), mla=True)
    e4m3 = make_backend({**extra, "kv_dtype": "float8_e4m3fn"}, mla_pool(dtype=torch.uint8), mla=True)
    e5m2 = make_backend({**extra, "kv_dtype": "float8_e5m2"}, mla_pool(dtype=torch.uint8), mla=True)
    assert e4m3.engine.namespace.id != e5m2.engine.namespace.id


def test_missing_model_name_needs_a_fingerprint(extra: dict, make_backend: Any) -> None:
    with pytest.raises(ConfigError, match="model_fingerprint"):
        make_backend(extra, mha_pool(), model=None)
    assert make_backend({**extra, "model_fingerprint": "sha-abc"}, mha_pool(), model=None).engine is not None


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_extra_config_file_as_sglang_parses_it(suffix: str, tmp_path: Path, make_backend: Any) -> None:
    """``--hicache-storage-backend-extra-config @file`` goes through SGLang's own parser first."""
    from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController

    disk = str(tmp_path / "disk")
    path = tmp_path / f"extra{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({**LOAD_KEYS, "interface_v1": 1, "disk_dir": disk, "prefetch_threshold": 128}))
    elif suffix == ".yaml":
        lines = [f"{k}: {v}" for k, v in LOAD_KEYS.items()] + ["interface_v1: 1", f"disk_dir: {disk}"]
        path.write_text("\n".join(lines) + "\n")
    else:
        lines = [f'{k} = "{v}"' for k, v in LOAD_KEYS.items()] + ["interface_v1 = 1", f'disk_dir = "{disk}"']
        path.write_text("\n".join(lines) + "\n")
    extra, *_ = HybridCacheController.parse_storage_backend_extra_config(f"@{path}")
    backend = make_backend(extra, mha_pool())
    assert backend.settings.interface_v1 and backend.engine.config.disk_dir == disk
