"""The store interface every tier implements, as zarr's store ABC does.

A store maps keys (``<namespace id>/<name>``) to immutable byte objects.
Everything is async on anyio. A missing object is a result (``None`` /
``False``), not an exception; exceptions are for misuse. Batched forms run
the single forms concurrently unless a tier has something better."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Sequence, TypeVar

import anyio

Buffer = bytes | bytearray | memoryview
ByteRange = tuple[int, int]  # (offset, length)
T = TypeVar("T")

_KEY = re.compile(r"^[0-9A-Za-z_.-]{1,128}/[0-9A-Za-z_.-]{1,200}$")


def check_key(key: str) -> str:
    """Reject keys that could escape a directory or prefix."""
    if not isinstance(key, str) or not _KEY.match(key) or ".." in key or key.startswith("."):
        raise ValueError(f"key={key!r}: expected '<namespace>/<name>' of [0-9A-Za-z_.-], no '..'")
    return key


async def gather(fns: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run coroutine factories concurrently in a task group; results in order."""
    results: list = [None] * len(fns)

    async def run(i: int) -> None:
        results[i] = await fns[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(fns)):
            tg.start_soon(run, i)
    return results


@dataclass
class TierStats:
    """Counters a tier keeps; the engine and telemetry read them."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    errors: int = 0
    evictions: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


class Store(ABC):
    """An async key → bytes store; one tier, or a composition of tiers."""

    name: str = "store"
    #: What a ranged read returns, for callers that slice the rest of an object from the first
    #: read's memory (``store/in_place.py``): "whole" (views of memory holding the whole object,
    #: never changed in place), "exact" (fresh buffers of just the ranges asked: never taken for
    #: a whole object), or "lent" (memory that may be reused after the caller is done).
    range_views: str = "lent"

    def __init__(self) -> None:
        self.counters = TierStats()

    @abstractmethod
    async def get(self, key: str) -> Buffer | None:
        """The whole object, or None."""

    @abstractmethod
    async def get_ranges(self, key: str, ranges: Sequence[ByteRange]) -> list[Buffer] | None:
        """The given byte ranges of one object, or None when it is missing or too short."""

    @abstractmethod
    async def put(self, key: str, data: Buffer) -> bool:
        """Store an object atomically (readers see the old state or the new); False if refused."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    def count_read_in_place(self, key: str, nbytes: int) -> None:
        """A caller read ``nbytes`` of ``key`` by slicing memory a ranged read returned
        (``store/in_place.py``) instead of asking again: counted as read from this tier."""
        self.counters.bytes_read += nbytes

    def exists_now(self, key: str) -> bool | None:
        """Presence from this process's own state, on the calling thread (any thread; reads
        only, no I/O on the store's loop): what an engine's hot "is it there?" question needs
        when a hop onto the loop costs more than the answer. None where the tier cannot tell
        here (S3, the daemon): ask ``exists``."""
        return None

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """True when something was deleted."""

    @abstractmethod
    async def list_keys(self, namespace: str | None = None) -> list[str]:
        """Keys held, optionally only one namespace's."""

    def reader_now(self, key: str) -> Callable[[], Buffer | None] | None:
        """Where this tier keeps ``key`` on this host: a function that reads the whole object
        on any thread (None from it: the object went away meanwhile), so that a caller which
        verifies objects on worker threads reads them there too, instead of a hop through the
        loop per object. None: not here, or not a local tier (S3, the daemon): use ``get``.
        Loop thread only: the tier's own bookkeeping (LRU order, counters) happens here."""
        return None

    def cold_now(self, key: str) -> bool:
        """Reading ``key`` here would wait for a device (a disk tier's file the page cache does
        not hold), as far as this process can tell cheaply; False where it cannot tell. Readers
        use it to keep more reads in flight when they would otherwise mostly wait."""
        return False

    def warm_now(self, key: str) -> bool:
        """All of ``key`` is in this host's memory (the memory tier; a disk tier's file the page
        cache holds whole), as far as this process can tell cheaply; False where it cannot tell.
        Read-ahead hints skip such objects: hinting cached pages reads nothing and costs CPU."""
        return False

    async def prefetch(self, requests: Sequence[tuple[str, ByteRange]]) -> None:
        """A hint: these ranges will be read soon, in this order. A tier that can start the
        I/O early (the disk tier asks the kernel to read ahead) does; the default does nothing."""

    def prefetches(self) -> bool:
        return type(self).prefetch is not Store.prefetch

    async def get_ranges_many(self, requests: Sequence[tuple[str, Sequence[ByteRange]]]) -> list[list[Buffer] | None]:
        """``get_ranges`` of several objects, results in order. The default runs them
        concurrently; a tier whose reads cost less than a task and a thread hop each (mapping
        local files) answers them all in one."""
        if len(requests) == 1:
            key, ranges = requests[0]
            return [await self.get_ranges(key, ranges)]
        return await gather([lambda k=k, r=r: self.get_ranges(k, r) for k, r in requests])

    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        return await gather([lambda k=k: self.get(k) for k in keys])

    async def put_many(self, items: Iterable[tuple[str, Buffer]]) -> list[bool]:
        return await gather([lambda k=k, d=d: self.put(k, d) for k, d in items])

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return await gather([lambda k=k: self.exists(k) for k in keys])

    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        return await gather([lambda k=k: self.delete(k) for k in keys])

    async def clear(self, namespace: str | None = None) -> int:
        """Delete every object (of one namespace); returns how many."""
        return sum(await self.delete_many(await self.list_keys(namespace)))

    async def aclose(self) -> None:
        """Release resources; the default has none."""

    def stats(self) -> dict:
        return {"tier": self.name, **self.counters.as_dict()}
