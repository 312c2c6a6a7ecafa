"""Helpers for the daemon tests: a real ``streamkv serve`` subprocess, the CLI,
and client processes (``python -m tests.daemon_helpers store|retrieve|hammer``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamkv.config import StreamKVConfig
from streamkv.keys import Namespace
from streamkv.layout import KVLayout

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = KVLayout(4, 2, 16, "float16", 16)
BIG = KVLayout(8, 4, 64, "float16", 64)  # 512 KiB chunks, for stores that take a while
MODEL = "test-model"
CLI = [sys.executable, "-m", "streamkv.cli"]  # the real ``streamkv`` command line


def short_tmp() -> Path:
    """A short directory (Unix socket paths are limited to ~107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="skvd"))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def cli_json(*args: str) -> Any:
    out = run_cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


class DaemonProcess:
    """``streamkv serve`` in a subprocess, its socket and disk under ``root``."""

    def __init__(self, root: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = {**os.environ, **(env or {})}
        self.socket = str(root / "sock")
        self.disk = str(root / "disk")
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.log_path = root / "daemon.log"

    def start(self, wait: bool = True) -> DaemonProcess:
        args = ["serve", "--socket", self.socket, "--disk-dir", self.disk, "--memory-gb", "0.25",
                "--disk-gb", "1", "--shm-gb", "0.5", "--log-level", "info", *self.extra]
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        from streamkv.client import DaemonClient, DaemonUnavailable

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                with DaemonClient(self.socket, timeout_s=2) as c:
                    try:
                        c.ping()
                        return
                    except DaemonUnavailable:
                        pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def client(self, **kw: Any) -> Any:
        from streamkv.client import DaemonClient

        return DaemonClient(self.socket, **kw)


def tokens_for(seed: int, chunks: int, layout: KVLayout = LAYOUT) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32000, chunks * layout.chunk_size)


def kv_for(seed: int, chunks: int, layout: KVLayout = LAYOUT, compressible: bool = False) -> list[np.ndarray]:
    """Per layer ``[2, T, H, D]`` raw uint16 KV (random, or low-entropy when ``compressible``)."""
    rng = np.random.default_rng(seed + 1_000_000)
    top = 4 if compressible else 65536
    shape = (2, chunks * layout.chunk_size, layout.num_kv_heads, layout.head_size)
    return [rng.integers(0, top, size=shape, dtype=np.uint16) for _ in range(layout.num_layers)]


def engine(socket: str, layout: KVLayout = LAYOUT, timeout_s: float = 5.0, **config: Any) -> Any:
    from streamkv.client import DaemonStore
    from streamkv.engine import StreamKVEngine

    cfg = StreamKVConfig(chunk_size=layout.chunk_size, socket=socket, mode="daemon", **config)
    store = DaemonStore(socket, timeout_s=timeout_s)
    return StreamKVEngine(cfg, layout, Namespace(MODEL, layout), tiers=[store])


def store(eng: Any, seed: int, chunks: int, compressible: bool = False) -> int:
    kv = kv_for(seed, chunks, eng.layout, compressible)
    return eng.store_kv(tokens_for(seed, chunks, eng.layout), lambda layer: (kv[layer][0], kv[layer][1])).result()


def retrieve(eng: Any, seed: int, chunks: int) -> tuple[int, list[np.ndarray] | None]:
    """Hit tokens, and the layers when every layer arrived intact."""
    handle = eng.retrieve(tokens_for(seed, chunks, eng.layout))
    hit = handle.hit_tokens
    ok = all(handle.wait(layer) for layer in range(eng.layout.num_layers))
    return hit, (handle.sink.layers if ok and hit else None)


def expected_prefix(seed: int, chunks: int, hit_tokens: int, layout: KVLayout = LAYOUT) -> list[np.ndarray]:
    return [layer[:, :hit_tokens] for layer in kv_for(seed, chunks, layout)]


def _main(argv: list[str]) -> None:
    cmd, socket = argv[0], argv[1]
    if cmd == "store":  # store SOCKET SEED CHUNKS
        with engine(socket) as eng:
            print(json.dumps({"stored": store(eng, int(argv[2]), int(argv[3]))}), flush=True)
    elif cmd == "retrieve":  # retrieve SOCKET SEED CHUNKS OUT.npz
        with engine(socket) as eng:
            hit, layers = retrieve(eng, int(argv[2]), int(argv[3]))
            np.savez(argv[4], *(layers or []))
            print(json.dumps({"hit": hit, "lookup": eng.lookup(tokens_for(int(argv[2]), int(argv[3])))}), flush=True)
    elif cmd == "hammer":  # hammer SOCKET FIRST_SEED ROUNDS: big stores, one line per finished round
        with engine(socket, BIG) as eng:
            for i in range(int(argv[3])):
                n = store(eng, int(argv[2]) + i, 16)
                print(json.dumps({"round": i, "stored": n}), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
