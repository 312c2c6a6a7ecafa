"""The S3 tier against a real S3 API (moto's server on 127.0.0.1); no mock of obstore.

Timeouts, retries and cool-downs are made short through constructor
arguments; the ``fail_after`` guards only turn a hang into a failure, they
are not timing assertions."""

from __future__ import annotations

import os
import socket
from typing import Iterator

import anyio
import numpy as np
import pytest

from streamkv.errors import ConfigError
from streamkv.format import FormatError, decode_section, encode_chunk, header_size, parse_header
from streamkv.keys import Namespace, chunk_keys
from streamkv.layout import KVLayout
from streamkv.store.circuit import CircuitBreaker, CircuitState
from streamkv.store.limits import Limits
from streamkv.store.s3 import S3Store, _coalesce
from streamkv.store.s3_config import S3Settings, check_prefix, parse_s3_url
from tests.s3_server import FaultyProxy, MotoS3, S3Bucket, s3_bucket, s3_server  # noqa: F401 (fixtures)
from tests.store_conformance import NS, StoreConformance, key, run

HANG_GUARD_S = 30  # a hang fails the test; nothing here is expected to come near it
LAYOUT = KVLayout(num_layers=6, num_kv_heads=2, head_size=16, dtype="bfloat16", chunk_size=16)


class TestS3Conformance(StoreConformance):
    @pytest.fixture
    def store(self, s3_bucket: S3Bucket) -> S3Store:  # noqa: F811
        return s3_bucket.store()


def _chunk(ns: Namespace, seed: int) -> tuple[bytearray, list[bytes]]:
    rng = np.random.default_rng(seed)
    sections = [rng.integers(0, 256, LAYOUT.section_bytes, dtype=np.uint8).tobytes() for _ in range(LAYOUT.num_layers)]
    return encode_chunk(ns, LAYOUT, sections, compression="off"), sections


async def read_layers(store: S3Store, key_: str, ns: Namespace, layers: range) -> list[bytes] | None:
    """What the pipeline does: header, then sections; any FormatError is the caller's miss."""
    head = await store.get_ranges(key_, [(0, header_size(LAYOUT.num_layers))])
    if head is None:
        return None
    try:
        header = parse_header(head[0], ns, LAYOUT)
        parts = await store.get_ranges(key_, [header.section_range(layer) for layer in layers])
        if parts is None:
            return None
        return [bytes(decode_section(header, layer, p)) for layer, p in zip(layers, parts)]
    except FormatError:
        return None


@pytest.fixture
def namespace() -> Namespace:
    return Namespace("test-model@sha:0", LAYOUT)


def test_chunk_round_trip_and_ranged_layer_reads(s3_bucket: S3Bucket, namespace: Namespace) -> None:  # noqa: F811
    store = s3_bucket.store()
    (k,) = chunk_keys(range(LAYOUT.chunk_size), LAYOUT.chunk_size, namespace)
    blob, sections = _chunk(namespace, 1)

    async def go() -> None:
        assert await store.put(k, blob)
        assert bytes(await store.get(k)) == bytes(blob)
        assert await read_layers(store, k, namespace, range(2, 5)) == sections[2:5]
        assert await read_layers(store, k, namespace, range(LAYOUT.num_layers)) == sections
        past_end = await store.get_ranges(k, [(len(blob) - 4, 8)])
        assert past_end is None  # too short is a miss
        assert await store.get_ranges(k, [(len(blob) + 100, 8)]) is None

    run(go)
    assert store.counters.errors == 0


def test_adjacent_sections_coalesce_into_one_request() -> None:
    spans = _coalesce([(200, 100), (0, 100), (100, 100), (10_000_000, 5)], gap=1024, max_bytes=1 << 20)
    assert [(s, e) for s, e, _ in spans] == [(0, 300), (10_000_000, 10_000_005)]
    assert spans[0][2] == [1, 2, 0]
    capped = _coalesce([(i * 100, 100) for i in range(10)], gap=0, max_bytes=300)
    assert [(s, e) for s, e, _ in capped] == [(0, 300), (300, 600), (600, 900), (900, 1000)]


def test_multipart_put_of_a_big_object(s3_bucket: S3Bucket) -> None:  # noqa: F811
    store = s3_bucket.store(part_size=5 << 20, multipart_threshold=5 << 20)
    data = os.urandom(12 << 20)

    async def go() -> None:
        assert await store.put(key(1), memoryview(data))
        assert bytes(await store.get(key(1))) == data
        parts = await store.get_ranges(key(1), [(5 << 20, 100), ((12 << 20) - 7, 7)])
        assert [bytes(p) for p in parts] == [data[5 << 20 : (5 << 20) + 100], data[-7:]]

    run(go)
    etag = s3_bucket.server.client().head_object(Bucket=s3_bucket.name, Key=f"{s3_bucket.prefix}/{key(1)}")["ETag"]
    assert etag.strip('"').endswith("-3")  # S3 marks multipart objects with the part count


def test_objects_stay_under_the_prefix(s3_bucket: S3Bucket) -> None:  # noqa: F811
    store = s3_bucket.store(prefix="fleet/a")

    async def go() -> None:
        await store.put(key(1), b"x")
        await store.put(key(2, "f" * 32), b"y")

    run(go)
    assert s3_bucket.object_keys() == sorted([f"fleet/a/{key(1)}", f"fleet/a/{key(2, 'f' * 32)}"])


def test_two_instances_share_one_bucket(s3_bucket: S3Bucket, namespace: Namespace) -> None:  # noqa: F811
    writer = s3_bucket.store()
    reader = s3_bucket.store(index_ttl_s=0.0)  # a fresh LIST on every lookup, to see the writer at once
    keys = chunk_keys(range(4 * LAYOUT.chunk_size), LAYOUT.chunk_size, namespace)
    blob, sections = _chunk(namespace, 2)

    async def go() -> None:
        assert await reader.exists_many(keys) == [False] * 4
        assert all(await writer.put_many([(k, blob) for k in keys[:3]]))
        assert await reader.exists_many(keys) == [True, True, True, False]
        assert await read_layers(reader, keys[1], namespace, range(LAYOUT.num_layers)) == sections
        assert await reader.get(keys[3]) is None

    run(go)
    assert reader.counters.hits == 2 and reader.counters.misses == 1


def test_lookup_of_512_chunks_is_one_list_per_namespace(s3_bucket: S3Bucket) -> None:  # noqa: F811
    writer, reader = s3_bucket.store(), s3_bucket.store(index_ttl_s=60.0)
    other = "e" * 32
    present = [key(i) for i in range(0, 512, 3)] + [key(i, other) for i in range(10)]
    asked = [key(i) for i in range(512)] + [key(i, other) for i in range(20)]

    async def go() -> None:
        await writer.put_many([(k, b"v") for k in present])
        for _ in range(3):
            flags = await reader.exists_many(asked)
            assert [k for k, f in zip(asked, flags) if f] == present

    run(go)
    assert reader.index.refreshes == 2  # one LIST per namespace, then answered from the index


def test_corrupted_object_is_a_miss(s3_bucket: S3Bucket, namespace: Namespace) -> None:  # noqa: F811
    store = s3_bucket.store()
    keys = chunk_keys(range(3 * LAYOUT.chunk_size), LAYOUT.chunk_size, namespace)
    blob, sections = _chunk(namespace, 3)
    client = s3_bucket.server.client()

    async def go() -> None:
        await store.put_many([(k, blob) for k in keys])

    run(go)
    bad_section = bytearray(blob)
    off, _ = parse_header(blob).section_range(4)
    bad_section[off + 10] ^= 0xFF
    bad_header = bytearray(blob)
    bad_header[20] ^= 0xFF
    for k, body in zip(keys, (bad_section, bad_header, blob[: len(blob) // 2])):
        client.put_object(Bucket=s3_bucket.name, Key=f"{s3_bucket.prefix}/{k}", Body=bytes(body))

    async def check() -> None:
        assert await read_layers(store, keys[0], namespace, range(0, 4)) == sections[:4]  # intact layers
        assert await read_layers(store, keys[0], namespace, range(3, 6)) is None  # layer 4 is damaged
        assert await read_layers(store, keys[1], namespace, range(0, 1)) is None  # header damaged
        assert await read_layers(store, keys[2], namespace, range(5, 6)) is None  # truncated

    run(check)
    assert store.counters.errors == 0  # damage is a miss, not a tier failure


def test_server_stopped_mid_run_misses_then_circuit_opens_and_closes() -> None:
    with MotoS3() as server:
        bucket = S3Bucket(server, server.create_bucket())
        store = bucket.store(timeout_s=1.0, retries=2, failure_threshold=2, cooldown_s=0.3)
        data = os.urandom(50_000)

        async def go() -> None:
            assert await store.put(key(1), data)
            server.stop()
            with anyio.fail_after(HANG_GUARD_S):
                assert await store.get(key(1)) is None  # a miss, after bounded retries
                assert await store.get_ranges(key(1), [(0, 10)]) is None
                assert store.breaker.state is CircuitState.OPEN
                sent_before = store.counters.extra["retries"]
                assert await store.get(key(1)) is None  # skipped: no request, no wait
                assert not await store.put(key(2), b"late")  # dropped and counted
                assert store.counters.extra["retries"] == sent_before
            assert store.counters.extra["short_circuited"] >= 2
            assert store.counters.extra["dropped_writes"] == 1
            server.start()  # the same port: the endpoint comes back
            await anyio.sleep(0.35)  # the cool-down
            with anyio.fail_after(HANG_GUARD_S):
                assert bytes(await store.get(key(1))) == data  # the half-open probe succeeds
            assert store.breaker.state is CircuitState.CLOSED
            assert await store.put(key(2), b"now")

        run(go)
        assert store.counters.errors >= 2 and store.counters.extra["retries"] >= 2
        assert store.stats()["circuit_opens"] == 1


@pytest.fixture
def proxy(s3_bucket: S3Bucket) -> Iterator[FaultyProxy]:  # noqa: F811
    p = FaultyProxy(s3_bucket.server.port)
    try:
        yield p
    finally:
        p.close()


def test_server_errors_are_retried_with_backoff(s3_bucket: S3Bucket, proxy: FaultyProxy) -> None:  # noqa: F811
    data = os.urandom(100_000)
    store = s3_bucket.store(endpoint=proxy.endpoint, retries=3)

    async def go() -> None:
        assert await s3_bucket.store().put(key(1), data)
        proxy.fail_next(2)
        assert bytes(await store.get(key(1))) == data

    run(go)
    assert proxy.failed == 2 and store.counters.extra["retries"] == 2 and store.counters.errors == 0


def test_transfer_cut_mid_read_is_a_miss_until_the_server_heals(s3_bucket: S3Bucket, proxy: FaultyProxy) -> None:  # noqa: F811
    data = os.urandom(2 << 20)
    store = s3_bucket.store(endpoint=proxy.endpoint, retries=1, failure_threshold=2, cooldown_s=0.2)

    async def go() -> None:
        assert await store.put(key(1), data)
        proxy.cut_after(64 << 10)  # every response dies after 64 KiB
        with anyio.fail_after(HANG_GUARD_S):
            assert await store.get(key(1)) is None
            assert await store.get_ranges(key(1), [(0, 1 << 20), (1 << 20, 1 << 20)]) is None
        assert store.breaker.state is CircuitState.OPEN
        proxy.heal()
        await anyio.sleep(0.25)
        with anyio.fail_after(HANG_GUARD_S):
            assert bytes(await store.get(key(1))) == data
        assert store.breaker.state is CircuitState.CLOSED

    run(go)
    assert store.counters.errors == 2 and store.counters.misses == 2 and store.counters.hits == 1


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_endpoint_that_never_answers_is_a_bounded_miss(s3_bucket: S3Bucket, black_hole: str) -> None:  # noqa: F811
    store = s3_bucket.store(endpoint=black_hole, timeout_s=0.3, retries=1, failure_threshold=1, cooldown_s=60)

    async def go() -> None:
        with anyio.fail_after(HANG_GUARD_S):
            assert await store.get(key(1)) is None
            assert await store.exists_many([key(1), key(2)]) == [False, False]
            with pytest.raises(ConfigError) as err:
                await store.check(timeout_s=0.3)
        assert err.value.field == "endpoint" and "no answer" in str(err.value)

    run(go)
    assert store.counters.extra["timeouts"] == 2 and store.breaker.state is CircuitState.OPEN


def test_wrong_credentials_fail_the_startup_check(s3_bucket: S3Bucket) -> None:  # noqa: F811
    from moto.core.authorization import enable_iam_authentication

    store = s3_bucket.store(access_key_id="AKIAWRONGWRONGWRONG1", secret_access_key="nope")

    async def go() -> None:
        with enable_iam_authentication(), anyio.fail_after(HANG_GUARD_S):
            with pytest.raises(ConfigError) as err:
                await store.check()
        assert err.value.field == "access_key_id" and "rejected" in str(err.value)

    run(go)


def test_missing_bucket_and_unreachable_endpoint_fail_the_startup_check(s3_bucket: S3Bucket) -> None:  # noqa: F811
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    closed_port = free.getsockname()[1]
    free.close()

    async def go() -> None:
        with anyio.fail_after(HANG_GUARD_S):
            await s3_bucket.store().check()  # the good one passes
            with pytest.raises(ConfigError) as err:
                await S3Store("no-such-bucket-here", **s3_bucket.server.store_kwargs()).check()
            assert err.value.field == "bucket"
            with pytest.raises(ConfigError) as err:
                await s3_bucket.store(endpoint=f"http://127.0.0.1:{closed_port}").check()
            assert err.value.field == "endpoint" and "unreachable" in str(err.value)

    run(go)


def test_credentials_and_endpoint_from_aws_environment(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = S3Store.from_url(s3_bucket.url, timeout_s=5.0)
    assert store.settings.endpoint == s3_bucket.endpoint and store.settings.allow_http

    async def go() -> None:
        await store.check()
        assert await store.put(key(5), b"env")
        assert bytes(await store.get(key(5))) == b"env"

    run(go)


def test_stores_share_one_named_limiter(s3_bucket: S3Bucket) -> None:  # noqa: F811
    limits = Limits(s3_requests=3)
    a, b = s3_bucket.store(limits=limits), s3_bucket.store(limits=limits)
    assert a.limiter is b.limiter and a.limiter.total_tokens == 3


@pytest.mark.parametrize("prefix", ["a/../b", "..", "a//b", "./a", "a/./b", "a/b..c", "sp ace"])
def test_bad_prefix_rejected(prefix: str) -> None:
    with pytest.raises(ConfigError) as err:
        S3Store("bucket", prefix, endpoint="http://127.0.0.1:9")
    assert err.value.field == "prefix" and err.value.value == prefix


@pytest.mark.parametrize(
    "url, field",
    [("s3://bkt/../x", "prefix"), ("http://bkt/x", "s3_url"), ("s3:///x", "s3_url"), ("s3://B_ad/x", "bucket")],
)
def test_bad_urls_rejected(url: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        S3Store.from_url(url, endpoint="http://127.0.0.1:9")
    assert err.value.field == field


def test_settings_parse_and_allow_http_only_for_http() -> None:
    assert parse_s3_url("s3://bkt/a/b/") == ("bkt", "a/b")
    assert check_prefix("/x/y/") == "x/y" and check_prefix("") == ""
    kw = dict(access_key_id="k", secret_access_key="s")
    assert S3Settings("bkt", endpoint="http://h:1", **kw).allow_http  # type: ignore[arg-type]
    assert not S3Settings("bkt", endpoint="https://h", **kw).allow_http  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        S3Settings("bkt", endpoint="ftp://h", **kw)  # type: ignore[arg-type]
    assert err.value.field == "endpoint"
    with pytest.raises(ConfigError):
        S3Settings("bkt", endpoint="http://h", access_key_id="only-half")


def test_circuit_breaker_states() -> None:
    now = [0.0]
    cb = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=lambda: now[0])
    for _ in range(2):
        assert cb.allow()
        cb.record_failure()
    assert cb.state is CircuitState.CLOSED
    cb.allow()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN and not cb.allow()
    now[0] = 10.0
    assert cb.allow() and cb.state is CircuitState.HALF_OPEN
    assert not cb.allow()  # one probe at a time
    cb.record_failure()  # the probe failed: open again, a new cool-down
    assert cb.state is CircuitState.OPEN and not cb.allow()
    now[0] = 20.0
    assert cb.allow()
    cb.release()  # a cancelled probe frees the slot
    assert cb.allow()
    cb.record_success()
    assert cb.state is CircuitState.CLOSED and cb.failures == 0 and cb.opens == 2


def test_namespace_keys_are_listed_and_cleared_per_namespace(s3_bucket: S3Bucket) -> None:  # noqa: F811
    a, b = s3_bucket.store(), s3_bucket.store()

    async def go() -> None:
        await a.put_many([(key(i), b"x") for i in range(5)] + [(key(1, "d" * 32), b"y")])
        assert await b.list_keys(NS) == sorted(key(i) for i in range(5))
        assert len(await b.list_keys()) == 6
        assert await b.clear(NS) == 5
        assert await a.list_keys() == [key(1, "d" * 32)]

    run(go)


def test_from_config_takes_the_s3_fields(s3_bucket: S3Bucket) -> None:  # noqa: F811
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        s3_url=s3_bucket.url, s3_endpoint=s3_bucket.endpoint, s3_region="us-east-1", s3_access_key_id="testing",
        s3_secret_access_key="testing", s3_timeout_s=4.0, s3_max_concurrency=7, s3_retries=2,
    )
    limits = Limits(s3_requests=7)
    store = S3Store.from_config(cfg, limits=limits)
    assert (store.timeout_s, store.retries, store.limiter) == (4.0, 2, limits.limiter("s3_requests"))

    async def go() -> None:
        await store.check()
        assert await store.put(key(1), b"cfg") and bytes(await store.get(key(1))) == b"cfg"

    run(go)


@pytest.mark.parametrize(
    "field, value", [("retries", -1), ("max_concurrency", 0), ("timeout_s", 0), ("part_size", 1024),
                     ("failure_threshold", 0), ("cooldown_s", -1.0)],
)
def test_bad_numbers_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        S3Store("bucket", endpoint="http://127.0.0.1:9", access_key_id="k", secret_access_key="s", **{field: value})
    assert err.value.field == field and err.value.value == value
