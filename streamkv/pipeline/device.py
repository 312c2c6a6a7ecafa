"""The device layer: copy asynchronously, record an event, make a stream wait on an event.

Why: the pipeline overlaps loading layer ``l+1`` with computing layer ``l``. On a GPU that is
streams and events (the compute stream waits on the load stream's event, the host never
blocks on the GPU); on a CPU it is worker threads and ``threading.Event``. The producer and
the engine-facing ``wait(layer)`` are written once against :class:`Device`.

A :class:`LayerEvent` has two halves: a host flag saying that the producer has *enqueued*
the record (an unrecorded CUDA event is a no-op to wait on, so a consumer must never wait on
it early), and the device event itself. ``Device.wait`` blocks the host only until the record
is enqueued (or failed), then makes the stream wait on the device: no host synchronisation
with the GPU.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
import threading
from collections.abc import Iterator
from typing import Any

import structlog
import torch

from streamkv.errors import ConfigError

log = structlog.get_logger(__name__)


class LayerEvent:
    """Readiness of one piece of work (a layer load, a save's device-to-host copy)."""

    __slots__ = ("_enqueued", "device_event", "error")

    def __init__(self, device_event: Any | None = None) -> None:
        self._enqueued = threading.Event()
        self.device_event = device_event
        self.error: BaseException | None = None

    @property
    def enqueued(self) -> bool:
        """True once the producer recorded (or failed) this event."""
        return self._enqueued.is_set()

    def fail(self, error: BaseException) -> None:
        """Mark the work as failed: waiters return False (a miss, the engine recomputes)."""
        self.error = error
        self._enqueued.set()

    def _mark_recorded(self) -> None:
        self._enqueued.set()

    def _wait_enqueued(self, timeout: float | None) -> bool:
        return self._enqueued.wait(timeout) and self.error is None


class CpuStream:
    """Stands in for a stream on the CPU: work submitted to it runs at once, in order."""

    def __init__(self, name: str = "cpu") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"CpuStream({self.name!r})"


class Device(ABC):
    """Copy / record / wait over one torch device. Subclasses: CPU, CUDA, ROCm."""

    kind: str = "abstract"

    def __init__(self, torch_device: torch.device) -> None:
        self.torch_device = torch_device

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.torch_device})"

    @abstractmethod
    def new_stream(self, *, high_priority: bool = False) -> Any: ...

    @abstractmethod
    def current_stream(self) -> Any: ...

    @abstractmethod
    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Context in which torch ops (and the kernels) are enqueued on ``stream``."""

    @abstractmethod
    def new_event(self) -> LayerEvent: ...

    @abstractmethod
    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        """``dst.copy_(src)`` ordered on ``stream``; may return before the bytes moved."""

    @abstractmethod
    def record(self, event: LayerEvent, stream: Any) -> None:
        """Mark ``event`` done once all work enqueued so far on ``stream`` is done."""

    @abstractmethod
    def wait(self, event: LayerEvent, stream: Any | None = None, timeout: float | None = None) -> bool:
        """Order ``stream`` (default: current) after ``event``; False if it failed or timed out."""

    @abstractmethod
    def is_complete(self, event: LayerEvent) -> bool:
        """Non-blocking: has the work behind ``event`` finished?"""

    @abstractmethod
    def host_wait(self, event: LayerEvent, timeout: float | None = None) -> bool:
        """Block this thread until the work is finished (writer threads, never the forward)."""

    def empty_host(self, nbytes: int) -> torch.Tensor:
        """A host byte buffer that the device can copy from/to asynchronously (pinned on GPU)."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def empty_device(self, nbytes: int) -> torch.Tensor | None:
        """A device byte buffer for staging, or None where host memory is the device."""
        return None


class CpuDevice(Device):
    """Threads and ``threading.Event``: copies are done eagerly by the calling thread."""

    kind = "cpu"

    def __init__(self, torch_device: torch.device | None = None) -> None:
        super().__init__(torch_device or torch.device("cpu"))
        self._current = CpuStream("compute")

    def new_stream(self, *, high_priority: bool = False) -> CpuStream:
        return CpuStream("side")

    def current_stream(self) -> CpuStream:
        return self._current

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext(stream)

    def new_event(self) -> LayerEvent:
        return LayerEvent()

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        dst.copy_(src)

    def record(self, event: LayerEvent, stream: Any) -> None:
        event._mark_recorded()

    def wait(self, event: LayerEvent, stream: Any | None = None, timeout: float | None = None) -> bool:
        return event._wait_enqueued(timeout)

    def is_complete(self, event: LayerEvent) -> bool:
        return event.enqueued

    def host_wait(self, event: LayerEvent, timeout: float | None = None) -> bool:
        return event._wait_enqueued(timeout)


class CudaDevice(Device):
    """torch.cuda streams and events; ``wait`` is ``stream.wait_event``, never a host sync."""

    kind = "cuda"

    def __init__(self, torch_device: torch.device) -> None:
        if torch_device.index is None:
            torch_device = torch.device(torch_device.type, torch.cuda.current_device())
        super().__init__(torch_device)
        self._warned_pageable = False

    def new_stream(self, *, high_priority: bool = False) -> torch.cuda.Stream:
        # Load/save streams run small kernels and copies the forward waits on: schedule them first.
        # torch maps a priority beyond the device's range to its highest priority.
        return torch.cuda.Stream(device=self.torch_device, priority=-100 if high_priority else 0)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.torch_device)

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return _cuda_stream_ctx(self.torch_device, stream)

    def new_event(self) -> LayerEvent:
        return LayerEvent(torch.cuda.Event(enable_timing=False, blocking=False, interprocess=False))

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        host = src if src.device.type == "cpu" else dst
        if host.device.type == "cpu" and not host.is_pinned() and not self._warned_pageable:
            self._warned_pageable = True
            log.warning("device.copy_from_pageable_memory", hint="use Device.empty_host; this copy blocks the host")
        with _cuda_stream_ctx(self.torch_device, stream):
            dst.copy_(src, non_blocking=True)
        for t in (dst, src):
            if t.is_cuda:  # the caching allocator must not hand this memory out before the copy ran
                t.record_stream(stream)

    def record(self, event: LayerEvent, stream: Any) -> None:
        _cuda_event(event).record(stream)
        event._mark_recorded()

    def wait(self, event: LayerEvent, stream: Any | None = None, timeout: float | None = None) -> bool:
        if not event._wait_enqueued(timeout):
            return False
        (stream if stream is not None else self.current_stream()).wait_event(_cuda_event(event))
        return True

    def is_complete(self, event: LayerEvent) -> bool:
        return event.enqueued and event.error is None and bool(_cuda_event(event).query())

    def host_wait(self, event: LayerEvent, timeout: float | None = None) -> bool:
        if not event._wait_enqueued(timeout):
            return False
        _cuda_event(event).synchronize()
        return True

    def empty_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty_device(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)


class RocmDevice(CudaDevice):
    """ROCm/HIP: torch's HIP build serves the same ``torch.cuda`` streams and events."""

    kind = "rocm"


def _cuda_event(event: LayerEvent) -> torch.cuda.Event:
    if event.device_event is None:
        raise ValueError("this LayerEvent was not made by a CUDA/ROCm Device (new_event)")
    return event.device_event  # type: ignore[no-any-return]


@contextlib.contextmanager
def _cuda_stream_ctx(device: torch.device, stream: Any) -> Iterator[Any]:
    with torch.cuda.device(device), torch.cuda.stream(stream):
        yield stream


def select_device(torch_device: torch.device | str | None = None) -> Device:
    """The :class:`Device` for a torch device: ``cpu`` -> CPU, ``cuda[:i]`` -> CUDA or ROCm."""
    dev = torch.device(torch_device) if torch_device is not None else torch.device("cpu")
    if dev.type == "cpu":
        return CpuDevice(dev)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", str(torch_device), "CUDA/ROCm requested but torch sees no GPU")
        return RocmDevice(dev) if getattr(torch.version, "hip", None) else CudaDevice(dev)
    raise ConfigError("device", str(torch_device), "unsupported device type; use 'cpu' or 'cuda[:N]'")
