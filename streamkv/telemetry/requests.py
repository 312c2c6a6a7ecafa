"""Per-request telemetry: what the engine core calls at a lookup, retrieve and store.

A retrieve crosses three threads (the engine's, the loop, codec workers) and
its layers overlap, so spans are not opened and closed as work happens.
Instead the recorder takes cheap ``perf_counter`` stamps at each step (layer
fetch start, layer ready, consumer wait start/end) and, once the producer is
done and the consumer has taken every layer, emits the whole span tree in one
go with explicit timestamps, on the loop thread, off the engine's path:

    streamkv.retrieve
      streamkv.tier.get       (one per chunk header, header phase)
      streamkv.retrieve.headers
      streamkv.retrieve.layer (one per layer)

A layer span runs from the layer's fetch start to its fetch end (sections
read, verified and copied into the sink: ``layer_done``, the copy end); the
consumer's wait is in its attributes (``streamkv.wait_s`` and the wall-clock
``streamkv.wait.start_ns``/``end_ns``) rather than in span events, because
events cost as much as a third of a span each and a retrieve has one layer
span per model layer. ``streamkv.wait_s`` is exactly ``handle.stall_s[layer]``,
so the layer waits add up to the stall the consumer saw."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from streamkv.telemetry.core import Telemetry, now


def token_count(tokens: Any) -> int:
    try:
        return int(len(tokens))
    except TypeError:
        return 0


def _result(hit: int, wanted: int) -> str:
    if hit <= 0:
        return "miss"
    return "hit" if hit >= wanted else "partial"


class RetrieveRecorder:
    """Stamps of one layer-wise retrieve, turned into metrics and spans when it ends."""

    def __init__(self, tel: Telemetry, handle: Any, prompt_tokens: int, namespace: str,
                 counters: dict[str, int]) -> None:
        self.tel = tel
        self.handle = handle
        self.prompt_tokens = prompt_tokens
        self.counters = counters
        self.t0, self.wall0 = now()
        layers = handle.num_layers
        self.fetch_start: list[float | None] = [None] * layers
        self.ready: list[float | None] = [None] * layers
        self.wait_start: list[float | None] = [None] * layers
        self.wait_end: list[float | None] = [None] * layers
        self.headers_end: float | None = None
        self._taken = [False] * layers
        self._taken_count = 0
        self._producer_done = False
        self._finished = False
        self._lock = threading.Lock()
        self.parent = otel_context.get_current()
        self.span = tel.start_span("streamkv.retrieve", {
            "streamkv.namespace": namespace,
            "streamkv.prompt_tokens": prompt_tokens,
            "streamkv.chunks": handle.requested_chunks,
            "streamkv.layers": layers,
        }, parent=self.parent, start_ns=self.wall0)
        self.context = trace.set_span_in_context(self.span, self.parent) if self.span is not None else None

    def _ns(self, t: float) -> int:
        return self.wall0 + int((t - self.t0) * 1e9)

    # -- hooks: producer (loop thread) --------------------------------------------
    def hit_known(self, chunks: int) -> None:
        """Headers verified: count the request and its hit/miss tokens now (once)."""
        if self.headers_end is not None:
            return
        self.headers_end = time.perf_counter()
        hit = chunks * self.handle.chunk_size
        ins = self.tel.instruments
        if self.tel.metrics:
            wanted = self.handle.requested_chunks * self.handle.chunk_size
            ins.requests.add(1, {"streamkv.op": "retrieve", "streamkv.result": _result(hit, wanted)})
            ins.hit_tokens.add(hit)
            ins.miss_tokens.add(max(0, self.prompt_tokens - hit))

    def layer_fetch(self, layer: int) -> None:
        self.fetch_start[layer] = time.perf_counter()

    def layer_ready(self, layer: int) -> None:
        self.ready[layer] = time.perf_counter()

    def layer_taken(self, layer: int) -> None:
        """The consumer released ``layer`` (scheduled onto the loop after its wait)."""
        with self._lock:
            if self._taken[layer]:
                return
            self._taken[layer] = True
            self._taken_count += 1
            last = self._taken_count == len(self._taken) and self._producer_done
        if last:
            self._finish()

    def producer_done(self, future: Future[Any]) -> None:
        with self._lock:
            self._producer_done = True
            hit = self.handle.hit_tokens  # known: the producer set it or cancel() did
            last = (future.cancelled() or self.handle.cancelled or hit == 0
                    or self._taken_count == len(self._taken))
        if last:
            self._finish()

    # -- hook: consumer (engine thread) -----------------------------------------
    def layer_waited(self, layer: int, start: float, end: float, in_time: bool) -> None:
        if self.wait_start[layer] is None:
            self.wait_start[layer] = start
        self.wait_end[layer] = end
        if not in_time:
            self.counters["retrieve_timeout"] = self.counters.get("retrieve_timeout", 0) + 1
            self.layer_taken(layer)

    # -- emission ------------------------------------------------------------------
    def _finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        handle = self.handle
        stamps = [t for t in (*self.ready, *self.wait_end, self.headers_end) if t is not None]
        end = max(stamps, default=time.perf_counter())
        hit = handle.hit_tokens
        valid = handle.valid_tokens
        if self.tel.metrics:
            ins = self.tel.instruments
            result = _result(valid, hit) if hit else "miss"  # partial: a layer failed after the hit was known
            ins.retrieve_duration.record(end - self.t0, {"streamkv.result": result})
            for layer, waited in enumerate(self.wait_end):
                if waited is not None:
                    ins.layer_wait_duration.record(handle.stall_s[layer])
        if self.span is not None:
            self._emit_spans(end, hit, valid)

    def _emit_spans(self, end: float, hit: int, valid: int) -> None:
        assert self.span is not None
        handle = self.handle
        tracer = self.tel.tracer
        if self.headers_end is not None:
            tracer.start_span("streamkv.retrieve.headers", context=self.context, start_time=self.wall0,
                              attributes={"streamkv.hit_tokens": hit}).end(end_time=self._ns(self.headers_end))
        for layer in range(handle.num_layers):
            start = self.fetch_start[layer]
            if start is None:
                continue
            ready = self.ready[layer]
            attributes: dict[str, Any] = {
                "streamkv.layer": layer,
                "streamkv.fetch_s": (ready - start) if ready is not None else -1.0,
                "streamkv.wait_s": handle.stall_s[layer],
                "streamkv.ok": ready is not None and not handle.cancelled,
            }
            w0, w1 = self.wait_start[layer], self.wait_end[layer]
            if w0 is not None and w1 is not None:
                attributes["streamkv.wait.start_ns"] = self._ns(w0)
                attributes["streamkv.wait.end_ns"] = self._ns(w1)
            tracer.start_span("streamkv.retrieve.layer", context=self.context, start_time=self._ns(start),
                              attributes=attributes).end(end_time=self._ns(ready if ready is not None else start))
        self.span.set_attributes({
            "streamkv.hit_tokens": hit,
            "streamkv.valid_tokens": valid,
            "streamkv.result": _result(valid, handle.requested_chunks * handle.chunk_size),
            "streamkv.stall_s": handle.total_stall_s,
            "streamkv.cancelled": bool(handle.cancelled),
        })
        self.span.end(end_time=self._ns(end))


class OpRecorder:
    """A lookup, store, or chunk-level read/write: one span, one duration, one request count."""

    def __init__(self, tel: Telemetry, op: str, span_name: str, attributes: dict[str, Any]) -> None:
        self.tel = tel
        self.op = op
        self.t0, self.wall0 = now()
        self.span = tel.start_span(span_name, attributes, parent=otel_context.get_current(), start_ns=self.wall0)
        self.context = trace.set_span_in_context(self.span) if self.span is not None else None

    def done(self, result: str, attributes: dict[str, Any] | None = None,
             hit_tokens: int | None = None, miss_tokens: int | None = None) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.tel.metrics:
            ins = self.tel.instruments
            ins.requests.add(1, {"streamkv.op": self.op, "streamkv.result": result})
            hist = {"lookup": ins.lookup_duration, "store": ins.store_duration}.get(self.op, ins.retrieve_duration)
            hist.record(elapsed, {"streamkv.result": result})
            if hit_tokens is not None:
                ins.hit_tokens.add(hit_tokens)
            if miss_tokens is not None:
                ins.miss_tokens.add(miss_tokens)
        if self.span is not None:
            self.span.set_attributes({"streamkv.result": result, **(attributes or {})})
            self.span.end(end_time=self.wall0 + int(elapsed * 1e9))

    def done_future(self, future: Future[Any]) -> None:
        """For ``Future[int]`` of chunks written (stores)."""
        if future.cancelled() or future.exception() is not None:
            self.done("error")
            return
        written = int(future.result() or 0)
        self.done("stored" if written else "skipped", {"streamkv.chunks_written": written})


def retrieve_recorder(tel: Telemetry, handle: Any, tokens: Any, namespace: str,
                      counters: dict[str, int]) -> RetrieveRecorder | None:
    """A recorder for ``handle``, or None when telemetry is off (the core then skips every hook)."""
    if not tel.active:
        return None
    return RetrieveRecorder(tel, handle, token_count(tokens), namespace, counters)


def op_recorder(tel: Telemetry, op: str, span_name: str, **attributes: Any) -> OpRecorder | None:
    if not tel.active:
        return None
    return OpRecorder(tel, op, span_name, {f"streamkv.{k}": v for k, v in attributes.items()})
