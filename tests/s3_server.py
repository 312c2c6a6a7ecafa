"""A real S3 API for tests: moto's threaded server on 127.0.0.1, and pytest fixtures.

``tests/conftest.py`` re-exports ``s3_server`` (one server per session) and
``s3_bucket`` (a fresh, empty bucket per test, with a ``store()`` factory).
Tests that stop the server use their own ``MotoS3`` so the shared one stays up.
moto keeps its buckets in process memory, so a server restarted on the same
port serves the same objects, as a real S3 endpoint coming back would."""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"


class MotoS3:
    """A moto S3 server that can be stopped and started again on the same port."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server: Any = None

    def start(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server._server.server_port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        """A boto3 client, for what the store under test must not do itself (setup, corruption)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"skv-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        for up in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        client.delete_bucket(Bucket=name)

    def store_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``S3Store``: endpoint, region, credentials, short test timeouts."""
        kwargs: dict[str, Any] = dict(
            endpoint=self.endpoint, region=REGION, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
            timeout_s=5.0, connect_timeout_s=1.0, retries=1, backoff_s=0.01, backoff_max_s=0.05,
            check_timeout_s=5.0,
        )
        kwargs.update(overrides)
        return kwargs

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FaultyProxy:
    """A TCP proxy in front of the S3 server that can fail the way networks and servers do.

    ``fail_next(n)``: the next ``n`` connections get ``503 Slow Down`` and are closed.
    ``cut_after(n)``: from now on every connection is closed after ``n`` more bytes of
    response (a server dying mid-transfer); ``heal()`` ends both."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._fail = 0
        self._cut: int | None = None
        self._cut_epoch = 0
        self.failed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._fail = n

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._cut, self._cut_epoch = nbytes, self._cut_epoch + 1

    def heal(self) -> None:
        with self._lock:
            self._fail, self._cut = 0, None

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            refuse = self._fail > 0
            self._fail -= refuse
        if refuse:
            self._refuse(client)
            return
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        self._pump(upstream, client, True)

    def _refuse(self, client: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
        client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        client.close()
        self.failed += 1

    def _pump(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        sent, epoch = 0, -1
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if response:
                    with self._lock:
                        cut, cut_epoch = self._cut, self._cut_epoch
                    if cut is not None:
                        if epoch != cut_epoch:
                            sent, epoch = 0, cut_epoch
                        if sent + len(data) > cut:
                            dst.sendall(data[: max(0, cut - sent)])
                            break
                    sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


@dataclass
class S3Bucket:
    """One empty bucket on a running server; ``store()`` opens an ``S3Store`` on it."""

    server: MotoS3
    name: str
    prefix: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:8]}")

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}"

    def store(self, **overrides: Any) -> Any:
        from streamkv.store.s3 import S3Store

        prefix = overrides.pop("prefix", self.prefix)
        return S3Store(self.name, prefix, **self.server.store_kwargs(**overrides))

    def object_keys(self) -> list[str]:
        """Every object name in the bucket, as S3 itself lists them."""
        client = self.server.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    """One moto S3 server for the session (127.0.0.1, a free port)."""
    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoS3) -> Iterator[S3Bucket]:
    """A fresh bucket per test, emptied and removed afterwards."""
    bucket = S3Bucket(s3_server, s3_server.create_bucket())
    try:
        yield bucket
    finally:
        if s3_server.running:
            s3_server.drop_bucket(bucket.name)
