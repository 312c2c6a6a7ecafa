"""Chunk keys: prefix chaining, namespace separation, token validation."""

from __future__ import annotations

import numpy as np
import pytest

from streamkv.keys import Namespace, as_token_array, chunk_keys, external_key
from streamkv.layout import KVLayout

LAYOUT = KVLayout(4, 2, 8, "bfloat16", 16)
NS = Namespace("model-a", LAYOUT)


def test_one_key_per_full_chunk_only() -> None:
    assert len(chunk_keys(list(range(47)), 16, NS)) == 2
    assert len(chunk_keys(list(range(48)), 16, NS)) == 3
    assert chunk_keys([], 16, NS) == []


def test_changing_a_token_changes_that_chunk_and_later_only() -> None:
    tokens = np.arange(160)
    base = chunk_keys(tokens, 16, NS)
    for i in range(10):
        changed = tokens.copy()
        changed[i * 16 + 5] += 1
        keys = chunk_keys(changed, 16, NS)
        assert keys[:i] == base[:i]
        assert all(a != b for a, b in zip(keys[i:], base[i:]))


def test_prefix_keys_are_a_prefix() -> None:
    tokens = np.arange(100)
    assert chunk_keys(tokens[:64], 16, NS) == chunk_keys(tokens, 16, NS)[:4]


@pytest.mark.parametrize(
    "other",
    [
        Namespace("model-b", LAYOUT),
        Namespace("model-a", KVLayout(4, 2, 8, "float16", 16)),
        Namespace("model-a", KVLayout(4, 2, 8, "bfloat16", 16, mla=False).with_chunk_size(32)),
        Namespace("model-a", KVLayout(4, 1, 8, "bfloat16", 16, mla=True)),
        Namespace("model-a", LAYOUT, tp_rank=1, tp_size=2),
        Namespace("model-a", LAYOUT, tp_rank=0, tp_size=2),
        Namespace("model-a", LAYOUT, pp_rank=1),
        Namespace("model-a", LAYOUT, format_version=2),
    ],
)
def test_namespaces_separate_keys(other: Namespace) -> None:
    tokens = np.arange(64)
    assert other.id != NS.id
    assert set(chunk_keys(tokens, 16, other)).isdisjoint(chunk_keys(tokens, 16, NS))
    assert external_key(other, "abc") != external_key(NS, "abc")


def test_same_inputs_same_keys() -> None:
    assert chunk_keys(range(64), 16, Namespace("model-a", LAYOUT)) == chunk_keys(np.arange(64), 16, NS)


@pytest.mark.parametrize("bad", ["some text", [1.5, 2.0], [[1, 2], [3, 4]], [-1, 2]])
def test_bad_tokens_rejected(bad: object) -> None:
    with pytest.raises(TypeError, match="tokens"):
        as_token_array(bad)


def test_torch_tokens_accepted() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(64).unsqueeze(0)
    assert chunk_keys(t, 16, NS) == chunk_keys(np.arange(64), 16, NS)


def test_128k_prompt_hashes() -> None:
    """Every chunk of a 128k-token prompt gets a distinct key (speed is in benchmarks)."""
    keys = chunk_keys(np.random.default_rng(0).integers(0, 50000, 131072), 256, NS)
    assert len(keys) == 512 and len(set(keys)) == 512
