"""Context flags that narrow what is traced inside a request.

A retrieve's header phase reads one small range per chunk and gets a
``streamkv.tier.get`` span each; its layer phase reads chunks x layers
sections, which would flood a trace, so the producer turns tier spans off for
that phase (the per-layer spans carry the timing). A ``ContextVar`` because
anyio tasks and worker threads inherit it, and it ends with the task."""

from __future__ import annotations

from contextvars import ContextVar

_TIER_SPANS: ContextVar[bool] = ContextVar("streamkv_tier_spans", default=True)


def tier_spans_enabled() -> bool:
    return _TIER_SPANS.get()


def suppress_tier_spans() -> None:
    """No ``streamkv.tier.*`` spans for the rest of the current task (and tasks it starts)."""
    _TIER_SPANS.set(False)
