"""Build the configured tiers, fastest first."""

from __future__ import annotations

from streamkv.config import StreamKVConfig
from streamkv.store.base import Store
from streamkv.store.disk import DiskStore
from streamkv.store.limits import Limits
from streamkv.store.memory import MemoryStore


def build_tiers(config: StreamKVConfig, limits: Limits) -> list[Store]:
    tiers: list[Store] = []
    for name in config.tiers or ():
        if name == "memory":
            tiers.append(MemoryStore(config.memory_bytes))
        elif name == "disk":
            tiers.append(DiskStore(config.disk_dir, config.disk_bytes, fsync=config.disk_fsync, limits=limits,
                                   mmap_reads=config.disk_mmap_reads,
                                   direct_reads=config.disk_direct_reads,
                                   direct_writes=config.disk_direct_writes))
        elif name == "s3":
            from streamkv.store.s3 import S3Store  # needs the s3 extra

            tiers.append(S3Store.from_config(config, limits))
    return tiers
