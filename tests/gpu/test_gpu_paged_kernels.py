"""GPU: the compiled gather/scatter kernels give the torch fallback's bytes, on every layout.

Needs CUDA (or ROCm) and, for the kernel half, CuPy (``pip install cupy-cuda12x`` / ``-cuda13x``).
"""

from __future__ import annotations

import pytest
import torch

from streamkv.pipeline import kernels, paged
from tests.test_paged_copy import BS, CASES, NB, _maker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU"),
]

GPU_DTYPES = [torch.float16, torch.bfloat16] + [
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
]


@pytest.fixture(scope="module")
def compiled() -> None:
    pytest.importorskip("cupy", reason="CuPy not installed: pip install cupy-cuda12x (or cupy-cuda13x)")
    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")


def _slots(seed: int, n: int, total: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[:n].to(torch.int64)


@pytest.mark.parametrize("chunk_tokens", [None, 16, 5])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_fallback_byte_for_byte(compiled: None, case: str, dtype: torch.dtype, chunk_tokens: int | None) -> None:
    cpu = CASES[case](_maker(dtype, "rand", torch.Generator().manual_seed(11), "cpu"))
    gpu = CASES[case](_maker(dtype, "rand", torch.Generator().manual_seed(11), "cuda"))
    slots = _slots(12, 97, NB * BS)
    expect = paged.gather_pages(cpu, slots, chunk_tokens=chunk_tokens, backend="torch")

    got_kernel = paged.gather_pages(gpu, slots.cuda(), chunk_tokens=chunk_tokens, backend="kernel")
    got_torch = paged.gather_pages(gpu, slots.cuda(), chunk_tokens=chunk_tokens, backend="torch")
    assert torch.equal(got_kernel.cpu(), expect)
    assert torch.equal(got_torch.cpu(), expect)

    dst_kernel = CASES[case](_maker(dtype, "zeros", torch.Generator(), "cuda"))
    dst_torch = CASES[case](_maker(dtype, "zeros", torch.Generator(), "cuda"))
    paged.scatter_pages(dst_kernel, slots.cuda(), expect.cuda(), chunk_tokens=chunk_tokens, backend="kernel")
    paged.scatter_pages(dst_torch, slots.cuda(), expect.cuda(), chunk_tokens=chunk_tokens, backend="torch")
    for a, b in zip(dst_kernel, dst_torch):
        assert torch.equal(a.view, b.view)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_large_sections_match(compiled: None, dtype: torch.dtype) -> None:
    """Several MiB per layer, 256-token chunks, a partial last chunk: the grid-stride path."""
    nb, bs, heads, dim = 320, 16, 8, 128
    gen = torch.Generator().manual_seed(13)
    make = _maker(dtype, "rand", gen, "cuda")
    segs = paged.mha_nhd(make((nb, bs, heads, dim)), make((nb, bs, heads, dim)))
    slots = _slots(14, 4000, nb * bs).cuda()
    a = paged.gather_pages(segs, slots, chunk_tokens=256, backend="kernel")
    b = paged.gather_pages(segs, slots, chunk_tokens=256, backend="torch")
    assert a.numel() >= 1 << 20
    assert torch.equal(a, b)
    zeros = _maker(dtype, "zeros", gen, "cuda")
    dst = paged.mha_nhd(zeros((nb, bs, heads, dim)), zeros((nb, bs, heads, dim)))
    paged.scatter_pages(dst, slots, a, chunk_tokens=256, backend="kernel")
    assert torch.equal(paged.gather_pages(dst, slots, chunk_tokens=256, backend="torch"), a)


def test_auto_backend_uses_kernels_on_gpu(compiled: None, monkeypatch: pytest.MonkeyPatch) -> None:
    segs = CASES["mla"](_maker(torch.bfloat16, "rand", torch.Generator().manual_seed(15), "cuda"))
    launched: list[str] = []
    real = kernels.copy_with_kernels

    def spy(kind: str, *args: object, **kw: object) -> None:
        launched.append(kind)
        real(kind, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "copy_with_kernels", spy)
    paged.gather_pages(segs, torch.arange(10, device="cuda"))
    assert launched == ["gather"]
    monkeypatch.setenv("STREAMKV_KERNELS", "torch")
    paged.gather_pages(segs, torch.arange(10, device="cuda"))
    assert launched == ["gather"]  # forced to the fallback
