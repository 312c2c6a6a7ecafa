"""Exceptions that say what went wrong and with which value.

Misuse and misconfiguration raise; a missing or corrupt object never does
(it is a miss, see DESIGN.md)."""

from __future__ import annotations


class StreamKVError(Exception):
    """Base class of every streamkv exception."""


class ConfigError(StreamKVError, ValueError):
    """A configuration field or argument has a bad value."""

    def __init__(self, field: str, value: object, why: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}={value!r}: {why}")


class LayoutMismatch(StreamKVError, ValueError):
    """KV handed to streamkv does not match the configured layout."""


class RetrieveFailed(StreamKVError):
    """A layer of a hit could not be delivered after the engine began using it.

    Only adapters see this; they recompute from ``valid_tokens``."""

    def __init__(self, layer: int, valid_tokens: int) -> None:
        self.layer = layer
        self.valid_tokens = valid_tokens
        super().__init__(f"layer {layer} failed to load; valid prefix is {valid_tokens} tokens")
