"""The metric instruments of streamkv, named in OpenTelemetry style.

Counters that the core already keeps (``engine.counters``, each tier's
``TierStats``, tier usage) are exposed through *observable* instruments: they
are read when a reader collects, so the request path pays nothing for them.
Only the per-request facts that exist nowhere else (durations, hit and miss
tokens) are recorded synchronously, and only when a metric reader is set.

Prometheus renders these names with ``_`` and a unit suffix, e.g.
``streamkv.retrieve.duration`` (s) becomes ``streamkv_retrieve_duration_seconds``."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

# engine.counters key -> streamkv.errors kind
ERROR_KINDS: dict[str, str] = {
    "retrieve_timeout": "timeout",
    "retrieve_corrupt": "corrupt",
    "retrieve_missing": "missing",
    "retrieve_errors": "unavailable",
    "store_errors": "unavailable",
}
ERROR_NAMES = ("timeout", "corrupt", "unavailable", "missing")

# name -> (unit, description); the README table is generated from this
METRICS: dict[str, tuple[str, str]] = {
    "streamkv.requests": ("{request}", "lookup/retrieve/store calls, by op and result"),
    "streamkv.hit_tokens": ("{token}", "prompt tokens served from the cache"),
    "streamkv.miss_tokens": ("{token}", "prompt tokens asked for but not served (recomputed)"),
    "streamkv.errors": ("{error}", "failures turned into misses, by kind: timeout|corrupt|unavailable|missing"),
    "streamkv.tier.bytes_read": ("By", "bytes read from a tier, by tier"),
    "streamkv.tier.bytes_written": ("By", "bytes written to a tier, by tier"),
    "streamkv.tier.usage": ("By", "bytes held by a tier, by tier"),
    "streamkv.tier.capacity": ("By", "capacity of a tier, by tier"),
    "streamkv.memory.pinned": ("By", "bytes of pinned objects in the memory tier"),
    "streamkv.lookup.duration": ("s", "lookup latency"),
    "streamkv.retrieve.duration": ("s", "retrieve latency, call to last layer consumed"),
    "streamkv.layer.wait.duration": ("s", "per-layer consumer wait: the stall the engine sees"),
    "streamkv.store.duration": ("s", "store latency, call to last chunk put"),
}

# latency buckets from 50 us to 30 s: layer waits are sub-ms, cold S3 retrieves are seconds
_LATENCY_BOUNDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Sources:
    """Engines whose counters and tiers the observable instruments read (weakly held)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, engine: Any) -> None:
        with self._lock:
            self._engines.add(engine)

    def discard(self, engine: Any) -> None:
        with self._lock:
            self._engines.discard(engine)

    def engines(self) -> list[Any]:
        with self._lock:
            return list(self._engines)

    def tiers(self) -> Iterable[Any]:
        for engine in self.engines():
            store = getattr(engine, "store", None)
            yield from getattr(store, "tiers", ())

    def tiered(self) -> Iterable[Any]:
        for engine in self.engines():
            store = getattr(engine, "store", None)
            if store is not None:
                yield store


def _by_tier(sources: Sources, read: Any) -> list[Observation]:
    totals: dict[str, float] = {}
    for tier in sources.tiers():
        value = read(tier)
        if value is not None:
            totals[tier.name] = totals.get(tier.name, 0) + value
    return [Observation(v, {"streamkv.tier": k}) for k, v in totals.items()]


class Instruments:
    """Every instrument, created once per meter."""

    def __init__(self, meter: Meter, sources: Sources) -> None:
        self.sources = sources

        def counter(name: str) -> Any:
            unit, desc = METRICS[name]
            return meter.create_counter(name, unit=unit, description=desc)

        def histogram(name: str) -> Any:
            unit, desc = METRICS[name]
            return meter.create_histogram(name, unit=unit, description=desc,
                                          explicit_bucket_boundaries_advisory=list(_LATENCY_BOUNDS))

        def observe(name: str, callback: Any, kind: str = "counter") -> None:
            unit, desc = METRICS[name]
            make = meter.create_observable_counter if kind == "counter" else meter.create_observable_gauge
            make(name, callbacks=[callback], unit=unit, description=desc)

        self.requests = counter("streamkv.requests")
        self.hit_tokens = counter("streamkv.hit_tokens")
        self.miss_tokens = counter("streamkv.miss_tokens")
        self.lookup_duration = histogram("streamkv.lookup.duration")
        self.retrieve_duration = histogram("streamkv.retrieve.duration")
        self.layer_wait_duration = histogram("streamkv.layer.wait.duration")
        self.store_duration = histogram("streamkv.store.duration")
        observe("streamkv.errors", self._errors)
        observe("streamkv.tier.bytes_read", lambda o: _by_tier(sources, lambda t: t.counters.bytes_read))
        observe("streamkv.tier.bytes_written", lambda o: _by_tier(sources, lambda t: t.counters.bytes_written))
        observe("streamkv.tier.usage", lambda o: _by_tier(sources, lambda t: getattr(t, "used_bytes", None)),
                kind="gauge")
        observe("streamkv.tier.capacity",
                lambda o: _by_tier(sources, lambda t: getattr(t, "capacity_bytes", None)), kind="gauge")
        observe("streamkv.memory.pinned", self._pinned, kind="gauge")

    def _errors(self, options: CallbackOptions) -> list[Observation]:
        totals = dict.fromkeys(ERROR_NAMES, 0)
        for engine in self.sources.engines():
            for key, kind in ERROR_KINDS.items():
                totals[kind] += int(engine.counters.get(key, 0))
        for store in self.sources.tiered():  # failed background writes and promotions
            totals["unavailable"] += int(store.counters.errors)
        for tier in self.sources.tiers():
            if tier.name == "s3":  # timeouts and refusals after retries
                totals["unavailable"] += int(tier.counters.errors)
        return [Observation(v, {"streamkv.error.kind": k}) for k, v in totals.items()]

    def _pinned(self, options: CallbackOptions) -> list[Observation]:
        total = 0
        seen = False
        for tier in self.sources.tiers():
            if tier.name == "memory" and hasattr(tier, "pinned_bytes"):
                total += int(tier.pinned_bytes)
                seen = True
        return [Observation(total)] if seen else []
