"""structlog set-up: key=value for people, JSON when configured.

The library never configures logging behind a caller's back unless nobody
has: an engine configures a quiet default (warnings and up) if structlog is
still unconfigured, so library logs never flood an engine's stdout."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(log_format: str = "console", level: str = "warning", force: bool = True) -> None:
    """Configure structlog for streamkv (``force=False``: only if nothing else did)."""
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
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
