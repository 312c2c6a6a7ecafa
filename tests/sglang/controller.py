"""SGLang's own page-transfer loops, run against a backend without a GPU.

``HiCacheController`` needs CUDA streams to be constructed, but its four
storage page functions only touch ``storage_backend``, ``storage_host_pool``
and ``page_size``. Calling them unbound on a small stand-in object runs
SGLang's real code for how it hands pages to a backend and how it counts a
prefetch's hits (stop at the first miss), for both the generic and the
``interface_v1`` (zero-copy) paths."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from sglang.srt.managers.cache_controller import HiCacheController


def _controller(backend: Any, pool: Any) -> SimpleNamespace:
    return SimpleNamespace(storage_backend=backend, storage_host_pool=pool, mem_pool_host=pool,
                           page_size=pool.page_size)


def backup(backend: Any, pool: Any, keys: list[str], host_indices: torch.Tensor, zero_copy: bool) -> bool:
    """What SGLang's backup thread does for one batch: True when the batch was stored."""
    fn = HiCacheController._page_set_zero_copy if zero_copy else HiCacheController._generic_page_set
    return bool(fn(_controller(backend, pool), keys, host_indices, None))


def prefetch(backend: Any, pool: Any, keys: list[str], host_indices: torch.Tensor, zero_copy: bool) -> int:
    """What SGLang's prefetch thread does for one batch: the number of leading pages loaded."""
    operation = SimpleNamespace(request_id="test", is_terminated=lambda: False)
    fn = HiCacheController._page_get_zero_copy if zero_copy else HiCacheController._generic_page_get
    return int(fn(_controller(backend, pool), operation, keys, host_indices, None))
