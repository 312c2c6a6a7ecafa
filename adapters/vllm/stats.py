"""Connector statistics, for vLLM's stats hooks and for streamkv's OpenTelemetry metrics.

Why both: vLLM aggregates ``KVConnectorStats`` from the workers and logs/exports them
with its own metrics; streamkv's dashboards read the same numbers as OpenTelemetry
counters and histograms named ``streamkv.vllm.*``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

_meter = metrics.get_meter("streamkv.adapters.vllm")
_loaded_tokens = _meter.create_counter("streamkv.vllm.loaded_tokens", unit="{token}")
_loaded_bytes = _meter.create_counter("streamkv.vllm.loaded_bytes", unit="By")
_saved_chunks = _meter.create_counter("streamkv.vllm.saved_chunks", unit="{chunk}")
_saved_bytes = _meter.create_counter("streamkv.vllm.saved_bytes", unit="By")
_hit_tokens = _meter.create_counter("streamkv.vllm.hit_tokens", unit="{token}")
_load_latency = _meter.create_histogram("streamkv.vllm.load_latency", unit="s")
_save_latency = _meter.create_histogram("streamkv.vllm.save_latency", unit="s")

_SUMS = ("loads", "loaded_tokens", "loaded_bytes", "saves", "saved_chunks", "saved_bytes", "hit_tokens",
         "lookups")
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
