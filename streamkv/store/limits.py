"""Named concurrency limits shared by every store of one runtime.

Disk I/O, S3 requests and encode/copy work each get one ``CapacityLimiter``
so that limits are set in one place, not scattered through calls."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from streamkv.errors import ConfigError


@dataclass
class Limits:
    disk_io: int = 16
    s3_requests: int = 32
    codec: int = 4
    _made: dict[str, anyio.CapacityLimiter] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("disk_io", "s3_requests", "codec"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(name, value, "must be a positive integer")

    def limiter(self, name: str) -> anyio.CapacityLimiter:
        """The one limiter for ``name`` (``disk_io``, ``s3_requests``, ``codec``)."""
        if name not in self._made:
            self._made[name] = anyio.CapacityLimiter(getattr(self, name))
        return self._made[name]
