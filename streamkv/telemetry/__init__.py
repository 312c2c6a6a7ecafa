"""streamkv telemetry: OpenTelemetry spans and metrics, scoped to streamkv.

``Telemetry.from_config(config)`` gives the process-wide pipeline for the
configured exporter (``none`` by default: no-op tracer and meter, and the
core skips its hooks). The engine core calls the recorders in
``streamkv.telemetry.requests``; ``streamkv.telemetry.instruments.METRICS``
lists every metric name with its unit."""

from __future__ import annotations

from streamkv.telemetry.core import Telemetry, now
from streamkv.telemetry.exporters import read_jsonl, span_to_dict
from streamkv.telemetry.instruments import METRICS
from streamkv.telemetry.propagation import current_trace_id, extract_context, inject_traceparent
from streamkv.telemetry.requests import OpRecorder, RetrieveRecorder, op_recorder, retrieve_recorder, token_count
from streamkv.telemetry.scope import suppress_tier_spans

__all__ = [
    "METRICS",
    "OpRecorder",
    "RetrieveRecorder",
    "Telemetry",
    "current_trace_id",
    "extract_context",
    "inject_traceparent",
    "now",
    "op_recorder",
    "read_jsonl",
    "retrieve_recorder",
    "span_to_dict",
    "suppress_tier_spans",
    "token_count",
]
