"""The shared-memory data plane: a pool of segments the daemon owns.

The daemon creates POSIX shared-memory segments (mode 0600, so only its own
user can map them) and hands out regions by (segment, offset, size). Each
client connection holds one staging region: a put writes the encoded object
there and the daemon reads it; a get is copied there by the daemon and read
by the client. Nothing bulk is pickled or sent through the socket. A region
larger than a segment gets a segment of its own, freed with it."""

from __future__ import annotations

import bisect
import os
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Callable

import numpy as np
import structlog

log = structlog.get_logger(__name__)
ALIGN = 4096
SEGMENT_BYTES = 64 << 20


def _round_up(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


@dataclass(frozen=True)
class Region:
    segment: str
    offset: int
    size: int

    def as_wire(self) -> list:
        return [self.segment, self.offset, self.size]


class _Segment:
    def __init__(self, name: str, size: int, dedicated: bool, addressable: bool) -> None:
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        try:  # reserve the pages now: a full /dev/shm fails here, not as SIGBUS on first touch
            os.posix_fallocate(self.shm._fd, 0, size)  # type: ignore[attr-defined]
        except OSError:
            _destroy(self.shm)
            raise
        self.size = size
        # arrays handed out and address lookups need a base array (it pins the mapping)
        self.base = np.frombuffer(self.shm.buf, dtype=np.uint8) if addressable else None
        self.address = self.base.ctypes.data if self.base is not None else 0
        self.dedicated = dedicated
        self.free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, size)

    def alloc(self, size: int) -> int | None:
        for i, (off, n) in enumerate(self.free):
            if n >= size:
                if n == size:
                    del self.free[i]
                else:
                    self.free[i] = (off + size, n - size)
                return off
        return None

    def release(self, off: int, size: int) -> None:
        self.free.append((off, size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for o, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        self.free = merged

    @property
    def empty(self) -> bool:
        return self.free == [(0, self.size)]


class ShmPool:
    """Segments created on demand up to ``capacity_bytes``; first-fit regions inside them."""

    def __init__(self, capacity_bytes: int = 1 << 30, segment_bytes: int = SEGMENT_BYTES,
                 addressable: bool = False) -> None:
        self.capacity_bytes = capacity_bytes
        self.segment_bytes = segment_bytes
        self.addressable = addressable
        self._starts: list[tuple[int, int, str]] = []  # sorted (address, size, name) for locate()
        self.prefix = f"skv{secrets.token_hex(4)}"
        self._segments: dict[str, _Segment] = {}
        self._count = 0
        self._lock = threading.RLock()  # finalizers may free from any thread
        self.used_bytes = 0
        self.failures = 0
        self.quiet = False
        self._blocked_until = 0.0

    @property
    def mapped_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    def alloc(self, size: int) -> Region | None:
        """A region of at least ``size`` bytes, or None when the pool is full."""
        need = _round_up(size)
        with self._lock:
            if need <= self.segment_bytes:
                for name, seg in self._segments.items():
                    if not seg.dedicated:
                        off = seg.alloc(need)
                        if off is not None:
                            return self._granted(name, off, need)
            seg_size = max(need, self.segment_bytes)
            if self.mapped_bytes + seg_size > self.capacity_bytes:
                self.failures += 1
                if not self.quiet:
                        log.warning("shared-memory pool full", need=need, mapped=self.mapped_bytes,
                                capacity=self.capacity_bytes)
                return None
            self._count += 1
            name = f"{self.prefix}_{self._count}"
            if time.monotonic() < self._blocked_until:
                self.failures += 1
                return None
            try:
                seg = _Segment(name, seg_size, dedicated=need > self.segment_bytes, addressable=self.addressable)
            except OSError as exc:  # /dev/shm is full: stop trying for a while
                self.failures += 1
                self._blocked_until = time.monotonic() + 10.0
                log.warning("cannot create a shared-memory segment; retrying in 10 s", size=seg_size,
                            error=str(exc))
                return None
            self._segments[name] = seg
            if seg.base is not None:
                bisect.insort(self._starts, (seg.address, seg.size, name))
            off = seg.alloc(need)
            assert off == 0
            return self._granted(name, 0, need)

    def _granted(self, name: str, off: int, size: int) -> Region:
        self.used_bytes += size
        return Region(name, off, size)

    def free(self, region: Region) -> None:
        with self._lock:
            seg = self._segments.get(region.segment)
            if seg is None:
                return
            seg.release(region.offset, region.size)
            self.used_bytes -= region.size
            if seg.dedicated and seg.empty:
                del self._segments[region.segment]
                self._starts = [t for t in self._starts if t[2] != region.segment]
                seg.base = None
                _destroy(seg.shm)

    def array(self, size: int) -> np.ndarray | None:
        """A uint8 array living in the pool, freed when the last reference to it goes."""
        if not self.addressable:
            raise RuntimeError("array() needs an addressable pool")
        region = self.alloc(size)
        if region is None:
            return None
        seg = self._segments[region.segment]
        assert seg.base is not None
        arr = seg.base[region.offset : region.offset + size]
        weakref.finalize(arr, self.free, region)
        return arr

    def locate(self, part: Any) -> tuple[str, int] | None:
        """(segment, offset) of a buffer that lies inside one of this pool's segments."""
        try:
            addr = np.frombuffer(part, dtype=np.uint8).__array_interface__["data"][0]
        except (TypeError, ValueError):
            return None
        starts = self._starts
        i = bisect.bisect_right(starts, (addr, 1 << 62, "")) - 1
        if i >= 0:
            start, size, name = starts[i]
            if start <= addr < start + size:
                return name, addr - start
        return None

    def view(self, region: Region, length: int | None = None) -> memoryview:
        seg = self._segments[region.segment]
        n = region.size if length is None else length
        return seg.shm.buf[region.offset : region.offset + n]

    def close(self) -> None:
        """Unlink every segment (clients that still map one keep their mapping)."""
        with self._lock:
            for seg in self._segments.values():
                seg.base = None
                _destroy(seg.shm)
            self._segments.clear()
            self._starts = []
            self.used_bytes = 0

    def stats(self) -> dict:
        return {"segments": len(self._segments), "mapped_bytes": self.mapped_bytes,
                "used_bytes": self.used_bytes, "capacity_bytes": self.capacity_bytes,
                "alloc_failures": self.failures}


def _close(shm: shared_memory.SharedMemory) -> None:
    """Close our handle; a mapping that still has views is unmapped when the last one goes."""
    try:
        shm.close()
    except BufferError:
        shm._mmap = None  # type: ignore[attr-defined]  # the views keep the mmap object alive
        shm.close()  # now only closes the file descriptor


def _destroy(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    _close(shm)


class ShmAttachments:
    """The client's mappings of the daemon's segments, by name."""

    def __init__(self) -> None:
        self._maps: dict[str, shared_memory.SharedMemory] = {}
        self._lock = threading.Lock()

    def view(self, segment: str, offset: int, size: int) -> memoryview:
        with self._lock:
            shm = self._maps.get(segment)
            if shm is None:
                shm = shared_memory.SharedMemory(name=segment, create=False)
                # Python 3.11 registers attached segments with the resource tracker,
                # which would unlink the daemon's segment when this process exits.
                try:
                    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
                except Exception:
                    pass
                self._maps[segment] = shm
        if offset < 0 or offset + size > shm.size:
            raise ValueError(f"region {offset}+{size} outside segment {segment} of {shm.size} bytes")
        return shm.buf[offset : offset + size]

    def array(self, segment: str, offset: int, size: int, on_free: Callable[[], None]) -> memoryview:
        """A read view of a leased region; ``on_free`` runs once nothing refers to it any more."""
        view = self.view(segment, offset, size)
        arr = np.frombuffer(view, dtype=np.uint8)
        weakref.finalize(arr, on_free)
        return memoryview(arr)

    def forget(self, segment: str) -> None:
        with self._lock:
            shm = self._maps.pop(segment, None)
        if shm is not None:
            _close(shm)

    def close(self) -> None:
        for name in list(self._maps):
            self.forget(name)
