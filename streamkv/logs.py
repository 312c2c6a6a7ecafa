"""structlog set-up: key=value for people, JSON when configured.

The library never configures logging behind a caller's back unless nobody
has: an engine configures a quiet default (warnings and up) if structlog is
still unconfigured, so library logs never flood an engine's stdout.

Every line logged inside a request carries that request's ``trace_id`` and
``span_id`` (from the OpenTelemetry context, which the core carries into its
loop thread), so a log line can be found in its trace and back."""

from __future__ import annotations

import logging
import sys
from typing import Callable, TextIO

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def add_trace_context(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the current span's ``trace_id``/``span_id`` (W3C hex), when there is one."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def _logger_factory(stream: TextIO | None) -> Callable[..., structlog.PrintLogger]:
    """Loggers on ``stream``, or on whatever ``sys.stderr`` is when a line is logged.

    Looked up per logger, not once: binding the ``sys.stderr`` of configure
    time breaks every later line once that stream is closed (a test's capture,
    a daemon's redirected stderr)."""
    def make(*args: object) -> structlog.PrintLogger:
        return structlog.PrintLogger(file=stream if stream is not None else sys.stderr)
    return make


def configure_logging(log_format: str = "console", level: str = "warning", force: bool = True,
                      stream: TextIO | None = None) -> None:
    """Configure structlog for streamkv (``force=False``: only if nothing else did).

    ``stream`` defaults to stderr, so logs never mix with a command's output."""
    if not force and structlog.is_configured():
        return
    renderer = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_trace_context,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_logger_factory(stream),
        cache_logger_on_first_use=False,
    )
