"""streamkv: chunked KV-cache storage for LLM engines, streamed back layer by layer."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
