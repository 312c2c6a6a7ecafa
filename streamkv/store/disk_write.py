"""Writing the disk tier's files: a temporary file renamed into place, O_DIRECT for large ones.

A reader sees the old object or the new one, never half of one; a temporary file left by a
crash is removed when the tier starts. Objects of ``DIRECT_MIN_BYTES`` and more are written
with ``O_DIRECT``, straight from the caller's buffer where it lies in huge pages, else from a
reused aligned one (all but the last partial block: that one goes through the page cache): the
bytes go to the device by DMA, with no copy into the page cache and no writeback of it later.
Smaller objects are written buffered (measured faster there: one O_DIRECT write waits for the
device, a buffered one does not). Where the filesystem refuses ``O_DIRECT`` (``EINVAL``)
``write_atomic`` writes buffered and says so."""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from pathlib import Path

import numpy as np

from streamkv.store.direct_io import ALIGN, HUGE_BYTES, O_DIRECT, AlignedBuffers

TMP_PREFIX = ".tmp."
DIRECT_PIECE = 8 << 20  # bytes per O_DIRECT write; also the size of one aligned buffer
DIRECT_MIN_BYTES = 128 << 10  # smaller objects are written buffered (see benchmarks/README.md)

_buffers = AlignedBuffers(max_idle_bytes=4 * DIRECT_PIECE)  # staging for O_DIRECT writes


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
    """Write ``data`` to an O_DIRECT ``fd``: its whole blocks by DMA, the last partial block
    through the page cache (O_DIRECT switched off for that one write). Padding that block and
    cutting the padding off with ``ftruncate`` instead cost 0.12 ms per object on the
    development VM (ext4 journals a truncate) against 0.02 ms. From a source that starts on a
    huge-page boundary (the engine encodes objects into such buffers: ``direct_io.aligned_empty``)
    the blocks go to the device straight from it; otherwise they are first copied into an aligned
    buffer of huge pages (there the device took 4 KiB-paged memory at a third of the speed: one
    segment per page)."""
    size = len(data)
    whole = size - size % ALIGN
    src = np.frombuffer(data, dtype=np.uint8)
    if src.ctypes.data % HUGE_BYTES == 0:
        _pwrite_all(fd, data[:whole], 0)
    elif whole:
        buf = _buffers.take(min(DIRECT_PIECE, whole), huge=True)  # back to the pool when dropped
        with memoryview(buf) as view:
            off = 0
            while off < whole:
                n = min(len(view), whole - off)
                np.copyto(buf[:n], src[off : off + n])  # numpy copies without the GIL; a memoryview would not
                _pwrite_all(fd, view[:n], off)
                off += n
        del buf
    if whole < size:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
        done = whole
        while done < size:
            done += os.pwrite(fd, data[done:], done)


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    """All of ``view`` (whole blocks) at offset ``at`` of an O_DIRECT ``fd``."""
    done = 0
    while done < len(view):
        wrote = os.pwrite(fd, view[done:], at + done)
        if wrote <= 0 or wrote % ALIGN:  # a short O_DIRECT write: give up, not misalign
            raise OSError(errno.EIO, f"short direct write ({wrote} of {len(view) - done} bytes)")
        done += wrote


def _write_file(path: Path, data: memoryview, fsync: bool, direct: bool) -> None:
    """Write ``data`` to a new temporary file beside ``path`` and rename it into place; on any
    failure the temporary file is removed and ``path`` keeps what it had."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}"
    fd = -1
    try:
        fd = _create(tmp, O_DIRECT if direct else 0)
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
        unlink_quietly(tmp)
        raise


def write_atomic(path: Path, data: memoryview, fsync: bool, direct: bool = True) -> bool:
    """Store ``data`` as ``path``, atomically. Returns whether it was written with O_DIRECT:
    False when ``direct`` is off, or when the filesystem refused O_DIRECT (``EINVAL``, at open
    or at write), in which case it was written buffered instead."""
    if direct and O_DIRECT:
        try:
            _write_file(path, data, fsync, direct=True)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _write_file(path, data, fsync, direct=False)
    return False
