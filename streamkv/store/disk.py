"""The disk tier: one file per object under a directory, on a local SSD.

Writes go to a temporary file that is renamed into place, so a reader sees
the old object or the new one, never half of one; a temporary file left by a
crash is removed on start. The index (key → size, LRU order) lives in memory
and is rebuilt from the directory on start, oldest file first. Reads run on
worker threads under the shared ``disk_io`` limiter; ranged reads use
``os.pread`` so one layer section costs one read."""

from __future__ import annotations

import mmap
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import anyio
import numpy as np
import structlog

from streamkv.errors import ConfigError
from streamkv.store.base import Buffer, ByteRange, Store, check_key
from streamkv.store.limits import Limits

log = structlog.get_logger(__name__)
TMP_PREFIX = ".tmp."


def _read_file(path: Path) -> np.ndarray | None:
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buf = np.empty(size, dtype=np.uint8)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    return None
                got += n
            return buf
    except OSError:  # missing, or a failing disk: a miss
        return None


def _read_ranges(path: Path, ranges: Sequence[ByteRange]) -> list[bytes] | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # missing, or a failing disk: a miss
        return None
    try:
        out = []
        for off, n in ranges:
            data = os.pread(fd, n, off)
            if len(data) != n:
                return None
            out.append(data)
        return out
    finally:
        os.close(fd)


def _map_ranges(path: Path, ranges: Sequence[ByteRange]) -> list[memoryview] | None:
    """Ranges as views of a read-only mapping: the page cache is read in place, no copy.

    Safe because objects are immutable: a writer replaces a file by rename (a new
    inode) and eviction unlinks it, neither of which touches pages already mapped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # missing, or a failing disk: a miss
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0 or any(off < 0 or off + n > size for off, n in ranges):
            return None
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    if ranges and ranges[0][0] == 0:
        # a read from offset 0 is a header: a layer-wise retrieve of this object starts, so
        # let the kernel read the whole file ahead (its I/O, not our CPU) while layers stream
        mapped.madvise(mmap.MADV_WILLNEED)
    else:
        for off, n in ranges:
            mapped.madvise(mmap.MADV_WILLNEED, off - off % mmap.PAGESIZE, n + off % mmap.PAGESIZE)
    view = memoryview(mapped)
    return [view[off : off + n] for off, n in ranges]


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_atomic(path: Path, data: memoryview, fsync: bool) -> None:
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb", buffering=0) as f:
            f.write(data)
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class DiskStore(Store):
    name = "disk"

    def __init__(self, root: str | os.PathLike, capacity_bytes: int, *, fsync: bool = False,
                 limits: Limits | None = None, on_evict: Callable[[str, memoryview], None] | None = None,
                 mmap_reads: bool = True) -> None:
        super().__init__()
        self.mmap_reads = mmap_reads
        self.on_evict = on_evict
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError("disk capacity_bytes", capacity_bytes, "must be a positive number of bytes")
        self.root = Path(root).expanduser()
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
        buf = await self._run(_read_file, self._path(key))
        return self._account(key, buf, None if buf is None else buf.nbytes)

    async def get_ranges(self, key: str, ranges: Sequence[ByteRange]) -> list[Buffer] | None:
        if not self._known(key):
            self.counters.misses += 1
            return None
        parts = await self._run(_map_ranges if self.mmap_reads else _read_ranges, self._path(key), list(ranges))
        return self._account(key, parts, None if parts is None else sum(len(p) for p in parts))

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
        try:
            await self._run(_write_atomic, path, view, self.fsync)
        except OSError as exc:
            self.counters.errors += 1
            log.warning("disk write failed", key=key, error=str(exc))
            return False
        self._forget(key)
        self._index[key] = size
        self.used_bytes += size
        self.counters.puts += 1
        self.counters.bytes_written += size
        if self.used_bytes > self.capacity_bytes:
            await self._evict(keep=key)
        return True

    def _victims(self, keep: str | None = None) -> list[str]:
        """Drop least recently used entries from the index until the tier fits; returns them."""
        victims = []
        for key in list(self._index):
            if self.used_bytes <= self.capacity_bytes:
                break
            if key != keep:
                self._forget(key)
                victims.append(key)
        self.counters.evictions += len(victims)
        return victims

    async def _evict(self, keep: str | None = None) -> None:
        """Evict to capacity; with an ``on_evict`` hook (write-back), hand each object down first."""
        for key in self._victims(keep):
            path = self._path(key)
            if self.on_evict is not None:
                data = await self._run(_read_file, path)
                if data is not None:
                    self.on_evict(key, memoryview(data))
            await self._run(_unlink_quietly, path)

    def _evict_sync(self, need: int = 0, keep: str | None = None) -> int:
        """Evict at start-up (no loop yet, nothing to hand down)."""
        victims = self._victims(keep)
        for key in victims:
            _unlink_quietly(self._path(key))
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
        try:
            size = os.stat(self._path(key)).st_size
        except OSError:  # missing, or a failing disk: not here
            return False
        self._index[key] = size
        self.used_bytes += size
        return True

    async def exists(self, key: str) -> bool:
        return self._known(key)

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
