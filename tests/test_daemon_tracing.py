"""Trace context crosses the daemon boundary (W3C traceparent in the client protocol)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.daemon_helpers import DaemonProcess, engine, retrieve, short_tmp, store


def spans(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("type") == "span"]


def test_daemon_spans_join_the_engine_trace(tmp_path: Path) -> None:
    daemon_file, client_file = tmp_path / "daemon.jsonl", tmp_path / "client.jsonl"
    daemon = DaemonProcess(short_tmp(), env={"STREAMKV_TELEMETRY_EXPORTER": "file",
                                             "STREAMKV_TELEMETRY_FILE": str(daemon_file)}).start()
    try:
        eng = engine(daemon.socket, telemetry_exporter="file", telemetry_file=str(client_file))
        assert store(eng, 7, 2) == 2
        hit, layers = retrieve(eng, 7, 2)
        assert hit > 0 and layers is not None
        eng.close()
        eng.telemetry.shutdown()
    finally:
        assert daemon.stop() == 0
    client = spans(client_file)
    retrieves = [s for s in client if s["name"] == "streamkv.retrieve"]
    assert retrieves
    client_ids = {s["span_id"] for s in client}
    remote = [s for s in spans(daemon_file) if s["trace_id"] == retrieves[0]["trace_id"]]
    assert remote, "no daemon span carries the engine's trace id"
    assert any(s["parent_span_id"] in client_ids for s in remote)
