"""Run a transformers causal LM with streamkv: prefill from the cache, store what is new.

``CachedModel`` binds a model to an engine (layout and namespace derived from
the model's config and weights). ``prefill`` retrieves the stored prefix of a
prompt, runs the forward on the rest, and hands the new full chunks to the
engine's background writer. If a layer of the hit turns out unusable after
the forward began, the prompt is recomputed from the intact prefix: a late
failure costs time, never correctness."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import structlog

from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.errors import RetrieveFailed
from streamkv.fingerprint import fingerprint_model
from streamkv.keys import Namespace, as_token_array
from streamkv.layout import KVLayout, dtype_name
from streamkv.pipeline.sink import ChunkViewSink
from streamkv.adapters.transformers.cache import StreamKVCache, cache_kwargs, host_planes

log = structlog.get_logger(__name__)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # logits of the last prompt position, [1, vocab]
    cache: StreamKVCache
    hit_tokens: int
    prompt_tokens: int
    ttft_s: float
    retries: int = 0
    stored: Any = None  # Future[int] of the background store


@dataclass
class GenerateResult:
    tokens: list[int]
    hit_tokens: int
    prompt_tokens: int
    ttft_s: float
    total_s: float
    extra: dict = field(default_factory=dict)


def layout_for(model: Any, chunk_size: int) -> KVLayout:
    return KVLayout.from_hf_config(model.config, dtype=dtype_name(model.dtype), chunk_size=chunk_size)


class CachedModel:
    """A transformers model whose prefills read from and write to streamkv."""

    def __init__(self, model: Any, config: StreamKVConfig, engine: StreamKVEngine | None = None,
                 fingerprint: str | None = None) -> None:
        self.model = model
        if engine is None:
            layout = layout_for(model, config.chunk_size)
            namespace = Namespace(model=fingerprint or fingerprint_model(model), layout=layout)
            engine = StreamKVEngine(config, layout, namespace)
        self.engine = engine
        self.layout = engine.layout

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> CachedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prompt(self, input_ids: Any) -> torch.Tensor:
        ids = torch.as_tensor(as_token_array(input_ids).astype("int64")).unsqueeze(0)
        if ids.shape[1] == 0:
            raise ValueError("input_ids: the prompt is empty")
        return ids.to(self.model.device)

    @torch.inference_mode()
    def prefill(self, input_ids: Any, store: bool = True, reuse: bool = True) -> PrefillResult:
        """Forward the prompt, reusing its stored prefix (unless ``reuse`` is off); the
        last token is always computed."""
        ids = self._prompt(input_ids)
        n = ids.shape[1]
        start = time.perf_counter()
        limit, retries = (n - 1 if reuse else 0), 0
        while True:
            handle = self.engine.retrieve(ids[0], sink=ChunkViewSink(self.layout), max_tokens=limit)
            cache = StreamKVCache(self.model.config, handle, self.layout)
            hit = handle.hit_tokens
            try:
                out = self.model(ids[:, hit:], **cache_kwargs(self.model, cache), use_cache=True)
                break
            except RetrieveFailed as exc:
                handle.cancel()
                retries += 1
                limit = exc.valid_tokens if retries == 1 else 0
                log.warning("streamed layer failed; recomputing from the intact prefix",
                            layer=exc.layer, valid_tokens=exc.valid_tokens)
        logits = out.logits[:, -1, :]
        ttft = time.perf_counter() - start
        stored = self.store(ids[0], cache) if store else None
        return PrefillResult(logits, cache, hit, n, ttft, retries, stored)

    def store(self, input_ids: Any, cache: Any) -> Any:
        """Store the prompt's full chunks from ``cache`` in the background (returns a future)."""
        ids = as_token_array(input_ids)
        layers = [(layer.keys, layer.values) for layer in cache.layers]  # references, not copies
        tokens = len(ids)

        def source(layer: int) -> list:
            keys, values = layers[layer]
            return host_planes(keys, values, tokens)

        return self.engine.store_kv(ids, source)

    @torch.inference_mode()
    def generate(self, input_ids: Any, max_new_tokens: int = 16, store: bool = True,
                 reuse: bool = True) -> GenerateResult:
        """Greedy generation; TTFT is the time to the first token's logits."""
        start = time.perf_counter()
        pre = self.prefill(input_ids, store=store, reuse=reuse)
        cache = pre.cache
        token = pre.logits.argmax(dim=-1, keepdim=True)
        tokens = [int(token)]
        eos = getattr(self.model.config, "eos_token_id", None)
        for _ in range(max_new_tokens - 1):
            if eos is not None and tokens[-1] == eos:
                break
            out = self.model(token, **cache_kwargs(self.model, cache), use_cache=True)
            token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            tokens.append(int(token))
        return GenerateResult(tokens, pre.hit_tokens, pre.prompt_tokens, pre.ttft_s,
                              time.perf_counter() - start, {"retries": pre.retries})

    def hf_generate(self, input_ids: Any, store: bool = True, **kwargs: Any) -> torch.Tensor:
        """``model.generate`` with the streamed cache as its KV cache."""
        ids = self._prompt(input_ids)
        handle = self.engine.retrieve(ids[0], sink=ChunkViewSink(self.layout), max_tokens=ids.shape[1] - 1)
        cache = StreamKVCache(self.model.config, handle, self.layout)
        try:
            out = self.model.generate(ids, **cache_kwargs(self.model, cache), **kwargs)
        except RetrieveFailed:
            handle.cancel()
            return self.model.generate(ids, **kwargs)
        if store:
            self.store(ids[0], cache)
        return out
