"""Reading whole objects in place from the local tiers' own memory.

A ranged read from the memory tier is a view of the object's buffer, and from the disk tier
(mmap reads) a view of a mapping of the whole file. Both hold the whole object and are never
changed in place (the memory tier allocates a buffer per object and drops it on eviction; the
disk tier replaces a file by rename and evicts by unlink, neither of which touches pages
already mapped). So after one ranged read, the rest of the object can be sliced from the same
memory with no further call into the store: no thread hop, open or mapping per section."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamkv.store.disk import DiskStore
from streamkv.store.memory import MemoryStore


def reads_in_place(store: Any) -> bool:
    """Every tier of ``store`` returns views of memory that holds whole objects: memory tiers,
    and disk tiers reading through mmap (not ``direct_reads``, whose views are of pooled
    buffers that later reads reuse). Remote tiers (S3, the daemon) return only what was asked."""
    tiers = getattr(store, "tiers", None)
    return bool(tiers) and all(isinstance(t, MemoryStore) or (isinstance(t, DiskStore) and _maps_files(t))
                               for t in tiers)


def whole_object(part: Any, nbytes: int) -> memoryview | None:
    """The memory ``part`` (a ranged read from offset 0) is a view of, from its start, when it
    holds at least ``nbytes``; else None. Compared by address, without reading a byte (on the
    disk tier that would wait for the device on the caller's thread)."""
    exporter = getattr(part, "obj", None)  # a memoryview's exporter: what it slices
    if exporter is None:
        return None
    try:
        view = memoryview(exporter).cast("B")
        if len(view) >= max(nbytes, 1) and _address(view) == _address(part):
            return view
    except (TypeError, ValueError):
        pass
    return None


def _maps_files(tier: DiskStore) -> bool:
    return bool(getattr(tier, "mmap_reads", False)) and not getattr(tier, "direct_reads", True)


def _address(buf: Any) -> int:
    """Where a buffer's bytes start."""
    return int(np.frombuffer(buf, dtype=np.uint8, count=1).ctypes.data)
