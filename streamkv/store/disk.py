"""The disk tier: one file per object under a directory, on a local SSD.

Writes go to a temporary file that is renamed into place, so a reader sees
the old object or the new one, never half of one; a temporary file left by a
crash is removed on start. Objects of ``DIRECT_MIN_BYTES`` and more are
written with ``O_DIRECT`` from a reused page-aligned buffer (padded to 4096
bytes, then truncated to the object's size): the bytes go to the device by
DMA, with no copy into the page cache and no writeback of it later. Smaller
objects are written buffered (measured faster there: one O_DIRECT write waits
for the device, a buffered one does not). Where the filesystem refuses
``O_DIRECT`` (``EINVAL``) the tier writes buffered from then on. The index
(key → size, LRU order) lives in memory and is rebuilt from the directory on
start, oldest file first. Reads run on worker threads under the shared
``disk_io`` limiter; ranged reads use ``os.pread`` so one layer section costs
one read."""

from __future__ import annotations

import errno
import mmap
import os
import uuid
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import anyio
import numpy as np
import structlog

from streamkv.errors import ConfigError
from streamkv.store.base import Buffer, ByteRange, Store, check_key
from streamkv.store.direct_io import AlignedBuffers, DirectIOUnsupported, read_ranges_direct
from streamkv.store.limits import Limits

log = structlog.get_logger(__name__)
TMP_PREFIX = ".tmp."


def _new_buffer(size: int) -> np.ndarray:
    return np.empty(size, dtype=np.uint8)


def _read_file(path: Path, alloc: Callable[[int], np.ndarray] = _new_buffer) -> np.ndarray | None:
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buf = alloc(size)
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
    for off, n in ranges:
        mapped.madvise(mmap.MADV_WILLNEED, off - off % mmap.PAGESIZE, n + off % mmap.PAGESIZE)
    view = memoryview(mapped)
    return [view[off : off + n] for off, n in ranges]


def _map_whole(path: Path, size: int) -> memoryview | None:
    parts = _map_ranges(path, [(0, size)])
    return None if parts is None else parts[0]


def _advise(requests: Sequence[tuple[Path, int, int]]) -> None:
    """Queue kernel read-ahead for (file, offset, length) in the given order; errors ignored."""
    fds: dict[Path, int] = {}
    try:
        for path, off, n in requests:
            if path not in fds:
                try:
                    fds[path] = os.open(path, os.O_RDONLY)
                except OSError:
                    fds[path] = -1
            if fds[path] >= 0:
                try:
                    os.posix_fadvise(fds[path], off, n, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
    finally:
        for fd in fds.values():
            if fd >= 0:
                os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


ALIGN = 4096  # O_DIRECT offset/length/buffer alignment: covers 512- and 4096-byte sectors
DIRECT_PIECE = 8 << 20  # bytes per O_DIRECT write; also the size of one aligned buffer
DIRECT_MIN_BYTES = 128 << 10  # smaller objects are written buffered (see benchmarks/README.md)
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none: always buffered
MAPPED_WHOLE_BYTES = 4 << 20  # whole-object reads (reader_now) of this size and more map the file


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


_buffers = AlignedBuffers(max_idle_bytes=4 * DIRECT_PIECE)  # staging for O_DIRECT writes


def _create(tmp: Path, flags: int) -> int:
    """Create ``tmp`` for writing (never an existing file); makes its directory if missing."""
    flags |= os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        return os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return os.open(tmp, flags, 0o644)


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _write_direct(fd: int, data: memoryview) -> None:
    """Write ``data`` to an O_DIRECT ``fd`` in aligned pieces copied into an aligned buffer;
    the last piece is zero-padded to ``ALIGN`` and the padding cut off with ``ftruncate``."""
    size = len(data)
    buf = _buffers.take(DIRECT_PIECE)  # back to the pool when this function drops it
    with memoryview(buf) as view:
        off = 0
        while off < size:
            n = min(len(view), size - off)
            view[:n] = data[off : off + n]
            end = _round_up(n)
            if end > n:
                view[n:end] = bytes(end - n)
            done = 0
            while done < end:
                wrote = os.pwrite(fd, view[done:end], off + done)
                if wrote <= 0 or wrote % ALIGN:  # a short O_DIRECT write: give up, not misalign
                    raise OSError(errno.EIO, f"short direct write ({wrote} of {end - done} bytes)")
                done += wrote
            off += n
    del buf
    if _round_up(size) != size:
        os.ftruncate(fd, size)


def _write_file(path: Path, data: memoryview, fsync: bool, direct: bool) -> None:
    """Write ``data`` to a new temporary file beside ``path`` and rename it into place; on any
    failure the temporary file is removed and ``path`` keeps what it had."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}"
    fd = -1
    try:
        fd = _create(tmp, _O_DIRECT if direct else 0)
        if direct:
            _write_direct(fd, data)
        else:
            _write_all(fd, data)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _unlink_quietly(tmp)
        raise


def _write_atomic(path: Path, data: memoryview, fsync: bool, direct: bool = True) -> bool:
    """Store ``data`` as ``path``, atomically. Returns whether it was written with O_DIRECT:
    False when ``direct`` is off, or when the filesystem refused O_DIRECT (``EINVAL``, at open
    or at write), in which case it was written buffered instead."""
    if direct and _O_DIRECT:
        try:
            _write_file(path, data, fsync, direct=True)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _write_file(path, data, fsync, direct=False)
    return False


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
        buf = await self._run(_read_file, self._path(key))
        return self._account(key, buf, None if buf is None else buf.nbytes)

    async def get_ranges(self, key: str, ranges: Sequence[ByteRange]) -> list[Buffer] | None:
        if not self._known(key):
            self.counters.misses += 1
            return None
        parts = None
        if self.direct_reads:
            try:
                parts = await self._run(read_ranges_direct, self._path(key), list(ranges), self._read_buffers)
            except DirectIOUnsupported as exc:
                self._direct_reads_refused(exc)
        if not self.direct_reads:
            parts = await self._run(_map_ranges if self.mmap_reads else _read_ranges, self._path(key), list(ranges))
        return self._account(key, parts, None if parts is None else sum(len(p) for p in parts))

    def reader_now(self, key: str) -> Callable[[], Buffer | None] | None:
        """Objects of ``MAPPED_WHOLE_BYTES`` and more are read as a view of a mapping of the
        file (in place, no copy); smaller ones into a pooled buffer, back in the pool once the
        caller drops every view of it: on the development VM a fresh buffer per small object
        cost more than reading into it (page faults), and mapping small files cost more than a
        read."""
        if not self._known(key):
            return None
        size = self._index[key]
        self._account(key, True, size)
        path = self._path(key)
        if self.direct_reads:
            return partial(self._read_direct, path, size)
        if self.mmap_reads and size >= MAPPED_WHOLE_BYTES:
            return partial(_map_whole, path, size)
        return partial(_read_file, path, self._read_buffers.take)

    def _read_direct(self, path: Path, size: int) -> Buffer | None:
        try:
            parts = read_ranges_direct(path, [(0, size)], self._read_buffers)
        except DirectIOUnsupported as exc:
            self._direct_reads_refused(exc)
            return _read_file(path, self._read_buffers.take)
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
            await self._run(_advise, known)

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
            direct = await self._run(_write_atomic, path, view, self.fsync, want_direct)
        except OSError as exc:
            self.counters.errors += 1
            log.warning("disk write failed", key=key, error=str(exc))
            return False
        if want_direct and not direct:
            self.direct_writes = False
            log.info("disk tier writes buffered: the filesystem refuses O_DIRECT", root=str(self.root))
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
                self._evicting.add(key)  # its file lingers until unlinked: not to be re-indexed
                victims.append(key)
        self.counters.evictions += len(victims)
        return victims

    async def _evict(self, keep: str | None = None) -> None:
        """Evict to capacity; with an ``on_evict`` hook (write-back), hand each object down first."""
        for key in self._victims(keep):
            path = self._path(key)
            try:
                if self.on_evict is not None:
                    data = await self._run(_read_file, path)
                    if data is not None:
                        self.on_evict(key, memoryview(data))
                await self._run(_unlink_quietly, path)
            finally:
                self._evicting.discard(key)

    def _evict_sync(self, need: int = 0, keep: str | None = None) -> int:
        """Evict at start-up (no loop yet, nothing to hand down)."""
        victims = self._victims(keep)
        for key in victims:
            _unlink_quietly(self._path(key))
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
        try:
            return os.stat(self._path(key)).st_size
        except OSError:  # missing, or a failing disk: not here
            return None

    async def exists(self, key: str) -> bool:
        return self._known(key)

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
