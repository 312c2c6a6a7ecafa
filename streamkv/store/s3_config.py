"""Settings of the S3 tier: validation, the standard AWS environment, error kinds.

Kept apart from ``s3.py`` so that configuration mistakes are caught (and
named) before any request is made, and so that the classification of
obstore's errors into miss / retry / give-up lives in one place."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import urlparse

from streamkv.errors import ConfigError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[0-9A-Za-z_.=-]+$")
_STATUS = re.compile(r"status code: (\d{3})")
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")

ErrorKind = Literal["missing", "retry", "fatal"]


def check_bucket(bucket: str) -> str:
    if not isinstance(bucket, str) or not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError("bucket", bucket, "not an S3 bucket name (3-63 of a-z 0-9 . -)")
    return bucket


def check_prefix(prefix: str) -> str:
    """A prefix of '/'-separated segments; no '..', '.', or empty segments, so nothing lands outside it."""
    if not isinstance(prefix, str):
        raise ConfigError("prefix", prefix, "must be a string")
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    for seg in stripped.split("/"):
        if seg in ("", ".", "..") or ".." in seg or not _SEGMENT.match(seg):
            raise ConfigError(
                "prefix", prefix, "segments must be non-empty [0-9A-Za-z_.=-], without '..' or '.'"
            )
    return stripped


def check_endpoint(endpoint: str | None) -> str | None:
    if endpoint is None or endpoint == "":
        return None
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError("endpoint", endpoint, "expected an http:// or https:// URL")
    return endpoint.rstrip("/")


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix``."""
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("s3", "s3a") or not parsed.netloc:
        raise ConfigError("s3_url", url, "expected s3://<bucket>/<prefix>")
    if parsed.query or parsed.fragment:
        raise ConfigError("s3_url", url, "no query or fragment allowed")
    return check_bucket(parsed.netloc), check_prefix(parsed.path)


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@dataclass(frozen=True)
class S3Settings:
    """Everything needed to reach one bucket + prefix; arguments win over AWS_* variables."""

    bucket: str
    prefix: str = "streamkv"
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bucket", check_bucket(self.bucket))
        object.__setattr__(self, "prefix", check_prefix(self.prefix))
        endpoint = self.endpoint or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        object.__setattr__(self, "endpoint", check_endpoint(endpoint))
        object.__setattr__(self, "region", self.region or _env("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1")
        if self.access_key_id is None and self.secret_access_key is None:
            object.__setattr__(self, "access_key_id", _env("AWS_ACCESS_KEY_ID"))
            object.__setattr__(self, "secret_access_key", _env("AWS_SECRET_ACCESS_KEY"))
            object.__setattr__(self, "session_token", self.session_token or _env("AWS_SESSION_TOKEN"))
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError("secret_access_key", "<hidden>", "access_key_id and secret_access_key go together")
        for name in ("timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(name, value, "must be a positive number of seconds")

    @property
    def allow_http(self) -> bool:
        return bool(self.endpoint and self.endpoint.startswith("http://"))

    def describe(self) -> str:
        where = self.endpoint or f"AWS {self.region}"
        return f"s3://{self.bucket}/{self.prefix} at {where}"

    def make_store(self) -> Any:
        """The obstore store; obstore's own retries are off, the tier does its own."""
        from obstore.store import S3Store as ObS3Store

        config: dict[str, Any] = {"region": self.region}
        if self.endpoint:
            config["endpoint"] = self.endpoint
        if self.access_key_id is not None:
            config["access_key_id"] = self.access_key_id
            config["secret_access_key"] = self.secret_access_key
            if self.session_token:
                config["session_token"] = self.session_token
        client = {
            "allow_http": self.allow_http,
            "timeout": timedelta(seconds=self.timeout_s),
            "connect_timeout": timedelta(seconds=self.connect_timeout_s),
        }
        return ObS3Store(
            self.bucket,
            prefix=self.prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options=client,  # type: ignore[arg-type]
            retry_config={"max_retries": 0},
        )


def http_status(exc: BaseException) -> int | None:
    match = _STATUS.search(str(exc))
    return int(match.group(1)) if match else None


def s3_code(exc: BaseException) -> str | None:
    match = _S3_CODE.search(str(exc))
    return match.group(1) if match else None


def is_timeout(exc: BaseException) -> bool:
    """Our own deadline (TimeoutError) or the HTTP client's (obstore reports ``kind: Timeout``)."""
    return isinstance(exc, TimeoutError) or "kind: Timeout" in str(exc)


def classify(exc: BaseException) -> ErrorKind:
    """missing: the object is not there; retry: 5xx, 429, timeouts, connection errors; fatal: the rest."""
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if is_timeout(exc):
        return "retry"
    status = http_status(exc)
    if status is not None:
        if (status == 404 and s3_code(exc) in (None, "NoSuchKey")) or status == 416:
            return "missing"  # 416: the object is shorter than the range asked for
        return "retry" if status >= 500 or status in (408, 429) else "fatal"
    text = str(exc)
    if any(s in text for s in ("error sending request", "HTTP error", "connection", "timed out", "Timeout")):
        return "retry"
    return "fatal"


def startup_error(settings: S3Settings, exc: BaseException, timeout_s: float) -> ConfigError:
    """Turn a failed start-up check into an error that names the setting at fault."""
    where = settings.describe()
    if is_timeout(exc):
        return ConfigError("endpoint", settings.endpoint, f"no answer within {timeout_s:g}s from {where}")
    status, code = http_status(exc), s3_code(exc)
    if code == "NoSuchBucket" or status == 404:
        return ConfigError("bucket", settings.bucket, f"no such bucket at {where}")
    if status in (401, 403):
        key = settings.access_key_id or "<from the environment/instance>"
        return ConfigError("access_key_id", key, f"credentials rejected by {where} ({code or status})")
    if status is not None:
        return ConfigError("endpoint", settings.endpoint, f"{where} answered HTTP {status} ({code})")
    return ConfigError("endpoint", settings.endpoint, f"unreachable: {where}: {str(exc).splitlines()[0][:200]}")
