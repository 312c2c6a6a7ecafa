"""What the SGLang backend did: counters for our stats, and SGLang's own StorageMetrics.

SGLang's storage threads call the backend concurrently, so every update takes
a lock. ``drain_storage_metrics`` hands SGLang the per-batch page counts and
bandwidths it logs with ``--enable-cache-report`` / storage metrics, in the
same shape its built-in backends (hf3fs, mooncake) produce."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class BackendCounters:
    """Thread-safe event counts plus per-batch samples for SGLang's StorageMetrics."""

    def __init__(self, page_bytes: int = 0) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.page_bytes = page_bytes
        self._prefetch_pgs: list[int] = []
        self._backup_pgs: list[int] = []
        self._prefetch_bw: list[float] = []
        self._backup_bw: list[float] = []

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._counts[name] += n

    def sample(self, kind: str, pages: int, seconds: float) -> None:
        """Record one batch read ('prefetch') or write ('backup')."""
        gb_per_s = pages * self.page_bytes / 1e9 / seconds if seconds > 0 else 0.0
        with self._lock:
            if kind == "prefetch":
                self._prefetch_pgs.append(pages)
                self._prefetch_bw.append(gb_per_s)
            else:
                self._backup_pgs.append(pages)
                self._backup_bw.append(gb_per_s)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def drain_storage_metrics(self) -> Any:
        """SGLang's StorageMetrics with the samples since the last call (None if unavailable)."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:  # an older/newer SGLang without it: report nothing
            return None
        metrics = StorageMetrics()
        with self._lock:
            metrics.prefetch_pgs.extend(self._prefetch_pgs)
            metrics.backup_pgs.extend(self._backup_pgs)
            metrics.prefetch_bandwidth.extend(self._prefetch_bw)
            metrics.backup_bandwidth.extend(self._backup_bw)
            self._prefetch_pgs.clear()
            self._backup_pgs.clear()
            self._prefetch_bw.clear()
            self._backup_bw.clear()
        return metrics
