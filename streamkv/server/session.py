"""One client connection of the daemon: the hello, then requests one at a time.

Each connection owns a staging region in the shared-memory pool; a request's
bulk bytes live there, so a frame only names offsets. A request is handled
under a shielded cancel scope, so shutdown lets it finish (a put is never
cut in half). A malformed frame, a bad hello or a wrong token drops the
connection with a logged error; the daemon keeps serving everyone else."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio
import numpy as np
import structlog
from anyio.abc import SocketStream
from opentelemetry import context as otel_context

from streamkv import control
from streamkv.server.admission import refusal
from streamkv.server.protocol import PROTOCOL_VERSION, MAX_FRAME, FrameReader, PeerClosed, ProtocolError, field, pack
from streamkv.server.shm import Region
from streamkv.server.leases import ShmMemoryStore
from streamkv.store.base import check_key, gather
from streamkv.store.memory import MemoryStore
from streamkv.telemetry import extract_context

if TYPE_CHECKING:
    from streamkv.server.daemon import Daemon

log = structlog.get_logger(__name__)
HELLO_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 30.0
STAGING_BYTES = 4 << 20
MAX_REQUEST_BYTES = 1 << 30
MAX_STAGING_BYTES = 256 << 20  # a get reply larger than this comes back in several requests
MAX_PENDING_BYTES = 1 << 30  # allocated for puts by reference and not yet committed, per connection


TRACE_FIELDS = ("traceparent", "tracestate")


class Session:
    def __init__(self, daemon: Daemon, stream: SocketStream, transport: str) -> None:
        self.daemon = daemon
        self.stream = stream
        self.transport = transport
        self.staging: Region | None = None
        self.ops: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "ping": self.op_ping, "exists": self.op_exists, "get": self.op_get, "put": self.op_put,
            "reserve": self.op_reserve, "delete": self.op_delete, "list": self.op_list, "flush": self.op_flush,
            "lookup": self.op_lookup, "pin": self.op_pin, "unpin": self.op_unpin, "clear": self.op_clear,
            "move": self.op_move, "compress": self.op_compress, "health": self.op_health, "stats": self.op_stats,
            "alloc": self.op_alloc, "commit": self.op_commit,
        }
        self._pending: dict[tuple[str, int], np.ndarray] = {}  # allocated, not yet committed
        self._pending_bytes = 0

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.daemon.store

    async def run(self) -> None:
        counters = self.daemon.counters
        reader = FrameReader(self.stream)
        try:
            with anyio.fail_after(HELLO_TIMEOUT_S):
                hello = await reader.read()
            if not await self._hello(hello):
                return
            while True:
                message = await reader.read()
                with anyio.CancelScope(shield=True):
                    reply = await self._handle(message)
                    with anyio.move_on_after(SEND_TIMEOUT_S) as sending:
                        await self.stream.send(pack(reply))
                    if sending.cancelled_caught:  # a peer that stops reading must not hold shutdown
                        log.error("client does not read its replies; connection dropped")
                        return
        except PeerClosed:
            pass
        except ProtocolError as exc:
            counters["protocol_errors"] += 1
            log.error("malformed frame; connection dropped", transport=self.transport, error=str(exc))
        except TimeoutError:
            counters["protocol_errors"] += 1
            log.error("no hello in time; connection dropped", transport=self.transport)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError) as exc:
            log.info("connection lost", transport=self.transport, error=repr(exc))
        finally:
            self._free_staging()
            self._pending.clear()  # uncommitted regions go back to the pool
            self.daemon.leases.orphan(id(self))
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _hello(self, hello: dict[str, Any]) -> bool:
        why = refusal(hello, self.transport, self.stream, self.daemon.config.token)
        if why is not None:
            self.daemon.counters["auth_failures"] += 1
            await self.stream.send(pack({"id": hello.get("id"), "ok": False, "error": why}))
            return False
        self.staging = self.daemon.shm.alloc(STAGING_BYTES)
        await self.stream.send(pack({
            "id": hello.get("id"), "ok": True, "version": PROTOCOL_VERSION, "pid": os.getpid(),
            "max_frame": MAX_FRAME, "staging": self.staging.as_wire() if self.staging else None,
            "put_by_reference": self._puts_by_reference,
        }))
        return True

    async def _handle(self, message: dict[str, Any]) -> dict[str, Any]:
        rid = message.get("id")
        op = field(message, "op", str)
        freed = message.get("free")
        if isinstance(freed, list):
            self.daemon.leases.free(freed)
        handler = self.ops.get(op)
        self.daemon.counters["requests"] += 1
        if handler is None:
            return {"id": rid, "ok": False, "error": f"unknown op {op!r}"}
        token = otel_context.attach(extract_context({k: message[k] for k in TRACE_FIELDS if k in message}))
        try:
            result = await handler(message)
        except ProtocolError:
            raise
        except (ValueError, TypeError, KeyError) as exc:  # a bad argument, answered, not fatal
            return {"id": rid, "ok": False, "error": str(exc)}
        finally:
            otel_context.detach(token)
        reply = {"id": rid, "ok": True, "result": result}
        if self.staging is not None:
            reply["staging"] = self.staging.as_wire()
        return reply

    # -- staging ---------------------------------------------------------------
    def _free_staging(self) -> None:
        if self.staging is not None:
            self.daemon.shm.free(self.staging)
            self.staging = None

    def _ensure_staging(self, size: int) -> bool:
        if self.staging is not None and self.staging.size >= size:
            return True
        if size > MAX_REQUEST_BYTES:
            return False
        want = max(STAGING_BYTES, 1 << (size - 1).bit_length())
        self._free_staging()
        self.staging = self.daemon.shm.alloc(want) or self.daemon.shm.alloc(size)
        return self.staging is not None

    # -- data ops ----------------------------------------------------------------
    async def op_ping(self, m: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def op_exists(self, m: dict[str, Any]) -> list[bool]:
        return await self.store.exists_many(field(m, "keys", list))

    async def op_reserve(self, m: dict[str, Any]) -> bool:
        return self._ensure_staging(field(m, "size", int))

    async def op_get(self, m: dict[str, Any]) -> list[Any]:
        """Whole objects or byte ranges, copied into staging: ``[offset, [lengths]]`` each, None
        for a miss, False for one that did not fit this time (the client asks again)."""
        items = field(m, "items", list)
        for item in items:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
                raise ProtocolError("get items are [key, ranges or null]")

        async def fetch(key: str, ranges: Any) -> list[Any] | None:
            if ranges is None:
                data = await self.store.get(key)
                return None if data is None else [data]
            return await self.store.get_ranges(key, [(int(o), int(n)) for o, n in ranges])

        # memory-tier hits answer without suspending: fetch them in line; the rest concurrently
        first = self.store.tiers[0]
        held = await first.exists_many([k for k, _ in items]) if isinstance(first, MemoryStore) else []
        found: list[Any] = [None] * len(items)
        out: list[Any] = [None] * len(items)
        slow = []
        for i, (k, r) in enumerate(items):
            if held and held[i] and r is not None and self.daemon.zero_copy:
                out[i], found[i] = await self._whole(k, r)
            elif held and held[i]:
                found[i] = await fetch(k, r)
            else:
                slow.append(i)
        if slow:
            fetched = await gather([lambda k=items[i][0], r=items[i][1]: fetch(k, r) for i in slow])
            for i, parts in zip(slow, fetched):
                found[i] = parts
        copies: list[int] = []
        for i, parts in enumerate(found):
            if parts and out[i] is None:
                refs = self._by_reference(parts)
                if refs is None:
                    copies.append(i)
                else:
                    out[i] = refs
        self._copy_into_staging(found, copies, out)
        return out

    async def _whole(self, key: str, ranges: Any) -> tuple[dict[str, Any] | None, list[Any] | None]:
        """A ranged read of a memory-tier object: the whole object by reference (it costs no
        more, and the client then reads the other layers of it without asking again); or,
        when it is not in the tier pool, the ranges to copy."""
        data = await self.store.get(key)
        if data is None:
            return None, None
        refs = self._by_reference([data])
        if refs is not None:
            refs["whole"] = True
            return refs, None
        view = memoryview(data).cast("B")
        spans = [(int(o), int(n)) for o, n in ranges]
        if any(o < 0 or n < 0 or o + n > len(view) for o, n in spans):
            return None, None
        return None, [view[o : o + n] for o, n in spans]

    def _by_reference(self, parts: list[Any]) -> dict[str, Any] | None:
        """Parts that live in the tier pool go out as (segment, offset, length) under a lease."""
        if not self.daemon.zero_copy:
            return None
        refs = []
        for p in parts:
            n = len(memoryview(p).cast("B"))
            where = self.daemon.tier_shm.locate(p) if n else None
            if where is None:
                return None
            refs.append([where[0], where[1], n])
        lease = self.daemon.leases.grant(parts, id(self))
        if lease is None:
            return None
        self.daemon.counters["bytes_out_by_reference"] += sum(r[2] for r in refs)
        return {"lease": lease, "refs": refs}

    def _copy_into_staging(self, found: list[Any], todo: list[int], out: list[Any]) -> None:
        """Copy the other parts back to back into staging: ``[offset, [lengths]]``; False for
        those that did not fit this time (the client asks again), None if nothing could fit."""
        sizes = {i: sum(len(memoryview(p).cast("B")) for p in found[i]) for i in todo}
        total = sum(sizes.values())
        if not total:
            return
        self._ensure_staging(min(total, MAX_STAGING_BYTES))
        cap = self.staging.size if self.staging is not None else 0
        dst = self.daemon.shm.view(self.staging) if self.staging is not None else None
        pos = 0
        try:
            for i in todo:
                if dst is None or pos + sizes[i] > cap:
                    out[i] = None if pos == 0 else False
                    if pos == 0:
                        self.daemon.counters["staging_misses"] += 1
                    continue
                lens, start = [], pos
                for p in found[i]:
                    src = memoryview(p).cast("B")
                    dst[pos : pos + len(src)] = src
                    pos += len(src)
                    lens.append(len(src))
                out[i] = [start, lens]
        finally:
            if dst is not None:
                dst.release()
        self.daemon.counters["bytes_out"] += pos

    async def op_put(self, m: dict[str, Any]) -> list[bool]:
        """Objects the client wrote into staging: ``[key, offset, length]`` each."""
        items = field(m, "items", list)
        if self.staging is None:
            return [False] * len(items)
        for item in items:
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                    or not all(isinstance(x, int) for x in item[1:])):
                raise ProtocolError("put items are [key, offset, length]")
            _, off, n = item
            if off < 0 or n <= 0 or off + n > self.staging.size:
                raise ProtocolError(f"put range {off}+{n} outside the staging region")
        ok = []
        for key, off, n in items:
            # a borrowed view: DaemonTieredStore copies it (once) before put returns
            view = self.daemon.shm.view(Region(self.staging.segment, self.staging.offset + off, n))
            try:
                ok.append(bool(await self.store.put(key, view)))
            finally:
                try:
                    view.release()
                except BufferError:  # a tier still holds it: a bug, since staging is reused
                    log.error("a tier kept a view of the staging area", key=key)
            self.daemon.counters["bytes_in"] += n
        return ok

    # -- puts by reference ------------------------------------------------------
    @property
    def _puts_by_reference(self) -> bool:
        return self.daemon.zero_copy and isinstance(self.store.tiers[0], ShmMemoryStore)

    async def op_alloc(self, m: dict[str, Any]) -> list[Any]:
        """Regions of the memory tier's pool, one per size, for objects the client writes in
        place and then ``commit``s: the bytes enter the tier with no copy in the daemon.
        None for a size that cannot be had now (the client sends that one through staging)."""
        sizes = field(m, "sizes", list)
        if not all(isinstance(n, int) and 0 < n <= MAX_REQUEST_BYTES for n in sizes):
            raise ProtocolError("alloc sizes are positive byte counts")
        out: list[Any] = []
        for n in sizes:
            arr = None
            if self._puts_by_reference and self._pending_bytes + n <= MAX_PENDING_BYTES:
                arr = self.daemon.tier_shm.array(n)
            where = None if arr is None else self.daemon.tier_shm.locate(arr)
            if where is None:
                out.append(None)
                continue
            self._pending[where] = arr
            self._pending_bytes += n
            out.append([where[0], where[1], n])
        return out

    async def op_commit(self, m: dict[str, Any]) -> list[bool]:
        """``items``: ``[key, segment, offset]`` of allocated regions the client has filled;
        ``discard``: ``[segment, offset]`` of regions it gives back unused."""
        items = field(m, "items", list)
        discard = m.get("discard") or []
        shapes = [(item, (str, str, int)) for item in items] + [(item, (str, int)) for item in discard]
        for item, types in shapes:
            if (not isinstance(item, list) or len(item) != len(types)
                    or not all(isinstance(x, t) for x, t in zip(item, types))):
                raise ProtocolError("commit items are [key, segment, offset]; discard [segment, offset]")
        for key, _, _ in items:
            check_key(key)
        for seg, off in discard:
            self._take(seg, off)
        ok = []
        for key, seg, off in items:
            arr = self._take(seg, off)
            stored = arr is not None and await self.store.adopt(key, arr)
            ok.append(bool(stored))
            if stored:
                self.daemon.counters["bytes_in"] += arr.nbytes
                self.daemon.counters["bytes_in_by_reference"] += arr.nbytes
        return ok

    def _take(self, seg: str, off: int) -> np.ndarray | None:
        arr = self._pending.pop((seg, off), None)
        if arr is not None:
            self._pending_bytes -= arr.nbytes
        return arr

    async def op_delete(self, m: dict[str, Any]) -> list[bool]:
        return await self.store.delete_many(field(m, "keys", list))

    async def op_list(self, m: dict[str, Any]) -> list[str]:
        return await control.list_keys(self.store, m.get("namespace"), m.get("prefix"))

    async def op_flush(self, m: dict[str, Any]) -> bool:
        await self.store.flush()
        return True

    # -- control ops ---------------------------------------------------------------
    async def op_lookup(self, m: dict[str, Any]) -> dict[str, Any]:
        return await control.lookup(self.store, field(m, "keys", list))

    async def op_pin(self, m: dict[str, Any]) -> int:
        return await control.pin(self.store, field(m, "keys", list))

    async def op_unpin(self, m: dict[str, Any]) -> int:
        return await control.unpin(self.store, field(m, "keys", list))

    async def op_clear(self, m: dict[str, Any]) -> int:
        return await control.clear(self.store, m.get("namespace"), m.get("prefix"))

    async def op_move(self, m: dict[str, Any]) -> int:
        return await control.move(self.store, field(m, "keys", list), field(m, "tier", str))

    async def op_compress(self, m: dict[str, Any]) -> dict[str, int]:
        return await control.compress(self.store, m.get("namespace"), m.get("keys"))

    async def op_health(self, m: dict[str, Any]) -> dict[str, Any]:
        return {**await control.health(self.store), **self.daemon.describe()}

    async def op_stats(self, m: dict[str, Any]) -> dict[str, Any]:
        return {"store": control.stats(self.store), "daemon": self.daemon.describe(),
                "counters": dict(self.daemon.counters), "shm": self.daemon.shm.stats(),
                "tier_shm": self.daemon.tier_shm.stats(), "leases": self.daemon.leases.stats()}
