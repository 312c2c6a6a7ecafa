"""The memory tier: a host-memory pool with a hard byte capacity.

Objects are held in buffers of page-locked memory when CUDA is present (so
host-to-device copies can be asynchronous) and plain host memory otherwise.
Eviction is LRU; a pinned object is never evicted. A put that cannot fit
without evicting pinned objects is refused rather than exceeding capacity.
Readers get zero-copy views: a buffer is never reused, so a view stays valid
after its object is evicted."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

from streamkv.errors import ConfigError
from streamkv.store.base import Buffer, ByteRange, Store, check_key

EvictHook = Callable[[str, memoryview], None]


def _use_pinned_memory() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or without CUDA
        return False


def host_buffer(nbytes: int, pinned: bool) -> np.ndarray:
    """A uint8 array of host memory, page-locked when ``pinned``."""
    if pinned:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    return np.empty(nbytes, dtype=np.uint8)


class MemoryStore(Store):
    name = "memory"
    range_views = "whole"  # views of the object's own buffer; a new buffer per object

    def __init__(self, capacity_bytes: int, pinned: bool | None = None, on_evict: EvictHook | None = None) -> None:
        super().__init__()
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError("memory capacity_bytes", capacity_bytes, "must be a positive number of bytes")
        self.capacity_bytes = capacity_bytes
        self.pinned_memory = _use_pinned_memory() if pinned is None else pinned
        self.on_evict = on_evict
        self._objects: OrderedDict[str, np.ndarray] = OrderedDict()
        self._pins: dict[str, int] = {}
        self.used_bytes = 0

    # -- the Store interface -------------------------------------------------
    async def get(self, key: str) -> Buffer | None:
        return self.get_now(key)

    def get_now(self, key: str) -> memoryview | None:
        """Synchronous get; safe from the loop thread only."""
        buf = self._objects.get(key)
        if buf is None:
            self.counters.misses += 1
            return None
        self._objects.move_to_end(key)
        self.counters.hits += 1
        self.counters.bytes_read += buf.nbytes
        return memoryview(buf)

    def reader_now(self, key: str) -> Callable[[], Buffer | None] | None:
        view = self.get_now(key) if key in self._objects else None
        return None if view is None else (lambda: view)

    def warm_now(self, key: str) -> bool:
        return key in self._objects

    async def get_ranges(self, key: str, ranges: Sequence[ByteRange]) -> list[Buffer] | None:
        buf = self._objects.get(key)
        if buf is None or any(off < 0 or off + n > buf.nbytes for off, n in ranges):
            self.counters.misses += 1
            return None
        self._objects.move_to_end(key)
        self.counters.hits += 1
        self.counters.bytes_read += sum(n for _, n in ranges)
        view = memoryview(buf)
        return [view[off : off + n] for off, n in ranges]

    async def put(self, key: str, data: Buffer) -> bool:
        return self.put_now(key, data)

    def put_now(self, key: str, data: Buffer) -> bool:
        src = memoryview(data).cast("B")
        if not self._room_for(key, len(src)):
            return False
        buf = self.new_buffer(len(src))
        buf[:] = np.frombuffer(src, dtype=np.uint8)
        self._install(key, buf)
        return True

    def adopt(self, key: str, buf: np.ndarray) -> bool:
        """Take ``buf`` (uint8, never written again by the caller) as the object: no copy."""
        if not self._room_for(key, buf.nbytes):
            return False
        self._install(key, buf)
        return True

    def _room_for(self, key: str, size: int) -> bool:
        check_key(key)
        old = self._objects.get(key)
        reclaim = old.nbytes if old is not None else 0
        if size > self.capacity_bytes or not self._make_room(size - reclaim, keep=key):
            self.counters.errors += 1
            return False
        return True

    def _install(self, key: str, buf: np.ndarray) -> None:
        old = self._objects.get(key)
        if old is not None:
            self.used_bytes -= old.nbytes
        self._objects[key] = buf
        self._objects.move_to_end(key)
        self.used_bytes += buf.nbytes
        self.counters.puts += 1
        self.counters.bytes_written += buf.nbytes

    def new_buffer(self, size: int) -> np.ndarray:
        """A fresh uint8 buffer for one object (the daemon overrides it to use shared memory)."""
        return host_buffer(size, self.pinned_memory)

    async def exists(self, key: str) -> bool:
        return key in self._objects

    def exists_now(self, key: str) -> bool:
        return key in self._objects

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [k in self._objects for k in keys]

    async def delete(self, key: str) -> bool:
        buf = self._objects.pop(key, None)
        if buf is None:
            return False
        self._pins.pop(key, None)
        self.used_bytes -= buf.nbytes
        return True

    async def list_keys(self, namespace: str | None = None) -> list[str]:
        if namespace is None:
            return list(self._objects)
        return [k for k in self._objects if k.startswith(namespace + "/")]

    # -- pinning and eviction ------------------------------------------------
    def pin(self, key: str) -> bool:
        """Protect an object from eviction (counted: pin twice, unpin twice)."""
        if key not in self._objects:
            return False
        self._pins[key] = self._pins.get(key, 0) + 1
        return True

    def unpin(self, key: str) -> bool:
        count = self._pins.get(key, 0)
        if count <= 0:
            return False
        if count == 1:
            del self._pins[key]
        else:
            self._pins[key] = count - 1
        return True

    def is_pinned(self, key: str) -> bool:
        return key in self._pins

    @property
    def pinned_bytes(self) -> int:
        return sum(self._objects[k].nbytes for k in self._pins if k in self._objects)

    def _make_room(self, need: int, keep: str) -> bool:
        """Evict least recently used unpinned objects until ``need`` more bytes fit."""
        if self.used_bytes + need <= self.capacity_bytes:
            return True
        evictable = sum(b.nbytes for k, b in self._objects.items() if k not in self._pins and k != keep)
        if self.used_bytes - evictable + need > self.capacity_bytes:
            return False
        for key in [k for k in self._objects if k not in self._pins and k != keep]:
            if self.used_bytes + need <= self.capacity_bytes:
                break
            buf = self._objects.pop(key)
            self.used_bytes -= buf.nbytes
            self.counters.evictions += 1
            if self.on_evict is not None:
                self.on_evict(key, memoryview(buf))
        return True

    def stats(self) -> dict:
        return {
            **super().stats(),
            "objects": len(self._objects),
            "used_bytes": self.used_bytes,
            "capacity_bytes": self.capacity_bytes,
            "pinned_bytes": self.pinned_bytes,
        }
