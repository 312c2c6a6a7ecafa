"""O_DIRECT helpers: reused page-aligned buffers, and ranged reads into them.

A cold layer read through the page cache costs the CPU twice: the kernel fills
and maps page-cache pages, and a fresh buffer costs a page fault per 4 KiB. On
a small CPU that time is taken from the forward the read is meant to overlap.
With O_DIRECT the device writes straight into a buffer this pool hands out
again once nothing refers to it any more. The disk tier's O_DIRECT writes stage
through the same buffers."""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

ALIGN = 4096
SIZE_STEP = 64 << 10  # buffers are pooled by size, rounded up to this


def _round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


class AlignedBuffers:
    """Page-aligned buffers, pooled by size; a buffer returns to the pool when the last
    view of the array handed out is gone (keep views derived through ``memoryview``)."""

    def __init__(self, max_idle_bytes: int = 256 << 20) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[np.ndarray]] = {}
        self.idle_bytes = 0
        self.created = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        size = _round_up(max(nbytes, 1), SIZE_STEP)
        with self._lock:
            free = self._idle.get(size)
            base = free.pop() if free else None
            if base is not None:
                self.idle_bytes -= size
        if base is None:
            base = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)  # anonymous maps are page-aligned
            self.created += 1
        out = base[:nbytes]
        weakref.finalize(out, self._give_back, base)
        return out

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            if self.idle_bytes + base.nbytes <= self.max_idle_bytes:
                self._idle.setdefault(base.nbytes, []).append(base)
                self.idle_bytes += base.nbytes


class DirectIOUnsupported(OSError):
    """The filesystem refuses O_DIRECT (tmpfs, some overlay and network filesystems)."""


def read_ranges_direct(path: Path, ranges: Sequence[tuple[int, int]],
                       buffers: AlignedBuffers) -> list[memoryview] | None:
    """Each range read with O_DIRECT (widened to whole blocks) into a pooled buffer; None
    when the file is missing, unreadable or shorter than a range."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == 22:  # EINVAL: no O_DIRECT here
            raise DirectIOUnsupported(exc.errno, str(exc)) from exc
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0 or any(off < 0 or n < 0 or off + n > size for off, n in ranges):
            return None
        parts = []
        for off, n in ranges:
            start = off - off % ALIGN
            length = _round_up(off + n, ALIGN) - start
            buf = buffers.take(length)
            view = memoryview(buf)
            try:
                got = os.preadv(fd, [view], start)
            except OSError as exc:
                if exc.errno == 22:
                    raise DirectIOUnsupported(exc.errno, str(exc)) from exc
                return None
            if got < off + n - start:
                return None
            parts.append(view[off - start : off - start + n])
        return parts
    finally:
        os.close(fd)
