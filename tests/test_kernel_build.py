"""Build checks of the kernel sources: nvcc for sm_80/sm_90, hipcc for one gfx target, and the
run-time compilers the loader really uses (NVRTC, hiprtc) where their libraries are found; each
check is also shown to fail on a broken source.

Why: the kernels compile at run time on the user's GPU, so a syntax error would only show there.
These checks run on machines without a GPU (CI); each skips with its reason when its compiler
is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((REPO / "cuda").glob("*.cu"))
HIP_SOURCES = sorted((REPO / "hip").glob("*.hip"))
CUDA_ARCHS = ["sm_80", "sm_90"]
HIP_ARCH = "gfx90a"
BODY_MARKER = "// ---- body shared with"
BREAKAGE = "\n__global__ void broken_kernel( { this is not C++ }\n"

NVCC = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)
if NVCC is None:
    NVCC_MISSING = "nvcc not found (install the CUDA toolkit to run the CUDA build check)"
elif shutil.which("g++") is None:
    NVCC_MISSING = "nvcc found but no g++ for its host side"
else:
    NVCC_MISSING = ""
HIPCC = shutil.which("hipcc")


def _nvcc(src: Path, arch: str, out: Path) -> subprocess.CompletedProcess[str]:
    assert NVCC is not None
    cmd = [NVCC, f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings", "-c", str(src), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _hipcc(src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    assert HIPCC is not None
    env = {**os.environ, "HIP_PLATFORM": "amd"}  # without it hipcc hands the file to nvcc
    cmd = [HIPCC, f"--offload-arch={HIP_ARCH}", "-std=c++17", "-Werror", "-c", str(src), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_sources_exist_in_pairs() -> None:
    assert CUDA_SOURCES, "no cuda/*.cu found"
    assert [p.stem for p in CUDA_SOURCES] == [p.stem for p in HIP_SOURCES]


@pytest.mark.parametrize("src", CUDA_SOURCES, ids=lambda p: p.name)
def test_hip_body_matches_cuda_body(src: Path) -> None:
    """The HIP file differs from the CUDA one only in its header, so they cannot drift."""
    cu = src.read_text()
    hip = (REPO / "hip" / f"{src.stem}.hip").read_text()
    assert BODY_MARKER in cu and BODY_MARKER in hip

    def body(text: str) -> str:
        return text.split(BODY_MARKER, 1)[1].split("\n", 1)[1]

    assert body(cu) == body(hip)


@pytest.mark.skipif(bool(NVCC_MISSING), reason=NVCC_MISSING)
@pytest.mark.parametrize("arch", CUDA_ARCHS)
@pytest.mark.parametrize("src", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(src: Path, arch: str, tmp_path: Path) -> None:
    res = _nvcc(src, arch, tmp_path / "k.o")
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(bool(NVCC_MISSING), reason=NVCC_MISSING)
def test_cuda_check_fails_on_a_broken_kernel(tmp_path: Path) -> None:
    broken = tmp_path / "broken.cu"
    broken.write_text(CUDA_SOURCES[0].read_text() + BREAKAGE)
    res = _nvcc(broken, CUDA_ARCHS[0], tmp_path / "k.o")
    assert res.returncode != 0
    assert "error" in (res.stderr + res.stdout).lower()


@pytest.mark.skipif(HIPCC is None, reason="hipcc not found (apt-get install hipcc to run the HIP build check)")
@pytest.mark.parametrize("src", HIP_SOURCES, ids=lambda p: p.name)
def test_hip_sources_compile(src: Path, tmp_path: Path) -> None:
    res = _hipcc(src, tmp_path / "k.o")
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(HIPCC is None, reason="hipcc not found (apt-get install hipcc to run the HIP build check)")
def test_hip_check_fails_on_a_broken_kernel(tmp_path: Path) -> None:
    broken = tmp_path / "broken.hip"
    broken.write_text(HIP_SOURCES[0].read_text() + BREAKAGE)
    res = _hipcc(broken, tmp_path / "k.o")
    assert res.returncode != 0
    assert "error" in (res.stderr + res.stdout).lower()


# ---- NVRTC: how the kernels are really compiled at run time (no host headers available) ----


def _find_nvrtc() -> str | None:
    explicit = os.environ.get("STREAMKV_NVRTC_LIB")
    if explicit:
        return explicit
    # The nvidia-cuda-nvrtc wheel puts it under site-packages/nvidia/<cuXX>/lib.
    found = [lib for entry in sys.path for lib in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libnvrtc.so*")))]
    for lib in found + sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")):
        if "alt" not in os.path.basename(lib) and "builtins" not in os.path.basename(lib):
            return lib
    return None


NVRTC = _find_nvrtc()


def _nvrtc_compile(source: str, arch: str) -> tuple[int, str]:
    assert NVRTC is not None
    # NVRTC dlopens its builtins library by name: load it first from the same folder.
    for builtins in sorted(glob.glob(os.path.join(os.path.dirname(NVRTC), "libnvrtc-builtins.so*"))):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            break
    lib = ctypes.CDLL(NVRTC)
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"paged_copy.cu", 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram failed: {rc}"
    opts = [f"--gpu-architecture={arch}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, buf.value.decode(errors="replace")


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (pip install nvidia-cuda-nvrtc or set STREAMKV_NVRTC_LIB)")
@pytest.mark.parametrize("src", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile_with_nvrtc(src: Path) -> None:
    rc, log = _nvrtc_compile(src.read_text(), "compute_80")
    assert rc == 0, log
    rc, log = _nvrtc_compile(src.read_text() + BREAKAGE, "compute_80")
    assert rc != 0 and "error" in log.lower()


# ---- hiprtc: the ROCm run-time compiler (in libamdhip64, installed with Debian's hipcc) ----


def _find_hiprtc() -> str | None:
    explicit = os.environ.get("STREAMKV_HIPRTC_LIB")
    if explicit:
        return explicit
    return ctypes.util.find_library("amdhip64")


HIPRTC = _find_hiprtc()


def _hiprtc_compile(source: str) -> tuple[int, str]:
    assert HIPRTC is not None
    lib = ctypes.CDLL(HIPRTC)
    prog = ctypes.c_void_p()
    rc = lib.hiprtcCreateProgram(ctypes.byref(prog), source.encode(), b"paged_copy.hip", 0, None, None)
    assert rc == 0, f"hiprtcCreateProgram failed: {rc}"
    opts = [f"--offload-arch={HIP_ARCH}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.hiprtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.hiprtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value + 1)
    lib.hiprtcGetProgramLog(prog, buf)
    lib.hiprtcDestroyProgram(ctypes.byref(prog))
    return rc, buf.value.decode(errors="replace")


@pytest.mark.skipif(HIPRTC is None, reason="libamdhip64 (hiprtc) not found (apt-get install hipcc brings it)")
@pytest.mark.parametrize("src", HIP_SOURCES, ids=lambda p: p.name)
def test_hip_sources_compile_with_hiprtc(src: Path) -> None:
    rc, log = _hiprtc_compile(src.read_text())
    assert rc == 0, log
    rc, log = _hiprtc_compile(src.read_text() + BREAKAGE)
    assert rc != 0 and "error" in log.lower()
