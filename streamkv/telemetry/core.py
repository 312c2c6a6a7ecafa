"""The ``Telemetry`` object: one tracer, one meter, the instruments and exporters.

Why not the OpenTelemetry globals: an engine process may already own the
global providers (vLLM and SGLang set their own), tests need a fresh pipeline
each, and the default must cost nearly nothing. So every ``Telemetry`` owns
its providers; spans still join the caller's trace because the *context*
(``opentelemetry.context``) is global and is what links parent and child.

With ``telemetry_exporter: none`` and no ``metrics_port`` both sides are
no-ops: ``tracing`` and ``metrics`` are False and the core skips its hooks."""

from __future__ import annotations

import atexit
import threading
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

from streamkv.telemetry.instruments import Instruments, Sources
from streamkv.telemetry.scope import tier_spans_enabled

T = TypeVar("T")
SCOPE = "streamkv"
METRIC_EXPORT_INTERVAL_MS = 30_000


class Telemetry:
    """Tracer + meter + instruments of one streamkv process (or one test)."""

    def __init__(self, *, span_exporters: Sequence[SpanExporter] = (), metric_readers: Sequence[MetricReader] = (),
                 batch: bool = True, service_name: str = "streamkv") -> None:
        resource = Resource.create({"service.name": service_name})
        self.tracing = bool(span_exporters)
        self.metrics = bool(metric_readers)
        self._tracer_provider: TracerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        self.metrics_server: Any = None
        if self.tracing:
            self._tracer_provider = TracerProvider(resource=resource)
            for exporter in span_exporters:
                processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
                self._tracer_provider.add_span_processor(processor)
            self.tracer: trace.Tracer = self._tracer_provider.get_tracer(SCOPE)
        else:
            self.tracer = trace.NoOpTracer()
        if self.metrics:
            self._meter_provider = MeterProvider(metric_readers=list(metric_readers), resource=resource)
            self.meter = self._meter_provider.get_meter(SCOPE)
        else:
            self.meter = NoOpMeterProvider().get_meter(SCOPE)
        self.sources = Sources()
        self.instruments = Instruments(self.meter, self.sources)
        self._closed = False

    @property
    def active(self) -> bool:
        """True when spans or metrics are recorded; the core skips all hooks otherwise."""
        return self.tracing or self.metrics

    # -- construction ------------------------------------------------------------
    @classmethod
    def disabled(cls) -> Telemetry:
        return _DISABLED

    @classmethod
    def create(cls, config: Any) -> Telemetry:
        """A new ``Telemetry`` from ``telemetry_exporter``, ``telemetry_file``, ``metrics_port``."""
        from streamkv.telemetry import exporters

        spans: list[SpanExporter] = []
        readers: list[MetricReader] = []
        kind = getattr(config, "telemetry_exporter", "none")
        if kind != "none":
            if kind == "file":
                span_exp, metric_exp = exporters.file_exporters(config.telemetry_file)
            elif kind == "console":
                span_exp, metric_exp = exporters.console_exporters()
            else:
                span_exp, metric_exp = exporters.otlp_exporters()
            spans.append(span_exp)
            readers.append(PeriodicExportingMetricReader(metric_exp, export_interval_millis=METRIC_EXPORT_INTERVAL_MS))
        port = getattr(config, "metrics_port", None)
        registry = None
        if port is not None:
            from streamkv.telemetry.prometheus import prometheus_reader

            reader, registry = prometheus_reader()
            readers.append(reader)
        tel = cls(span_exporters=spans, metric_readers=readers)
        if port is not None:
            from streamkv.telemetry.prometheus import serve_metrics

            tel.metrics_server = serve_metrics(registry, int(port))
        return tel

    @classmethod
    def from_config(cls, config: Any) -> Telemetry:
        """The process-wide ``Telemetry`` for these settings (shared by every engine that uses them).

        Shared because a scrape port can be bound once and one file should not
        be opened by two writers; flushed and shut down at interpreter exit."""
        kind = getattr(config, "telemetry_exporter", "none")
        port = getattr(config, "metrics_port", None)
        if kind == "none" and port is None:
            return _DISABLED
        key = (kind, getattr(config, "telemetry_file", None) if kind == "file" else None, port)
        with _SHARED_LOCK:
            tel = _SHARED.get(key)
            if tel is None or tel._closed:
                tel = _SHARED[key] = cls.create(config)
            return tel

    # -- engines -----------------------------------------------------------------
    def attach(self, engine: Any) -> None:
        """Let the observable instruments read ``engine.counters`` and its tiers."""
        if self.metrics:
            self.sources.add(engine)

    def detach(self, engine: Any) -> None:
        self.sources.discard(engine)

    # -- context -----------------------------------------------------------------
    @staticmethod
    def current_context() -> otel_context.Context:
        return otel_context.get_current()

    @staticmethod
    def bind(fn: Callable[..., Awaitable[T]], ctx: otel_context.Context | None) -> Callable[..., Awaitable[T]]:
        """``fn`` run under ``ctx`` (default: the caller's current context) on the loop thread.

        Carries the caller's trace into the loop, so the core's spans and log
        lines there join the engine's request; a no-op when there is none."""
        if ctx is None:
            ctx = otel_context.get_current()
        if not ctx:
            return fn

        async def in_context(*args: Any) -> T:
            token = otel_context.attach(ctx)
            try:
                return await fn(*args)
            finally:
                otel_context.detach(token)

        return in_context

    # -- spans -------------------------------------------------------------------
    def start_span(self, name: str, attributes: dict[str, Any] | None = None,
                   parent: otel_context.Context | None = None, start_ns: int | None = None) -> trace.Span | None:
        """A started, not current span (None when not tracing); the caller ends it."""
        if not self.tracing:
            return None
        return self.tracer.start_span(name, context=parent, attributes=attributes, start_time=start_ns)

    def tier_span(self, op: str, key: str) -> trace.Span | None:
        """A ``streamkv.tier.<op>`` span under the current request span, or None.

        Only inside a traced request, and not for the per-layer section reads of
        a retrieve (those would be chunks x layers spans; the layer spans carry
        that detail instead)."""
        if not self.tracing or not tier_spans_enabled():
            return None
        if not trace.get_current_span().get_span_context().is_valid:  # not inside a request
            return None
        return self.tracer.start_span(f"streamkv.tier.{op}", attributes={"streamkv.key": key})

    @staticmethod
    def end_tier_span(span: trace.Span | None, tier: str | None, nbytes: int, result: str) -> None:
        if span is None:
            return
        span.set_attributes({"streamkv.tier": tier or "none", "streamkv.bytes": nbytes, "streamkv.result": result})
        span.end()

    # -- lifecycle ---------------------------------------------------------------
    def force_flush(self, timeout_ms: int = 10_000) -> None:
        if self._tracer_provider is not None:
            self._tracer_provider.force_flush(timeout_ms)
        if self._meter_provider is not None:
            self._meter_provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Flush and stop exporters and the scrape endpoint; safe to call twice."""
        if self._closed or self is _DISABLED:
            return
        self._closed = True
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()

    @property
    def metrics_port(self) -> int | None:
        """The bound scrape port (useful with ``metrics_port: 0``)."""
        return None if self.metrics_server is None else int(self.metrics_server.server_port)


def now() -> tuple[float, int]:
    """A monotonic and a wall-clock stamp: durations from the first, span times from the second."""
    return time.perf_counter(), time.time_ns()


_DISABLED = Telemetry()
_SHARED: dict[tuple[Any, ...], Telemetry] = {}
_SHARED_LOCK = threading.Lock()


@atexit.register
def _shutdown_shared() -> None:
    for tel in list(_SHARED.values()):
        tel.shutdown()
