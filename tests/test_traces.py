"""Workload traces: the generator is deterministic and schema-valid; the committed traces load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamkv.cli import main as cli_main
from streamkv.traces import (
    KINDS,
    GenerateOptions,
    TraceError,
    TraceRequest,
    generate,
    prompt_tokens,
    read_trace,
    reusable_tokens,
    validate_record,
    write_trace,
)

TRACES = Path(__file__).resolve().parents[1] / "traces"
GOOD = {"arrival_s": 0.5, "session": "s", "context_id": "c", "context_tokens": 10, "new_tokens": 5,
        "output_tokens": 3, "kind": "rag", "turn": 0}


@pytest.mark.parametrize("kind", KINDS)
def test_generator_is_deterministic_for_a_seed(kind: str) -> None:
    a = generate(GenerateOptions(kind=kind, seed=7))
    assert a == generate(GenerateOptions(kind=kind, seed=7))
    assert a != generate(GenerateOptions(kind=kind, seed=8))
    for req in a:
        assert validate_record(json.loads(json.dumps(req.as_dict()))) == req
        assert req.kind == kind and req.prompt_len <= 2048


@pytest.mark.parametrize("kind", KINDS)
def test_generated_traces_have_the_sharing_of_their_kind(kind: str) -> None:
    reqs = generate(GenerateOptions(kind=kind, seed=3, requests=20, max_context=1024))
    assert all(r.prompt_len <= 1024 for r in reqs)
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    assert sum(reusable_tokens(reqs, 64)) > 0
    if kind == "chat":  # each turn's prompt starts with the whole previous prompt of its session
        last: dict[str, np.ndarray] = {}
        for r in reqs:
            p = prompt_tokens(r, 49152)
            if r.session in last:
                prev = last[r.session]
                assert r.context_tokens >= len(prev) and np.array_equal(p[: len(prev)], prev)
            last[r.session] = p
    if kind == "agent":
        assert len({(r.context_id, r.context_tokens) for r in reqs}) == 1  # one shared tool context


def test_prompt_tokens_share_context_not_questions() -> None:
    a = TraceRequest(0.0, "u1", "doc-0", 300, 20, 5, "rag", 0)
    b = TraceRequest(1.0, "u2", "doc-0", 300, 20, 5, "rag", 0)
    pa, pb = prompt_tokens(a, 1000, low=10), prompt_tokens(b, 1000, low=10)
    assert len(pa) == 320 and np.array_equal(pa[:300], pb[:300]) and not np.array_equal(pa[300:], pb[300:])
    assert pa.min() >= 10 and pa.max() < 1000
    assert np.array_equal(prompt_tokens(a, 1000, low=10), pa)


@pytest.mark.parametrize("field, value", [
    ("kind", "video"), ("new_tokens", 0), ("context_tokens", -1), ("arrival_s", "soon"),
    ("session", ""), ("output_tokens", True), ("extra", 1),
])
def test_schema_rejects_bad_records(field: str, value: object) -> None:
    with pytest.raises(TraceError, match=field):
        validate_record({**GOOD, field: value})


def test_schema_rejects_missing_fields_and_time_going_back(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="context_id"):
        validate_record({k: v for k, v in GOOD.items() if k != "context_id"})
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({**GOOD, "arrival_s": 2.0}) + "\n" + json.dumps({**GOOD, "turn": 1}) + "\n")
    with pytest.raises(TraceError, match="back in time"):
        read_trace(path)
    path.write_text(json.dumps(GOOD) + "\nnot json\n")
    with pytest.raises(TraceError, match=":2: not JSON"):
        read_trace(path)


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    reqs = generate(GenerateOptions(kind="rag", seed=1))
    assert read_trace(write_trace(reqs, tmp_path / "rag.jsonl")) == reqs


@pytest.mark.parametrize("name", ["chat", "rag", "agent"])
def test_committed_traces_are_valid_and_small(name: str) -> None:
    reqs = read_trace(TRACES / f"{name}.jsonl")
    assert 1 <= len(reqs) <= 12
    assert {r.kind for r in reqs} == {name}
    assert max(r.prompt_len for r in reqs) <= 2048


def test_cli_generate_writes_the_generated_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "agent.jsonl"
    argv = ["trace", "generate", "--kind", "agent", "--seed", "5", "--requests", "6", "-o", str(out)]
    assert cli_main(argv) == 0
    assert read_trace(out) == generate(GenerateOptions(kind="agent", seed=5, requests=6))
    assert cli_main(["trace", "validate", str(out)]) == 0
    assert "6 requests" in capsys.readouterr().out
