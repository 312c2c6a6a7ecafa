"""vLLM connector: ``StreamKVConnector`` for ``--kv-transfer-config``.

``kv_connector_module_path`` is this package, ``streamkv.adapters.vllm``; the
class is imported lazily so that ``model_folder`` (used by tests and benchmarks
before vLLM starts) does not pull in vLLM."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamkv.adapters.vllm.connector import StreamKVConnector

__all__ = ["StreamKVConnector"]


def __getattr__(name: str) -> Any:
    if name == "StreamKVConnector":
        from streamkv.adapters.vllm.connector import StreamKVConnector

        return StreamKVConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
