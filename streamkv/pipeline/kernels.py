"""Run-time loading and launching of the paged gather/scatter kernels (CuPy RawModule).

Why: the kernels in ``cuda/`` (NVIDIA, NVRTC) and ``hip/`` (ROCm, hiprtc) ship as source and
compile on first use for whatever GPU is present, so the wheel needs no per-arch build.
CuPy is imported lazily: without it (or without a GPU) ``paged.py`` uses torch indexing.

Launch planning (pointer/stride alignment -> vector width, grid size, argument list) is plain
Python so that tests can drive the same kernel source compiled for the host.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import structlog
import torch

from streamkv.pipeline.paged import PagedSegment

log = structlog.get_logger(__name__)

Kind = Literal["gather", "scatter"]
THREADS_PER_BLOCK = 256
_WIDTHS = (16, 8, 4, 2, 1)

_lock = threading.Lock()
_modules: dict[tuple[str, int], Any] = {}
_sm_counts: dict[int, int] = {}
_unavailable: str | None = None
_checked = False


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: function name, grid/block sizes and its 15 scalar arguments."""

    name: str
    width: int
    grid: int
    block: int
    args: tuple[int, ...]


def kernel_source(platform: Literal["cuda", "hip"]) -> str:
    """The kernel source text: package data when installed, the repository folder otherwise."""
    if platform == "cuda":
        package, fname = "streamkv.kernels_cuda", "paged_copy.cu"
    else:
        package, fname = "streamkv.kernels_hip", "paged_copy.hip"
    try:
        return resources.files(package).joinpath(fname).read_text()
    except (ImportError, OSError, TypeError):  # an editable install: read the repository folder
        root = Path(__file__).resolve().parents[2]
        return (root / platform / fname).read_text()


def vector_width(*values: int) -> int:
    """Widest of 16/8/4/2/1 bytes dividing every address, stride and size in ``values``."""
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    for w in _WIDTHS:
        if g % w == 0:
            return w
    return 1


def _log2(value: int) -> int:
    """log2 of a power of two, else -1 (the kernel then divides)."""
    return value.bit_length() - 1 if value > 0 and value & (value - 1) == 0 else -1


def plan_launch(
    kind: Kind,
    seg: PagedSegment,
    staging_ptr: int,
    slots_ptr: int,
    n_tokens: int,
    chunk_tokens: int,
    seg_prefix: int,
    total_row: int,
    max_blocks: int,
) -> LaunchPlan:
    """Arguments and vector width for moving one segment; see ``cuda/paged_copy.cu``."""
    v = seg.view
    sb, so, sh = v.stride(0), v.stride(1), v.stride(2)
    heads, seg_bytes = seg.heads, seg.seg_bytes
    if heads > 1 and sh == seg_bytes:
        # A token's heads are contiguous in the pool (and always in the section): one long row.
        heads, seg_bytes, sh = 1, heads * seg_bytes, 0
    pool_terms = [v.data_ptr(), seg_bytes]
    # A stride only matters where its index can be non-zero.
    pool_terms += [s for s, size in ((sb, seg.num_blocks), (so, seg.block_size), (sh, heads)) if size > 1]
    staging_terms = [staging_ptr, seg_bytes, seg_prefix, total_row]
    width = vector_width(*pool_terms, *staging_terms)
    vecs = seg_bytes // width
    rows_per_block = THREADS_PER_BLOCK // min(vecs, THREADS_PER_BLOCK)
    grid = max(1, min(math.ceil(n_tokens * heads / rows_per_block), max_blocks))
    args = (
        v.data_ptr(), staging_ptr, slots_ptr, n_tokens, heads, seg.block_size, seg_bytes,
        sb, so, sh, chunk_tokens, seg_prefix, total_row, _log2(seg.block_size), _log2(chunk_tokens),
    )
    return LaunchPlan(f"paged_{kind}_v{width}", width, grid, THREADS_PER_BLOCK, args)


def copy_with_kernels(
    kind: Kind,
    segments: Sequence[PagedSegment],
    slots: torch.Tensor,
    section: torch.Tensor,
    chunk_tokens: int | None,
    launcher: Callable[[LaunchPlan], None] | None = None,
    max_blocks: int | None = None,
) -> None:
    """Move every segment of a layer between pool and section, one launch per segment.

    ``launcher`` defaults to CuPy on the current torch stream; tests pass a host harness.
    """
    n = slots.numel()
    if n == 0:
        return
    if launcher is None:
        launcher = _cupy_launcher(section.device)
    if max_blocks is None:
        max_blocks = _max_blocks(section.device)
    chunk = chunk_tokens or n
    total_row = sum(s.row_bytes for s in segments)
    prefix = 0
    for seg in segments:
        launcher(plan_launch(kind, seg, section.data_ptr(), slots.data_ptr(), n, chunk, prefix, total_row, max_blocks))
        prefix += seg.row_bytes


def _is_hip() -> bool:
    return bool(getattr(torch.version, "hip", None))


def available() -> bool:
    """True when CuPy imports and a GPU is present; the reason is logged once otherwise."""
    global _checked, _unavailable
    with _lock:
        if _checked:
            return _unavailable is None
        _checked = True
        try:
            import cupy  # noqa: F401

            if not torch.cuda.is_available():
                _unavailable = "torch sees no CUDA/ROCm device"
        except Exception as exc:  # ImportError, or a CuPy built for another CUDA
            _unavailable = f"cupy not importable: {exc!r}"
        if _unavailable:
            log.info("paged_kernels.fallback_to_torch", reason=_unavailable)
        return _unavailable is None


def unavailable_reason() -> str | None:
    available()
    return _unavailable


def _module(device_index: int) -> Any:
    """The compiled RawModule for a device, built once (NVRTC/hiprtc) and cached."""
    platform: Literal["cuda", "hip"] = "hip" if _is_hip() else "cuda"
    key = (platform, device_index)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            import cupy

            with cupy.cuda.Device(device_index):
                mod = cupy.RawModule(code=kernel_source(platform))
                mod.compile()
            _modules[key] = mod
            log.info("paged_kernels.compiled", platform=platform, device=device_index)
        return mod


def _max_blocks(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_counts.get(index)
    if count is None:
        count = torch.cuda.get_device_properties(index).multi_processor_count
        _sm_counts[index] = count
    return count * 8


def _cupy_launcher(device: torch.device) -> Callable[[LaunchPlan], None]:
    import cupy
    import numpy as np

    index = device.index if device.index is not None else torch.cuda.current_device()
    mod = _module(index)
    stream = torch.cuda.current_stream(index)

    def launch(plan: LaunchPlan) -> None:
        fn = mod.get_function(plan.name)
        args = tuple(np.uint64(a) for a in plan.args[:3]) + tuple(np.int64(a) for a in plan.args[3:])
        with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
            fn((plan.grid,), (plan.block,), args)

    return launch
