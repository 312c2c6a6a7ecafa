"""The S3 tier: chunk objects in any S3-compatible bucket, through obstore.

Objects are named ``<prefix>/<namespace>/<name>`` and shared by every replica
that points at the same bucket and prefix. A remote tier fails in ways a local
one does not, so every request goes through one path (``_call``): the named,
shared ``s3_requests`` limiter (``streamkv.store.limits``), a per-request
timeout, retries with exponential backoff on 5xx / 429 / timeouts /
connection errors, and a circuit breaker. While
the circuit is open the tier is skipped: reads are misses and writes are
dropped (both counted), so a dead S3 endpoint never stalls the engine.

Layer reads are ranged GETs; ranges closer than ``coalesce`` bytes are merged
into one request (split again above ``max_request_bytes``, since S3 pays best
around 8-16 MB per request). Large puts use obstore's multipart upload, which
S3 makes visible only on completion, so readers never see half an object."""

from __future__ import annotations

import random
from functools import partial
from typing import Any, Awaitable, Callable, Literal, Sequence, TypeVar

import anyio
import obstore as obs
import structlog

from streamkv.errors import ConfigError
from streamkv.store.base import Buffer, ByteRange, Store, check_key, gather
from streamkv.store.circuit import CircuitBreaker
from streamkv.store.limits import Limits
from streamkv.store.s3_config import S3Settings, classify, is_timeout, parse_s3_url, startup_error
from streamkv.store.s3_index import NamespaceIndex

log = structlog.get_logger(__name__)
T = TypeVar("T")
Outcome = Literal["ok", "missing", "skipped", "failed"]
MiB = 1024 * 1024
_DELETE_BATCH = 1000  # S3 DeleteObjects takes at most 1000 keys


def _coalesce(ranges: Sequence[ByteRange], gap: int, max_bytes: int) -> list[tuple[int, int, list[int]]]:
    """Merge byte ranges into request spans (start, end, indices of the ranges they serve)."""
    order = sorted((i for i in range(len(ranges)) if ranges[i][1] > 0), key=lambda i: ranges[i][0])
    spans: list[tuple[int, int, list[int]]] = []
    for i in order:
        off, length = ranges[i]
        if spans:
            start, end, members = spans[-1]
            if off - end <= gap and max(end, off + length) - start <= max_bytes:
                spans[-1] = (start, max(end, off + length), members + [i])
                continue
        spans.append((off, off + length, [i]))
    return spans


class S3Store(Store):
    """One bucket + prefix as a streamkv tier. See the module docstring for the failure policy."""

    name = "s3"
    range_views = "exact"

    def __init__(
        self,
        bucket: str,
        prefix: str = "streamkv",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        max_concurrency: int = 16,
        limits: Limits | None = None,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        index_ttl_s: float = 2.0,
        coalesce: int = 1 * MiB,
        max_request_bytes: int = 16 * MiB,
        part_size: int = 8 * MiB,
        multipart_threshold: int = 16 * MiB,
        part_concurrency: int = 4,
        check_timeout_s: float = 10.0,
    ) -> None:
        super().__init__()
        self.settings = S3Settings(
            bucket, prefix, endpoint, region, access_key_id, secret_access_key, session_token,
            timeout_s, connect_timeout_s,
        )
        for field, value, low in (
            ("retries", retries, 0), ("max_concurrency", max_concurrency, 1), ("part_concurrency", part_concurrency, 1),
            ("coalesce", coalesce, 0), ("max_request_bytes", max_request_bytes, 1),
            ("part_size", part_size, 5 * MiB), ("multipart_threshold", multipart_threshold, 5 * MiB),
            ("failure_threshold", failure_threshold, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(field, value, f"must be an integer >= {low}")
        for field, number in (("backoff_s", backoff_s), ("backoff_max_s", backoff_max_s),
                              ("cooldown_s", cooldown_s), ("index_ttl_s", index_ttl_s)):
            if not isinstance(number, (int, float)) or number < 0:
                raise ConfigError(field, number, "must be a number of seconds >= 0")
        if not isinstance(check_timeout_s, (int, float)) or check_timeout_s <= 0:
            raise ConfigError("check_timeout_s", check_timeout_s, "must be a positive number of seconds")
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.limits = limits or Limits(s3_requests=max_concurrency)
        self.coalesce, self.max_request_bytes = coalesce, max_request_bytes
        self.part_size, self.multipart_threshold, self.part_concurrency = part_size, multipart_threshold, part_concurrency
        self.check_timeout_s = check_timeout_s
        self.breaker = CircuitBreaker(failure_threshold, cooldown_s, name=f"s3:{self.settings.bucket}")
        self.index = NamespaceIndex(self._list_names, ttl_s=index_ttl_s)
        self.obstore: Any = self.settings.make_store()
        self.counters.extra.update(retries=0, timeouts=0, short_circuited=0, dropped_writes=0)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Store:
        """``S3Store.from_url("s3://bucket/prefix", endpoint=..., region=...)``."""
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **kwargs)

    @classmethod
    def from_config(cls, config: Any, limits: Limits | None = None) -> S3Store:
        """From a ``StreamKVConfig`` (``s3_*`` fields); optional fields fall back to defaults."""
        optional = {
            "region": "s3_region", "access_key_id": "s3_access_key_id",
            "secret_access_key": "s3_secret_access_key", "session_token": "s3_session_token",
            "timeout_s": "s3_timeout_s", "retries": "s3_retries", "max_concurrency": "s3_max_concurrency",
            "failure_threshold": "s3_failure_threshold", "cooldown_s": "s3_cooldown_s",
            "index_ttl_s": "s3_index_ttl_s",
        }
        kwargs = {arg: getattr(config, f) for arg, f in optional.items() if getattr(config, f, None) is not None}
        return cls.from_url(config.s3_url, endpoint=getattr(config, "s3_endpoint", None), limits=limits, **kwargs)

    def __repr__(self) -> str:
        return f"S3Store({self.settings.describe()!r})"

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The shared ``s3_requests`` limiter: pass one ``Limits`` to every store of a runtime."""
        return self.limits.limiter("s3_requests")

    # -- the one request path -------------------------------------------------

    async def _call(self, op: str, key: str, fn: Callable[[], Awaitable[T]]) -> tuple[Outcome, T | None]:
        """Run one S3 request under the limiter, timeout, retries and breaker."""
        if not self.breaker.allow():
            self.counters.extra["short_circuited"] += 1
            return "skipped", None
        # a half-open probe gets one retry at most: enough to survive a stale pooled connection
        attempts = min(2, self.retries + 1) if self.breaker.probing else self.retries + 1
        error: BaseException | None = None
        try:
            for attempt in range(attempts):
                try:
                    limiter = self.limiter
                    try:  # a free token is taken without a trip through the event loop
                        limiter.acquire_nowait()
                    except anyio.WouldBlock:
                        await limiter.acquire()
                    try:
                        with anyio.fail_after(self.timeout_s):
                            value = await fn()
                    finally:
                        limiter.release()
                    self.breaker.record_success()
                    return "ok", value
                except Exception as exc:  # noqa: BLE001 - every S3 failure is classified below
                    kind = classify(exc)
                    if kind == "missing":
                        self.breaker.record_success()
                        return "missing", None
                    error = exc
                    if is_timeout(exc):
                        self.counters.extra["timeouts"] += 1
                    if kind == "fatal" or attempt + 1 == attempts:
                        break
                    self.counters.extra["retries"] += 1
                    delay = min(self.backoff_max_s, self.backoff_s * 2**attempt)
                    await anyio.sleep(delay * random.uniform(0.5, 1.0))
            self.breaker.record_failure()
            self.counters.errors += 1
            log.warning(
                "s3 request failed", op=op, key=key, attempts=attempt + 1, circuit=self.breaker.state.value,
                error=(str(error).splitlines() or [type(error).__name__])[0][:300],
            )
            return "failed", None
        finally:
            self.breaker.release()

    # -- reads ----------------------------------------------------------------

    async def get(self, key: str) -> Buffer | None:
        check_key(key)

        async def fetch() -> Any:
            result = await obs.get_async(self.obstore, key)
            return await result.bytes_async()

        outcome, data = await self._call("get", key, fetch)
        if outcome != "ok" or data is None:
            self._miss(key, outcome)
            return None
        self.counters.hits += 1
        self.counters.bytes_read += len(data)
        return memoryview(data)

    async def get_ranges(self, key: str, ranges: Sequence[ByteRange]) -> list[Buffer] | None:
        check_key(key)
        ranges = [self._check_range(r) for r in ranges]
        if not any(length for _, length in ranges):  # nothing to fetch: answer for the object itself
            return [b"" for _ in ranges] if await self.exists(key) else None
        spans = _coalesce(ranges, self.coalesce, self.max_request_bytes)
        fetched: list[Any] = [None] * len(spans)

        async def fetch_span(i: int) -> bool:
            start, end, _ = spans[i]
            outcome, data = await self._call(
                "get_range", key, lambda: obs.get_range_async(self.obstore, key, start=start, length=end - start)
            )
            fetched[i] = data if outcome == "ok" else outcome
            return outcome == "ok" and data is not None and len(data) == end - start

        complete = await gather([partial(fetch_span, i) for i in range(len(spans))])
        if not all(complete):
            failed = [f for f in fetched if isinstance(f, str)]
            self._miss(key, failed[0] if failed else "missing")  # a short object is a miss
            return None
        out: list[Buffer] = [b""] * len(ranges)
        for (start, _, members), data in zip(spans, fetched):
            view = memoryview(data)
            for i in members:
                off, length = ranges[i]
                out[i] = view[off - start : off - start + length]
        self.counters.hits += 1
        self.counters.bytes_read += sum(length for _, length in ranges)
        return out

    def _miss(self, key: str, outcome: str) -> None:
        self.counters.misses += 1
        if outcome == "missing":
            ns, _, name = key.partition("/")
            self.index.removed(ns, name)
        return None

    @staticmethod
    def _check_range(r: ByteRange) -> ByteRange:
        off, length = r
        if not isinstance(off, int) or not isinstance(length, int) or off < 0 or length < 0:
            raise ValueError(f"range={r!r}: expected (offset >= 0, length >= 0) integers")
        return off, length

    # -- existence ------------------------------------------------------------

    async def exists(self, key: str) -> bool:
        """True from a fresh index entry, else one HEAD (authoritative)."""
        check_key(key)
        ns, _, name = key.partition("/")
        if self.index.known(ns, name):
            return True
        outcome, _ = await self._call("head", key, lambda: obs.head_async(self.obstore, key))
        return outcome == "ok"

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """One LIST per namespace (cached ``index_ttl_s``), not one HEAD per key; see ``s3_index``."""
        by_ns: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            by_ns.setdefault(check_key(key).partition("/")[0], []).append(i)
        flags = [False] * len(keys)

        async def resolve(ns: str) -> None:
            names = await self.index.names(ns)
            if names is not None:
                for i in by_ns[ns]:
                    flags[i] = keys[i].partition("/")[2] in names

        await gather([partial(resolve, ns) for ns in by_ns])
        return flags

    async def _list_names(self, namespace: str) -> set[str] | None:
        outcome, metas = await self._call(
            "list", namespace, lambda: obs.list(self.obstore, f"{namespace}/", chunk_size=1000).collect_async()
        )
        if outcome != "ok" or metas is None:
            return None
        return {m["path"].rpartition("/")[2] for m in metas if m["path"].count("/") == 1}

    async def list_keys(self, namespace: str | None = None) -> list[str]:
        if namespace is not None:
            check_key(f"{namespace}/x")
            names = await self._list_names(namespace)
            return sorted(f"{namespace}/{n}" for n in names or ())
        outcome, metas = await self._call("list", "*", lambda: obs.list(self.obstore, None).collect_async())
        if outcome != "ok" or metas is None:
            return []
        return sorted(m["path"] for m in metas if _is_key(m["path"]))

    # -- writes ---------------------------------------------------------------

    async def put(self, key: str, data: Buffer) -> bool:
        check_key(key)
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        size = len(view)
        outcome, _ = await self._call(
            "put", key,
            lambda: obs.put_async(
                self.obstore, key, view, use_multipart=size > self.multipart_threshold,
                chunk_size=self.part_size, max_concurrency=self.part_concurrency,
            ),
        )
        if outcome != "ok":
            self.counters.extra["dropped_writes"] += 1
            return False
        ns, _, name = key.partition("/")
        self.index.added(ns, name)
        self.counters.puts += 1
        self.counters.bytes_written += size
        return True

    async def delete(self, key: str) -> bool:
        """HEAD then DELETE: S3's DELETE does not say whether anything was there."""
        if not await self.exists(key):
            return False
        outcome, _ = await self._call("delete", key, lambda: obs.delete_async(self.obstore, key))
        ns, _, name = key.partition("/")
        if outcome == "ok":
            self.index.removed(ns, name)
        return outcome == "ok"

    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        """One LIST per namespace to learn what is there, then bulk DeleteObjects."""
        by_ns: dict[str, set[str]] = {}
        for key in keys:
            ns, _, name = check_key(key).partition("/")
            by_ns.setdefault(ns, set()).add(name)
        present: set[str] = set()
        for ns in by_ns:
            names = await self._list_names(ns)
            present |= {f"{ns}/{n}" for n in (names or set()) & by_ns[ns]}
        deleted = await self._bulk_delete(sorted(present))
        flags = []
        for key in keys:  # a key named twice was deleted once
            flags.append(key in deleted)
            deleted.discard(key)
        return flags

    async def clear(self, namespace: str | None = None) -> int:
        keys = await self.list_keys(namespace)
        deleted = await self._bulk_delete(keys)
        self.index.forget(namespace)
        return len(deleted)

    async def _bulk_delete(self, keys: list[str]) -> set[str]:
        done: set[str] = set()
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            outcome, _ = await self._call("delete_many", batch[0], partial(obs.delete_async, self.obstore, batch))
            if outcome == "ok":
                done.update(batch)
                for key in batch:
                    ns, _, name = key.partition("/")
                    self.index.removed(ns, name)
        return done

    # -- life cycle -----------------------------------------------------------

    async def check(self, timeout_s: float | None = None) -> None:
        """Start-up check: one LIST (delimited) of the prefix, bounded in time.

        Raises ``ConfigError`` naming the bucket, the credentials or the endpoint."""
        limit = self.check_timeout_s if timeout_s is None else timeout_s
        try:
            with anyio.fail_after(limit):
                await obs.list_with_delimiter_async(self.obstore, None)
        except Exception as exc:  # noqa: BLE001 - turned into a ConfigError naming the cause
            raise startup_error(self.settings, exc, limit) from None
        log.info("s3 tier reachable", store=self.settings.describe())

    async def aclose(self) -> None:
        self.index.forget()

    def stats(self) -> dict:
        out = super().stats()
        out.update(circuit=self.breaker.state.value, circuit_opens=self.breaker.opens, list_refreshes=self.index.refreshes)
        return out


def _is_key(path: str) -> bool:
    try:
        check_key(path)
    except ValueError:
        return False
    return True
