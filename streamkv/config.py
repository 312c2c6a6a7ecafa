"""One typed configuration, from a YAML file, ``STREAMKV_*`` variables and keywords.

Later sources win: defaults < YAML file < environment < keyword arguments.
Every bad value raises ``ConfigError`` naming the field and the value, at
construction, never mid-request."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from streamkv.errors import ConfigError

TIER_NAMES = ("memory", "disk", "s3")
GIB = 1 << 30


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamkv"


@dataclass(frozen=True)
class StreamKVConfig:
    """Every setting of streamkv; the README documents each field."""

    chunk_size: int = 256
    tiers: tuple[str, ...] | None = None  # None: memory, disk, and s3 when s3_url is set
    memory_gb: float = 2.0
    disk_dir: str = field(default_factory=lambda: str(default_cache_dir() / "disk"))
    disk_gb: float = 20.0
    disk_fsync: bool = False
    disk_mmap_reads: bool = True
    disk_direct_reads: bool = False
    disk_direct_writes: bool = True
    s3_url: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_timeout_s: float = 10.0
    s3_max_concurrency: int = 32
    s3_retries: int = 3
    s3_session_token: str | None = None
    s3_failure_threshold: int = 5
    s3_cooldown_s: float = 30.0
    s3_index_ttl_s: float = 2.0
    write_policy: str = "write_through"
    promote_on_hit: bool = True
    compression: str = "auto"
    max_inflight_layers: int = 3
    disk_io_threads: int = 16
    codec_threads: int = 4
    mode: str = "inprocess"
    socket: str = field(default_factory=lambda: str(default_cache_dir() / "streamkv.sock"))
    tcp: str | None = None
    token: str | None = None
    log_format: str = "console"
    log_level: str = "warning"
    telemetry_exporter: str = "none"
    telemetry_file: str | None = None
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "chunk_size", int)
        _positive(self, "memory_gb", float)
        _positive(self, "disk_gb", float)
        _positive(self, "s3_timeout_s", float)
        _positive(self, "s3_max_concurrency", int)
        _positive(self, "s3_failure_threshold", int)
        _positive(self, "s3_cooldown_s", float)
        _positive(self, "s3_index_ttl_s", float)
        _positive(self, "max_inflight_layers", int)
        _positive(self, "disk_io_threads", int)
        _positive(self, "codec_threads", int)
        if not isinstance(self.s3_retries, int) or self.s3_retries < 0:
            raise ConfigError("s3_retries", self.s3_retries, "must be an integer >= 0")
        _choice(self, "write_policy", ("write_through", "write_back"))
        _choice(self, "compression", ("auto", "lz4", "off"))
        _choice(self, "mode", ("inprocess", "daemon"))
        _choice(self, "log_format", ("console", "json"))
        _choice(self, "log_level", ("debug", "info", "warning", "error"))
        _choice(self, "telemetry_exporter", ("none", "console", "otlp", "file"))
        if self.telemetry_exporter == "file" and not self.telemetry_file:
            raise ConfigError("telemetry_file", self.telemetry_file, "required when telemetry_exporter is 'file'")
        tiers = self.tiers
        if tiers is None:
            tiers = ("memory", "disk") + (("s3",) if self.s3_url else ())
        if isinstance(tiers, str):
            tiers = tuple(t.strip() for t in tiers.split(",") if t.strip())
        tiers = tuple(tiers)
        bad = [t for t in tiers if t not in TIER_NAMES]
        if not tiers or bad or len(set(tiers)) != len(tiers):
            raise ConfigError("tiers", list(tiers), f"a non-empty, ordered subset of {TIER_NAMES}")
        if list(tiers) != sorted(tiers, key=TIER_NAMES.index):
            raise ConfigError("tiers", list(tiers), "must be ordered fastest first: memory, disk, s3")
        if "s3" in tiers and not self.s3_url:
            raise ConfigError("s3_url", self.s3_url, "required when the s3 tier is enabled")
        if self.s3_url is not None and not str(self.s3_url).startswith("s3://"):
            raise ConfigError("s3_url", self.s3_url, "expected s3://bucket[/prefix]")
        if self.metrics_port is not None and not (0 <= int(self.metrics_port) < 65536):
            raise ConfigError("metrics_port", self.metrics_port, "must be a TCP port number")
        object.__setattr__(self, "tiers", tiers)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GIB)

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_gb * GIB)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> StreamKVConfig:
        """Defaults, then the YAML file, then ``STREAMKV_*`` variables, then ``overrides``."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(_read_yaml(Path(path)))
        values.update(_from_env(os.environ if env is None else env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StreamKVConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(unknown[0], values[unknown[0]], f"unknown setting; known: {sorted(known)}")
        return cls(**{k: _coerce(known[k], v) for k, v in values.items()})

    def replace(self, **changes: Any) -> StreamKVConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for secret in ("s3_secret_access_key", "s3_session_token", "token"):
            if d.get(secret):
                d[secret] = "***"
        return d


def _positive(cfg: StreamKVConfig, name: str, kind: type) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok or value <= 0:
        raise ConfigError(name, value, "must be a positive " + ("integer" if kind is int else "number"))


def _choice(cfg: StreamKVConfig, name: str, options: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in options:
        raise ConfigError(name, value, f"one of {options}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError("config", str(path), f"cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("config", str(path), f"not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "the YAML file must hold a mapping")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    names = {f.name for f in fields(StreamKVConfig)}
    out: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith("STREAMKV_"):
            name = key[len("STREAMKV_"):].lower()
            if name in names:
                out[name] = value
    return out


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Strings from YAML/env into the field's type, with a clear error."""
    if not isinstance(value, str):
        return value
    kind = str(f.type)
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind.startswith("tuple"):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        if kind.startswith("int | None"):
            return int(value)
    except ValueError as exc:
        raise ConfigError(f.name, value, f"expected {kind}") from exc
    return value
