"""Connector statistics, for vLLM's stats hooks and for streamkv's OpenTelemetry metrics.

Why both: vLLM aggregates ``KVConnectorStats`` from the workers and logs them, and
exports them on its Prometheus endpoint through ``StreamKVPromMetrics`` (vLLM's
``build_prom_metrics`` hook: ``vllm:streamkv_*`` counters and histograms, labelled like
vLLM's own metrics); streamkv's dashboards read the same numbers as OpenTelemetry
counters and histograms named ``streamkv.vllm.*``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

_meter = metrics.get_meter("streamkv.adapters.vllm")
_loaded_tokens = _meter.create_counter("streamkv.vllm.loaded_tokens", unit="{token}")
_loaded_bytes = _meter.create_counter("streamkv.vllm.loaded_bytes", unit="By")
_saved_chunks = _meter.create_counter("streamkv.vllm.saved_chunks", unit="{chunk}")
_saved_bytes = _meter.create_counter("streamkv.vllm.saved_bytes", unit="By")
_hit_tokens = _meter.create_counter("streamkv.vllm.hit_tokens", unit="{token}")
_load_latency = _meter.create_histogram("streamkv.vllm.load_latency", unit="s")
_save_latency = _meter.create_histogram("streamkv.vllm.save_latency", unit="s")

_SUMS = ("loads", "loaded_tokens", "loaded_bytes", "saves", "saved_chunks", "saved_bytes", "hit_tokens",
         "lookups", "promoted_chunks", "promoted_bytes")
_SERIES = ("load_s", "save_s")


def record_hit(tokens: int) -> None:
    if tokens:
        _hit_tokens.add(tokens)


class StepStats:
    """Thread-safe accumulation between two ``get_kv_connector_stats`` calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = _empty()

    def record_load(self, tokens: int, nbytes: int, seconds: float) -> None:
        _loaded_tokens.add(tokens)
        _loaded_bytes.add(nbytes)
        _load_latency.record(seconds)
        with self._lock:
            self._data["loads"] += 1
            self._data["loaded_tokens"] += tokens
            self._data["loaded_bytes"] += nbytes
            self._data["load_s"].append(seconds)

    def record_save(self, chunks: int, nbytes: int, seconds: float) -> None:
        _saved_chunks.add(chunks)
        _saved_bytes.add(nbytes)
        _save_latency.record(seconds)
        with self._lock:
            self._data["saves"] += 1
            self._data["saved_chunks"] += chunks
            self._data["saved_bytes"] += nbytes
            self._data["save_s"].append(seconds)

    def record_promotion(self, nbytes: int) -> None:
        with self._lock:
            self._data["promoted_chunks"] += 1
            self._data["promoted_bytes"] += nbytes

    def take(self) -> StreamKVConnectorStats | None:
        with self._lock:
            data, self._data = self._data, _empty()
        stats = StreamKVConnectorStats(data=data)
        return None if stats.is_empty() else stats


def _empty() -> dict[str, Any]:
    data: dict[str, Any] = {k: 0 for k in _SUMS}
    data.update({k: [] for k in _SERIES})
    return data


@dataclass
class StreamKVConnectorStats(KVConnectorStats):
    """Sums and latency series; aggregated across workers and intervals by vLLM."""

    def __post_init__(self) -> None:
        base = _empty()
        base.update(self.data or {})
        self.data = base

    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not isinstance(other, StreamKVConnectorStats):
            return self
        for k in _SUMS:
            self.data[k] += other.data.get(k, 0)
        for k in _SERIES:
            self.data[k] = list(self.data[k]) + list(other.data.get(k, []))
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: self.data[k] for k in _SUMS}
        for k in _SERIES:
            series = self.data[k]
            out[f"avg_{k}"] = round(sum(series) / len(series), 6) if series else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data[k] for k in _SUMS)


# Prometheus: one counter per sum, one histogram per latency series (seconds).
_PROM_COUNTERS = {
    "loads": "Prefix loads from streamkv into vLLM's KV cache.",
    "loaded_tokens": "Tokens whose KV was loaded from streamkv.",
    "loaded_bytes": "Bytes of KV loaded from streamkv into vLLM's KV cache.",
    "saves": "Saves of prompt chunks handed to streamkv.",
    "saved_chunks": "Prompt chunks stored in streamkv.",
    "saved_bytes": "Bytes of KV stored in streamkv.",
    "hit_tokens": "Prompt tokens found in streamkv by the scheduler's lookups.",
    "lookups": "Scheduler lookups of prompts in streamkv.",
    "promoted_chunks": "Loaded chunks copied up into a faster streamkv tier after their load.",
    "promoted_bytes": "Bytes copied up into a faster streamkv tier after loads.",
}
_PROM_HISTOGRAMS = {
    "load_s": ("load_seconds", "Time from start to end of one request's KV load."),
    "save_s": ("save_seconds", "Time from hand-over to stored, one request's saved chunks."),
}
_LATENCY_BUCKETS = [1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class StreamKVPromMetrics(KVConnectorPromMetrics):
    """``vllm:streamkv_*`` metrics on vLLM's Prometheus endpoint, fed by ``observe``.

    vLLM calls ``observe`` with the stats of each scheduler step (worker stats aggregated
    with the scheduler's, ``StreamKVConnectorStats.data``) and the engine's index."""

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            k: self._counter_cls(name=f"vllm:streamkv_{k}", documentation=doc, labelnames=labelnames)
            for k, doc in _PROM_COUNTERS.items()
        }
        self._histograms = {
            k: self._histogram_cls(name=f"vllm:streamkv_{name}", documentation=doc, labelnames=labelnames,
                                   buckets=_LATENCY_BUCKETS)
            for k, (name, doc) in _PROM_HISTOGRAMS.items()
        }
        self._children: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}

    def _for_engine(self, engine_idx: int) -> tuple[dict[str, Any], dict[str, Any]]:
        children = self._children.get(engine_idx)
        if children is None:
            values = self.per_engine_labelvalues[engine_idx]
            children = ({k: c.labels(*values) for k, c in self._counters.items()},
                        {k: h.labels(*values) for k, h in self._histograms.items()})
            self._children[engine_idx] = children
        return children

    def observe(self, transfer_stats_data: dict[str, Any] | None, engine_idx: int = 0) -> None:
        if not transfer_stats_data:
            return
        counters, histograms = self._for_engine(engine_idx)
        for k, counter in counters.items():
            value = transfer_stats_data.get(k, 0)
            if value:
                counter.inc(value)
        for k, histogram in histograms.items():
            for seconds in transfer_stats_data.get(k, ()):
                histogram.observe(float(seconds))
