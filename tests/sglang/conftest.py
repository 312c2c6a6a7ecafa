"""Fixtures for the SGLang adapter tests; they run in the sglang environment (.venv-sglang).

Backends are built the way SGLang builds them: ``StorageBackendFactory.create_backend("dynamic", ...)``
with the extra_config a user passes on the command line, then ``register_mem_pool_host`` with a
real SGLang host pool (see pools.py)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None
if HAVE_SGLANG:
    with warnings.catch_warnings():
        # Importing sglang pulls in flashinfer/cutlass, which warn at import on a CPU machine;
        # import the heavy modules once, quietly, before the tests do.
        warnings.simplefilter("ignore")
        import sglang.srt.managers.cache_controller  # noqa: F401
        import sglang.srt.mem_cache.storage.backend_factory  # noqa: F401

from tests.s3_server import s3_bucket, s3_server  # noqa: E402,F401  (the shared moto S3 fixtures)

LOAD_KEYS = {
    "backend_name": "streamkv",
    "module_path": "streamkv.adapters.sglang",
    "class_name": "StreamKVStorage",
}

MakeBackend = Callable[..., Any]


@pytest.fixture
def extra(tmp_path: Path) -> dict[str, Any]:
    """A user's extra_config for a disk-only cache in this test's directory (zero-copy interface)."""
    return {**LOAD_KEYS, "interface_v1": 1, "tiers": "disk", "disk_dir": str(tmp_path / "disk"), "disk_gb": 1}


@pytest.fixture
def make_backend() -> Iterator[MakeBackend]:
    """``make_backend(extra, pool, **rank)``: a backend through SGLang's factory, bound to ``pool``."""
    made: list[Any] = []

    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from .pools import storage_config

    def make(extra: dict[str, Any], pool: Any, **rank: Any) -> Any:
        config = storage_config(extra, page_first=pool.layout == "page_first", **rank)
        backend = StorageBackendFactory.create_backend("dynamic", config, pool)
        backend.register_mem_pool_host(pool)
        backend.on_host_pools_registered()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test here is marked ``sglang`` (``-m "not sglang"`` leaves them out)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.sglang)
