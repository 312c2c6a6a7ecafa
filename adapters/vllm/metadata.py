"""What the scheduler half tells the worker half each step, and what comes back.

Why separate: these objects cross a process boundary (scheduler → workers with
vLLM's msgspec/pickle serialization, workers → scheduler as worker metadata), so
they hold only plain data: request ids, chunk keys, token ranges and block ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class LoadSpec:
    """Load the KV of tokens ``[start, end)`` of a request from stored chunks.

    ``rank_keys[r][i]`` is tensor-parallel rank ``r``'s key of the chunk holding
    tokens ``(first_chunk + i) * chunk_size ..``; tokens before ``start`` inside the
    first chunk are already in vLLM's cache (a local prefix-cache hit) and are not
    written."""

    req_id: str
    rank_keys: list[list[str]]
    first_chunk: int
    start: int
    end: int
    block_ids: list[int]
    is_async: bool = False


@dataclass
class SaveSpec:
    """Store the full chunks ``first_chunk ..`` of a request, one key each.

    All tokens of these chunks are computed by the end of this step's forward,
    in the blocks ``block_ids`` (the request's block table from token 0)."""

    req_id: str
    rank_keys: list[list[str]]
    first_chunk: int
    block_ids: list[int]


@dataclass
class StreamKVConnectorMetadata(KVConnectorMetadata):
    """One step's plan: loads, saves and requests preempted before this step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def sync_loads(self) -> list[LoadSpec]:
        return [spec for spec in self.loads if not spec.is_async]

    @property
    def async_loads(self) -> list[LoadSpec]:
        return [spec for spec in self.loads if spec.is_async]


@dataclass
class StreamKVWorkerMetadata(KVConnectorWorkerMetadata):
    """Chunks the workers handed to the store this step, named by their rank-0 key.

    The scheduler half counts them as present for later lookups, so a prefix saved
    a moment ago hits even before the store's own index in the scheduler's process
    has seen it (the memory tier lives in the worker process). Rank-0 keys name a
    chunk independently of the reporting rank, so ranks' reports can be intersected."""

    saved_keys: set[str] = field(default_factory=set)
    failed_keys: set[str] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, StreamKVWorkerMetadata):
            return self
        # With tensor parallelism a chunk is present only when every rank saved its shard.
        return StreamKVWorkerMetadata(
            saved_keys=(self.saved_keys & other.saved_keys) - self.failed_keys - other.failed_keys,
            failed_keys=self.failed_keys | other.failed_keys,
        )
