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


def reads_in_place(store: Any, every_tier: bool = False) -> bool:
    """Some tier of ``store`` returns views of whole objects and none lends memory it may reuse
    (``Store.range_views``): memory tiers and disk tiers reading through mmap, beside tiers whose
    ranged reads return just the bytes asked (S3), which ``whole_object`` then never accepts.
    The daemon's tier lends shared memory, so a store with it never reads in place.
    ``every_tier``: all tiers return whole views (for callers that would otherwise read an
    object whole in one request, where a failed in-place attempt costs a second one)."""
    tiers = getattr(store, "tiers", None) or [store]
    kinds = {getattr(t, "range_views", "lent") for t in tiers}
    if every_tier:
        return kinds == {"whole"}
    return "whole" in kinds and kinds <= {"whole", "exact"}


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


def _address(buf: Any) -> int:
    """Where a buffer's bytes start."""
    return int(np.frombuffer(buf, dtype=np.uint8, count=1).ctypes.data)
