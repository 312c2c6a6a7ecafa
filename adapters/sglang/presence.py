"""A short-lived memory of which SGLang pages are stored, and their store keys.

SGLang asks ``batch_exists`` for the same page hashes again and again (every
prefetch re-walks a prefix), and each question otherwise costs a hop onto the
engine's event loop. Pages this backend just wrote, read or saw are remembered
for ``ttl_s`` seconds. A stale "present" is harmless: the page's read then
misses and SGLang's hit gets shorter, exactly as with an object evicted between
``batch_exists`` and ``batch_get`` (SGLang's own file backend has the same
TTL cache, off by default). A read miss forgets the page at once."""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Sequence

_MAX_ENTRIES = 1 << 20


class PresenceCache:
    """Thread-safe key → (store key, last confirmed) map with a TTL on the 'present' part."""

    def __init__(self, to_store_key: Callable[[str], str], ttl_s: float) -> None:
        self._to_store_key = to_store_key
        self.ttl_s = ttl_s
        self._store_keys: dict[str, str] = {}
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def store_keys(self, keys: Sequence[str]) -> list[str]:
        """Store keys of SGLang page hashes (hashing is memoised: the same pages come back)."""
        out = []
        cache = self._store_keys
        for k in keys:
            sk = cache.get(k)
            if sk is None:
                sk = self._to_store_key(k)
                if len(cache) >= _MAX_ENTRIES:
                    cache.clear()
                cache[k] = sk
            out.append(sk)
        return out

    def leading_present(self, keys: Sequence[str]) -> int:
        """How many leading keys were confirmed present within the TTL."""
        if self.ttl_s <= 0:
            return 0
        deadline = time.monotonic() - self.ttl_s
        seen = self._seen
        n = 0
        for k in keys:
            t = seen.get(k)
            if t is None or t < deadline:
                break
            n += 1
        return n

    def mark_present(self, keys: Iterable[str]) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._seen) >= _MAX_ENTRIES:
                self._seen.clear()
            for k in keys:
                self._seen[k] = now

    def forget(self, keys: Iterable[str]) -> None:
        with self._lock:
            for k in keys:
                self._seen.pop(k, None)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
