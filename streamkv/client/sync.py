"""``DaemonClient``: a synchronous client for tools, the CLI and benchmarks.

It runs a ``DaemonStore`` on a loop thread of its own; control calls raise
``DaemonUnavailable`` or ``DaemonError`` rather than turning into misses,
because a person or a script asked for an answer."""

from __future__ import annotations

from typing import Any, Sequence

from streamkv.client.store import DaemonStore
from streamkv.runtime import Runtime


class DaemonClient:
    def __init__(self, socket: str | None = None, *, tcp: str | None = None, token: str | None = None,
                 timeout_s: float = 10.0) -> None:
        self.store = DaemonStore(socket, tcp=tcp, token=token, timeout_s=timeout_s, retry_s=0.0,
                                 control_timeout_s=max(timeout_s, 120.0))
        self.runtime = Runtime("streamkv-client")

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> DaemonClient:
        store = DaemonStore.from_config(config)
        ep = store.endpoint
        return cls(ep.socket, tcp=ep.tcp, token=ep.token, **kwargs)

    def call(self, op: str, **args: Any) -> Any:
        return self.runtime.call(lambda: self.store.control(op, **args))

    def ping(self) -> None:
        self.call("ping")

    def lookup(self, keys: Sequence[str]) -> dict[str, Any]:
        return self.call("lookup", keys=list(keys))

    def pin(self, keys: Sequence[str]) -> int:
        return self.call("pin", keys=list(keys))

    def unpin(self, keys: Sequence[str]) -> int:
        return self.call("unpin", keys=list(keys))

    def clear(self, namespace: str | None = None, prefix: str | None = None) -> int:
        return self.call("clear", namespace=namespace, prefix=prefix)

    def move(self, keys: Sequence[str], tier: str) -> int:
        return self.call("move", keys=list(keys), tier=tier)

    def compress(self, namespace: str | None = None, keys: Sequence[str] | None = None) -> dict[str, int]:
        return self.call("compress", namespace=namespace, keys=None if keys is None else list(keys))

    def list_keys(self, namespace: str | None = None, prefix: str | None = None) -> list[str]:
        return self.call("list", namespace=namespace, prefix=prefix)

    def flush(self) -> None:
        self.call("flush")

    def health(self) -> dict[str, Any]:
        return self.call("health")

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def close(self) -> None:
        try:
            self.runtime.call(self.store.aclose)
        finally:
            self.runtime.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
