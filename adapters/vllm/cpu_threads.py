"""Where streamkv's helper threads run in a vLLM CPU worker.

Why: vLLM's CPU worker binds its OpenMP team to a list of cores (``OMP_PLACES``,
``GOMP_CPU_AFFINITY`` or ``KMP_AFFINITY``, set when the worker is spawned), and the
worker's main thread is the team's first thread, pinned to the first of them. Every
thread started from the main thread inherits that one-core mask, so streamkv's loader
and saver threads would all share one core with the forward they are meant to run
beside, while the cores vLLM keeps free (``VLLM_CPU_NUM_OF_RESERVED_CPU``) sit idle.
Here those threads are moved to the cores the OpenMP team is not bound to, or, where
the team has every core, to all of them (so the OS can place them where a core is idle).
On GPU workers, or where no binding is visible, nothing changes.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable

import structlog

log = structlog.get_logger(__name__)

_BIND_VARS = ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def parse_cpu_ids(text: str) -> set[int]:
    """CPU ids named in an OpenMP binding string: ``{0,1}``, ``0 1 4-6``, ``...proclist=[2,3]``."""
    if "proclist=" in text:
        text = text.split("proclist=", 1)[1]
    ids: set[int] = set()
    for lo, hi in re.findall(r"(\d+)(?:\s*-\s*(\d+))?", text):
        ids.update(range(int(lo), int(hi or lo) + 1))
    return ids


def omp_bound_cpus(environ: dict[str, str] | None = None) -> set[int]:
    """The cores vLLM bound this worker's OpenMP team to (empty if it bound none)."""
    env = os.environ if environ is None else environ
    for var in _BIND_VARS:
        value = env.get(var)
        if value:
            return parse_cpu_ids(value)
    return set()


def online_cpus() -> set[int]:
    """The CPUs this process may run on: its cgroup's (else every online CPU), narrowed to
    the mask of the process that started it (vLLM's engine core: a ``taskset`` on the
    server), since this process's own threads are already bound by vLLM."""
    cpus: set[int] = set()
    for path in ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/devices/system/cpu/online"):
        try:
            with open(path) as fh:
                cpus = parse_cpu_ids(fh.read())
        except OSError:
            continue
        if cpus:
            break
    cpus = cpus or set(range(os.cpu_count() or 1))
    try:
        parent = os.sched_getaffinity(os.getppid())
    except (OSError, AttributeError):
        return cpus
    return (cpus & parent) or cpus


def helper_cpus(omp: set[int] | None = None, online: set[int] | None = None) -> set[int] | None:
    """Cores for streamkv's threads, or None to leave their masks alone.

    The cores outside the OpenMP team's binding if there are any, else all of them."""
    omp = omp_bound_cpus() if omp is None else omp
    if not omp:
        return None
    online = online_cpus() if online is None else online
    free = online - omp
    return free or online


def pin_current_thread(cpus: Iterable[int] | None) -> None:
    """Set the calling thread's CPU mask (threads it starts later inherit it)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, set(cpus))
    except OSError as exc:  # a cpuset that excludes them: keep the inherited mask
        log.debug("thread affinity not changed", error=repr(exc))


def pin_threads(names: Iterable[str], cpus: Iterable[int] | None) -> int:
    """Set the mask of the live Python threads whose names start with one of ``names``."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return 0
    prefixes = tuple(names)
    mask = set(cpus)
    done = 0
    for thread in threading.enumerate():
        if thread.native_id is None or not thread.name.startswith(prefixes):
            continue
        try:
            os.sched_setaffinity(thread.native_id, mask)
            done += 1
        except OSError:  # the thread ended meanwhile, or a cpuset refuses
            continue
    return done
