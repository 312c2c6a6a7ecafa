"""The disk tier: one file per object under a directory, on a local SSD.

Files are written atomically, large ones with O_DIRECT (``disk_write.py``), and read whole,
by ranges or mapped (``disk_read.py``). The index (key → size, LRU order) lives in memory
and is rebuilt from the directory on start, oldest file first; files another process wrote
into the same directory are indexed when first asked for. Reads and writes run on worker
threads under the shared ``disk_io`` limiter; a ranged read of one layer section costs one
read, or none where the object's mapping is already in hand (``store/in_place.py``)."""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import anyio
import structlog

from streamkv.errors import ConfigError
from streamkv.store.base import Buffer, ByteRange, Store, check_key
from streamkv.store.direct_io import O_DIRECT, AlignedBuffers, DirectIOUnsupported, read_ranges_direct
from streamkv.store.disk_read import Take, advise, is_cold, is_warm, map_ranges, new_buffer, read_ranges, read_whole
from streamkv.store.disk_write import DIRECT_MIN_BYTES, TMP_PREFIX, unlink_quietly, write_atomic
from streamkv.store.limits import Limits

log = structlog.get_logger(__name__)
MAPPED_WHOLE_BYTES = 4 << 20  # whole-object reads (reader_now) of this size and more map the file


class DiskStore(Store):
    name = "disk"

    @property
    def range_views(self) -> str:  # type: ignore[override]
        """mmap reads view a mapping of the whole file (files are replaced by rename, never
        changed in place); O_DIRECT reads fill pooled buffers that later reads reuse."""
        if self.direct_reads:
            return "lent"
        return "whole" if self.mmap_reads else "exact"

    def __init__(self, root: str | os.PathLike, capacity_bytes: int, *, fsync: bool = False,
                 limits: Limits | None = None, on_evict: Callable[[str, memoryview], None] | None = None,
                 mmap_reads: bool = True, direct_writes: bool = True, direct_reads: bool = False) -> None:
        super().__init__()
        self.mmap_reads = mmap_reads
        self.direct_reads = direct_reads
        self._read_buffers = AlignedBuffers()
        self.direct_writes = direct_writes  # O_DIRECT puts; turned off if the filesystem refuses them
        self.cold_direct_reads = bool(O_DIRECT)  # cold whole objects by O_DIRECT (disk_read.read_whole)
        self.on_evict = on_evict
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError("disk capacity_bytes", capacity_bytes, "must be a positive number of bytes")
        self.root = Path(root).expanduser()
        self._root = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{TMP_PREFIX}probe.{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError("disk_dir", str(root), f"not a writable directory ({exc.strerror})") from exc
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self.limits = limits or Limits()
        self._index: OrderedDict[str, int] = OrderedDict()
        self._evicting: set[str] = set()
        self.used_bytes = 0
        self._rebuild_index()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _rebuild_index(self) -> None:
        """Index every complete object; delete temporaries a crash left behind."""
        found: list[tuple[float, str, int]] = []
        removed = 0
        for ns_dir in self.root.iterdir():
            if not ns_dir.is_dir() or ns_dir.name.startswith("."):
                continue
            for entry in os.scandir(ns_dir):
                if entry.name.startswith(TMP_PREFIX):
                    os.unlink(entry.path)
                    removed += 1
                elif entry.is_file():
                    st = entry.stat()
                    found.append((st.st_mtime, f"{ns_dir.name}/{entry.name}", st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self.used_bytes += size
        if found or removed:
            log.info("disk index rebuilt", root=str(self.root), objects=len(found), torn_removed=removed)
        if self.used_bytes > self.capacity_bytes:
            self._evict_sync(0)

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limits.limiter("disk_io"))

    async def get(self, key: str) -> Buffer | None:
        if not self._known(key):
            self.counters.misses += 1
            return None
        buf = await self._run(self._read_whole, self._path(key), new_buffer, self._read_buffers.take)
        return self._account(key, buf, None if buf is None else buf.nbytes)

    async def get_ranges(self, key: str, ranges: Sequence[ByteRange]) -> list[Buffer] | None:
        if not self._known(key):
            self.counters.misses += 1
            return None
        parts = None
        if self.direct_reads:
            try:
                parts = await self._run(read_ranges_direct, self._path(key), list(ranges), self._read_buffers.take)
            except DirectIOUnsupported as exc:
                self._direct_reads_refused(exc)
        if not self.direct_reads:
            parts = await self._run(map_ranges if self.mmap_reads else read_ranges, self._path(key), list(ranges))
        return self._account(key, parts, None if parts is None else sum(len(p) for p in parts))

    async def get_ranges_many(self, requests: Sequence[tuple[str, Sequence[ByteRange]]]) -> list[list[Buffer] | None]:
        """Mapped reads of several objects in one worker-thread hop: mapping a file costs tens
        of microseconds, a task and a hop per file several times that on a small CPU (a
        layer-wise retrieve's 16 chunk headers: ~4.5 ms one by one, 0.3 ms of mapping)."""
        if self.direct_reads or not self.mmap_reads or len(requests) < 2:
            return await super().get_ranges_many(requests)
        known = [(i, self._path(key), list(ranges)) for i, (key, ranges) in enumerate(requests) if self._known(key)]
        mapped = await self._run(lambda: [map_ranges(path, ranges) for _, path, ranges in known])
        out: list[list[Buffer] | None] = [None] * len(requests)
        for (i, _, _), parts in zip(known, mapped):
            out[i] = self._account(requests[i][0], parts, None if parts is None else sum(len(p) for p in parts))
        self.counters.misses += len(requests) - len(known)
        return out

    def reader_now(self, key: str) -> Callable[[], Buffer | None] | None:
        """Objects of ``MAPPED_WHOLE_BYTES`` and more are read as a view of a mapping of the
        file (in place, no copy) where the page cache holds them, and with O_DIRECT where it
        does not; smaller ones into a pooled buffer, back in the pool once the caller drops
        every view of it: on the development VM a fresh buffer per small object cost more than
        reading into it (page faults), and mapping small files cost more than a read."""
        if not self._known(key):
            return None
        size = self._index[key]
        self._account(key, True, size)
        path = self._path(key)
        if self.direct_reads:
            return partial(self._read_direct, path, size)
        pool = self._read_buffers
        return partial(self._read_whole, path, pool.take, pool.take_huge, self.mmap_reads and size >= MAPPED_WHOLE_BYTES)

    def _read_whole(self, path: Path, take: Take, direct: Take, map_warm: bool = False) -> Buffer | None:
        """``disk_read.read_whole``, cold large objects with O_DIRECT into buffers from ``direct``
        while the filesystem allows it."""
        try:
            return read_whole(path, take, direct if self.cold_direct_reads else None, map_warm)
        except DirectIOUnsupported as exc:
            if self.cold_direct_reads:
                log.info("O_DIRECT refused; cold objects read through the page cache", root=str(self.root),
                         error=str(exc))
            self.cold_direct_reads = False
            return read_whole(path, take, None, map_warm)

    def _read_direct(self, path: Path, size: int) -> Buffer | None:
        try:
            parts = read_ranges_direct(path, [(0, size)], self._read_buffers.take)
        except DirectIOUnsupported as exc:
            self._direct_reads_refused(exc)
            return self._read_whole(path, self._read_buffers.take, self._read_buffers.take)
        return None if parts is None else parts[0]

    def _direct_reads_refused(self, exc: DirectIOUnsupported) -> None:
        """This filesystem refuses O_DIRECT: page-cache reads from now on."""
        if self.direct_reads:
            log.info("O_DIRECT reads refused; reading through the page cache", root=str(self.root),
                     error=str(exc))
        self.direct_reads = False

    async def prefetch(self, requests: Sequence[tuple[str, ByteRange]]) -> None:
        """Ask the kernel to read the ranges ahead, in order: its I/O, not our CPU. A layer-wise
        retrieve passes its sections layer-major, so layer 0 of every chunk arrives first."""
        known = [(self._path(k), off, n) for k, (off, n) in requests if self._known(k)]
        if known:
            await self._run(advise, known)

    def _account(self, key: str, result, nbytes: int | None):  # type: ignore[no-untyped-def]
        if result is None:
            self.counters.misses += 1
            self._forget(key)
            return None
        if key in self._index:
            self._index.move_to_end(key)
        self.counters.hits += 1
        self.counters.bytes_read += nbytes or 0
        return result

    async def put(self, key: str, data: Buffer) -> bool:
        path = self._path(key)
        view = memoryview(data).cast("B")
        size = len(view)
        if size > self.capacity_bytes:
            self.counters.errors += 1
            return False
        want_direct = self.direct_writes and size >= DIRECT_MIN_BYTES
        try:
            direct = await self._run(write_atomic, path, view, self.fsync, want_direct)
        except OSError as exc:
            self.counters.errors += 1
            log.warning("disk write failed", key=key, error=str(exc))
            return False
        if want_direct and not direct:
            self.direct_writes = False
            log.warning("disk tier writes buffered from now on: the filesystem refuses O_DIRECT",
                        root=self._root)
        self._forget(key)
        self._index[key] = size
        self.used_bytes += size
        self.counters.puts += 1
        self.counters.bytes_written += size
        if self.used_bytes > self.capacity_bytes:
            await self._evict(keep=key)
        return True

    @property
    def leaving_bytes(self) -> int:
        """Bytes of objects still indexed (readable) while they are handed down to the tier below."""
        return sum(self._index.get(key, 0) for key in self._evicting)

    def _victims(self, keep: str | None = None, hand_down: bool = False) -> list[str]:
        """Least recently used entries to drop until the tier fits. Without ``hand_down`` they
        leave the index at once. With it they stay in the index, readable, until ``_evict`` has
        handed them to the tier below: otherwise a read between the two finds them in no tier."""
        victims = []
        over = self.used_bytes - self.leaving_bytes - self.capacity_bytes
        for key, size in list(self._index.items()):
            if over <= 0:
                break
            if key == keep or key in self._evicting:
                continue
            self._evicting.add(key)  # its file lingers until unlinked: not to be re-indexed
            if not hand_down:
                self._forget(key)
            over -= size
            victims.append(key)
        self.counters.evictions += len(victims)
        return victims

    async def _evict(self, keep: str | None = None) -> None:
        """Evict to capacity; with an ``on_evict`` hook (write-back), hand each object down first.
        A victim put again meanwhile still goes (the same object, and it went down); one put
        again after it left the index is looked at again once this round is done."""
        hand_down = self.on_evict is not None
        while victims := self._victims(keep, hand_down):
            for key in victims:
                path = self._path(key)
                try:
                    if hand_down:
                        data = await self._run(self._read_whole, path, new_buffer, self._read_buffers.take)
                        if data is not None:
                            self.on_evict(key, memoryview(data))  # type: ignore[misc]
                        self._forget(key)
                    await self._run(unlink_quietly, path)
                finally:
                    self._evicting.discard(key)
                if key in self._index and not path.exists():  # put again, then unlinked by us
                    self._forget(key)

    def _evict_sync(self, need: int = 0, keep: str | None = None) -> int:
        """Evict at start-up (no loop yet, nothing to hand down)."""
        victims = self._victims(keep)
        for key in victims:
            unlink_quietly(self._path(key))
            self._evicting.discard(key)
        return len(victims)

    def _forget(self, key: str) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self.used_bytes -= size

    def _known(self, key: str) -> bool:
        """In the index, or written since by another process sharing the directory
        (then indexed now): ranks and replicas on one host see each other's chunks."""
        if key in self._index:
            return True
        size = self._unindexed_size(key)
        if size is None:
            return False
        self._index[key] = size
        self.used_bytes += size
        return True

    def _unindexed_size(self, key: str) -> int | None:
        """Size of ``key``'s file where the index lacks it (another process wrote it), or None:
        no such file, a failing disk, or a file this tier is evicting (never to be re-indexed)."""
        if key in self._evicting:
            return None
        try:  # a plain string: a Path per key cost 4x the stat (lookups of 512 keys, most absent)
            return os.stat(f"{self._root}/{check_key(key)}").st_size
        except OSError:  # missing, or a failing disk: not here
            return None

    async def exists(self, key: str) -> bool:
        return self._known(key)

    def cold_now(self, key: str) -> bool:
        """A whole read of ``key`` would go to the device: ``disk_read.is_cold``, the rule
        ``read_whole`` follows (one ``cachestat`` call, Linux 6.5+; False where the kernel
        cannot tell or the file is not there)."""
        return self._page_cache_says(key, is_cold)

    def warm_now(self, key: str) -> bool:
        """The page cache holds all of ``key``'s file (``disk_read.is_warm``)."""
        return self._page_cache_says(key, is_warm)

    def _page_cache_says(self, key: str, rule: Callable[[int, int], bool]) -> bool:
        if key not in self._index:
            return False
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except OSError:
            return False
        try:
            return rule(fd, self._index[key])
        finally:
            os.close(fd)

    def exists_now(self, key: str) -> bool:
        """``exists`` without indexing a file another process wrote (that is the loop's to do,
        when the object is read): the index, else a ``stat`` of the file."""
        if key in self._index:
            return True
        try:
            return self._unindexed_size(key) is not None
        except ValueError:  # not a key this store could hold
            return False

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self._known(k) for k in keys]

    async def delete(self, key: str) -> bool:
        if key not in self._index:
            return False
        self._forget(key)
        try:
            await self._run(os.unlink, self._path(key))
        except FileNotFoundError:
            pass
        return True

    async def list_keys(self, namespace: str | None = None) -> list[str]:
        if namespace is None:
            return list(self._index)
        return [k for k in self._index if k.startswith(namespace + "/")]

    def stats(self) -> dict:
        return {
            **super().stats(),
            "objects": len(self._index),
            "used_bytes": self.used_bytes,
            "capacity_bytes": self.capacity_bytes,
            "root": str(self.root),
            "direct_writes": self.direct_writes,  # False once the filesystem refused O_DIRECT
        }


def drop_page_cache(root: str | os.PathLike, sync: bool = True) -> None:
    """Write back, then evict every file under ``root`` from the page cache, so the next
    reads come from the device (cold-read benchmarks; touches only these files)."""
    for path in Path(root).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                if sync:
                    os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
