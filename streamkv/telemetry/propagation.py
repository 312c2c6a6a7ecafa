"""W3C trace context across process boundaries (the daemon's client protocol).

The client puts ``traceparent`` (and ``tracestate``) into each request's
header map; the server extracts it and runs the request under that context,
so one trace shows the engine's request, the client call and the daemon's
tier reads."""

from __future__ import annotations

from typing import Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def inject_traceparent(carrier: MutableMapping[str, str] | None = None,
                       ctx: otel_context.Context | None = None) -> dict[str, str]:
    """The current (or given) trace context as ``{"traceparent": ..., ["tracestate": ...]}``; empty when none."""
    out: dict[str, str] = dict(carrier or {})
    _PROPAGATOR.inject(out, context=ctx)
    if carrier is not None:
        carrier.update(out)
    return out


def extract_context(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """A context whose parent is the remote span named in ``carrier`` (empty context if none)."""
    return _PROPAGATOR.extract(dict(carrier or {}))


def current_trace_id() -> str | None:
    """The current trace id in W3C hex, or None outside a trace (for logs and reports)."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
