"""``StreamKVConnector``: streamkv behind vLLM's ``KVConnectorBase_V1``.

Why a thin class: vLLM constructs the connector once per role (scheduler process,
each worker process) and calls both halves' methods on the same class. This class
only derives the shared settings and forwards each call to the half for its role
(``scheduler.SchedulerSide`` or ``worker.WorkerSide``). No method lets an exception
from streamkv reach vLLM at run time: a failure is a miss, logged and counted.

Loaded with::

    --kv-transfer-config '{"kv_connector": "StreamKVConnector",
        "kv_connector_module_path": "streamkv.adapters.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"load_mode": "layerwise", "disk_dir": "/nvme/kv"}}'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from streamkv.engine import StreamKVEngine

from streamkv.adapters.vllm.metadata import StreamKVConnectorMetadata
from streamkv.adapters.vllm.paged_layout import packing_for_backend
from streamkv.adapters.vllm.scheduler import SchedulerSide
from streamkv.adapters.vllm.settings import (
    ConnectorSettings,
    attention_group,
    build_layout,
    build_namespaces,
    kv_format,
    model_fingerprint,
    tp_rank,
)
from streamkv.adapters.vllm.stats import StreamKVConnectorStats, StreamKVPromMetrics, record_hit
from streamkv.adapters.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = structlog.get_logger(__name__)


class StreamKVConnector(KVConnectorBase_V1):
    """Prefix KV reuse across requests, restarts and replicas through streamkv's tiers."""

    _cache_hit_source = CacheHitSource.DISK

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.settings = ConnectorSettings.from_extra_config(extra)
        self.geometry = attention_group(kv_cache_config)
        self.layout = build_layout(self.geometry, self.settings.config.chunk_size)
        self.fingerprint = model_fingerprint(vllm_config, self.settings.model_fingerprint)
        self.backend, self.format_tag = kv_format(vllm_config, self.geometry, self.settings)
        self.namespaces = build_namespaces(vllm_config, self.layout, self.fingerprint, self.format_tag)
        if tuple(self.settings.config.tiers or ()) == ("memory",):
            self._cache_hit_source = CacheHitSource.HOST
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = SchedulerSide(self.settings.config, self.layout, self.namespaces,
                                                self.geometry.block_size, self.settings.layerwise)
        else:
            rank = tp_rank()
            config = self.settings.config
            # The store's promote-on-hit would copy whole objects up while their sections are
            # still loading; the worker promotes once each load is over instead.
            engine = StreamKVEngine(config.replace(promote_on_hit=False), self.layout, self.namespaces[rank])
            packing = packing_for_backend(self.backend, mla=self.layout.mla)
            self.worker_side = WorkerSide(engine, self.geometry.layer_names, packing,
                                          self.geometry.block_size, rank, kv_cache_config.num_blocks,
                                          promote_after_load=config.promote_on_hit)
        log.info("StreamKVConnector ready", role=role.name, mode=self.settings.load_mode,
                 layout=self.layout.describe(), tiers=self.settings.config.tiers, model=self.fingerprint)

    # -- class-level answers to vLLM ----------------------------------------------------
    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return ConnectorSettings.from_extra_config(extra_config).layerwise

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        return None  # any layout: pages are read through their strides

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> StreamKVConnectorStats | None:
        return StreamKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]],
                           ) -> KVConnectorPromMetrics | None:
        return StreamKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- scheduler side -------------------------------------------------------------------
    def _sched(self) -> SchedulerSide:
        assert self.scheduler_side is not None, "scheduler-side method called on a worker connector"
        return self.scheduler_side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            tokens, is_async = self._sched().get_num_new_matched_tokens(request, num_computed_tokens)
        except Exception as exc:
            log.error("lookup failed; miss", req_id=request.request_id, error=repr(exc))
            return 0, False
        record_hit(tokens)
        return tokens, is_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._sched().update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, block_ids)

    # -- worker side ----------------------------------------------------------------------
    def _work(self) -> WorkerSide:
        assert self.worker_side is not None, "worker-side method called on a scheduler connector"
        return self.worker_side

    def _meta(self) -> StreamKVConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StreamKVConnectorMetadata)
        return meta

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        ctx = self._vllm_config.compilation_config.static_forward_context
        layer = ctx.get(self.geometry.layer_names[0]) if ctx else None
        backend = getattr(layer, "attn_backend", None)
        actual = str(backend.get_name()) if backend is not None else None
        if actual is not None and packing_for_backend(actual, mla=self.layout.mla) != self._work().packing:
            raise ValueError(f"attention backend {actual} stores KV unlike {self.backend}; "
                             "set kv_connector_extra_config.attn_backend")
        self._work().register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if isinstance(kv_connector_metadata, StreamKVConnectorMetadata):
            self._work().handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        try:
            self._work().start_load_kv(self._meta())
        except Exception as exc:
            log.error("start_load_kv failed; loads become misses", error=repr(exc))
            for spec in self._meta().loads:
                self._work()._fail_whole(spec, repr(exc))

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._work().wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        if self.settings.layerwise:
            self._work().save_kv_layer(layer_name, self._meta())

    def wait_for_save(self) -> None:
        work = self._work()
        if not self.settings.layerwise and self.has_connector_metadata():
            for name in work.layer_names:  # whole-request mode copies every layer at step end
                work.save_kv_layer(name, self._meta())
        work.finish_sync_loads()
        work.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._work().get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._work().build_worker_meta()

    def get_kv_connector_stats(self) -> StreamKVConnectorStats | None:
        if self.worker_side is not None:
            return self.worker_side.stats.take()
        side = self._sched()
        data = {"lookups": side.stats["lookups"], "hit_tokens": side.stats["lookup_hit_tokens"]}
        side.stats["lookups"] = side.stats["lookup_hit_tokens"] = 0
        stats = StreamKVConnectorStats(data=data)
        return None if stats.is_empty() else stats

    def shutdown(self) -> None:
        try:
            if self.worker_side is not None:
                self.worker_side.shutdown()
            if self.scheduler_side is not None:
                self.scheduler_side.close()
        except Exception as exc:
            log.warning("shutdown not clean", error=repr(exc))
