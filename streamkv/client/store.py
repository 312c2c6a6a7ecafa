"""``DaemonStore``: the ``Store`` interface backed by a running ``streamkv serve``.

An engine built over it (``StreamKVEngine(config, layout, ns, tiers=[store])``)
keeps its whole API: keys, encoding and verification stay in the engine's
process, the daemon only holds objects. Concurrent single-key reads issued in
the same loop iteration (the producer reads every chunk of a layer at once)
go out as one batched request. Every failure to reach the daemon is a miss
within a bounded time, logged and counted; after a failure the store stays
down for a short, growing back-off (calls miss at once), then tries again."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import anyio
import structlog

from streamkv.client.connection import Connection, DaemonError, DaemonUnavailable, Endpoint
from streamkv.server.protocol import ProtocolError
from streamkv.server.shm import ShmAttachments
from streamkv.store.base import Buffer, ByteRange, Store, check_key

log = structlog.get_logger(__name__)
T = TypeVar("T")
MAX_BATCH = 256  # coalesced ranged reads per request
MAX_WHOLE_BATCH = 32  # whole objects per request (each may be several MB)
LENT_TTL_S = 2.0  # how long a whole object lent by reference is read locally (it is immutable)
LENT_MAX = 4096


def _slices(whole: memoryview, ranges: Any) -> list[memoryview] | None:
    """Byte ranges of a whole object (None for the whole), or None when one runs past its end."""
    if ranges is None:
        return [whole]
    spans = [(int(o), int(n)) for o, n in ranges]
    if any(o < 0 or n < 0 or o + n > len(whole) for o, n in spans):
        return None
    return [whole[o : o + n] for o, n in spans]


class _Batch:
    """Coalesces concurrent calls made in one loop iteration into one request."""

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self.run = run
        self.pending: list[tuple[Any, list[Any]]] = []

    async def submit(self, item: Any) -> Any:
        slot: list[Any] = [anyio.Event(), None]
        self.pending.append((item, slot))
        if len(self.pending) > 1:
            await slot[0].wait()
            return slot[1]
        batch: list[tuple[Any, list[Any]]] | None = None
        results: list[Any] = []
        try:
            await anyio.sleep(0)  # let the other callers of this loop iteration join
            batch, self.pending = self.pending, []
            results = [None] * len(batch)
            for i in range(0, len(batch), MAX_BATCH):
                part = batch[i : i + MAX_BATCH]
                results[i : i + len(part)] = await self.run([it for it, _ in part])
        finally:
            if batch is None:
                batch, self.pending = self.pending, []
            for n, (_, s) in enumerate(batch):
                s[1] = results[n] if n < len(results) else None
                s[0].set()
        return slot[1]


class DaemonStore(Store):
    name = "daemon"

    def __init__(self, socket: str | None = None, *, tcp: str | None = None, token: str | None = None,
                 timeout_s: float = 5.0, connect_timeout_s: float = 1.0, control_timeout_s: float = 120.0,
                 max_connections: int = 8, retry_s: float = 0.1, max_retry_s: float = 2.0) -> None:
        super().__init__()
        if not socket and not tcp:
            raise ValueError("DaemonStore needs a socket path or a tcp address")
        self.endpoint = Endpoint(socket=socket, tcp=tcp, token=token)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.control_timeout_s = control_timeout_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.attachments = ShmAttachments()
        self._slots = anyio.Semaphore(max_connections)
        self._idle: list[Connection] = []
        self._down_until = 0.0
        self._backoff = 0.0
        self._down = False
        self._probing = False
        self._gets = _Batch(self._run_gets)
        self._puts = _Batch(self.put_many)
        self._releases: deque[int] = deque()  # shared by all connections: any may carry them
        self._daemon_pid: int | None = None
        self._lent: OrderedDict[str, tuple[memoryview, float]] = OrderedDict()
        self.client_counters = {"requests": 0, "errors": 0, "error_misses": 0, "reconnects": 0, "connects": 0}

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> DaemonStore:
        """Unix socket from ``config.socket``; TCP (with ``config.token``) when ``config.tcp`` is set
        and no socket file exists."""
        import os

        if config.tcp and not os.path.exists(os.path.expanduser(config.socket)):
            return cls(tcp=config.tcp, token=config.token, **kwargs)
        return cls(os.path.expanduser(config.socket), token=config.token, **kwargs)

    # -- connections -----------------------------------------------------------
    def _mark_down(self, exc: BaseException) -> None:
        for conn in self._idle:
            conn.broken = True
        self._idle.clear()
        self._backoff = min(self.max_retry_s, max(self.retry_s, self._backoff * 2))
        self._down_until = time.monotonic() + self._backoff
        if not self._down:
            log.error("daemon unreachable; calls are misses until it is back",
                      endpoint=self.endpoint.describe(), error=str(exc))
        self._down = True

    async def _acquire(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.broken:
                return conn
        if time.monotonic() < self._down_until:
            raise DaemonUnavailable(f"{self.endpoint.describe()}: down, next try in "
                                    f"{self._down_until - time.monotonic():.2f}s")
        if self._down and self._probing:  # one caller probes a daemon that was down; the rest miss
            raise DaemonUnavailable(f"{self.endpoint.describe()}: down, reconnecting")
        self._probing = self._down
        try:
            with anyio.fail_after(self.connect_timeout_s):
                conn = await Connection.open(self.endpoint, self.attachments)
        except (DaemonUnavailable, ProtocolError, TimeoutError, OSError) as exc:
            self._mark_down(exc)
            if isinstance(exc, DaemonUnavailable):
                raise
            raise DaemonUnavailable(f"{self.endpoint.describe()}: {type(exc).__name__}: {exc}") from exc
        finally:  # also when the prober is cancelled
            self._probing = False
        conn.releases = self._releases
        if conn.daemon_pid != self._daemon_pid:
            if self._daemon_pid is not None:  # a restarted daemon: its old segments are gone
                self.attachments.close()
                self._releases.clear()
            self._daemon_pid = conn.daemon_pid
        self.client_counters["connects"] += 1
        if self._down:
            self.client_counters["reconnects"] += 1
            log.warning("daemon reachable again", endpoint=self.endpoint.describe(), pid=conn.daemon_pid)
        self._down = False
        self._backoff = 0.0
        return conn

    async def request(self, fn: Callable[[Connection], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Run ``fn`` on a pooled connection; DaemonUnavailable when the daemon cannot answer."""
        async with self._slots:
            self.client_counters["requests"] += 1
            conn = await self._acquire()
            try:
                with anyio.fail_after(timeout_s or self.timeout_s):
                    result = await fn(conn)
            except DaemonError:
                self._idle.append(conn)
                raise
            except (ProtocolError, TimeoutError, OSError, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, anyio.EndOfStream) as exc:
                await conn.aclose()
                self._mark_down(exc)
                raise DaemonUnavailable(f"{self.endpoint.describe()}: {type(exc).__name__}: {exc}") from exc
            except BaseException:
                await conn.aclose()
                raise
            self._idle.append(conn)
            return result

    async def _data(self, fn: Callable[[Connection], Awaitable[T]], miss: T) -> T:
        """A data call: any failure is a miss, counted."""
        try:
            return await self.request(fn)
        except (DaemonUnavailable, DaemonError) as exc:
            self.client_counters["errors"] += 1
            self.client_counters["error_misses"] += 1
            self.counters.errors += 1
            log.debug("daemon call failed; miss", error=str(exc))
            return miss

    async def control(self, op: str, **args: Any) -> Any:
        """A control call (CLI, tools): raises DaemonUnavailable / DaemonError instead of missing."""
        return await self.request(lambda c: c.call(op, **args), self.control_timeout_s)

    # -- reads -----------------------------------------------------------------
    async def _run_gets(self, items: list[Any]) -> list[Any]:
        async def fn(conn: Connection) -> list[Any]:
            results: list[Any] = [None] * len(items)
            pending = list(range(len(items)))
            while pending:  # replies larger than the staging region come in several rounds
                res = await conn.call("get", items=[items[i] for i in pending])
                if not isinstance(res, list) or len(res) != len(pending):
                    raise ProtocolError("get reply does not match the request")
                parts = conn.read_staging([r if isinstance(r, (list, dict)) else None for r in res])
                again = [i for i, r in zip(pending, res) if r is False]
                for i, r, p in zip(pending, res, parts):
                    if isinstance(r, dict) and r.get("whole") and p is not None:
                        results[i] = self._remember(items[i][0], p[0], items[i][1])
                    elif r is not False:
                        results[i] = p
                if len(again) == len(pending):
                    break
                pending = again
            return results
        out = await self._data(fn, [None] * len(items))
        for r in out:
            if r is None:
                self.counters.misses += 1
            else:
                self.counters.hits += 1
                self.counters.bytes_read += sum(len(p) for p in r)
        return out

    # -- objects the daemon handed over whole, by reference ---------------------
    def _remember(self, key: str, whole: memoryview, ranges: Any) -> list[memoryview] | None:
        """Keep a whole object the daemon lent us for a moment (the next layers of a retrieve
        read it without a request); returns the ranges that were asked for."""
        self._lent[key] = (whole, time.monotonic() + LENT_TTL_S)
        self._lent.move_to_end(key)
        while len(self._lent) > LENT_MAX:
            self._lent.popitem(last=False)
        return _slices(whole, ranges)

    def forget_lent(self) -> None:
        """Drop every object lent by reference (their leases are returned with the next request)."""
        self._lent.clear()

    def _borrowed(self, key: str) -> memoryview | None:
        now = time.monotonic()
        while self._lent:  # entries expire in insertion order (one TTL for all)
            oldest = next(iter(self._lent.values()))
            if oldest[1] >= now:
                break
            self._lent.popitem(last=False)
        entry = self._lent.get(key)
        return None if entry is None else entry[0]

    async def get(self, key: str) -> Buffer | None:
        whole = self._borrowed(check_key(key))
        if whole is not None:
            self.counters.hits += 1
            return whole
        parts = await self._gets.submit([key, None])
        return None if parts is None else parts[0]

    async def get_ranges(self, key: str, ranges: Sequence[ByteRange]) -> list[Buffer] | None:
        whole = self._borrowed(check_key(key))
        if whole is not None:
            self.counters.hits += 1
            return _slices(whole, ranges)
        return await self._gets.submit([key, [[int(o), int(n)] for o, n in ranges]])

    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        out: list[Any] = []
        for i in range(0, len(keys), MAX_WHOLE_BATCH):
            out += await self._run_gets([[check_key(k), None] for k in keys[i : i + MAX_WHOLE_BATCH]])
        return [None if parts is None else parts[0] for parts in out]

    async def exists(self, key: str) -> bool:
        return (await self.exists_many([key]))[0]

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        keys = [check_key(k) for k in keys]
        flags = await self._data(lambda c: c.call("exists", keys=keys), [False] * len(keys))
        return [bool(f) for f in flags]

    async def list_keys(self, namespace: str | None = None) -> list[str]:
        return list(await self._data(lambda c: c.call("list", namespace=namespace), []))

    # -- writes ----------------------------------------------------------------
    async def put(self, key: str, data: Buffer) -> bool:
        """Concurrent puts of one loop iteration go out together, like reads."""
        return bool(await self._puts.submit((check_key(key), data)))

    async def put_many(self, items: Iterable[tuple[str, Buffer]]) -> list[bool]:
        objs = [(check_key(k), memoryview(d).cast("B")) for k, d in items]
        if not objs:
            return []

        async def fn(conn: Connection) -> list[bool]:
            if conn.put_by_reference:
                return await self._put_by_reference(conn, objs)
            return await self._put_through_staging(conn, objs)

        out = await self._data(fn, [False] * len(objs))
        self.counters.puts += sum(out)
        self.counters.bytes_written += sum(len(o) for (_, o), ok in zip(objs, out) if ok)
        return out

    async def _put_by_reference(self, conn: Connection, objs: list[tuple[str, memoryview]]) -> list[bool]:
        """Write each object straight into a region of the daemon's memory tier, then commit:
        one copy in all, as in process. Objects it has no region for go through staging."""
        regions = await conn.call("alloc", sizes=[len(o) for _, o in objs])
        if not isinstance(regions, list) or len(regions) != len(objs):
            raise ProtocolError("alloc reply does not match the request")
        placed = [i for i, r in enumerate(regions) if isinstance(r, list) and len(r) == 3]
        try:
            conn.write_regions([regions[i] for i in placed], [objs[i][1] for i in placed])
        except (ValueError, ProtocolError):
            await conn.call("commit", items=[], discard=[regions[i][:2] for i in placed])
            raise
        flags = await conn.call("commit", items=[[objs[i][0], *regions[i][:2]] for i in placed])
        results = [False] * len(objs)
        for i, flag in zip(placed, flags):
            results[i] = bool(flag)
        done = set(placed)
        rest = [i for i in range(len(objs)) if i not in done]
        if rest:
            for i, flag in zip(rest, await self._put_through_staging(conn, [objs[i] for i in rest])):
                results[i] = flag
        return results

    async def _put_through_staging(self, conn: Connection, objs: list[tuple[str, memoryview]]) -> list[bool]:
        """Objects copied back to back into the connection's staging area, a group at a time."""
        results: list[bool] = []
        i = 0
        while i < len(objs):
            group, total = [], 0
            while i < len(objs) and (not group or total + len(objs[i][1]) <= conn.staging_size):
                group.append(objs[i])
                total += len(objs[i][1])
                i += 1
            if total > conn.staging_size and not await conn.call("reserve", size=total):
                results += [False] * len(group)
                continue
            spans = conn.write_staging([o for _, o in group])
            flags = await conn.call("put", items=[[k, off, n] for (k, _), (off, n) in zip(group, spans)])
            results += [bool(f) for f in flags]
        return results

    async def delete(self, key: str) -> bool:
        return (await self.delete_many([key]))[0]

    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        keys = [check_key(k) for k in keys]
        return [bool(f) for f in await self._data(lambda c: c.call("delete", keys=keys), [False] * len(keys))]

    async def clear(self, namespace: str | None = None) -> int:
        return int(await self._data(lambda c: c.call("clear", namespace=namespace), 0))

    async def flush(self) -> bool:
        """Wait until the daemon's background writes to its lower tiers are done."""
        return bool(await self._data(lambda c: c.call("flush"), False))

    async def aclose(self) -> None:
        self._lent.clear()  # drops the views of lent objects: their leases queue for freeing
        if self._releases and self._idle:
            with anyio.move_on_after(self.timeout_s):
                try:
                    await self._idle[-1].call("ping")  # carries the frees
                except Exception as exc:  # the daemon expires them itself after a grace period
                    log.debug("could not return leases on close", error=repr(exc))
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()
        self.attachments.close()

    @property
    def connected(self) -> bool:
        return not self._down

    def stats(self) -> dict:
        return {**super().stats(), **self.client_counters, "endpoint": self.endpoint.describe(),
                "down": self._down}
