"""SmolLM2-135M (HF transformers adapter) against a real ``streamkv serve``: KV stored
through the daemon by one engine and streamed back to a fresh one gives the same
logits as recompute, bit for bit. The adapter is unchanged: only its engine's tier is
the daemon."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from streamkv.adapters.transformers import CachedModel  # noqa: E402
from streamkv.adapters.transformers.cache import cache_kwargs  # noqa: E402
from streamkv.adapters.transformers.session import layout_for  # noqa: E402
from streamkv.adapters.transformers.smollm2 import load_smollm2  # noqa: E402
from streamkv.client import DaemonStore  # noqa: E402
from streamkv.config import StreamKVConfig  # noqa: E402
from streamkv.engine import StreamKVEngine  # noqa: E402
from streamkv.fingerprint import fingerprint_model  # noqa: E402
from streamkv.keys import Namespace  # noqa: E402
from tests.daemon_helpers import DaemonProcess, short_tmp  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
PREFIX, SUFFIX = 1024, 40


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess(short_tmp()).start()
    yield d
    d.stop()
    shutil.rmtree(d.root, ignore_errors=True)


def daemon_model(model, fingerprint: str, sock: str) -> CachedModel:  # type: ignore[no-untyped-def]
    config = StreamKVConfig(mode="daemon", socket=sock)
    layout = layout_for(model, config.chunk_size)
    engine = StreamKVEngine(config, layout, Namespace(model=fingerprint, layout=layout),
                            tiers=[DaemonStore.from_config(config)])
    return CachedModel(model, config, engine=engine)


def test_smollm2_through_the_daemon_equals_recompute(daemon: DaemonProcess, tmp_path: Path) -> None:
    model = load_smollm2("float32")[0]
    fingerprint = fingerprint_model(model)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(100, 40000, (PREFIX,), generator=g)
    first = torch.cat([prefix, torch.randint(100, 40000, (SUFFIX,), generator=g)])
    second = torch.cat([prefix, torch.randint(100, 40000, (SUFFIX - 5,), generator=g)])
    with daemon_model(model, fingerprint, daemon.socket) as cm:
        cold = cm.prefill(first)
        assert cold.hit_tokens == 0 and cold.stored.result() == PREFIX // 256
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(second[:PREFIX].unsqueeze(0), **cache_kwargs(model, cache), use_cache=True)
        reference = model(second[PREFIX:].unsqueeze(0), **cache_kwargs(model, cache), use_cache=True).logits[:, -1, :]
    with daemon_model(model, fingerprint, daemon.socket) as cm:  # a fresh engine: only the daemon has the KV
        warm = cm.prefill(second)
    assert warm.hit_tokens == PREFIX
    assert torch.equal(warm.logits, reference)
