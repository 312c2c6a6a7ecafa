"""The consumer's side of a layer-wise retrieve.

The producer fetches layer sections in layer order and marks each layer done;
the engine's forward calls ``wait(layer)`` right before attention of that
layer. A failure never delivers wrong KV: the layer reports ``False`` and
``valid_tokens`` says how much of the hit is still intact, so the adapter can
recompute the rest."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any, Callable


class RetrieveHandle:
    """Per-layer completion events of one retrieve, plus the hit it promised."""

    def __init__(self, num_layers: int, chunk_size: int, requested_chunks: int,
                 release: Callable[[int], None] | None = None, wait_timeout_s: float = 60.0) -> None:
        self.num_layers = num_layers
        self.chunk_size = chunk_size
        self.requested_chunks = requested_chunks
        self.wait_timeout_s = wait_timeout_s
        self._release = release
        self._ready = threading.Event()
        self._done = [threading.Event() for _ in range(num_layers)]
        self._layer_ok = [True] * num_layers
        self._hit_chunks = 0
        self._valid_chunks = requested_chunks
        self._lock = threading.Lock()
        self.stall_s = [0.0] * num_layers
        self.future: Future[None] | None = None
        self.cancelled = False
        self.trace: Any = None  # a telemetry RetrieveRecorder when telemetry is on (streamkv.telemetry)

    # -- producer side -------------------------------------------------------
    def set_hit(self, chunks: int) -> None:
        if self.trace is not None:
            self.trace.hit_known(chunks)
        with self._lock:
            self._hit_chunks = chunks
            self._valid_chunks = min(self._valid_chunks, chunks)
        self._ready.set()
        if chunks == 0:
            for ev in self._done:
                ev.set()

    def chunk_failed(self, chunk: int, layer: int) -> None:
        """Chunk ``chunk`` could not be delivered at ``layer``: the valid prefix ends before it."""
        with self._lock:
            self._valid_chunks = min(self._valid_chunks, chunk)
            self._layer_ok[layer] = False

    def layer_done(self, layer: int, delivered_chunks: int | None = None) -> None:
        """The producer is finished with ``layer``; it is complete only if every hit chunk arrived."""
        if self.trace is not None:
            self.trace.layer_ready(layer)
        if delivered_chunks is not None and delivered_chunks < self._hit_chunks:
            with self._lock:
                self._layer_ok[layer] = False
        self._done[layer].set()

    def live_chunks(self) -> int:
        """Chunks still worth fetching (those before the first failure)."""
        with self._lock:
            return min(self._hit_chunks, self._valid_chunks)

    # -- consumer side -------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> int:
        """Block until the hit is known (headers verified); returns hit tokens."""
        if not self._ready.wait(self.wait_timeout_s if timeout is None else timeout):
            self.set_hit(0)
        return self.hit_tokens

    @property
    def hit_tokens(self) -> int:
        self._ready.wait(self.wait_timeout_s)
        return self._hit_chunks * self.chunk_size

    @property
    def valid_tokens(self) -> int:
        """Tokens of the hit whose every delivered layer so far is intact."""
        with self._lock:
            return min(self._hit_chunks, self._valid_chunks) * self.chunk_size

    def wait(self, layer: int, timeout: float | None = None) -> bool:
        """Block until ``layer``'s KV for the whole hit is in place; False if it cannot be."""
        start = time.perf_counter()
        ok = self._done[layer].wait(self.wait_timeout_s if timeout is None else timeout)
        end = time.perf_counter()
        self.stall_s[layer] += end - start
        if self.trace is not None:
            self.trace.layer_waited(layer, start, end, ok)
        if not ok:  # the producer is stuck: give up on this layer and the whole hit
            self.chunk_failed(0, layer)
            return False
        release = self._release  # cancel() may drop it meanwhile
        if release is not None:
            release(layer)
            if layer == self.num_layers - 1:
                self._release = None  # the last one: drop the hook (it references the producer)
        with self._lock:
            return self._layer_ok[layer]

    def done(self) -> bool:
        return all(ev.is_set() for ev in self._done)

    def cancel(self) -> None:
        """Stop fetching (the request went away); waiters are released as failed."""
        self.cancelled = True
        self._release = None  # no producer to hand layers back to (its loop may be gone too)
        if self.future is not None:
            self.future.cancel()
        if not self._ready.is_set():
            self.set_hit(0)
        for layer, ev in enumerate(self._done):
            if not ev.is_set():
                self.chunk_failed(0, layer)
                ev.set()

    @property
    def total_stall_s(self) -> float:
        return sum(self.stall_s)
