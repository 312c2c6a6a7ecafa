"""A short-lived index of which objects a namespace holds in S3.

Why: a lookup of 512 chunks must not cost 512 HEAD round trips. One LIST of
the namespace (1000 names per page) answers them all; its result is kept for
``ttl_s`` and kept current with this process's own puts and deletes.

Staleness, the trade-off: objects that *another* replica puts become visible
here at most ``ttl_s`` after they land (until then a lookup says miss and the
engine recomputes, which is safe); objects another replica deletes may be
reported present for up to ``ttl_s`` (the get that follows is then a counted
miss, also safe). A namespace with very many objects costs one LIST page per
1000 objects on each refresh; a refresh runs once however many callers wait
on it (single flight)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import anyio


@dataclass
class _Listing:
    names: set[str] = field(default_factory=set)
    own_puts: dict[str, float] = field(default_factory=dict)  # name -> when this process put it
    fetched_at: float = float("-inf")
    refreshing: anyio.Event | None = None


class NamespaceIndex:
    """Names per namespace, refreshed by a caller-supplied LIST when older than ``ttl_s``."""

    def __init__(
        self,
        list_namespace: Callable[[str], Awaitable[set[str] | None]],
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._list = list_namespace
        self.ttl_s = ttl_s
        self._clock = clock
        self._ns: dict[str, _Listing] = {}
        self.refreshes = 0

    def fresh(self, namespace: str) -> bool:
        entry = self._ns.get(namespace)
        return entry is not None and self._clock() - entry.fetched_at < self.ttl_s

    def known(self, namespace: str, name: str) -> bool:
        """Present in a fresh listing (or put by this process since)."""
        return self.fresh(namespace) and name in self._ns[namespace].names

    def added(self, namespace: str, name: str) -> None:
        entry = self._ns.setdefault(namespace, _Listing())
        entry.names.add(name)
        entry.own_puts[name] = self._clock()

    def removed(self, namespace: str, name: str) -> None:
        entry = self._ns.get(namespace)
        if entry is not None:
            entry.names.discard(name)
            entry.own_puts.pop(name, None)

    def forget(self, namespace: str | None = None) -> None:
        if namespace is None:
            self._ns.clear()
        else:
            self._ns.pop(namespace, None)

    async def names(self, namespace: str) -> set[str] | None:
        """The namespace's names, listing it when stale; None when the LIST failed."""
        entry = self._ns.setdefault(namespace, _Listing())
        if self.fresh(namespace):
            return entry.names
        if entry.refreshing is not None:  # another caller is listing: share its answer
            await entry.refreshing.wait()
            return entry.names if self.fresh(namespace) else None
        entry.refreshing = event = anyio.Event()
        started = self._clock()
        try:
            listed = await self._list(namespace)
            if listed is None:
                return None
            # own puts that landed while the LIST was in flight may be missing from it
            entry.own_puts = {n: t for n, t in entry.own_puts.items() if t >= started}
            entry.names = listed | entry.own_puts.keys()
            entry.fetched_at = started
            self.refreshes += 1
            return entry.names
        finally:
            entry.refreshing = None
            event.set()
