"""GPU: layer-wise streaming through the device layer and the pinned staging ring.

Streamed KV lands in a paged pool byte for byte; the compute stream never reads a layer before
its event even when the producer is slow (on the host and on the device); and the hot path
(load, scatter, the engine-facing wait) never synchronises the host with the GPU.
Runs with the compiled kernels when CuPy is present and with the torch fallback always.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from streamkv.pipeline import kernels, paged
from streamkv.pipeline.device import CudaDevice, RocmDevice, select_device
from streamkv.pipeline.staging import PagedPoolSink, StagingRing, load_layer, save_layer
from tests.test_paged_copy import BS, CASES, NB, _maker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU"),
]

LAYERS = 4
CHUNK = 16
SLEEP_CYCLES = 20_000_000  # ~10 ms of GPU time: makes a missing stream wait visible


@pytest.fixture(params=["kernel", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "kernel":
        try:
            import cupy  # noqa: F401
        except ImportError:
            pytest.skip("CuPy not installed: the kernel path cannot run")
        if not kernels.available():
            pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    else:
        monkeypatch.setenv("STREAMKV_KERNELS", "torch")
    yield request.param


def _setup(case: str = "vllm_packed", dtype: torch.dtype = torch.bfloat16) -> tuple[list, list, torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(21)
    stored = [CASES[case](_maker(dtype, "rand", gen, "cpu")) for _ in range(LAYERS)]
    pools = [CASES[case](_maker(dtype, "zeros", gen, "cuda")) for _ in range(LAYERS)]
    slots = torch.randperm(NB * BS, generator=gen)[: 5 * CHUNK - 3].to(torch.int64)
    sections = [paged.gather_pages(s, slots, chunk_tokens=CHUNK) for s in stored]
    return stored, pools, slots, sections


def test_select_device_on_gpu() -> None:
    dev = select_device("cuda")
    assert isinstance(dev, RocmDevice if torch.version.hip else CudaDevice)
    assert dev.empty_host(64).is_pinned()


@pytest.mark.parametrize("case", ["mha_nhd", "vllm_packed", "mla", "mha_nhd_padded"])
def test_streamed_kv_into_paged_pool_equals_stored(backend: str, case: str) -> None:
    _, pools, slots, sections = _setup(case)
    dev = select_device("cuda")
    ring = StagingRing(dev, num_buffers=2, buffer_bytes=2 * CHUNK * (sections[0].numel() // slots.numel()))
    slots_dev = slots.cuda()
    load = dev.new_stream(high_priority=True)
    events = [dev.new_event() for _ in range(LAYERS)]
    for layer in range(LAYERS):  # several pieces per layer through a two-buffer ring
        load_layer(dev, ring, sections[layer], pools[layer], slots_dev, load, events[layer], chunk_tokens=CHUNK)
    for layer in range(LAYERS):
        assert dev.wait(events[layer])
        got = paged.gather_pages(pools[layer], slots_dev, chunk_tokens=CHUNK)
        assert torch.equal(got.cpu(), sections[layer])


def test_consumer_never_reads_a_layer_before_its_event(backend: str) -> None:
    """A producer slow on the host and on its stream; the compute stream reads each layer
    right after ``wait``: it must see the loaded bytes, never the zeros before them."""
    _, pools, slots, sections = _setup("mha_nhd")
    dev = select_device("cuda")
    ring = StagingRing.for_layers(dev, sections[0].numel(), num_buffers=2)
    slots_dev = slots.cuda()
    load = dev.new_stream(high_priority=True)
    events = [dev.new_event() for _ in range(LAYERS)]

    def produce() -> None:
        for layer in range(LAYERS):
            time.sleep(0.02)
            with torch.cuda.stream(load):
                torch.cuda._sleep(SLEEP_CYCLES)  # the copy and scatter start late on the device
            load_layer(dev, ring, sections[layer], pools[layer], slots_dev, load, events[layer], chunk_tokens=CHUNK)

    t = threading.Thread(target=produce)
    t.start()
    seen = []
    for layer in range(LAYERS):
        assert dev.wait(events[layer], timeout=60)  # host waits for the enqueue only
        seen.append(paged.gather_pages(pools[layer], slots_dev, chunk_tokens=CHUNK))  # compute stream
    t.join(60)
    torch.cuda.synchronize()
    for layer in range(LAYERS):
        assert torch.equal(seen[layer].cpu(), sections[layer])


def test_no_host_sync_on_the_hot_path(backend: str) -> None:
    _, pools, slots, sections = _setup("vllm_packed")
    dev = select_device("cuda")
    ring = StagingRing.for_layers(dev, sections[0].numel(), num_buffers=3)
    slots_dev = slots.cuda()  # prepared off the hot path: a host->device copy of indices syncs
    load = dev.new_stream(high_priority=True)
    events = [dev.new_event() for _ in range(LAYERS)]
    out = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(LAYERS):
            load_layer(dev, ring, sections[layer], pools[layer], slots_dev, load, events[layer], chunk_tokens=CHUNK)
        for layer in range(LAYERS):
            assert dev.wait(events[layer])
            out.append(paged.gather_pages(pools[layer], slots_dev, chunk_tokens=CHUNK))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for layer in range(LAYERS):
        assert torch.equal(out[layer].cpu(), sections[layer])


def test_save_stream_waits_for_the_compute_event(backend: str) -> None:
    """The save stream gathers a layer only after the compute stream's event for it."""
    stored, pools, slots, sections = _setup("mha_nhd")
    dev = select_device("cuda")
    ring = StagingRing.for_layers(dev, sections[0].numel(), num_buffers=2)
    slots_dev = slots.cuda()
    save = dev.new_stream()
    computed = dev.new_event()
    on_device = [s.view.cuda() for s in stored[0]]
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)  # the "layer" finishes late on the compute stream
    for dst, src in zip(pools[0], on_device):
        dst.view.copy_(src)  # device to device, ordered after the sleep
    dev.record(computed, dev.current_stream())
    pending = save_layer(dev, ring, pools[0], slots_dev, save, after=computed, chunk_tokens=CHUNK)
    assert pending is not None
    assert pending.read() == bytes(sections[0].numpy())
    pending.release()


def test_paged_pool_sink_on_gpu(backend: str) -> None:
    stored, pools, slots, _ = _setup("mha_nhd")
    slots = slots[: 4 * CHUNK]  # a hit is whole chunks
    sections = [paged.gather_pages(s, slots, chunk_tokens=CHUNK) for s in stored]
    dev = select_device("cuda")
    chunk_bytes = CHUNK * (sections[0].numel() // slots.numel())
    ring = StagingRing(dev, num_buffers=3, buffer_bytes=chunk_bytes)
    sink = PagedPoolSink(dev, pools, slots.cuda(), CHUNK, ring=ring)
    n_chunks = slots.numel() // CHUNK
    sink.begin(n_chunks)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(LAYERS):
            for c in reversed(range(n_chunks)):
                lo = c * chunk_bytes
                sink.write(layer, c, memoryview(sections[layer][lo : lo + chunk_bytes].numpy()))
            sink.finish_layer(layer)
        for layer in range(LAYERS):
            assert sink.wait(layer)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for layer in range(LAYERS):
        assert torch.equal(paged.gather_pages(pools[layer], slots.cuda(), chunk_tokens=CHUNK).cpu(), sections[layer])
