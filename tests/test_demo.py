"""`streamkv demo` and `streamkv bench e2e`, run as a user runs them, on small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from streamkv.cli import main  # noqa: E402

pytestmark = pytest.mark.slow


def test_demo_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--json", "--prompt-tokens", "600", "--new-tokens", "3", "--cache-dir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    rows = out["rows"]
    assert len(rows) == 5
    for row in rows:
        assert {"prompt_tokens", "hit_tokens", "ttft_cold_s", "ttft_warm_s", "outputs_identical"} <= set(row)
        assert row["outputs_identical"] is True
        assert row["hit_tokens"] == (row["prompt_tokens"] - 1) // 256 * 256
    assert any(row["hit_tokens"] > 0 for row in rows)
    assert (tmp_path / "disk").is_dir()


def test_demo_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--prompt-tokens", "300", "--new-tokens", "2", "--cache-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "TTFT cold" in text and "identical" in text and "outputs identical: True" in text


def test_bench_e2e_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "e2e", "--json", "--prefixes", "256", "--repeats", "1", "--workdir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["hit_tokens"] == 256 and rows[0]["logits_identical"] is True
