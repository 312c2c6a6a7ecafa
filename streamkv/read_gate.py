"""Ordering for concurrent verified reads into a caller's memory.

``ChunkObjects.read_into`` fetches objects concurrently and verifies them on a few
worker lanes; with ``prefix`` (SGLang's ``batch_get`` contract) an object may be copied
into the caller's memory only once every object before it verified, so nothing after
a miss is ever written. This is that bookkeeping, and nothing else."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np


class ReadGate:
    """What ``read_into``'s worker lanes share: objects waiting to be verified, and with
    ``prefix`` the rule that an object is copied only once every object before it verified
    (so nothing after a miss reaches the caller's memory). Thread-safe; the loop puts objects
    in and learns whether to start another lane, lanes drain until nothing is waiting."""

    def __init__(self, n: int, prefix: bool, lanes: int) -> None:
        self.n = n
        self.prefix = prefix
        self.lanes = max(1, lanes)
        self.lock = threading.Lock()
        self.waiting: deque[tuple[int, list[Any], np.ndarray]] = deque()
        self.running = 0
        self.verified = [False] * n
        self.copied = [False] * n
        self.front = 0  # objects [0, front) all verified
        self.broken = n  # prefix: the first object that missed
        self.parked: dict[int, tuple[Any, np.ndarray]] = {}  # verified, waiting for earlier ones
        self.allowed: deque[tuple[int, Any, np.ndarray]] = deque()  # verified, free to be copied
        self.failures: list[tuple[int, Exception]] = []

    def hopeless(self, i: int) -> bool:
        """An earlier object already missed: with ``prefix`` this one cannot count."""
        return self.prefix and i > self.broken

    def put(self, i: int, box: list[Any] | None, targets: np.ndarray | None) -> bool:
        """Hand over object ``i`` (None: a miss). True: the caller starts another lane."""
        with self.lock:
            if box is None or targets is None:
                self._miss(i)
                return False
            self.waiting.append((i, box, targets))
            if self.running < self.lanes:
                self.running += 1
                return True
            return False

    def drain(self, verify: Any, copy: Any) -> None:
        """One lane (a worker thread): verify waiting objects, copy those allowed, until none waits."""
        while True:
            with self.lock:
                if not self.waiting:
                    self.running -= 1
                    return
                i, box, targets = self.waiting.popleft()
            self._take(i, box, targets, verify, copy)

    def read(self, jobs: deque[tuple[int, Any, np.ndarray]], verify: Any, copy: Any) -> None:
        """One lane (a worker thread) that reads objects too: it takes the next ``(i, reader,
        targets)`` from ``jobs``, shared by every reading lane (in order, so few objects wait
        for an earlier one, and no lane idles while another still has a share to do), and reads,
        verifies and copies it here, until ``jobs`` is empty (objects after a miss are not read)."""
        while True:
            try:
                i, reader, targets = jobs.popleft()  # atomic: lanes never take the same job
            except IndexError:
                return
            if self.hopeless(i):
                continue
            try:
                data = reader()
            except Exception as exc:  # a bug in a tier: still only a miss
                self._failed(i, exc)
                continue
            if data is None:
                with self.lock:
                    self._miss(i)
                continue
            self._take(i, [data], targets, verify, copy)
            del data

    def _take(self, i: int, box: list[Any], targets: np.ndarray, verify: Any, copy: Any) -> None:
        try:
            sections = verify(box.pop())
        except Exception as exc:  # FormatError: corrupt or foreign; anything else: a bug, still a miss
            self._failed(i, exc)
            return
        self._verified(i, sections, targets)
        del sections
        self._copy_allowed(copy)

    def _failed(self, i: int, exc: Exception) -> None:
        with self.lock:
            self.failures.append((i, exc))
            self._miss(i)

    def _verified(self, i: int, sections: Any, targets: np.ndarray) -> None:
        """Object ``i`` verified: queue it, and any it unblocked, for copying."""
        with self.lock:
            if not self.prefix:
                self.allowed.append((i, sections, targets))
                return
            if i > self.broken:
                return
            self.verified[i] = True
            self.parked[i] = (sections, targets)
            while self.front < self.n and self.verified[self.front]:
                self.front += 1
            for j in sorted(j for j in self.parked if j < self.front):
                self.allowed.append((j, *self.parked.pop(j)))

    def _copy_allowed(self, copy: Any) -> None:
        """Copy queued objects, whichever lane verified them: a lane that unblocks many objects
        shares their copies with the others instead of making them all itself."""
        while True:
            with self.lock:
                if not self.allowed:
                    return
                j, sections, dest = self.allowed.popleft()
                if self.prefix and j > self.broken:  # an earlier copy failed meanwhile
                    continue
            try:
                copy(sections, dest)
                self.copied[j] = True
            except Exception as exc:
                self._failed(j, exc)
            del sections

    def _miss(self, i: int) -> None:  # under the lock
        if self.prefix and i < self.broken:
            self.broken = i
            for j in [j for j in self.parked if j > i]:
                del self.parked[j]

    def results(self) -> list[bool]:
        if not self.prefix:
            return list(self.copied)
        ok = [False] * self.n
        for i in range(self.n):
            if not self.copied[i]:
                break
            ok[i] = True
        return ok

