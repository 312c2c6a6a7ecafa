"""PNG plots for ``streamkv bench`` reports (matplotlib, Agg backend: no display needed).

The plots read plain data: benchmark rows (dicts) and spans as dicts in the
``streamkv.telemetry.span_to_dict`` shape, which is also what the JSON-lines
file exporter writes; so a timeline can be drawn from a live run or later
from a ``telemetry_file``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def percentile(values: Iterable[float], q: float) -> float:
    data = [float(v) for v in values]
    return float(np.percentile(data, q)) if data else float("nan")


def plot_ttft_by_length(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """TTFT without streamkv (cold) and with it (warm) against prompt length, one point per request."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    length = [r["prompt_tokens"] for r in rows]
    ax.scatter(length, [r["ttft_cold_s"] * 1e3 for r in rows], label="without streamkv (recompute)",
               marker="o", color="#c44e52")
    ax.scatter(length, [r["ttft_warm_s"] * 1e3 for r in rows], label="with streamkv", marker="^", color="#4c72b0")
    for r in rows:
        ax.plot([r["prompt_tokens"]] * 2, [r["ttft_cold_s"] * 1e3, r["ttft_warm_s"] * 1e3],
                color="#999999", lw=0.6, zorder=0)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("TTFT cold vs warm by prompt length")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_hit_rate(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per-request share of the prompt served from the cache, and the running total over the trace."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    x = np.arange(len(rows))
    hit = np.array([r["hit_tokens"] for r in rows], dtype=float)
    prompt = np.maximum(np.array([r["prompt_tokens"] for r in rows], dtype=float), 1)
    ax.bar(x, hit / prompt, color="#4c72b0", alpha=0.7, label="request hit rate")
    if rows and "reusable_tokens" in rows[0]:
        ideal = np.array([r["reusable_tokens"] for r in rows], dtype=float) / prompt
        ax.scatter(x, ideal, marker="_", s=400, color="#55a868", lw=2, label="reusable (ideal cache)", zorder=3)
    ax.plot(x, np.cumsum(hit) / np.cumsum(prompt), color="#dd8452", marker=".", label="cumulative hit rate")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("request (trace order)")
    ax.set_ylabel("prompt tokens from the cache")
    ax.set_title("hit rate over the trace")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right")
    return _save(fig, path)


def pick_retrieve(spans: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The layer-wise retrieve with the largest hit (the most layers worth drawing)."""
    retrieves = [s for s in spans if s["name"] == "streamkv.retrieve"
                 and s["attributes"].get("streamkv.api") != "chunks"
                 and s["attributes"].get("streamkv.hit_tokens", 0) > 0]
    return max(retrieves, key=lambda s: (s["attributes"]["streamkv.hit_tokens"], s["start_ns"]), default=None)


def layer_timeline(spans: Sequence[dict[str, Any]], retrieve: dict[str, Any]) -> list[dict[str, float]]:
    """Per layer, ms since the retrieve began: fetch start/end and consumer wait start/end."""
    t0 = retrieve["start_ns"]
    rows = []
    for span in spans:
        if span["name"] != "streamkv.retrieve.layer" or span["parent_span_id"] != retrieve["span_id"]:
            continue
        attrs = span["attributes"]
        rows.append({
            "layer": attrs["streamkv.layer"],
            "fetch_start_ms": (span["start_ns"] - t0) / 1e6,
            "fetch_end_ms": (span["end_ns"] - t0) / 1e6,
            "wait_start_ms": (attrs["streamkv.wait.start_ns"] - t0) / 1e6 if "streamkv.wait.start_ns" in attrs
            else float("nan"),
            "wait_end_ms": (attrs["streamkv.wait.end_ns"] - t0) / 1e6 if "streamkv.wait.end_ns" in attrs
            else float("nan"),
            "wait_ms": attrs.get("streamkv.wait_s", 0.0) * 1e3,
        })
    return sorted(rows, key=lambda r: r["layer"])


def plot_layer_timeline(spans: Sequence[dict[str, Any]], path: str | Path,
                        retrieve: dict[str, Any] | None = None) -> Path:
    """Gantt chart of one request: when each layer was fetched, and how long the engine waited for it."""
    plt = _pyplot()
    retrieve = retrieve or pick_retrieve(spans)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    if retrieve is None:
        ax.text(0.5, 0.5, "no cache hit in this run: nothing was streamed", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    rows = layer_timeline(spans, retrieve)
    for r in rows:
        ax.barh(r["layer"], r["fetch_end_ms"] - r["fetch_start_ms"], left=r["fetch_start_ms"], height=0.8,
                color="#4c72b0", alpha=0.75)
        if not np.isnan(r["wait_start_ms"]):
            ax.barh(r["layer"], r["wait_end_ms"] - r["wait_start_ms"], left=r["wait_start_ms"],
                    height=0.4, color="#c44e52")
            ax.plot([r["wait_end_ms"]], [r["layer"]], marker="|", color="black", ms=7)
    total_wait = sum(r["wait_ms"] for r in rows)
    hit = retrieve["attributes"].get("streamkv.hit_tokens", 0)
    ax.set_xlabel("ms since retrieve started")
    ax.set_ylabel("layer")
    ax.invert_yaxis()
    ax.set_title(f"per-layer stream of one request ({hit} hit tokens): stall {total_wait:.1f} ms")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#4c72b0", alpha=0.75, label="layer fetched (read + verify + copy)"),
                       Patch(color="#c44e52", label="engine waits for the layer (stall)"),
                       Line2D([], [], color="black", marker="|", ls="", label="engine takes the layer")],
              loc="upper right")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    _pyplot().close(fig)
    return path


def is_png(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.stat().st_size > len(PNG_MAGIC) and path.read_bytes()[:8] == PNG_MAGIC


def write_e2e_report(result: dict[str, Any], spans: Sequence[dict[str, Any]], folder: str | Path) -> list[Path]:
    """The e2e report folder: results.json, spans.jsonl and the three PNGs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (folder / "spans.jsonl").write_text("".join(json.dumps(s, default=str) + "\n" for s in spans))
    rows = result["requests"]
    return [
        folder / "results.json",
        folder / "spans.jsonl",
        plot_ttft_by_length(rows, folder / "ttft_by_prompt_length.png"),
        plot_hit_rate(rows, folder / "hit_rate.png"),
        plot_layer_timeline(spans, folder / "layer_stall_timeline.png"),
    ]
