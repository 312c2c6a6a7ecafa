"""Shared fixtures: a real S3 server (moto, server mode) on 127.0.0.1."""

from __future__ import annotations

from tests.s3_server import s3_bucket, s3_server  # noqa: F401
