"""Configuration errors name the field and the value; both halves derive the same keys."""

from __future__ import annotations

import pytest
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from tests.vllm.vllm_helpers import make_kv_cache_config, make_vllm_config
from streamkv.adapters.vllm.settings import ConnectorSettings
from streamkv.errors import ConfigError


def test_load_mode_and_aliases():
    assert ConnectorSettings.from_extra_config({}).load_mode == "layerwise"
    assert ConnectorSettings.from_extra_config({"load_mode": "whole_request"}).load_mode == "async"
    with pytest.raises(ConfigError, match="load_mode"):
        ConnectorSettings.from_extra_config({"load_mode": "sometimes"})


def test_unknown_setting_is_named():
    with pytest.raises(ConfigError, match="shared_storage_path"):
        ConnectorSettings.from_extra_config({"shared_storage_path": "/tmp"})


def test_chunk_size_must_be_a_multiple_of_the_block_size(model_dir, store_extra):
    cfg = make_vllm_config(model_dir, dict(store_extra, chunk_size=48))
    with pytest.raises(ConfigError, match="chunk_size"):
        KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, make_kv_cache_config(16, 32))


def test_both_roles_agree_on_layout_and_namespace(model_dir, store_extra):
    cfg = make_vllm_config(model_dir, store_extra)
    kvc = make_kv_cache_config(16, 32)
    sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kvc)
    work = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kvc)
    try:
        assert sched.layout == work.layout
        assert [ns.id for ns in sched.namespaces] == [ns.id for ns in work.namespaces]
        assert "cpu_attn" in sched.format_tag  # CPU pages never share a namespace with GPU ones
    finally:
        sched.shutdown()
        work.shutdown()
