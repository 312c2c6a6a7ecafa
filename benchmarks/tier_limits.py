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
    """O_DIRECT writes and reads of ``count`` files of ``size`` bytes (the dd oflag/iflag=direct limit)."""

    def __init__(self, root: Path, size: int, count: int, concurrency: int, src: memoryview) -> None:
        self.root, self.size, self.concurrency = root, size, concurrency
        root.mkdir(parents=True, exist_ok=True)
        self.bufs = [mmap.mmap(-1, _round_up(size)) for _ in range(concurrency)]  # page-aligned
        for b in self.bufs:
            b[: len(src)] = src
        self.free = list(range(concurrency))
        self.paths = [root / f"od{i}" for i in range(count)]
        self.total = count * _round_up(size)
        self.written = False

    async def _one(self, fn: Callable[[Path, mmap.mmap, int], None], path: Path) -> None:
        slot = self.free.pop()
        try:
            await anyio.to_thread.run_sync(fn, path, self.bufs[slot], self.size)
        finally:
            self.free.append(slot)

    async def write(self) -> float:
        self.written = True
        return await best_rate(self.total, 1, lambda r: [lambda p=p: self._one(_odirect_write, p) for p in self.paths],
                               self.concurrency)

    async def read(self) -> float:
        if not self.written:  # something to read (untimed)
            await self.write()
        return await best_rate(self.total, 1, lambda r: [lambda p=p: self._one(_odirect_read, p) for p in self.paths],
                               self.concurrency)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


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
