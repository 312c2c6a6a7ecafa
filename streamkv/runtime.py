"""An anyio event loop on its own thread, for engines that call from their own threads.

The engine-facing API is synchronous; it hands work to this loop. One task
group lives for the runtime's whole life so background writes can be
spawned from anywhere and are finished, not dropped, when it closes."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Awaitable, Callable, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal

T = TypeVar("T")


class Runtime:
    """Owns the loop thread, its blocking portal and a long-lived background task group."""

    def __init__(self, name: str = "streamkv") -> None:
        self._cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(name=f"{name}-loop")
        self.portal = self._cm.__enter__()
        self._stop: anyio.Event | None = None
        self._group_future, self.background = self.portal.start_task(self._hold_group)
        self._closed = False
        self._lock = threading.Lock()

    async def _hold_group(self, *, task_status: TaskStatus[TaskGroup]) -> None:
        self._stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            task_status.started(tg)
            await self._stop.wait()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a coroutine function on the loop and wait for its result."""
        return self.portal.call(fn, *args)

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> Future[T]:
        """Start a coroutine function on the loop; returns at once with a future."""
        return self.portal.start_task_soon(fn, *args)

    def close(self) -> None:
        """Let background work finish, then stop the loop thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        assert self._stop is not None
        self.portal.call(self._stop.set)
        self._group_future.result()
        self._cm.__exit__(None, None, None)
