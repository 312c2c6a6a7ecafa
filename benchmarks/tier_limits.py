"""The limits the tier benchmark measures each tier against, and how it drives load.

Kept apart from ``tiers.py`` so that what counts as "the machine's limit" (a
warm ``numpy.copyto``, O_DIRECT I/O with aligned buffers, a plain obstore
client against the same server) is in one short file to read and judge."""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import anyio
import numpy as np

from streamkv.store.disk import drop_page_cache

MB = 1e6
ALIGN = 4096
Job = Callable[[], Awaitable[Any]]


async def drive(jobs: Sequence[Job], concurrency: int) -> float:
    """Seconds to run every job, at most ``concurrency`` at a time."""
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(job: Job) -> None:
        async with limiter:
            await job()

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(one, job)
    return time.perf_counter() - t0


async def best_rate(nbytes: int, repeat: int, make_jobs: Callable[[int], Sequence[Job]], concurrency: int,
                    after: Callable[[], Any] | None = None) -> float:
    """Best MB/s over ``repeat`` runs; ``after`` runs inside the timing (e.g. a sync)."""
    best = 0.0
    for r in range(repeat):
        jobs = make_jobs(r)
        t0 = time.perf_counter()
        await drive(jobs, concurrency)
        if after is not None:
            await anyio.to_thread.run_sync(after)
        best = max(best, nbytes / (time.perf_counter() - t0) / MB)
    return best


def memcpy_rate(sources: list[np.ndarray], size: int, repeat: int) -> float:
    """MB/s of copying ``size``-byte pieces of distinct source buffers (as the tier holds
    distinct objects) into one warm destination (as the pipeline has one staging ring)."""
    dst = np.zeros(sources[0].nbytes, dtype=np.uint8)
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for a in sources:
            for off in range(0, a.nbytes - size + 1, size):
                np.copyto(dst[off : off + size], a[off : off + size])
        done = sum(a.nbytes // size for a in sources) * size
        best = max(best, done / (time.perf_counter() - t0) / MB)
    return best


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _odirect_write(path: Path, buf: mmap.mmap, n: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        view, done = memoryview(buf)[: _round_up(n)], 0
        while done < len(view):
            done += os.write(fd, view[done:])
    finally:
        os.close(fd)


def _odirect_read(path: Path, buf: mmap.mmap, n: int, offset: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [memoryview(buf)[: _round_up(n)]], offset)
    finally:
        os.close(fd)


def drop_cache(root: Path) -> None:
    """Write back, then drop these files from the page cache, so reads come from the device."""
    os.sync()
    drop_page_cache(root, sync=False)


class ODirect:
    """O_DIRECT writes and reads of ``count`` files of ``size`` bytes (the dd oflag/iflag=direct limit).

    Each write round creates ``count`` new files (``O_CREAT | O_EXCL``), as the tier creates a
    file per new object, and keeps them until the run ends, as the tier does: both sides then
    allocate inodes and blocks alike. (Rewriting the same files every round, as this limit
    did before, skipped both; on a disk mounted with ``discard`` over thin storage it also
    skipped the device's first-write cost.) Reads read the first round's files."""

    def __init__(self, root: Path, size: int, count: int, concurrency: int, src: memoryview) -> None:
        self.root, self.size, self.count = root, size, count
        root.mkdir(parents=True, exist_ok=True)
        # page-aligned, private, huge pages asked for: as the tier's own buffers (direct_io.py)
        self.bufs = [mmap.mmap(-1, _round_up(size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                     for _ in range(concurrency)]
        for b in self.bufs:
            if hasattr(mmap, "MADV_HUGEPAGE"):
                b.madvise(mmap.MADV_HUGEPAGE)
            b[: len(src)] = src
        self.free = list(range(concurrency))
        self.nbytes = count * size
        self.rounds: list[list[Path]] = []

    async def _one(self, fn: Callable[[Path, mmap.mmap, int], None], path: Path) -> None:
        slot = self.free.pop()
        try:
            await anyio.to_thread.run_sync(fn, path, self.bufs[slot], self.size)
        finally:
            self.free.append(slot)

    def write_jobs(self, r: int) -> list[Job]:
        """Jobs that write ``count`` new files (round ``r``)."""
        paths = [self.root / f"w{len(self.rounds)}-{i}" for i in range(self.count)]
        self.rounds.append(paths)
        return [lambda p=p: self._one(_odirect_write, p) for p in paths]

    def read_jobs(self, r: int = 0) -> list[Job]:
        """Jobs that read the first write round's files back."""
        if not self.rounds:
            raise RuntimeError("ODirect.read_jobs: nothing written yet")
        return [lambda p=p: self._one(_odirect_read, p) for p in self.rounds[0]]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Side:
    """One side of a comparison: the jobs of round ``r`` and the bytes they move; ``before``
    runs untimed ahead of each slice (dropping the page cache), ``after`` timed after it (a sync)."""

    jobs: Callable[[int], Sequence[Job]]
    nbytes: int
    before: Callable[[], Any] | None = None
    after: Callable[[], Any] | None = None


async def interleaved(repeat: int, tier: Side, limit: Side, concurrency: int,
                      slices: int = 4) -> tuple[list[float], list[float]]:
    """MB/s samples (tier, limit), one per round. Each round's jobs are cut into ``slices``
    slices (fewer where a slice would not keep ``concurrency`` jobs in flight) and the two
    sides take turns slice by slice, the order swapped every slice: a device
    whose speed drifts within seconds (this VM's disk wrote 0.43 to 1.4 GB/s in consecutive
    1 GiB ``dd`` runs) weighs on both alike, where whole-round pairs compared one burst with
    another."""
    sides = {"tier": tier, "limit": limit}
    samples: dict[str, list[float]] = {"tier": [], "limit": []}
    for r in range(repeat):
        jobs = {who: list(side.jobs(r)) for who, side in sides.items()}
        spent = {"tier": 0.0, "limit": 0.0}
        cut = max(1, min(slices, min(len(j) for j in jobs.values()) // concurrency))  # full slices
        for s in range(cut):
            for who in ("tier", "limit") if (r + s) % 2 == 0 else ("limit", "tier"):
                side, mine = sides[who], jobs[who]
                if side.before is not None:
                    await anyio.to_thread.run_sync(side.before)
                t0 = time.perf_counter()
                await drive(mine[len(mine) * s // cut : len(mine) * (s + 1) // cut], concurrency)
                if side.after is not None:
                    await anyio.to_thread.run_sync(side.after)
                spent[who] += time.perf_counter() - t0
        for who, side in sides.items():
            samples[who].append(side.nbytes / spent[who] / MB)
    return samples["tier"], samples["limit"]


async def paired(repeat: int, tier: Callable[[int], Awaitable[float]],
                 limit: Callable[[int], Awaitable[float]]) -> tuple[list[float], list[float]]:
    """MB/s samples (tier, limit) over ``repeat`` rounds, each round running both back to back and
    swapping who goes first, so that neither gets a quieter machine or a warmer server."""
    samples: dict[str, list[float]] = {"tier": [], "limit": []}
    for r in range(repeat):
        order = [("limit", limit), ("tier", tier)]
        for who, fn in order if r % 2 == 0 else order[::-1]:
            samples[who].append(await fn(r))
    return samples["tier"], samples["limit"]


class MotoProcess:
    """moto's S3 server in its own process, so it does not share the benchmark's GIL."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def create_bucket(self, bucket: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket=bucket)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
