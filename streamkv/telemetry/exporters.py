"""Exporters chosen by ``telemetry_exporter``: none, console, otlp, file (JSON lines).

The file exporter writes one JSON object per line (``{"type": "span", ...}``
or ``{"type": "metric", ...}``) so that a run can be inspected with ``jq``
and re-read by ``streamkv.report`` to draw a per-layer stall timeline without
any collector running. The same dict shape is produced from in-memory spans
(``span_to_dict``) so the report code reads both alike."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from streamkv.errors import ConfigError


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """A span as plain JSON-able data (ids in W3C hex, times in ns since the epoch)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "type": "span",
        "name": span.name,
        "trace_id": _hex(ctx.trace_id, 32) if ctx else None,
        "span_id": _hex(ctx.span_id, 16) if ctx else None,
        "parent_span_id": _hex(parent.span_id, 16) if parent else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
    }


def metrics_to_dicts(data: MetricsData) -> list[dict[str, Any]]:
    """Flatten OTel metrics data into one record per data point."""
    out: list[dict[str, Any]] = []
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    record: dict[str, Any] = {
                        "type": "metric",
                        "name": metric.name,
                        "unit": metric.unit,
                        "attributes": dict(point.attributes or {}),
                        "time_ns": point.time_unix_nano,
                    }
                    if hasattr(point, "value"):
                        record["value"] = point.value
                    else:  # histogram
                        record.update(count=point.count, sum=point.sum,
                                      bounds=list(point.explicit_bounds), counts=list(point.bucket_counts))
                    out.append(record)
    return out


class _JsonLinesFile:
    """An append-only JSON-lines file shared by the span and the metric exporter."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, default=str, separators=(",", ":")) + "\n" for r in records)
        with self._lock:
            if not self._fh.closed:
                self._fh.write(text)
                self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class JsonLinesSpanExporter(SpanExporter):
    """Spans to a JSON-lines file (used behind a BatchSpanProcessor: off the request path)."""

    def __init__(self, sink: _JsonLinesFile) -> None:
        self.sink = sink

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self.sink.write(span_to_dict(s) for s in spans)
        except (OSError, ValueError):
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.sink.close()


class JsonLinesMetricExporter(MetricExporter):
    """Metric points to the same JSON-lines file, cumulative, on each periodic export."""

    def __init__(self, sink: _JsonLinesFile) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        self.sink = sink

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        try:
            self.sink.write(metrics_to_dicts(metrics_data))
        except (OSError, ValueError):
            return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """The span exporter owns the file and closes it."""


def file_exporters(path: str | Path) -> tuple[SpanExporter, MetricExporter]:
    sink = _JsonLinesFile(path)
    return JsonLinesSpanExporter(sink), JsonLinesMetricExporter(sink)


def console_exporters() -> tuple[SpanExporter, MetricExporter]:
    """OpenTelemetry's console exporters, on stderr: stdout belongs to the engine and to ``--json``."""
    import sys

    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter(out=sys.stderr), ConsoleMetricExporter(out=sys.stderr)


def otlp_exporters() -> tuple[SpanExporter, MetricExporter]:
    """OTLP over HTTP/protobuf (endpoint from the standard ``OTEL_EXPORTER_OTLP_*`` variables)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError("telemetry_exporter", "otlp",
                          "needs the optional extra: pip install 'streamkv[otlp]'") from exc
    return OTLPSpanExporter(), OTLPMetricExporter(preferred_temporality={})


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a telemetry JSON-lines file (optionally only ``span`` or ``metric``)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if kind is None or record.get("type") == kind:
                out.append(record)
    return out


__all__ = [
    "JsonLinesMetricExporter",
    "JsonLinesSpanExporter",
    "console_exporters",
    "file_exporters",
    "metrics_to_dicts",
    "otlp_exporters",
    "read_jsonl",
    "span_to_dict",
]
