"""Chunk object stores: one async interface, several tiers."""

from __future__ import annotations

from streamkv.store.base import Store, check_key
from streamkv.store.disk import DiskStore
from streamkv.store.limits import Limits
from streamkv.store.memory import MemoryStore
from streamkv.store.tiered import TieredStore

__all__ = ["DiskStore", "Limits", "MemoryStore", "Store", "TieredStore", "check_key"]
