"""Telemetry: span trees, metric values, the Prometheus endpoint, JSON logs with trace ids.

Uses the real engine core on a tiny layout with the memory tier only, and an
OpenTelemetry in-memory span exporter and metric reader."""

from __future__ import annotations

import io
import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import structlog
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.format import header_size
from streamkv.keys import Namespace
from streamkv.layout import KVLayout
from streamkv.logs import configure_logging
from streamkv.telemetry import Telemetry, extract_context, inject_traceparent, read_jsonl

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_size=8, dtype="float16", chunk_size=16)
CONFIG = StreamKVConfig(chunk_size=16, tiers=("memory",), memory_gb=0.01, compression="off")
OBJECT_BYTES = header_size(LAYOUT.num_layers) + LAYOUT.num_layers * LAYOUT.section_bytes


def eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll until ``check()`` is truthy: spans are emitted on the loop thread after the last wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.005)


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30_000, size=n)


def source(n: int) -> Callable[[int], list[np.ndarray]]:
    def planes(layer: int) -> list[np.ndarray]:
        rng = np.random.default_rng(layer)
        shape = (n, LAYOUT.num_kv_heads, LAYOUT.head_size)
        return [rng.standard_normal(shape).astype(np.float16) for _ in range(2)]
    return planes


@pytest.fixture
def telemetry() -> Iterator[tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]]:
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tel = Telemetry(span_exporters=[spans], metric_readers=[reader], batch=False)
    yield tel, spans, reader
    tel.shutdown()


@pytest.fixture
def engine(telemetry: tuple[Telemetry, Any, Any]) -> Iterator[StreamKVEngine]:
    eng = StreamKVEngine(CONFIG, LAYOUT, Namespace("test-model", LAYOUT), telemetry=telemetry[0])
    yield eng
    eng.close()


def consume(engine: StreamKVEngine, toks: np.ndarray) -> Any:
    handle = engine.retrieve(toks)
    if handle.hit_tokens:
        for layer in range(LAYOUT.num_layers):
            assert handle.wait(layer)
    return handle


def by_name(spans: list[Any], name: str) -> list[Any]:
    return [s for s in spans if s.name == name]


def test_hit_span_tree_and_layer_waits_add_up(engine: StreamKVEngine, telemetry: Any) -> None:
    tel, exporter, _ = telemetry
    prompt = tokens(50, seed=1)  # 3 full chunks + a tail
    assert engine.store_kv(prompt, source(50)).result() == 3
    with tel.tracer.start_as_current_span("engine.request") as request:
        handle = consume(engine, prompt)
    assert handle.hit_tokens == 48
    spans = eventually(lambda: by_name(exporter.get_finished_spans(), "streamkv.retrieve") and
                       exporter.get_finished_spans())
    (retrieve,) = by_name(spans, "streamkv.retrieve")
    trace_id = request.get_span_context().trace_id
    assert retrieve.parent.span_id == request.get_span_context().span_id
    assert retrieve.context.trace_id == trace_id
    assert retrieve.attributes["streamkv.hit_tokens"] == 48
    assert retrieve.attributes["streamkv.result"] == "hit"
    assert retrieve.attributes["streamkv.namespace"] == engine.namespace.id
    children = [s for s in spans if s.parent is not None and s.parent.span_id == retrieve.context.span_id]
    names = sorted(s.name for s in children)
    assert names == ["streamkv.retrieve.headers"] + ["streamkv.retrieve.layer"] * 4 + ["streamkv.tier.get"] * 3
    tier_gets = by_name(children, "streamkv.tier.get")
    assert all(s.attributes["streamkv.tier"] == "memory" and s.attributes["streamkv.result"] == "hit"
               for s in tier_gets)
    assert all(s.context.trace_id == trace_id for s in children)  # emitted on the loop thread, same trace
    layers = sorted(by_name(children, "streamkv.retrieve.layer"), key=lambda s: s.attributes["streamkv.layer"])
    assert [s.attributes["streamkv.layer"] for s in layers] == [0, 1, 2, 3]
    waits = [s.attributes["streamkv.wait_s"] for s in layers]
    assert waits == handle.stall_s
    assert sum(waits) == pytest.approx(handle.total_stall_s)
    assert retrieve.attributes["streamkv.stall_s"] == pytest.approx(handle.total_stall_s)
    for span in layers:  # fetch start..end as the span; the consumer's wait in its attributes
        attrs = span.attributes
        assert attrs["streamkv.ok"] and attrs["streamkv.fetch_s"] >= 0
        assert span.start_time >= retrieve.start_time and span.end_time <= retrieve.end_time
        assert attrs["streamkv.wait.start_ns"] <= attrs["streamkv.wait.end_ns"] <= retrieve.end_time
    (store,) = by_name(spans, "streamkv.store")
    puts = [s for s in by_name(spans, "streamkv.tier.put") if s.parent.span_id == store.context.span_id]
    assert len(puts) == 3 and {s.attributes["streamkv.bytes"] for s in puts} == {OBJECT_BYTES}
    assert store.attributes["streamkv.chunks_written"] == 3


def test_miss_span_tree(engine: StreamKVEngine, telemetry: Any) -> None:
    tel, exporter, _ = telemetry
    assert engine.lookup(tokens(40, seed=2)) == 0
    handle = consume(engine, tokens(40, seed=2))
    assert handle.hit_tokens == 0
    spans = eventually(lambda: by_name(exporter.get_finished_spans(), "streamkv.retrieve") and
                       exporter.get_finished_spans())
    (retrieve,) = by_name(spans, "streamkv.retrieve")
    assert retrieve.parent is None  # no caller span: a root of its own
    assert retrieve.attributes["streamkv.result"] == "miss"
    assert retrieve.attributes["streamkv.hit_tokens"] == 0
    children = [s for s in spans if s.parent is not None and s.parent.span_id == retrieve.context.span_id]
    assert sorted(s.name for s in children) == ["streamkv.retrieve.headers"] + ["streamkv.tier.get"] * 2
    assert {s.attributes["streamkv.result"] for s in by_name(children, "streamkv.tier.get")} == {"miss"}
    (lookup,) = by_name(spans, "streamkv.lookup")
    assert lookup.attributes["streamkv.result"] == "miss" and lookup.attributes["streamkv.chunks"] == 2


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def value(points: dict[str, list[Any]], name: str, **attrs: str) -> Any:
    want = {f"streamkv.{k}": v for k, v in attrs.items()}
    found = [p for p in points.get(name, []) if dict(p.attributes or {}) == want]
    assert len(found) == 1, (name, want, points.get(name))
    return found[0].value if hasattr(found[0], "value") else found[0]


def test_metric_values_after_scripted_requests(engine: StreamKVEngine, telemetry: Any) -> None:
    _, exporter, reader = telemetry
    a, b = tokens(50, seed=3), tokens(40, seed=4)
    assert engine.store_kv(a, source(50)).result() == 3           # store: 3 chunks
    assert engine.lookup(a) == 48                                   # lookup hit
    consume(engine, a)                                              # retrieve hit: 48 hit, 2 miss
    consume(engine, b)                                              # retrieve miss: 40 miss
    # corrupt chunk 0 of a third prompt: a miss counted as an error of kind "corrupt"
    c = tokens(32, seed=5)
    assert engine.store_kv(c, source(32)).result() == 2
    memory = engine.store.tiers[0]
    first = engine.keys(c)[0]
    engine.runtime.call(memory.put, first, b"\x00" * OBJECT_BYTES)
    assert consume(engine, c).hit_tokens == 0
    eventually(lambda: len(by_name(exporter.get_finished_spans(), "streamkv.retrieve")) == 3)
    points = metric_points(reader)
    assert value(points, "streamkv.requests", op="store", result="stored") == 2
    assert value(points, "streamkv.requests", op="lookup", result="hit") == 1
    assert value(points, "streamkv.requests", op="retrieve", result="hit") == 1
    assert value(points, "streamkv.requests", op="retrieve", result="miss") == 2
    assert value(points, "streamkv.hit_tokens") == 48
    assert value(points, "streamkv.miss_tokens") == 2 + 40 + 32
    written = 5 * OBJECT_BYTES + OBJECT_BYTES  # five chunks stored, one overwritten with garbage
    assert value(points, "streamkv.tier.bytes_written", tier="memory") == written
    # the hit read 3 headers and 3 x 4 sections; the corrupt header read (one range) counts too
    read = 3 * OBJECT_BYTES + header_size(LAYOUT.num_layers) * 2
    assert value(points, "streamkv.tier.bytes_read", tier="memory") == read
    assert value(points, "streamkv.errors", **{"error.kind": "corrupt"}) == 1
    assert value(points, "streamkv.errors", **{"error.kind": "timeout"}) == 0
    # the corrupt object was deleted on detection, so four remain
    assert value(points, "streamkv.tier.usage", tier="memory") == 4 * OBJECT_BYTES
    assert value(points, "streamkv.layer.wait.duration").count == LAYOUT.num_layers
    assert value(points, "streamkv.lookup.duration", result="hit").count == 1


def test_prometheus_endpoint_serves_metrics(tmp_path: Path) -> None:
    tel = Telemetry.create(CONFIG.replace(metrics_port=0))
    eng = StreamKVEngine(CONFIG, LAYOUT, Namespace("test-model", LAYOUT), telemetry=tel)
    try:
        prompt = tokens(32, seed=6)
        eng.store_kv(prompt, source(32)).result()
        consume(eng, prompt)
        port = tel.metrics_port
        assert port
        body = eventually(lambda: (lambda text: "streamkv_retrieve_duration_seconds_count" in text and text)(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()))
        assert "streamkv_hit_tokens_total 32.0" in body
        assert 'streamkv_tier_bytes_written_bytes_total{streamkv_tier="memory"}' in body
        assert "streamkv_layer_wait_duration_seconds_bucket" in body
    finally:
        eng.close()
        tel.shutdown()


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("json", "debug", stream=buf)
    yield buf
    structlog.reset_defaults()


def test_json_logs_carry_the_trace_id(engine: StreamKVEngine, telemetry: Any, json_logs: io.StringIO) -> None:
    tel = telemetry[0]
    c = tokens(32, seed=7)
    engine.store_kv(c, source(32)).result()
    engine.runtime.call(engine.store.tiers[0].put, engine.keys(c)[0], b"\x00" * OBJECT_BYTES)
    with tel.tracer.start_as_current_span("engine.request") as request:
        assert consume(engine, c).hit_tokens == 0  # the producer logs the corrupt header on the loop thread
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.strip()]
    warned = [r for r in lines if r.get("event", "").startswith("chunk header unusable")]
    assert warned, lines
    assert warned[0]["trace_id"] == format(request.get_span_context().trace_id, "032x")
    assert warned[0]["level"] == "warning"


def test_file_exporter_writes_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    tel = Telemetry.create(CONFIG.replace(telemetry_exporter="file", telemetry_file=str(path)))
    eng = StreamKVEngine(CONFIG, LAYOUT, Namespace("test-model", LAYOUT), telemetry=tel)
    prompt = tokens(32, seed=8)
    eng.store_kv(prompt, source(32)).result()
    consume(eng, prompt)
    eventually(lambda: tel.force_flush() or any(r["name"] == "streamkv.retrieve" for r in read_jsonl(path, "span")))
    eng.close()
    tel.shutdown()
    spans = read_jsonl(path, "span")
    retrieve = [r for r in spans if r["name"] == "streamkv.retrieve"]
    assert retrieve and retrieve[0]["attributes"]["streamkv.hit_tokens"] == 32
    assert any(r["name"] == "streamkv.hit_tokens" for r in read_jsonl(path, "metric"))


def test_traceparent_round_trip(telemetry: Any) -> None:
    tel = telemetry[0]
    with tel.tracer.start_as_current_span("client") as client:
        carrier = inject_traceparent()
    assert carrier["traceparent"].split("-")[1] == format(client.get_span_context().trace_id, "032x")
    with tel.tracer.start_as_current_span("server", context=extract_context(carrier)) as server:
        assert server.get_span_context().trace_id == client.get_span_context().trace_id


def test_disabled_telemetry_records_nothing_and_engine_works() -> None:
    tel = Telemetry.from_config(CONFIG)
    assert not tel.active and tel is Telemetry.disabled()
    eng = StreamKVEngine(CONFIG, LAYOUT, Namespace("test-model", LAYOUT))
    try:
        prompt = tokens(32, seed=9)
        eng.store_kv(prompt, source(32)).result()
        handle = consume(eng, prompt)
        assert handle.hit_tokens == 32 and handle.trace is None
    finally:
        eng.close()
