"""End to end on a real model: SmolLM2-135M in float32 on the CPU through HF transformers.

KV served from the cache must give the same logits as recompute, bit for bit,
and the same generated tokens; also after the process restarts (disk only).

"Recompute" is the engine recomputing the prefix KV (a fresh cache, prefix
forward, then the same suffix forward): that isolates what streamkv supplies,
the KV bytes. A single forward over the whole prompt is a different float
computation (BLAS blocks a 33-row GEMM differently from a 1057-row one), so
against it the logits agree to float tolerance, not bit for bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from streamkv.adapters.transformers import CachedModel  # noqa: E402
from streamkv.adapters.transformers.cache import cache_kwargs  # noqa: E402
from streamkv.adapters.transformers.smollm2 import load_smollm2  # noqa: E402
from streamkv.config import StreamKVConfig  # noqa: E402
from streamkv.fingerprint import fingerprint_model  # noqa: E402

pytestmark = pytest.mark.slow
PREFIX, SUFFIX = 1024, 40


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_smollm2("float32")[0]


@pytest.fixture(scope="module")
def fingerprint(model) -> str:  # type: ignore[no-untyped-def]
    return fingerprint_model(model)


def prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(100, 40000, (PREFIX,), generator=g)
    a = torch.cat([prefix, torch.randint(100, 40000, (SUFFIX,), generator=g)])
    b = torch.cat([prefix, torch.randint(100, 40000, (SUFFIX - 7,), generator=g)])
    return a, b


def config(tmp_path: Path, **kw) -> StreamKVConfig:  # type: ignore[no-untyped-def]
    return StreamKVConfig(disk_dir=str(tmp_path / "disk"), memory_gb=0.5, disk_gb=1, **kw)


def recompute(model, ids: torch.Tensor, split: int = PREFIX):  # type: ignore[no-untyped-def]
    """Last-position logits and the cache, with the prefix KV recomputed from scratch."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids[:split].unsqueeze(0), **cache_kwargs(model, cache), use_cache=True)
        logits = model(ids[split:].unsqueeze(0), **cache_kwargs(model, cache), use_cache=True).logits[:, -1, :]
    return logits, cache


def test_streamed_logits_equal_recompute_bit_for_bit(model, fingerprint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first, second = prompts()
    reference, ref_cache = recompute(model, second)
    with torch.inference_mode():
        single_pass = model(second.unsqueeze(0)).logits[:, -1, :]
    with CachedModel(model, config(tmp_path), fingerprint=fingerprint) as cm:
        cold = cm.prefill(first)
        assert cold.hit_tokens == 0
        assert cold.stored.result() == PREFIX // 256
        warm = cm.prefill(second)
    assert warm.hit_tokens == PREFIX
    assert warm.logits.dtype == torch.float32
    assert torch.equal(warm.logits, reference)
    for streamed_layer, ref_layer in zip(warm.cache.layers, ref_cache.layers):
        assert torch.equal(streamed_layer.keys, ref_layer.keys)
        assert torch.equal(streamed_layer.values, ref_layer.values)
    torch.testing.assert_close(warm.logits, single_pass, rtol=1e-4, atol=1e-4)


def test_generate_gives_identical_tokens(model, fingerprint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first, second = prompts(1)
    with torch.inference_mode():
        reference = model.generate(second.unsqueeze(0), max_new_tokens=12, do_sample=False)
    with CachedModel(model, config(tmp_path), fingerprint=fingerprint) as cm:
        cm.prefill(first).stored.result()
        assert cm.engine.lookup(second) == PREFIX
        streamed = cm.hf_generate(second, max_new_tokens=12, do_sample=False)
        greedy = cm.generate(second, max_new_tokens=12)
    assert torch.equal(streamed, reference)
    assert greedy.hit_tokens == PREFIX
    assert greedy.tokens == reference[0, len(second):].tolist()


STORE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from streamkv.adapters.transformers import CachedModel
    from streamkv.adapters.transformers.smollm2 import load_smollm2
    from streamkv.config import StreamKVConfig
    model = load_smollm2("float32")[0]
    g = torch.Generator().manual_seed(int(sys.argv[2]))
    prefix = torch.randint(100, 40000, (1024,), generator=g)
    ids = torch.cat([prefix, torch.randint(100, 40000, (40,), generator=g)])
    cfg = StreamKVConfig(disk_dir=sys.argv[1], memory_gb=0.5, disk_gb=1, tiers=("disk",))
    with CachedModel(model, cfg) as cm:
        print(cm.prefill(ids).stored.result())
    """
)


def test_hit_after_process_restart_disk_only(model, fingerprint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    disk = tmp_path / "disk"
    out = subprocess.run([sys.executable, "-c", STORE_SCRIPT, str(disk), "2"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "4"
    _, second = prompts(2)
    reference, _ = recompute(model, second)
    with CachedModel(model, config(tmp_path, tiers=("disk",)), fingerprint=fingerprint) as cm:
        warm = cm.prefill(second)
    assert warm.hit_tokens == PREFIX
    assert torch.equal(warm.logits, reference)


def test_corrupt_layer_recomputes_and_stays_correct(model, fingerprint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first, second = prompts(3)
    reference, _ = recompute(model, second, split=2 * 256)
    cfg = config(tmp_path, tiers=("disk",))
    with CachedModel(model, cfg, fingerprint=fingerprint) as cm:
        cm.prefill(first).stored.result()
        victim = tmp_path / "disk" / cm.engine.keys(second)[2]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # the last layer of chunk 2: found only after 29 layers ran
    victim.write_bytes(bytes(data))
    with CachedModel(model, cfg, fingerprint=fingerprint) as cm:
        warm = cm.prefill(second, store=False)
    assert warm.retries == 1
    assert torch.equal(warm.logits, reference)


def test_wrong_layout_for_model_is_rejected(model, fingerprint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from streamkv.engine import StreamKVEngine
    from streamkv.errors import LayoutMismatch
    from streamkv.keys import Namespace
    from streamkv.layout import KVLayout

    wrong = KVLayout(12, 3, 64, "float32", 256)
    engine = StreamKVEngine(config(tmp_path), wrong, Namespace(fingerprint, wrong))
    with CachedModel(model, config(tmp_path), engine=engine) as cm:
        with pytest.raises(LayoutMismatch, match="30 cache layers"):
            cm.prefill(prompts()[0])
