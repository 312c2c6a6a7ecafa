"""A circuit breaker for a remote tier.

A remote tier that is down must not turn every cache lookup into a wait for
timeouts: after ``failure_threshold`` consecutive failed operations the
circuit is *open* and callers skip the tier (reads are misses, writes are
dropped) for ``cooldown_s``. Then it is *half-open*: exactly one caller is
let through as a probe; its success closes the circuit, its failure opens it
for another cool-down. The breaker holds no lock: it is used from one event
loop, and every method runs without awaiting."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import structlog

log = structlog.get_logger(__name__)


class CircuitState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Consecutive-failure breaker with a cool-down and a single half-open probe."""

    failure_threshold: int = 5
    cooldown_s: float = 30.0
    name: str = "circuit"
    clock: Callable[[], float] = time.monotonic
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opens: int = 0
    _opened_at: float = field(default=0.0, repr=False)
    _probe_out: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold={self.failure_threshold}: must be >= 1")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s={self.cooldown_s}: must be >= 0")

    def allow(self) -> bool:
        """May a request go out now? In half-open state only one probe may."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self.clock() - self._opened_at < self.cooldown_s:
                return False
            self.state = CircuitState.HALF_OPEN
            self._probe_out = False
            log.info("circuit half-open", circuit=self.name)
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    @property
    def probing(self) -> bool:
        """True while the one half-open probe is out (it should not retry much)."""
        return self.state is CircuitState.HALF_OPEN

    def record_success(self) -> None:
        if self.state is not CircuitState.CLOSED:
            log.info("circuit closed", circuit=self.name)
        self.state = CircuitState.CLOSED
        self.failures = 0
        self._probe_out = False

    def record_failure(self) -> None:
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or (
            self.state is CircuitState.CLOSED and self.failures >= self.failure_threshold
        ):
            self._open()

    def release(self) -> None:
        """A permitted request ended without a verdict (cancelled): free the probe slot."""
        self._probe_out = False

    def _open(self) -> None:
        self.state = CircuitState.OPEN
        self._opened_at = self.clock()
        self._probe_out = False
        self.opens += 1
        log.warning("circuit open", circuit=self.name, failures=self.failures, cooldown_s=self.cooldown_s)
