"""The prepared GPU-machine script (benchmarks/device_check.sh) parses, and where there is no
CUDA device it stops after the package step with a summary that says so (its GPU steps can only
run on a lent device machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"


def test_device_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None,
                    reason="a GPU machine runs the whole script, not this check")
def test_device_check_stops_at_the_device_step_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PY=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT)], cwd=SCRIPT.parents[1], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    rows = {line.split("  rc=")[0].strip(): line for line in lines if "  rc=" in line}
    assert "rc=0" in rows["packages (from .device-wheels)"]
    assert "rc=0" not in rows["device"]
    assert not any(name.startswith("GPU tests") for name in rows)  # stopped before the GPU steps
    assert (out / "packages.txt").exists() and (out / "device.txt").exists()
