"""``streamkv serve`` as a real subprocess: cross-process hits, crashes on both
sides, restart, an unreachable or hung daemon, authentication, hostile
frames, graceful shutdown, and every control call through the CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import anyio
import msgpack
import numpy as np
import pytest

from streamkv.client import DaemonClient, DaemonRefused, DaemonStore
from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.format import decode_chunk
from streamkv.keys import Namespace
from streamkv.server.protocol import MAX_FRAME
from tests.daemon_helpers import (BIG, LAYOUT, MODEL, ROOT, DaemonProcess, cli_json, engine, expected_prefix, kv_for,
                                  retrieve, run_cli, short_tmp, store, tokens_for)

pytestmark = pytest.mark.timeout(180)
NS_ID = Namespace(MODEL, LAYOUT).id


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess(short_tmp()).start()
    yield d
    d.stop()
    shutil.rmtree(d.root, ignore_errors=True)


@pytest.fixture
def fresh_root() -> Iterator[Path]:
    root = short_tmp()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def helper(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.daemon_helpers", *args]


def until(fn: Any, timeout: float = 20.0) -> Any:
    """Poll ``fn`` until it returns something truthy (reconnects take a back-off or two)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def verify_every_object(sock: str) -> int:
    """Every object the daemon lists decodes with valid checksums; returns how many."""
    async def go() -> int:
        store_ = DaemonStore(sock)
        keys = await store_.list_keys()
        for key in keys:
            data = await store_.get(key)
            assert data is not None, key
            decode_chunk(data)  # raises on any torn or corrupt object
        await store_.aclose()
        return len(keys)
    return anyio.run(go)


def test_store_in_one_process_hit_in_another(daemon: DaemonProcess, tmp_path: Path) -> None:
    out = subprocess.run(helper("store", daemon.socket, "11", "6"), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert json.loads(out.stdout.splitlines()[-1]) == {"stored": 6}, out.stderr
    npz = tmp_path / "got.npz"
    out = subprocess.run(helper("retrieve", daemon.socket, "11", "6", str(npz)), cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result == {"hit": 96, "lookup": 96}, out.stderr
    got = np.load(npz)
    for layer, want in enumerate(expected_prefix(11, 6, 96)):
        assert np.array_equal(got[f"arr_{layer}"], want)


def test_client_sigkill_mid_store_leaves_nothing_half_stored(daemon: DaemonProcess) -> None:
    proc = subprocess.Popen(helper("hammer", daemon.socket, "500", "400"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    done = [json.loads(proc.stdout.readline()) for _ in range(2)]  # type: ignore[union-attr]
    time.sleep(random.Random(1).uniform(0.0, 0.05))
    proc.kill()
    proc.wait(30)
    assert all(d["stored"] == 16 for d in done)
    assert verify_every_object(daemon.socket) >= 32
    with engine(daemon.socket, BIG) as eng:  # complete requests hit, byte for byte
        hit, layers = retrieve(eng, 500, 16)
        assert hit == 16 * BIG.chunk_size and layers is not None
        assert all(np.array_equal(a, b) for a, b in zip(layers, expected_prefix(500, 16, hit, BIG)))
    with engine(daemon.socket) as eng:  # and the daemon serves everyone else
        assert store(eng, 12, 2) == 2
        assert eng.lookup(tokens_for(12, 2)) == 32


def test_daemon_sigkill_then_restart(fresh_root: Path) -> None:
    d = DaemonProcess(fresh_root).start()
    eng = engine(d.socket, timeout_s=2.0)
    try:
        assert store(eng, 21, 4) == 4
        with d.client() as c:
            c.flush()  # the write-through copies are on disk
        hammer = subprocess.Popen(helper("hammer", d.socket, "900", "400"), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        hammer.stdout.readline()  # type: ignore[union-attr]
        d.stop(signal.SIGKILL)
        hammer.kill()
        hammer.wait(30)
        ns_dir = next(p for p in Path(d.disk).iterdir() if p.is_dir())
        torn = ns_dir / f".tmp.{'ab' * 16}.deadbeef"  # what a crash mid-write leaves
        torn.write_bytes(b"SKVC" + b"\0" * 100)
        assert eng.lookup(tokens_for(21, 4)) == 0  # down: a miss, not an error

        d.start()
        assert until(lambda: eng.lookup(tokens_for(21, 4)) == 64)  # same engine, reconnected
        hit, layers = retrieve(eng, 21, 4)
        assert hit == 64 and layers is not None
        assert all(np.array_equal(a, b) for a, b in zip(layers, expected_prefix(21, 4, 64)))
        assert not torn.exists()
        assert not [p for p in Path(d.disk).rglob(".tmp.*")]
        verify_every_object(d.socket)  # whatever survived the crash is whole
        assert eng.store.tiers[0].client_counters["reconnects"] >= 1
    finally:
        eng.close()
        d.stop()


def test_daemon_down_or_hung_calls_are_misses(daemon: DaemonProcess, fresh_root: Path) -> None:
    with engine(str(fresh_root / "nobody.sock"), timeout_s=0.5) as eng:
        assert eng.lookup(tokens_for(31, 2)) == 0
        assert retrieve(eng, 31, 2) == (0, None)
        assert store(eng, 31, 2) == 0
        assert eng.store.tiers[0].client_counters["error_misses"] >= 2
    with engine(daemon.socket, timeout_s=0.5) as eng:
        assert store(eng, 32, 2) == 2
        daemon.send(signal.SIGSTOP)  # hung, not dead: requests time out into misses
        try:
            assert eng.lookup(tokens_for(32, 2)) == 0
            assert retrieve(eng, 32, 2)[0] == 0
        finally:
            daemon.send(signal.SIGCONT)
        assert until(lambda: eng.lookup(tokens_for(32, 2)) == 32)


def test_tcp_token_socket_permissions_and_metrics(fresh_root: Path) -> None:
    refused = run_cli("serve", "--socket", str(fresh_root / "x.sock"), "--disk-dir", str(fresh_root / "x"),
                      "--tcp", "0")
    assert refused.returncode == 2 and "token" in refused.stderr
    d = DaemonProcess(fresh_root, "--tcp", "127.0.0.1:0", "--token", "s3cret", "--metrics-port", "0").start()
    try:
        with d.client() as c:
            health = c.health()
        tcp = health["tcp"]
        with urllib.request.urlopen(f"http://127.0.0.1:{health['metrics_port']}/metrics", timeout=10) as r:
            assert b'streamkv_tier_objects{tier="memory"}' in r.read()
        for token in ("wrong", None):
            with DaemonClient(tcp=tcp, token=token) as c:
                with pytest.raises(DaemonRefused):
                    c.ping()
        with DaemonClient(tcp=tcp, token="s3cret") as c:
            c.ping()
            assert c.stats()["counters"]["auth_failures"] >= 2
        cfg = StreamKVConfig(chunk_size=LAYOUT.chunk_size, mode="daemon", tcp=tcp, token="s3cret")
        tcp_store = DaemonStore(tcp=tcp, token="s3cret")
        with StreamKVEngine(cfg, LAYOUT, Namespace(MODEL, LAYOUT), tiers=[tcp_store]) as eng:
            assert store(eng, 35, 2) == 2
            hit, layers = retrieve(eng, 35, 2)
            assert hit == 32 and layers is not None
            assert all(np.array_equal(a, b) for a, b in zip(layers, expected_prefix(35, 2, 32)))
            hit, _ = retrieve(eng, 35, 2)  # lent objects are read locally for a moment
            assert hit == 32
        with DaemonClient(tcp=tcp, token="s3cret") as c:
            stats = c.stats()
        # the memory tier's objects went out by reference, and every lease came back on close
        assert stats["counters"]["bytes_out_by_reference"] > 0 and stats["counters"]["bytes_out"] == 0
        assert stats["leases"]["granted"] >= 2 and stats["leases"]["live"] == 0

        os.chmod(d.socket, 0o666)  # others could connect: the client will not trust it
        with pytest.raises(DaemonRefused):
            with d.client() as c:
                c.ping()
        with engine(d.socket) as eng:
            assert store(eng, 33, 1) == 0 and eng.lookup(tokens_for(33, 1)) == 0
        os.chmod(d.socket, 0o600)
        if os.getuid() == 0:  # a socket of another user
            os.chown(d.socket, 65534, 65534)
            with pytest.raises(DaemonRefused):
                with d.client() as c:
                    c.ping()
            os.chown(d.socket, 0, 0)
        with d.client() as c:
            c.ping()
    finally:
        d.stop()


def _hostile(i: int, rng: random.Random) -> tuple[bytes, bool]:
    """A malformed message and whether the test must half-close for the daemon to see its end."""
    kind = i % 6
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 300)), True
    if kind == 1:
        body = rng.randbytes(rng.randrange(1, 300))
        return struct.pack(">I", len(body)) + body, False
    if kind == 2:
        return struct.pack(">I", rng.randrange(MAX_FRAME + 1, 1 << 32)) + rng.randbytes(64), False
    if kind == 3:
        body = msgpack.packb([1, 2, 3]) if rng.random() < 0.5 else msgpack.packb({"op": "get", "items": []})
        return struct.pack(">I", len(body)) + body, False
    hello = msgpack.packb({"op": "hello", "version": 1, "id": 1})
    bad = msgpack.packb({"op": "get", "id": 2, "items": [[1, 2, 3]]}) if kind == 4 else rng.randbytes(40)
    return b"".join(struct.pack(">I", len(m)) + m for m in (hello, bad)), kind == 5


def test_malformed_and_oversized_frames_drop_only_that_connection(daemon: DaemonProcess) -> None:
    rng = random.Random(6)
    with daemon.client() as c:
        before = c.stats()["counters"]["protocol_errors"]
    for i in range(300):
        payload, half_close = _hostile(i, rng)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(daemon.socket)
            try:
                s.sendall(payload)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
                while s.recv(65536):  # the daemon closes its end
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
    with daemon.client() as c:
        c.ping()
        errors = c.stats()["counters"]["protocol_errors"] - before
    assert errors >= 250  # some random prefixes are valid-looking frames cut short: also errors
    assert "malformed frame; connection dropped" in daemon.log()
    with engine(daemon.socket) as eng:
        assert store(eng, 34, 2) == 2 and retrieve(eng, 34, 2)[0] == 32


def test_every_control_call_through_the_cli(daemon: DaemonProcess) -> None:
    with engine(daemon.socket, compression="off") as eng:
        assert store(eng, 41, 3, compressible=True) == 3
    sock = ["--socket", daemon.socket]
    sel = [*sock, "--tokens", ",".join(map(str, tokens_for(41, 3))), "--model", MODEL,
           "--layout", LAYOUT.describe()]
    looked = cli_json("lookup", *sel)
    assert looked["hit_chunks"] == 3 and all("memory" in t for t in looked["tiers"])
    assert cli_json("pin", *sel)["pinned"] == 3
    assert cli_json("move", *sel, "--to", "disk")["moved"] == 3
    assert all(t == ["memory", "disk"] for t in cli_json("lookup", *sel)["tiers"])  # pinned: stays
    assert cli_json("unpin", *sel)["unpinned"] == 3
    assert cli_json("move", *sel, "--to", "disk")["moved"] == 3
    assert all(t == ["disk"] for t in cli_json("lookup", *sel)["tiers"])
    assert cli_json("move", *sel, "--to", "memory")["moved"] == 3
    assert all(t == ["memory", "disk"] for t in cli_json("lookup", *sel)["tiers"])
    packed = cli_json("compress", *sock, "--namespace", NS_ID)
    assert packed["recompressed"] >= 6 and packed["bytes_after"] < packed["bytes_before"]
    with engine(daemon.socket) as eng:  # recompressed objects still give the same bytes
        hit, layers = retrieve(eng, 41, 3)
        assert hit == 48 and layers is not None
        want = [layer[:, :48] for layer in kv_for(41, 3, compressible=True)]
        assert all(np.array_equal(a, b) for a, b in zip(layers, want))
    health = cli_json("health", *sock)
    assert health["ok"] and [t["tier"] for t in health["tiers"]] == ["memory", "disk"]
    stats = cli_json("stats", *sock)
    assert stats["store"]["hits"] > 0 and stats["counters"]["bytes_in"] > 0
    assert [t["tier"] for t in stats["store"]["tiers"]] == ["memory", "disk"]
    status = run_cli("status", *sock)
    assert status.returncode == 0 and "health: ok" in status.stdout and "memory" in status.stdout
    assert run_cli("clear", *sock).returncode == 2  # says what to clear, never wipes by default
    assert cli_json("clear", *sock, "--namespace", NS_ID)["deleted"] >= 3
    assert cli_json("lookup", *sel)["hit_chunks"] == 0
    cli_json("clear", *sock, "--all")
    with daemon.client() as c:
        assert c.list_keys() == []


def test_sigterm_flushes_write_back_and_removes_the_socket(fresh_root: Path) -> None:
    d = DaemonProcess(fresh_root, "--write-policy", "write_back").start()
    second = DaemonProcess(fresh_root).start(wait=False)  # the socket is taken: it refuses to start
    assert second.proc is not None and second.proc.wait(60) != 0
    with engine(d.socket) as eng:
        assert store(eng, 51, 3) == 3
    with d.client() as c:
        assert all(t == ["memory"] for t in c.lookup(c.list_keys())["tiers"])
    assert d.stop(signal.SIGTERM) == 0
    assert not os.path.exists(d.socket)
    assert "write-back data flushed to lower tiers" in d.log()
    d.start()
    try:
        with engine(d.socket) as eng:
            hit, layers = retrieve(eng, 51, 3)
            assert hit == 48 and layers is not None
            assert all(np.array_equal(a, b) for a, b in zip(layers, expected_prefix(51, 3, 48)))
    finally:
        d.stop()


def test_puts_go_into_the_memory_tier_by_reference(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        before = c.stats()["counters"]
    with engine(daemon.socket) as eng:
        assert store(eng, 61, 3) == 3
        eng.flush()
        hit, layers = retrieve(eng, 61, 3)
        assert hit == 48 and layers is not None
        assert all(np.array_equal(a, b) for a, b in zip(layers, expected_prefix(61, 3, 48)))
    with daemon.client() as c:
        after = c.stats()["counters"]
    grew = after.get("bytes_in_by_reference", 0) - before.get("bytes_in_by_reference", 0)
    assert grew >= 3 * LAYOUT.chunk_bytes  # the encoded objects, written once, into the tier
    assert after["bytes_in"] - before["bytes_in"] == grew  # nothing went through staging
    assert verify_every_object(daemon.socket) > 0


def test_alloc_and_commit_protocol_refuses_what_was_not_allocated(daemon: DaemonProcess) -> None:
    from streamkv.client.connection import Connection, Endpoint
    from streamkv.server.shm import ShmAttachments

    async def go() -> None:
        attachments = ShmAttachments()
        conn = await Connection.open(Endpoint(socket=daemon.socket), attachments)
        try:
            assert conn.put_by_reference
            regions = await conn.call("alloc", sizes=[100, 5000, 7])
            assert [r[2] for r in regions] == [100, 5000, 7]
            conn.write_regions(regions[:2], [memoryview(b"a" * 100), memoryview(b"b" * 5000)])
            key_a, key_b, key_c = (f"{NS_ID}/byref{i}" for i in range(3))
            flags = await conn.call("commit", items=[[key_a, *regions[0][:2]], [key_b, *regions[1][:2]],
                                                     [key_c, regions[2][0], regions[2][1] + 4096]],
                                    discard=[regions[2][:2]])
            assert flags == [True, True, False]  # the third region was never allocated there
            # a region is committed once: again is refused, and so is one given back
            assert await conn.call("commit", items=[[key_c, *regions[0][:2]], [key_c, *regions[2][:2]]]) == [False, False]
            got = await conn.call("exists", keys=[key_a, key_b, key_c])
            assert got == [True, True, False]
        finally:
            await conn.aclose()
            attachments.close()
        store_ = DaemonStore(daemon.socket)
        assert bytes(await store_.get(key_a)) == b"a" * 100 and bytes(await store_.get(key_b)) == b"b" * 5000
        await store_.delete_many([key_a, key_b])
        await store_.aclose()
    anyio.run(go)


def test_puts_through_staging_when_the_daemon_has_no_memory_tier(fresh_root: Path) -> None:
    d = DaemonProcess(fresh_root, "--tiers", "disk").start()
    try:
        with engine(d.socket) as eng:
            assert store(eng, 62, 2) == 2
            eng.flush()
            hit, layers = retrieve(eng, 62, 2)
            assert hit == 32 and layers is not None
        with d.client() as c:
            counters = c.stats()["counters"]
        assert counters["bytes_in"] >= 2 * LAYOUT.chunk_bytes and counters.get("bytes_in_by_reference", 0) == 0
    finally:
        d.stop()
