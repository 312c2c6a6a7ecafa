"""CPU tests of the paged gather/scatter: torch fallback, the kernel source run on the host,
the CPU device's event semantics, and the staging ring's backpressure."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from streamkv.errors import ConfigError
from streamkv.layout import KVLayout
from streamkv.pipeline import kernels, paged
from streamkv.pipeline.device import CpuDevice, select_device
from streamkv.pipeline.staging import StagingRing, load_layer, save_layer

REPO = Path(__file__).resolve().parents[1]
NB, BS, H, D = 7, 16, 4, 64
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]

Make = Callable[[tuple[int, ...]], torch.Tensor]


def _maker(dtype: torch.dtype, fill: str, gen: torch.Generator, device: str | torch.device = "cpu") -> Make:
    """Tensors of ``dtype`` holding random bytes (any bit pattern: we compare bytes) or zeros."""

    def make(shape: tuple[int, ...]) -> torch.Tensor:
        size = torch.empty((), dtype=dtype).element_size()
        raw_shape = (*shape[:-1], shape[-1] * size)
        if fill == "zeros":
            raw = torch.zeros(raw_shape, dtype=torch.uint8)
        else:
            raw = torch.randint(0, 256, raw_shape, dtype=torch.uint8, generator=gen)
        return raw.to(device).view(dtype)

    return make


# Each case builds the pool's segments from a tensor factory; the same call with a zero
# factory gives an empty pool of the same geometry and strides.
CASES: dict[str, Callable[[Make], list[paged.PagedSegment]]] = {
    "mha_nhd": lambda m: paged.mha_nhd(m((NB, BS, H, D)), m((NB, BS, H, D))),
    "mha_nhd_vllm_kv0_kv1": lambda m: (lambda kv: paged.mha_nhd(kv[0], kv[1]))(m((2, NB, BS, H, D))),
    "mha_nhd_padded": lambda m: paged.mha_nhd(m((NB, BS, H, D + 3))[..., :D], m((NB, BS, H, D + 1))[..., 1 : D + 1]),
    "mha_nhd_pad8": lambda m: paged.mha_nhd(m((NB, BS, H, D + 4))[..., :D], m((NB, BS, H, D + 4))[..., 4:]),
    "mha_nhd_bs12": lambda m: paged.mha_nhd(m((10, 12, H, D)), m((10, 12, H, D))),  # not a power of two
    "mha_hnd": lambda m: paged.mha_hnd(m((NB, H, BS, D)), m((NB, H, BS, D))),
    "token_pool": lambda m: paged.token_pool(m((NB * BS, H, D)), m((NB * BS, H, D))),
    "vllm_packed": lambda m: paged.vllm_packed(m((NB, H, BS, D + D // 2)), D),
    "vllm_packed_strided": lambda m: paged.vllm_packed(m((NB + 1, H + 2, BS, 2 * D))[1:, 1:-1], D),
    "mla": lambda m: paged.mla(m((NB, BS, 576))),
    "mla_odd": lambda m: paged.mla(m((NB, BS, 9))),
}


def _slots(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randperm(NB * BS, generator=gen)[:n].to(torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_tokens", [None, 16, 5])
def test_gather_scatter_round_trip(case: str, dtype: torch.dtype, chunk_tokens: int | None) -> None:
    gen = torch.Generator().manual_seed(1)
    src = CASES[case](_maker(dtype, "rand", gen))
    slots = _slots(gen, 37)
    section = paged.gather_pages(src, slots, chunk_tokens=chunk_tokens)
    assert section.numel() == paged.section_nbytes(src, 37)

    dst = CASES[case](_maker(dtype, "zeros", gen))
    paged.scatter_pages(dst, slots, section, chunk_tokens=chunk_tokens)
    for s_seg, d_seg in zip(src, dst):
        blk, off = slots // s_seg.block_size, slots % s_seg.block_size
        assert torch.equal(d_seg.view[blk, off], s_seg.view[blk, off])
    assert torch.equal(paged.gather_pages(dst, slots, chunk_tokens=chunk_tokens), section)
    others = torch.tensor(sorted(set(range(NB * BS)) - set(slots.tolist())), dtype=torch.int64)
    assert int(paged.gather_pages(dst, others).count_nonzero()) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_chunk_scatter_writes_what_scatter_pages_writes(case: str, dtype: torch.dtype) -> None:
    """The prepared per-chunk scatter (PagedPoolSink on a CPU) gives the pool the same bytes as
    scatter_pages, chunk by chunk, at any section offset; pools whose blocks and offsets do not
    merge into slots (HND, vLLM's packed halves) get None and keep scatter_pages."""
    gen = torch.Generator().manual_seed(5)
    src = CASES[case](_maker(dtype, "rand", gen))
    slots = _slots(gen, 48)
    section = paged.gather_pages(src, slots, chunk_tokens=16)
    a, b = CASES[case](_maker(dtype, "zeros", gen)), CASES[case](_maker(dtype, "zeros", gen))
    scatter = paged.chunk_scatter(a)
    if case in ("mha_hnd", "vllm_packed", "vllm_packed_strided"):
        assert scatter is None
        return
    assert scatter is not None
    per_chunk = section.numel() // 3
    odd = torch.empty(section.numel() + 3, dtype=torch.uint8)[3:]  # a section at an odd offset
    odd.copy_(section)
    for c, sec in enumerate((section, odd, section)):
        scatter(slots[16 * c : 16 * (c + 1)], sec[per_chunk * c : per_chunk * (c + 1)])
    paged.scatter_pages(b, slots, section, chunk_tokens=16)
    for x, y in zip(a, b):
        assert torch.equal(x.view, y.view)


def test_section_layout_is_chunks_of_k_then_v() -> None:
    """The section matches streamkv.layout: per chunk, K [T, H, D] then V [T, H, D]."""
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(NB, BS, H, D, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    v = torch.randn(NB, BS, H, D, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    slots = _slots(gen, 23)
    chunk = 8
    expect = []
    for c0 in range(0, 23, chunk):
        s = slots[c0 : c0 + chunk]
        for plane in (k, v):
            expect.append(plane.reshape(-1, H, D)[s].contiguous().view(torch.uint8).reshape(-1))
    section = paged.gather_pages(paged.mha_nhd(k, v), slots, chunk_tokens=chunk)
    assert torch.equal(section, torch.cat(expect))


def test_packed_and_separate_layouts_give_the_same_section() -> None:
    gen = torch.Generator().manual_seed(3)
    k = torch.randint(0, 256, (NB, BS, H, D * 2), dtype=torch.uint8, generator=gen).view(torch.float16)
    v = torch.randint(0, 256, (NB, BS, H, D * 2), dtype=torch.uint8, generator=gen).view(torch.float16)
    packed = torch.cat([k, v], dim=-1).permute(0, 2, 1, 3).contiguous()  # [NB, H, BS, 2D]
    slots = _slots(gen, 40)
    a = paged.gather_pages(paged.mha_nhd(k, v), slots, chunk_tokens=16)
    b = paged.gather_pages(paged.vllm_packed(packed, D), slots, chunk_tokens=16)
    assert torch.equal(a, b)


def test_slots_for_pages() -> None:
    slots = paged.slots_for_pages(torch.tensor([3, 0]), block_size=4, num_tokens=6)
    assert slots.tolist() == [12, 13, 14, 15, 0, 1]


def test_bad_arguments_raise() -> None:
    segs = CASES["mha_nhd"](_maker(torch.float16, "zeros", torch.Generator()))
    with pytest.raises(ValueError, match="int64"):
        paged.gather_pages(segs, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="staging holds"):
        paged.gather_pages(segs, torch.tensor([1, 2]), out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="backend='kernel'"):
        paged.gather_pages(segs, torch.tensor([1, 2]), backend="kernel")
    with pytest.raises(IndexError):
        paged.gather_pages(segs, torch.tensor([NB * BS]))
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        paged.as_segment(torch.zeros(2, 2, 2, 4)[..., ::2])
    with pytest.raises(ValueError, match="head_size"):
        paged.vllm_packed(torch.zeros(2, 2, 2, 4), 4)


# ---- the CUDA kernel source, compiled for the host and launched with the real launch plans ----

_PRELUDE = r"""
#include <cstring>
struct uint4 { unsigned int x, y, z, w; } __attribute__((aligned(16)));
struct uint2 { unsigned int x, y; } __attribute__((aligned(8)));
struct Dim3 { unsigned int x, y, z; };
static Dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#include "KERNEL"
typedef void (*kernel_fn)(unsigned char*, unsigned char*, const long long*, long long, long long, long long,
                          long long, long long, long long, long long, long long, long long, long long,
                          long long, long long);
#define ENTRY(N) {#N, N}
static struct { const char* name; kernel_fn fn; } table[] = {
    ENTRY(paged_gather_v16), ENTRY(paged_gather_v8), ENTRY(paged_gather_v4), ENTRY(paged_gather_v2),
    ENTRY(paged_gather_v1), ENTRY(paged_scatter_v16), ENTRY(paged_scatter_v8), ENTRY(paged_scatter_v4),
    ENTRY(paged_scatter_v2), ENTRY(paged_scatter_v1)};
extern "C" int host_launch(const char* name, unsigned grid, unsigned block, unsigned char* pool,
                           unsigned char* staging, const long long* slots, long long a3, long long a4,
                           long long a5, long long a6, long long a7, long long a8, long long a9,
                           long long a10, long long a11, long long a12, long long a13, long long a14) {
    for (auto& e : table) {
        if (std::strcmp(e.name, name) != 0) continue;
        gridDim = {grid, 1, 1}; blockDim = {block, 1, 1};
        for (unsigned b = 0; b < grid; ++b)
            for (unsigned t = 0; t < block; ++t) {
                blockIdx = {b, 0, 0}; threadIdx = {t, 0, 0};
                e.fn(pool, staging, slots, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14);
            }
        return 0;
    }
    return 1;
}
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: cannot run the kernel source on the host")
    out = tmp_path_factory.mktemp("hostkernel")
    src = out / "harness.cpp"
    src.write_text(_PRELUDE.replace("KERNEL", str(REPO / "cuda" / "paged_copy.cu")))
    lib = out / "libpaged_host.so"
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-o", str(lib), str(src)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.host_launch.restype = ctypes.c_int
    dll.host_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint] + [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 12
    return dll


def _host_launcher(dll: ctypes.CDLL, widths: set[int]) -> Callable[[kernels.LaunchPlan], None]:
    def launch(plan: kernels.LaunchPlan) -> None:
        pool, staging, slots, n, heads, bs, seg, sb, so, sh = plan.args[:10]
        w = plan.width
        # The plan's width must really divide every address the kernel forms.
        assert pool % w == 0 and staging % w == 0 and seg % w == 0
        assert all(s % w == 0 for s, size in ((sb, 2), (so, bs), (sh, heads)) if size > 1)
        widths.add(w)
        assert dll.host_launch(plan.name.encode(), plan.grid, plan.block, *plan.args) == 0

    return launch


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_source_on_host_matches_fallback(host_kernels: ctypes.CDLL, case: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    src = CASES[case](_maker(dtype, "rand", gen))
    slots = _slots(gen, 29)
    widths: set[int] = set()
    launch = _host_launcher(host_kernels, widths)
    for chunk in (None, 8):
        expect = paged.gather_pages(src, slots, chunk_tokens=chunk, backend="torch")
        got = torch.full_like(expect, 0xAB)
        # max_blocks=3 makes every thread walk the grid-stride loop.
        kernels.copy_with_kernels("gather", src, slots, got, chunk, launcher=launch, max_blocks=3)
        assert torch.equal(got, expect)
        dst = CASES[case](_maker(dtype, "zeros", gen))
        kernels.copy_with_kernels("scatter", dst, slots, expect, chunk, launcher=launch, max_blocks=3)
        ref = CASES[case](_maker(dtype, "zeros", gen))
        paged.scatter_pages(ref, slots, expect, chunk_tokens=chunk, backend="torch")
        for a, b in zip(dst, ref):
            assert torch.equal(a.view, b.view)
    assert widths
    _ALL_WIDTHS.update(widths)


_ALL_WIDTHS: set[int] = set()


def test_host_runs_covered_every_vector_width(host_kernels: ctypes.CDLL) -> None:
    """Runs after the parametrized host runs (file order): all five kernel widths were exercised."""
    if not _ALL_WIDTHS:
        pytest.skip("run together with test_kernel_source_on_host_matches_fallback")
    assert _ALL_WIDTHS == {16, 8, 4, 2, 1}


def test_vector_width_follows_alignment() -> None:
    assert kernels.vector_width(4096, 256, 128) == 16
    assert kernels.vector_width(4096, 136) == 8
    assert kernels.vector_width(4096, 134) == 2
    assert kernels.vector_width(4096, 9) == 1
    seg = paged.mha_nhd(torch.zeros(2, 4, 2, 67, dtype=torch.float16)[..., :64], torch.zeros(1, 1, 1, 1))[0]
    plan = kernels.plan_launch("gather", seg, 1 << 20, 0, 8, 8, 0, 256, 100)
    assert plan.width == 2 and plan.name == "paged_gather_v2"


def test_kernels_unavailable_without_gpu_falls_back() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert kernels.available() is False
    assert kernels.unavailable_reason()


# ---- the CPU device and the staging ring ----


def test_cpu_device_event_semantics() -> None:
    dev = select_device("cpu")
    assert isinstance(dev, CpuDevice)
    ev = dev.new_event()
    assert not dev.is_complete(ev)
    assert dev.wait(ev, timeout=0.01) is False  # not recorded yet: waiting times out
    dst, src = torch.zeros(8), torch.arange(8.0)
    stream = dev.new_stream()
    dev.copy_async(dst, src, stream)
    assert torch.equal(dst, src)  # eager on the CPU
    seen: list[bool] = []
    t = threading.Thread(target=lambda: seen.append(dev.wait(ev)))
    t.start()
    time.sleep(0.02)
    assert not seen  # still blocked before the record
    dev.record(ev, stream)
    t.join(5)
    assert seen == [True] and dev.is_complete(ev) and dev.host_wait(ev)
    failed = dev.new_event()
    failed.fail(RuntimeError("tier down"))
    assert dev.wait(failed) is False and dev.host_wait(failed) is False


def test_select_device_errors() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device"):
            select_device("cuda")
    with pytest.raises(ConfigError, match="device"):
        select_device("meta")


def test_ring_backpressure_and_release_on_event() -> None:
    dev = CpuDevice()
    ring = StagingRing(dev, num_buffers=2, buffer_bytes=64)
    a, b = ring.acquire(), ring.acquire()
    assert a.host.numel() == 64 and a.device is None and a is not b
    with pytest.raises(TimeoutError):
        ring.acquire(timeout=0.01)
    ev = dev.new_event()
    ring.release(a, ev)
    with pytest.raises(TimeoutError):
        ring.acquire(timeout=0.01)  # released, but its event has not completed
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(ring.acquire(timeout=10)))
    t.start()
    time.sleep(0.02)
    assert not got
    dev.record(ev, dev.current_stream())
    t.join(10)
    assert got == [a]  # the same buffer comes back: reused, never reallocated
    ring.release(b)
    assert ring.free_count == 1
    stats = ring.stats()
    assert stats["acquires"] == 3 and stats["stall_s"] > 0 and stats["free"] == 1
    with pytest.raises(ConfigError):
        StagingRing(dev, 0, 64)
    ring.close()
    with pytest.raises(RuntimeError, match="closed"):
        ring.acquire()


@pytest.mark.parametrize("buffer_chunks", [1, 2, 10])
def test_save_then_load_layer_through_the_ring(buffer_chunks: int) -> None:
    dev = CpuDevice()
    gen = torch.Generator().manual_seed(5)
    src = CASES["vllm_packed"](_maker(torch.bfloat16, "rand", gen))
    slots = _slots(gen, 45)
    chunk = 16
    total_row = sum(s.row_bytes for s in src)
    ring = StagingRing(dev, num_buffers=3, buffer_bytes=buffer_chunks * chunk * total_row)
    pending = save_layer(dev, ring, src, slots, dev.new_stream(), chunk_tokens=chunk)
    assert pending is not None
    section = pending.read()
    pending.release()
    assert section == bytes(paged.gather_pages(src, slots, chunk_tokens=chunk).numpy())

    dst = CASES["vllm_packed"](_maker(torch.bfloat16, "zeros", gen))
    ev = dev.new_event()
    load_layer(dev, ring, section, dst, slots, dev.new_stream(), ev, chunk_tokens=chunk)
    assert dev.wait(ev)
    assert torch.equal(paged.gather_pages(dst, slots, chunk_tokens=chunk), paged.gather_pages(src, slots, chunk_tokens=chunk))
    assert ring.free_count == 3


def test_save_layer_larger_than_the_ring_raises() -> None:
    dev = CpuDevice()
    segs = CASES["mla"](_maker(torch.float16, "zeros", torch.Generator()))
    ring = StagingRing(dev, num_buffers=2, buffer_bytes=8 * segs[0].row_bytes)
    with pytest.raises(ConfigError, match="buffers"):
        save_layer(dev, ring, segs, torch.arange(40), dev.new_stream(), chunk_tokens=8)


def test_consumer_never_reads_a_layer_before_its_event() -> None:
    """A slow producer loads layers in order; the consumer waits per layer and sees full KV."""
    dev = CpuDevice()
    gen = torch.Generator().manual_seed(6)
    layers = 6
    stored = [CASES["mha_nhd"](_maker(torch.float16, "rand", gen)) for _ in range(layers)]
    pools = [CASES["mha_nhd"](_maker(torch.float16, "zeros", gen)) for _ in range(layers)]
    slots = _slots(gen, 50)
    sections = [paged.gather_pages(s, slots, chunk_tokens=16) for s in stored]
    events = [dev.new_event() for _ in range(layers)]
    ring = StagingRing(dev, num_buffers=2, buffer_bytes=sections[0].numel())
    load_stream = dev.new_stream()

    def produce() -> None:
        for layer in range(layers):
            time.sleep(0.01)  # a slow tier
            load_layer(dev, ring, sections[layer], pools[layer], slots, load_stream, events[layer], chunk_tokens=16)

    t = threading.Thread(target=produce)
    t.start()
    for layer in range(layers):
        assert dev.wait(events[layer], timeout=30)
        assert torch.equal(paged.gather_pages(pools[layer], slots, chunk_tokens=16), sections[layer])
    t.join(30)


def test_load_layer_failure_marks_event_failed() -> None:
    dev = CpuDevice()
    segs = CASES["mla"](_maker(torch.float16, "zeros", torch.Generator()))
    ring = StagingRing(dev, num_buffers=1, buffer_bytes=1 << 16)
    ev = dev.new_event()
    bad_slots = torch.tensor([NB * BS + 5])
    with pytest.raises(IndexError):
        load_layer(dev, ring, bytes(segs[0].row_bytes), segs, bad_slots, dev.new_stream(), ev)
    assert dev.wait(ev, timeout=1) is False
    assert ring.acquire(timeout=1) is not None  # the buffer came back


# ---- the paged-pool sink, fed as the core producer feeds a sink: chunk objects, any order ----


def _stored_chunks(
    layers: list[list[paged.PagedSegment]], slots: torch.Tensor, chunk: int, dtype: str
) -> tuple[KVLayout, list[bytearray]]:
    """Chunk objects (the real format) holding the KV at ``slots`` of ``layers``."""
    from streamkv.format import encode_chunk
    from streamkv.keys import Namespace

    layout = KVLayout(len(layers), H, D, dtype, chunk)
    ns = Namespace("test-model", layout)
    objs = []
    for c0 in range(0, slots.numel(), chunk):
        sections = [bytes(paged.gather_pages(segs, slots[c0 : c0 + chunk]).numpy()) for segs in layers]
        objs.append(encode_chunk(ns, layout, sections, compression="off"))
    return layout, objs


@pytest.mark.parametrize("use_ring", [False, True])
def test_paged_pool_sink_streams_stored_chunks_into_the_pool(use_ring: bool) -> None:
    import random
    from concurrent.futures import ThreadPoolExecutor

    from streamkv.format import decode_section, parse_header
    from streamkv.pipeline.staging import PagedPoolSink

    dev = CpuDevice()
    gen = torch.Generator().manual_seed(7)
    n_layers, chunk = 3, 16
    stored = [CASES["mha_nhd"](_maker(torch.bfloat16, "rand", gen)) for _ in range(n_layers)]
    slots = _slots(gen, 4 * chunk)
    layout, objs = _stored_chunks(stored, slots, chunk, "bfloat16")
    pools = [CASES["mha_nhd"](_maker(torch.bfloat16, "zeros", gen)) for _ in range(n_layers)]
    ring = StagingRing(dev, num_buffers=2, buffer_bytes=layout.section_bytes) if use_ring else None
    sink = PagedPoolSink(dev, pools, slots, chunk, ring=ring)
    sink.begin(len(objs))
    headers = [parse_header(o) for o in objs]
    order = random.Random(0)

    def deliver(layer: int, c: int) -> None:
        off, length = headers[c].section_range(layer)
        sink.write(layer, c, decode_section(headers[c], layer, memoryview(objs[c])[off : off + length]))

    def produce() -> None:
        with ThreadPoolExecutor(4) as pool:
            for layer in range(n_layers):
                chunks = list(range(len(objs)))
                order.shuffle(chunks)
                list(pool.map(lambda c, layer=layer: deliver(layer, c), chunks))
                if layer % 2:  # the last write records the event; finish_layer is idempotent
                    sink.finish_layer(layer)

    t = threading.Thread(target=produce)
    t.start()
    for layer in range(n_layers):
        assert sink.wait(layer, timeout=30)
        assert torch.equal(paged.gather_pages(pools[layer], slots), paged.gather_pages(stored[layer], slots))
    t.join(30)
    if ring is not None:
        assert ring.free_count == 2


def test_paged_pool_sink_failed_layer_and_bad_config() -> None:
    from streamkv.pipeline.staging import PagedPoolSink

    dev = CpuDevice()
    pools = [CASES["mla"](_maker(torch.float16, "zeros", torch.Generator()))]
    sink = PagedPoolSink(dev, pools, torch.arange(32), 16)
    with pytest.raises(ValueError, match="slots"):
        sink.begin(3)
    sink.begin(2)
    sink.fail_layer(0, RuntimeError("corrupt section"))
    assert sink.wait(0, timeout=1) is False
    small = StagingRing(dev, 1, 8)
    with pytest.raises(ConfigError, match="buffer_bytes"):
        PagedPoolSink(dev, pools, torch.arange(32), 16, ring=small)


def test_engine_retrieve_streams_into_a_paged_pool(tmp_path: Path) -> None:
    """The real engine (store_kv, retrieve with its producer) feeding a PagedPoolSink."""
    from streamkv.config import StreamKVConfig
    from streamkv.engine import StreamKVEngine
    from streamkv.keys import Namespace
    from streamkv.pipeline.staging import PagedPoolSink

    n_layers, chunk, tokens = 3, 16, 64
    layout = KVLayout(n_layers, H, D, "bfloat16", chunk)
    config = StreamKVConfig(chunk_size=chunk, tiers=("disk",), disk_dir=str(tmp_path / "disk"), log_level="error")
    gen = torch.Generator().manual_seed(8)
    planes = [[torch.randint(-30000, 30000, (tokens, H, D), dtype=torch.int16, generator=gen) for _ in range(2)]
              for _ in range(n_layers)]
    ids = list(range(1000, 1000 + tokens))
    with StreamKVEngine(config, layout, Namespace("paged-sink-test", layout)) as engine:
        assert engine.store_kv(ids, lambda layer: [p.numpy() for p in planes[layer]]).result() == tokens // chunk
        engine.flush()
        pools = [CASES["mha_nhd"](_maker(torch.bfloat16, "zeros", gen)) for _ in range(n_layers)]
        slots = _slots(gen, tokens)
        sink = PagedPoolSink(CpuDevice(), pools, slots, chunk)
        handle = engine.retrieve(ids, sink=sink)
        assert handle.wait_ready() == tokens
        for layer in range(n_layers):
            assert handle.wait(layer) and sink.wait(layer, timeout=30)
            for seg, plane in zip(pools[layer], planes[layer]):
                got = seg.view[slots // BS, slots % BS].reshape(tokens, -1)
                assert torch.equal(got, plane.view(torch.uint8).reshape(tokens, -1))
