"""The streamkv daemon: tiers in their own process, shared by engines on one host."""

from streamkv.server.daemon import Daemon, run_daemon
from streamkv.server.protocol import MAX_FRAME, PROTOCOL_VERSION

__all__ = ["Daemon", "run_daemon", "MAX_FRAME", "PROTOCOL_VERSION"]
