"""Workload traces: requests over time, as JSON lines, and a seeded generator.

A trace says *what a cache sees*, not what words were typed: each request
names a shared context (``context_id``, ``context_tokens``), the tokens new to
it, and how many tokens the model then generates. Token ids are synthesised
from those names (``prompt_tokens``), deterministically, so a replay against
any model sees the same prefix sharing the real workload had:

- ``chat``: one conversation per session; the history grows every turn
  (``context_tokens`` of turn k+1 = context + new + output of turn k), and the
  new tokens continue the conversation's own token stream.
- ``rag``: a pool of documents reused across questions; the context is a
  document, the new tokens are the question (unique per request).
- ``agent``: one long shared tool/system context for every session, short
  steps (unique per request).

Sizes default to what SmolLM2-135M replays in minutes on a 2-core CPU."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import xxhash

from streamkv.errors import ConfigError, StreamKVError

KINDS = ("chat", "rag", "agent")
_BLOCK = 1024  # tokens per seeded block: prefixes stay identical whatever length is asked


class TraceError(StreamKVError, ValueError):
    """A trace record is malformed; names the line and the field."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    session: str
    context_id: str
    context_tokens: int
    new_tokens: int
    output_tokens: int
    kind: str
    turn: int = 0

    @property
    def prompt_len(self) -> int:
        return self.context_tokens + self.new_tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "arrival_s": (int, float), "session": str, "context_id": str, "context_tokens": int,
    "new_tokens": int, "output_tokens": int, "kind": str, "turn": int,
}
_REQUIRED = tuple(f.name for f in fields(TraceRequest) if f.name != "turn")


def validate_record(record: Any, where: str = "record") -> TraceRequest:
    """One JSON object → ``TraceRequest``, or ``TraceError`` naming the field and value."""
    if not isinstance(record, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise TraceError(f"{where}: missing field(s) {missing}")
    unknown = sorted(set(record) - set(_TYPES))
    if unknown:
        raise TraceError(f"{where}: unknown field(s) {unknown}; known: {sorted(_TYPES)}")
    for name, kind in _TYPES.items():
        if name in record and (not isinstance(record[name], kind) or isinstance(record[name], bool)):
            raise TraceError(f"{where}: {name}={record[name]!r} is not {kind}")
    req = TraceRequest(**record)
    if req.kind not in KINDS:
        raise TraceError(f"{where}: kind={req.kind!r}: one of {KINDS}")
    if req.arrival_s < 0 or req.context_tokens < 0 or req.turn < 0:
        raise TraceError(f"{where}: arrival_s, context_tokens and turn must be >= 0")
    if req.new_tokens < 1 or req.output_tokens < 1:
        raise TraceError(f"{where}: new_tokens and output_tokens must be >= 1")
    if not req.session or not req.context_id:
        raise TraceError(f"{where}: session and context_id must be non-empty")
    return req


def validate(requests: Sequence[TraceRequest]) -> list[TraceRequest]:
    """Whole-trace rules: arrivals never go back; (session, turn) is unique."""
    seen: set[tuple[str, int]] = set()
    last = 0.0
    for i, req in enumerate(requests):
        if req.arrival_s < last:
            raise TraceError(f"request {i}: arrival_s={req.arrival_s} goes back in time (previous {last})")
        last = req.arrival_s
        if (req.session, req.turn) in seen:
            raise TraceError(f"request {i}: session={req.session!r} turn={req.turn} appears twice")
        seen.add((req.session, req.turn))
    return list(requests)


def read_trace(path: str | Path) -> list[TraceRequest]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError("trace", str(path), f"cannot read ({exc.strerror})") from exc
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{n}: not JSON ({exc.msg})") from exc
        out.append(validate_record(record, f"{path}:{n}"))
    return validate(out)


def dumps(requests: Iterable[TraceRequest]) -> str:
    return "".join(json.dumps(r.as_dict(), separators=(", ", ": ")) + "\n" for r in requests)


def write_trace(requests: Sequence[TraceRequest], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(validate(list(requests))), encoding="utf-8")
    return path


# -- token synthesis ---------------------------------------------------------------
def _stream(name: str, n: int, vocab_size: int, low: int) -> np.ndarray:
    blocks = []
    for b in range((n + _BLOCK - 1) // _BLOCK):
        seed = xxhash.xxh64_intdigest(f"{name}#{b}".encode())
        blocks.append(np.random.default_rng(seed).integers(low, vocab_size, size=_BLOCK, dtype=np.int64))
    return np.concatenate(blocks)[:n] if blocks else np.zeros(0, dtype=np.int64)


def prompt_tokens(req: TraceRequest, vocab_size: int, low: int = 1000) -> np.ndarray:
    """The prompt's token ids: the context stream, then the new tokens (see module doc)."""
    if not low < vocab_size:
        raise ConfigError("vocab_size", vocab_size, f"must exceed the lowest token id used ({low})")
    if req.kind == "chat":
        return _stream(req.context_id, req.prompt_len, vocab_size, low)
    context = _stream(req.context_id, req.context_tokens, vocab_size, low)
    new = _stream(f"{req.session}/{req.turn}", req.new_tokens, vocab_size, low)
    return np.concatenate([context, new])


def reusable_tokens(requests: Sequence[TraceRequest], chunk_size: int) -> list[int]:
    """Per request, the prompt tokens an ideal cache of earlier prompts holds (full chunks)."""
    seen: dict[str, int] = {}  # context stream -> longest prompt prefix stored so far
    out = []
    for req in requests:
        stored = seen.get(req.context_id, 0)
        reuse = min(stored, req.context_tokens if req.kind != "chat" else req.prompt_len)
        out.append(reuse // chunk_size * chunk_size)
        mine = req.prompt_len if req.kind == "chat" else req.context_tokens
        seen[req.context_id] = max(stored, mine)
    return out


# -- generation --------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateOptions:
    kind: str
    seed: int = 0
    requests: int = 12
    sessions: int = 3
    max_context: int = 2048
    docs: int = 4
    rate: float = 0.5  # mean arrivals per second (Poisson)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("kind", self.kind, f"one of {KINDS}")
        for name in ("requests", "sessions", "max_context", "docs"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be >= 1")
        if self.max_context < 256:
            raise ConfigError("max_context", self.max_context, "must be >= 256 tokens")
        if self.rate <= 0:
            raise ConfigError("rate", self.rate, "must be > 0")


def generate(opts: GenerateOptions) -> list[TraceRequest]:
    """A deterministic trace for ``opts`` (same options, same trace, on any machine)."""
    rng = np.random.default_rng([opts.seed, KINDS.index(opts.kind)])
    arrivals = np.cumsum(rng.exponential(1.0 / opts.rate, size=opts.requests))
    make = {"chat": _chat, "rag": _rag, "agent": _agent}[opts.kind]
    reqs = make(opts, rng)
    return validate([
        TraceRequest(**{**r.as_dict(), "arrival_s": round(float(t), 3)}) for r, t in zip(reqs, arrivals)
    ])


def _u(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def _chat(opts: GenerateOptions, rng: np.random.Generator) -> list[TraceRequest]:
    """Sessions take turns at random; each turn's prompt is the whole history so far.

    A conversation whose history no longer fits ``max_context`` ends and a new
    one (a new session) takes its place, as a user starting a fresh chat."""
    history = {f"chat-{s}": _u(rng, 32, 128) for s in range(opts.sessions)}  # system prompt
    turns = dict.fromkeys(history, 0)
    out = []
    for _ in range(opts.requests):
        live = [s for s in history if history[s] + 64 <= opts.max_context]
        if len(live) < opts.sessions:
            fresh = f"chat-{len(history)}"
            history[fresh], turns[fresh] = _u(rng, 32, 128), 0
            live.append(fresh)
        session = live[int(rng.integers(len(live)))]
        ctx = history[session]
        new = min(_u(rng, 40, 200), opts.max_context - ctx)
        output = _u(rng, 30, 150)
        out.append(TraceRequest(0.0, session, session, ctx, new, output, "chat", turns[session]))
        history[session] = ctx + new + output
        turns[session] += 1
    return out


def _rag(opts: GenerateOptions, rng: np.random.Generator) -> list[TraceRequest]:
    """Questions over a document pool; popular documents come back (Zipf-like weights)."""
    sizes = [_u(rng, opts.max_context // 4, opts.max_context - 128) for _ in range(opts.docs)]
    weights = 1.0 / np.arange(1, opts.docs + 1)
    weights /= weights.sum()
    turns: dict[str, int] = {}
    out = []
    for _ in range(opts.requests):
        doc = int(rng.choice(opts.docs, p=weights))
        session = f"user-{int(rng.integers(opts.sessions))}"
        question = min(_u(rng, 16, 64), opts.max_context - sizes[doc])
        out.append(TraceRequest(0.0, session, f"doc-{doc}", sizes[doc], max(1, question),
                                _u(rng, 20, 100), "rag", turns.get(session, 0)))
        turns[session] = turns.get(session, 0) + 1
    return out


def _agent(opts: GenerateOptions, rng: np.random.Generator) -> list[TraceRequest]:
    """A long tool/system context shared by every session, then short steps."""
    tools = _u(rng, opts.max_context // 2, opts.max_context - 160)
    turns: dict[str, int] = {}
    out = []
    for _ in range(opts.requests):
        session = f"agent-{int(rng.integers(opts.sessions))}"
        step = min(_u(rng, 24, 128), opts.max_context - tools)
        out.append(TraceRequest(0.0, session, "tools", tools, max(1, step), _u(rng, 16, 64), "agent",
                                turns.get(session, 0)))
        turns[session] = turns.get(session, 0) + 1
    return out
