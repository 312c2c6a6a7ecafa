"""Copying what a load found only in a slower tier up into the faster ones, after the load.

Why not the store's own promote-on-hit: it starts copying whole objects at the first
section read, so on a small CPU the copies compete with the very sections the forward is
waiting for (a fresh-engine disk hit at 2k tokens waited ~3x longer for its layers). Here
the copy starts once a load has delivered every layer, one object at a time, in the
background on the engine's loop."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import structlog

from streamkv.engine import StreamKVEngine

from streamkv.adapters.vllm.stats import StepStats

log = structlog.get_logger(__name__)


class PromoteAfterLoad:
    """Background copies up the tiers of objects that finished loading (``enabled``: the
    engine's store is then built with promote-on-hit off)."""

    def __init__(self, engine: StreamKVEngine, stats: StepStats, enabled: bool) -> None:
        self.engine = engine
        self.stats = stats
        self.enabled = enabled
        self._lock = threading.Lock()
        self._promoting: set[str] = set()  # keys being copied up now: never twice at once
        self._futures: list[Future[None]] = []

    def __call__(self, keys: list[str]) -> None:
        """Start copying ``keys`` up, where a slower tier holds them and a faster one does not."""
        tiers = list(getattr(self.engine.store, "tiers", ()))
        if not self.enabled or len(tiers) < 2 or not keys:
            return
        with self._lock:
            keys = [k for k in keys if k not in self._promoting]
            self._promoting.update(keys)
        if not keys:
            return

        async def promote() -> None:
            try:
                todo = list(keys)
                for i, tier in enumerate(tiers):
                    if not todo:
                        break
                    found = await tier.exists_many(todo)
                    held = [k for k, f in zip(todo, found) if f]
                    todo = [k for k, f in zip(todo, found) if not f]
                    if i == 0:
                        continue
                    for key in held:
                        data = await tier.get(key)
                        if data is None:
                            continue
                        for upper in tiers[:i]:
                            await upper.put(key, data)
                        self.stats.record_promotion(len(memoryview(data).cast("B")))
            except Exception as exc:  # a failed copy up only means the next hit reads lower
                log.warning("promotion after load failed", error=repr(exc))
            finally:
                with self._lock:
                    self._promoting.difference_update(keys)

        try:
            future = self.engine.runtime.submit(promote)
        except Exception as exc:
            log.warning("promotion after load not started", error=repr(exc))
            with self._lock:
                self._promoting.difference_update(keys)
            return
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + [future]

    def take_futures(self) -> list[Future[None]]:
        """The copies started and not yet waited for (``flush`` waits for them)."""
        with self._lock:
            futures, self._futures = self._futures, []
        return futures
