"""Reads ``--hicache-storage-backend-extra-config`` into streamkv settings.

SGLang passes one dict to every backend, mixing its own keys (which backend to
load, which I/O interface to use) with the backend's. We take SGLang's keys as
they are, our adapter's few keys, and every streamkv setting either inline or
from ``"config": "<streamkv YAML>"`` (inline keys win). Anything else is a typo
that would otherwise silently change nothing, so it is rejected at start-up
with the key named.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from streamkv.config import StreamKVConfig
from streamkv.errors import ConfigError
from streamkv.layout import dtype_name

# Keys SGLang itself reads from the same dict (backend_factory.py,
# cache_controller.py, hybrid_cache_controller.py in sglang 0.5.23). Most are
# popped before the backend sees them; a backend built by hand may still get them.
SGLANG_KEYS = frozenset(
    {
        "backend_name",
        "module_path",
        "class_name",
        "interface_v1",
        "tp_lcm_size",
        "prefetch_threshold",
        "prefetch_timeout_base",
        "prefetch_timeout_per_ki_token",
        "hicache_storage_pass_prefix_keys",
    }
)

# The adapter's own keys.
ADAPTER_KEYS = frozenset({"config", "model_fingerprint", "kv_dtype", "namespace_extra", "exists_cache_ttl_s"})

STREAMKV_KEYS = frozenset(f.name for f in fields(StreamKVConfig))

# streamkv settings that the adapter decides itself: one object per SGLang page.
_ADAPTER_OWNED = {"chunk_size": "one streamkv object holds one SGLang page; the chunk size follows --page-size"}


@dataclass(frozen=True)
class AdapterSettings:
    """Everything the SGLang backend needs from ``extra_config``."""

    config: StreamKVConfig
    model_fingerprint: str | None = None
    kv_dtype: str | None = None
    namespace_extra: str = ""
    interface_v1: bool = False
    exists_cache_ttl_s: float = 2.0


def parse_extra_config(extra: Mapping[str, Any] | None) -> AdapterSettings:
    """Validate SGLang's extra_config; raise ConfigError naming the first bad key."""
    extra = dict(extra or {})
    unknown = sorted(k for k in extra if k not in SGLANG_KEYS | ADAPTER_KEYS | STREAMKV_KEYS)
    if unknown:
        key = unknown[0]
        raise ConfigError(
            key,
            extra[key],
            "unknown key in --hicache-storage-backend-extra-config; streamkv accepts "
            f"{sorted(ADAPTER_KEYS)}, any streamkv setting ({sorted(STREAMKV_KEYS)}) "
            f"and SGLang's own {sorted(SGLANG_KEYS)}",
        )
    for key, why in _ADAPTER_OWNED.items():
        if key in extra:
            raise ConfigError(key, extra[key], why)

    path = extra.get("config")
    if path is not None and not isinstance(path, str):
        raise ConfigError("config", path, "expected the path of a streamkv YAML file")
    inline = {k: v for k, v in extra.items() if k in STREAMKV_KEYS}
    config = StreamKVConfig.load(path, **inline)

    fingerprint = extra.get("model_fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint.strip()):
        raise ConfigError("model_fingerprint", fingerprint,
                          "expected a non-empty string (e.g. the weights' revision hash)")
    kv_dtype = extra.get("kv_dtype")
    if kv_dtype is not None:
        kv_dtype = dtype_name(kv_dtype)
    ns_extra = extra.get("namespace_extra", "")
    if not isinstance(ns_extra, str):
        raise ConfigError("namespace_extra", ns_extra, "expected a string")
    ttl = extra.get("exists_cache_ttl_s", 2.0)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0:
        raise ConfigError("exists_cache_ttl_s", ttl, "expected a number of seconds >= 0 (0 turns the cache off)")
    v1 = extra.get("interface_v1", 0)
    if v1 not in (0, 1, True, False):
        raise ConfigError("interface_v1", v1, "expected 0 or 1")
    return AdapterSettings(
        config=config,
        model_fingerprint=fingerprint,
        kv_dtype=kv_dtype,
        namespace_extra=ns_extra,
        interface_v1=bool(v1),
        exists_cache_ttl_s=float(ttl),
    )
