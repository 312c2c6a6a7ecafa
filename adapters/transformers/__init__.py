"""streamkv for HF transformers: a streamed ``DynamicCache`` and a model wrapper."""

from __future__ import annotations

from streamkv.adapters.transformers.cache import StreamKVCache, StreamedLayer
from streamkv.adapters.transformers.session import CachedModel, GenerateResult, PrefillResult, layout_for

__all__ = ["CachedModel", "GenerateResult", "PrefillResult", "StreamKVCache", "StreamedLayer", "layout_for"]
