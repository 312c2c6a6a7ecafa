"""A Prometheus scrape endpoint for streamkv's OpenTelemetry metrics.

Each ``Telemetry`` gets its own ``CollectorRegistry`` rather than the
``prometheus_client`` global one: an engine that already exports its own
metrics (vLLM, SGLang) keeps its registry untouched, and two streamkv
pipelines in one process (tests) do not clash on metric names."""

from __future__ import annotations

from typing import Any

from streamkv.errors import ConfigError


def prometheus_reader() -> tuple[Any, Any]:
    """A ``PrometheusMetricReader`` bound to a fresh registry, and that registry."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry
    except ImportError as exc:
        raise ConfigError("metrics_port", "set", "needs the optional extra: pip install 'streamkv[metrics]'") from exc
    registry = CollectorRegistry(auto_describe=False)
    return PrometheusMetricReader(registry=registry, disable_target_info=True, scope_info_enabled=False), registry


def serve_metrics(registry: Any, port: int, addr: str = "127.0.0.1") -> Any:
    """Start ``/metrics`` on ``addr:port`` in a daemon thread; returns the HTTP server.

    Binds to loopback by default: metrics name models and namespaces, so
    exposing them beyond the host is the operator's choice (``addr``)."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigError("metrics_port", port, f"cannot listen on {addr}:{port} ({exc.strerror})") from exc
    return server
