"""Clients of ``streamkv serve``.

``DaemonStore`` is a ``Store`` backed by the daemon: hand it to
``StreamKVEngine(config, layout, namespace, tiers=[DaemonStore.from_config(config)])``
and lookup, retrieve and store work unchanged. ``DaemonClient`` is the
synchronous control client the CLI uses."""

from streamkv.client.connection import DaemonError, DaemonRefused, DaemonUnavailable, Endpoint
from streamkv.client.store import DaemonStore
from streamkv.client.sync import DaemonClient

__all__ = ["DaemonClient", "DaemonError", "DaemonRefused", "DaemonStore", "DaemonUnavailable", "Endpoint"]
