"""A retrieve sink that scatters each verified layer section straight into vLLM's pages.

Why: the producer delivers ``(layer, chunk, section bytes)`` from worker threads as
soon as a section is verified; writing it into the paged cache right there means
layer ``l`` is in place when the forward reaches it, with no second staging copy.
A sink can be closed (the request was preempted or aborted and its blocks may be
reused): closing waits for writes under way and drops every later one.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence

import torch

from streamkv.layout import KVLayout
from streamkv.pipeline.paged import scatter_pages

from streamkv.adapters.vllm.paged_layout import LayerPages, scatter_blocks, slots_for_tokens


class PagedSink:
    """Writes the chunks of one ``LoadSpec`` into the pages of every layer."""

    def __init__(self, layout: KVLayout, layers: Sequence[LayerPages], block_ids: list[int],
                 first_chunk: int, start: int, end: int) -> None:
        self.layout = layout
        self.layers = layers
        self.block_ids = block_ids
        self.first_chunk = first_chunk
        self.start = start
        self.end = end
        self.bytes_written = 0
        self._closed = False
        self._active = 0
        self._cond = threading.Condition()
        self._slots: dict[int, torch.Tensor] = {}

    def begin(self, hit_chunks: int) -> None:
        del hit_chunks

    def _range(self, chunk: int) -> tuple[int, int]:
        """Tokens of ``chunk`` (relative to the spec) that this load writes, absolute."""
        lo = (self.first_chunk + chunk) * self.layout.chunk_size
        return max(lo, self.start), min(lo + self.layout.chunk_size, self.end)

    def _slots_for(self, chunk: int, block_size: int) -> torch.Tensor:
        slots = self._slots.get(chunk)
        if slots is None:
            lo, hi = self._range(chunk)
            slots = slots_for_tokens(self.block_ids, block_size, lo, hi)
            self._slots[chunk] = slots
        return slots

    def _section(self, raw: memoryview, skip: int, n: int, pages: LayerPages) -> torch.Tensor:
        """The section bytes for tokens ``skip .. skip + n`` of the chunk, in section layout."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffers: scatter only reads them
            full = torch.frombuffer(raw, dtype=torch.uint8)
        C = self.layout.chunk_size
        if skip == 0 and n == C:
            return full
        if pages.page_order:  # whole pages, one after the other
            per_block = pages.page_bytes()
            return full[skip // pages.block_size * per_block : (skip + n) // pages.block_size * per_block]
        row = self.layout.num_kv_heads * self.layout.head_size * self.layout.itemsize
        planes = full.view(self.layout.planes, C, row)
        return planes[:, skip : skip + n].reshape(-1).contiguous()

    def write(self, layer: int, chunk: int, raw: memoryview) -> None:
        with self._cond:
            if self._closed:
                return
            self._active += 1
        try:
            pages = self.layers[layer]
            lo, hi = self._range(chunk)
            if hi <= lo:
                return
            skip = lo - (self.first_chunk + chunk) * self.layout.chunk_size
            section = self._section(raw, skip, hi - lo, pages)
            device = pages.segments[0].view.device
            bs = pages.block_size
            if device.type == "cpu" and lo % bs == 0 and hi % bs == 0:  # whole pages
                scatter_blocks(pages, self.block_ids[lo // bs : hi // bs], section)
            else:
                if pages.page_order:
                    raise ValueError(f"tokens [{lo}, {hi}) are not whole blocks of {bs}")
                slots = self._slots_for(chunk, bs)
                if section.device != device:
                    section, slots = section.to(device), slots.to(device)
                scatter_pages(list(pages.segments), slots, section, chunk_tokens=hi - lo)
            self.bytes_written += section.numel()
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """No write after this returns; waits for writes under way."""
        with self._cond:
            self._closed = True
            while self._active:
                self._cond.wait()
