"""The staging ring: a fixed set of (pinned host, device) byte buffers reused across requests.

Why: host-to-device copies are only asynchronous from pinned memory, and pinning is slow, so
buffers are allocated once. A buffer goes back to the ring only when the copy (and kernel)
that read or wrote it has completed on the device, which the ring learns by polling the
buffer's event (``query``, never a host sync). With every buffer in flight, ``acquire``
blocks: that is the producer's backpressure, so it runs at most ``num_buffers`` pieces ahead.

``load_layer`` / ``save_layer`` are the per-layer steps of the pipeline built on the ring.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
import torch

from streamkv.errors import ConfigError
from streamkv.pipeline.device import Device, LayerEvent
from streamkv.pipeline.paged import (
    PagedSegment,
    chunk_scatter,
    gather_pages,
    scatter_pages,
    section_nbytes,
)

log = structlog.get_logger(__name__)

_POLL_MIN_S = 0.0001
_POLL_MAX_S = 0.002


@dataclass(eq=False)
class StagingSlot:
    """One ring entry: a host buffer and (on a GPU) a device buffer of the same size."""

    index: int
    host: torch.Tensor
    device: torch.Tensor | None


class StagingRing:
    """``num_buffers`` buffers of ``buffer_bytes``; acquire blocks while all are in flight."""

    def __init__(self, device: Device, num_buffers: int, buffer_bytes: int, *, device_buffers: bool = True) -> None:
        if not isinstance(num_buffers, int) or num_buffers < 1:
            raise ConfigError("num_buffers", num_buffers, "must be an integer >= 1")
        if not isinstance(buffer_bytes, int) or buffer_bytes < 1:
            raise ConfigError("buffer_bytes", buffer_bytes, "must be an integer >= 1")
        self.device = device
        self.buffer_bytes = buffer_bytes
        self.num_buffers = num_buffers
        self._slots = [
            StagingSlot(i, device.empty_host(buffer_bytes), device.empty_device(buffer_bytes) if device_buffers else None)
            for i in range(num_buffers)
        ]
        self._free: deque[StagingSlot] = deque(self._slots)
        self._pending: deque[tuple[StagingSlot, LayerEvent]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.acquires = 0
        self.stall_s = 0.0  # time acquirers spent blocked on a full ring (backpressure), for telemetry
        log.debug("staging.ring_created", device=device.kind, num_buffers=num_buffers, buffer_bytes=buffer_bytes)

    @classmethod
    def for_layers(cls, device: Device, layer_bytes: int, num_buffers: int = 3) -> StagingRing:
        """The default sizing: each buffer holds one layer of a batch, three in flight."""
        return cls(device, num_buffers, layer_bytes)

    @property
    def free_count(self) -> int:
        with self._cond:
            self._reap()
            return len(self._free)

    def stats(self) -> dict[str, float]:
        """Counters for telemetry: buffers, free now, acquires so far, seconds blocked in acquire."""
        return {"num_buffers": self.num_buffers, "free": self.free_count, "acquires": self.acquires, "stall_s": self.stall_s}

    def _reap(self) -> None:
        # Pending entries complete in any order across streams: check them all.
        still: deque[tuple[StagingSlot, LayerEvent]] = deque()
        for slot, ev in self._pending:
            if (ev.enqueued and ev.error is not None) or self.device.is_complete(ev):
                self._free.append(slot)
            else:
                still.append((slot, ev))
        self._pending = still

    def acquire(self, timeout: float | None = None) -> StagingSlot:
        """A free slot; blocks (polling pending events) while none is free."""
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        delay = _POLL_MIN_S
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("StagingRing is closed")
                self._reap()
                if self._free:
                    self.acquires += 1
                    self.stall_s += time.monotonic() - start
                    return self._free.popleft()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no staging buffer freed within {timeout}s ({self.num_buffers} in flight)")
                # Releases notify; completions of device work do not, so poll while any is pending.
                wait_for = delay if self._pending else left
                if wait_for is not None and left is not None:
                    wait_for = min(wait_for, left)
                self._cond.wait(wait_for)
                delay = min(delay * 2, _POLL_MAX_S)

    def release(self, slot: StagingSlot, event: LayerEvent | None = None) -> None:
        """Give ``slot`` back: at once, or when ``event`` (the work that used it) completes."""
        if slot not in self._slots:
            raise ValueError(f"slot {slot.index} does not belong to this ring")
        with self._cond:
            if event is None:
                self._free.append(slot)
            else:
                self._pending.append((slot, event))
            self._cond.notify_all()

    def close(self) -> None:
        """Wake blocked acquirers with an error; buffers are freed with the ring."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _pieces(n_tokens: int, chunk_tokens: int, total_row: int, buffer_bytes: int) -> list[tuple[int, int]]:
    """Split tokens into runs of whole chunks that fit one buffer (section order is chunk order)."""
    per_chunk = chunk_tokens * total_row
    chunks_per_piece = buffer_bytes // per_chunk
    if chunks_per_piece < 1:
        raise ConfigError("buffer_bytes", buffer_bytes, f"smaller than one chunk's layer section ({per_chunk} bytes)")
    step = chunks_per_piece * chunk_tokens
    return [(t0, min(t0 + step, n_tokens)) for t0 in range(0, n_tokens, step)]


def _as_bytes_tensor(section: torch.Tensor | bytes | bytearray | memoryview) -> torch.Tensor:
    if isinstance(section, torch.Tensor):
        return section.reshape(-1).view(torch.uint8)
    mv = memoryview(section).cast("B")
    if not mv.nbytes:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        # Read-only bytes (a tier's result) are only ever read here.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv, dtype=torch.uint8)


def _settle(device: Device, event: LayerEvent, stream: object, exc: BaseException) -> None:
    """After a failed step, free its buffer only once work already enqueued on it is done."""
    if event.enqueued:
        return
    try:
        device.record(event, stream)
    except Exception:  # the device itself is failing: nothing more can be ordered
        event.fail(exc)


def load_layer(
    device: Device,
    ring: StagingRing,
    section: torch.Tensor | bytes | bytearray | memoryview,
    segments: Sequence[PagedSegment],
    slots: torch.Tensor,
    stream: object,
    event: LayerEvent,
    *,
    chunk_tokens: int | None = None,
) -> None:
    """Producer step: section bytes (host) -> pinned buffer -> device -> pool rows, then ``event``.

    ``slots`` lives on the pool's device (prepare it once per request, off the hot path).
    The host copy into the pinned buffer happens on the calling (producer) thread; the H2D
    copy and the scatter are enqueued on ``stream``; ``event`` is recorded after the last piece.
    """
    src = _as_bytes_tensor(section)
    n = slots.numel()
    total_row = sum(s.row_bytes for s in segments)
    if src.numel() != n * total_row:
        raise ValueError(f"section has {src.numel()} bytes, {n} tokens of these segments need {n * total_row}")
    chunk = chunk_tokens or max(n, 1)
    for t0, t1 in _pieces(n, chunk, total_row, ring.buffer_bytes) if n else []:
        nbytes = (t1 - t0) * total_row
        slot = ring.acquire()
        piece_done = device.new_event()
        try:
            slot.host[:nbytes].copy_(src[t0 * total_row : t1 * total_row])
            with device.use_stream(stream):
                staged = slot.host[:nbytes]
                if slot.device is not None:
                    device.copy_async(slot.device[:nbytes], staged, stream)
                    staged = slot.device[:nbytes]
                scatter_pages(segments, slots[t0:t1], staged, chunk_tokens=chunk)
                device.record(piece_done, stream)
        except BaseException as exc:
            _settle(device, piece_done, stream, exc)
            event.fail(exc)
            raise
        finally:
            ring.release(slot, piece_done)
    device.record(event, stream)


@dataclass
class PendingSave:
    """A layer's gathered bytes on their way to host memory; ``read`` once, then ``release``."""

    device: Device
    ring: StagingRing
    pieces: list[tuple[StagingSlot, int, LayerEvent]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n, _ in self.pieces)

    def read_into(self, out: torch.Tensor | bytearray | memoryview, timeout: float | None = None) -> bool:
        """Wait for the device-to-host copies (host wait: writer thread) and copy the bytes out."""
        dst = _as_bytes_tensor(out)
        pos = 0
        for slot, n, ev in self.pieces:
            if not self.device.host_wait(ev, timeout):
                return False
            dst[pos : pos + n].copy_(slot.host[:n])
            pos += n
        return True

    def read(self, timeout: float | None = None) -> bytes | None:
        buf = bytearray(self.nbytes)
        return bytes(buf) if self.read_into(buf, timeout) else None

    def release(self) -> None:
        for slot, _, ev in self.pieces:
            self.ring.release(slot, ev)
        self.pieces = []


def save_layer(
    device: Device,
    ring: StagingRing,
    segments: Sequence[PagedSegment],
    slots: torch.Tensor,
    stream: object,
    after: LayerEvent | None = None,
    *,
    chunk_tokens: int | None = None,
    block: bool = True,
) -> PendingSave | None:
    """Save step: ``stream`` waits on ``after`` (the compute stream's event for this layer),
    gathers the pool rows at ``slots`` and copies them to pinned host buffers.

    Returns at once; the writer thread calls ``PendingSave.read_into`` then ``release``.
    With ``block=False`` (the forward's thread) a full ring drops the save: None.
    """
    n = slots.numel()
    total_row = sum(s.row_bytes for s in segments)
    chunk = chunk_tokens or max(n, 1)
    pieces = _pieces(n, chunk, total_row, ring.buffer_bytes) if n else []
    if len(pieces) > ring.num_buffers:
        # Save buffers stay held until the writer reads them: more pieces than buffers would deadlock.
        raise ConfigError("buffer_bytes", ring.buffer_bytes,
                          f"{n} tokens need {len(pieces)} buffers, the ring has {ring.num_buffers}")
    pending = PendingSave(device, ring)
    if after is not None and not device.wait(after, stream):
        raise RuntimeError("save_layer: the compute event failed; nothing to save")
    for t0, t1 in pieces:
        nbytes = (t1 - t0) * total_row
        try:
            slot = ring.acquire(None if block else 0.0)
        except TimeoutError:
            pending.release()
            log.warning("staging.save_dropped", reason="no free staging buffer", tokens=n)
            return None
        done = device.new_event()
        try:
            with device.use_stream(stream):
                staged = slot.device[:nbytes] if slot.device is not None else slot.host[:nbytes]
                gather_pages(segments, slots[t0:t1], staged, chunk_tokens=chunk)
                if slot.device is not None:
                    device.copy_async(slot.host[:nbytes], staged, stream)
                device.record(done, stream)
        except BaseException as exc:
            _settle(device, done, stream, exc)
            ring.release(slot, done)
            pending.release()
            raise
        pending.pieces.append((slot, nbytes, done))
    return pending


class PagedPoolSink:
    """A ``LayerSink`` (pipeline/sink.py) that streams each verified chunk section into an
    engine's paged KV pool as it arrives: pinned buffer -> device on the load stream -> scatter.

    The producer calls ``write(layer, chunk, raw)`` from worker threads in any order; the
    layer's event is recorded after its last chunk's write (or by ``finish_layer``, which a
    producer may call before ``handle.layer_done``). After ``handle.wait(layer)`` the forward
    calls ``sink.wait(layer)``: a stream wait on a GPU. Each write takes one ring buffer and
    gives it back when its copy and scatter complete, so writes never wait on each other (no
    partial pieces to deadlock on): size the ring's buffers to one chunk section and their
    number to a few layers of chunks.
    On a CPU pass ``ring=None``: sections scatter straight from the bytes the tier returned.
    Build it on the engine's thread: its current stream is taken as the compute stream.
    """

    def __init__(self, device: Device, layers: Sequence[Sequence[PagedSegment]], slots: torch.Tensor,
                 chunk_tokens: int, ring: StagingRing | None = None, stream: object | None = None) -> None:
        if ring is None and device.kind != "cpu":
            raise ConfigError("ring", None, f"a {device.kind} device needs a pinned StagingRing")
        self.device, self.layers, self.slots, self.ring = device, list(layers), slots, ring
        self.chunk_tokens = chunk_tokens
        self.stream = stream if stream is not None else device.new_stream(high_priority=True)
        self.events = [device.new_event() for _ in self.layers]
        # The pool's pages may still be read by work already queued on the compute stream
        # (an earlier request's): order every write of this sink after it, on the device.
        admitted = device.new_event()
        device.record(admitted, device.current_stream())
        device.wait(admitted, self.stream)
        self.hit_chunks = 0
        self._written = [0] * len(self.layers)
        self._lock = threading.Lock()
        # CPU: each layer's pool prepared once for chunk-sized scatters (None: scatter_pages)
        self._scatters = [chunk_scatter(segs) if ring is None else None for segs in self.layers]
        biggest = max(section_nbytes(segs, chunk_tokens) for segs in self.layers)
        if ring is not None and ring.buffer_bytes < biggest:
            raise ConfigError("buffer_bytes", ring.buffer_bytes, f"smaller than one chunk's layer section ({biggest} bytes)")

    def begin(self, hit_chunks: int) -> None:
        if self.slots.numel() < hit_chunks * self.chunk_tokens:
            raise ValueError(f"{hit_chunks} chunks need {hit_chunks * self.chunk_tokens} slots, got {self.slots.numel()}")
        self.hit_chunks = hit_chunks

    def write(self, layer: int, chunk: int, raw: object) -> None:
        segs, t0 = self.layers[layer], chunk * self.chunk_tokens
        slots = self.slots[t0 : t0 + self.chunk_tokens]
        src = _as_bytes_tensor(raw)  # type: ignore[arg-type]
        if src.numel() != section_nbytes(segs, slots.numel()):
            need = section_nbytes(segs, slots.numel())
            raise ValueError(f"layer {layer} chunk {chunk}: {src.numel()} bytes, {slots.numel()} slots need {need}")
        if self.ring is None:
            scatter = self._scatters[layer]
            if scatter is not None:
                scatter(slots, src)
            else:
                scatter_pages(segs, slots, src, chunk_tokens=self.chunk_tokens)
        else:
            self._write_staged(segs, slots, src)
        with self._lock:
            self._written[layer] += 1
            last = self._written[layer] == self.hit_chunks
        if last:
            self.finish_layer(layer)

    def _write_staged(self, segs: Sequence[PagedSegment], slots: torch.Tensor, src: torch.Tensor) -> None:
        assert self.ring is not None
        slot = self.ring.acquire()  # backpressure: blocks this worker thread
        done = self.device.new_event()
        try:
            host = slot.host[: src.numel()]
            host.copy_(src)
            with self.device.use_stream(self.stream):
                staged = host
                if slot.device is not None:
                    staged = slot.device[: src.numel()]
                    self.device.copy_async(staged, host, self.stream)
                scatter_pages(segs, slots, staged, chunk_tokens=self.chunk_tokens)
                self.device.record(done, self.stream)
        except BaseException as exc:
            _settle(self.device, done, self.stream, exc)
            raise
        finally:
            self.ring.release(slot, done)

    def finish_layer(self, layer: int) -> None:
        """All of ``layer``'s writes are enqueued (or failed): record its event (once)."""
        with self._lock:
            if self.events[layer].enqueued:
                return
            self.device.record(self.events[layer], self.stream)

    def fail_layer(self, layer: int, error: BaseException) -> None:
        """The layer cannot be delivered: its waiters get False."""
        self.events[layer].fail(error)

    def wait(self, layer: int, stream: object | None = None, timeout: float | None = None) -> bool:
        """Order ``stream`` (default: the current, i.e. compute, stream) after ``layer``'s load."""
        return self.device.wait(self.events[layer], stream, timeout)
