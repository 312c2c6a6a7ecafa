"""ReadGate: the ordering rule of prefix reads, under real threads."""

from __future__ import annotations

import random
import threading
from collections import deque
import time

import numpy as np
import pytest

from streamkv.read_gate import ReadGate


def _run_lanes(n: int, lanes: int, prefix: bool, missing: set[int], seed: int) -> tuple[ReadGate, list, list]:
    """``lanes`` threads reading ``n`` objects from one queue, with random delays; returns
    the gate, the copy log (index, objects verified at that moment) and the copied targets."""
    gate = ReadGate(n, prefix, lanes=lanes)
    rng = random.Random(seed)
    delays = [rng.random() * 0.002 for _ in range(n)]
    verified: set[int] = set()
    log: list[tuple[int, frozenset[int]]] = []
    lock = threading.Lock()
    targets = [np.zeros(1, dtype=np.int64) for _ in range(n)]

    def reader(i: int):  # type: ignore[no-untyped-def]
        def read() -> object:
            time.sleep(delays[i])
            return None if i in missing else i
        return read

    def verify(data: object) -> object:
        with lock:
            verified.add(int(data))  # type: ignore[call-overload]
        return data

    def copy(sections: object, dest: np.ndarray) -> None:
        with lock:
            log.append((int(sections), frozenset(verified)))  # type: ignore[call-overload]
        dest[0] = int(sections) + 1  # type: ignore[call-overload]

    jobs = deque((i, reader(i), targets[i]) for i in range(n))
    threads = [threading.Thread(target=gate.read, args=(jobs, verify, copy)) for _ in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return gate, log, targets


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("lanes", [1, 2, 4])
def test_prefix_copies_only_after_every_earlier_object_verified(seed: int, lanes: int) -> None:
    gate, log, targets = _run_lanes(40, lanes, prefix=True, missing=set(), seed=seed)
    assert gate.results() == [True] * 40
    assert sorted(i for i, _ in log) == list(range(40))  # each copied exactly once
    for i, seen in log:
        assert set(range(i + 1)) <= seen, f"object {i} copied before an earlier one verified"
    assert [int(t[0]) for t in targets] == list(range(1, 41))


@pytest.mark.parametrize("seed", range(5))
def test_prefix_writes_nothing_after_a_miss(seed: int) -> None:
    gate, log, targets = _run_lanes(40, 2, prefix=True, missing={17}, seed=seed)
    assert gate.results() == [True] * 17 + [False] * 23
    assert sorted(i for i, _ in log) == list(range(17))
    assert not any(t[0] for t in targets[17:])


def test_without_prefix_every_hit_is_copied() -> None:
    gate, log, targets = _run_lanes(30, 3, prefix=False, missing={4, 20}, seed=1)
    hits = [i not in (4, 20) for i in range(30)]
    assert gate.results() == hits
    assert sorted(i for i, _ in log) == [i for i in range(30) if hits[i]]


def test_lanes_share_the_work_a_slow_object_does_not_hold_the_rest() -> None:
    """Object 0's read does not return until every other object was read: the other lane
    must read all of them meanwhile (with fixed shares, half of them would have waited
    behind object 0 in its lane, and object 0 would have timed out)."""
    n = 20
    gate = ReadGate(n, True, lanes=2)
    who: dict[int, str] = {}
    rest_read = threading.Event()

    def reader(i: int):  # type: ignore[no-untyped-def]
        def read() -> object:
            who[i] = threading.current_thread().name
            if i == 0:
                assert rest_read.wait(30), "the other lane did not read the rest"
            elif len(who) == n:
                rest_read.set()
            return i
        return read

    targets = [np.zeros(1, dtype=np.int64) for _ in range(n)]
    jobs = deque((i, reader(i), targets[i]) for i in range(n))

    def copy(sections: object, dest: np.ndarray) -> None:
        dest[0] = int(sections) + 1  # type: ignore[call-overload]

    threads = [threading.Thread(target=gate.read, args=(jobs, lambda d: d, copy), name=f"lane{k}") for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gate.results() == [True] * n and [int(t[0]) for t in targets] == list(range(1, n + 1))
    slow_lane = who[0]
    assert [i for i in range(n) if who[i] == slow_lane] == [0]  # the fast lane read all the others
