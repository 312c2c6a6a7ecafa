"""streamkv for SGLang: a HiCache storage backend (L3) for ``--enable-hierarchical-cache``.

Load it with::

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "streamkv",
        "module_path": "streamkv.adapters.sglang", "class_name": "StreamKVStorage",
        "interface_v1": 1, "disk_dir": "/nvme/streamkv", "disk_gb": 200}'

See README.md beside this file for the flags and the layer-wise plan."""

from __future__ import annotations

from .backend import StreamKVStorage

__all__ = ["StreamKVStorage"]
