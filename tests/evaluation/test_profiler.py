"""MemoryProfiler: timelines, exact cache bytes per decoding step, reports and the PNG."""

from __future__ import annotations

import mmap
import time

import pytest
from transformers import DynamicCache

from chunked_decomp import ChunkedDecomp, CompressionConfig
from chunked_decomp.evaluation.profiler import MemoryProfiler
from tests.helpers.models import make_tiny_model, random_ids

# float32 keys + values of one token: 2 layers x 2 KV heads x 16 dims x 2 x 4 bytes
BYTES_PER_TOKEN = 2 * 2 * 16 * 2 * 4
PROMPT, NEW = 80, 12


@pytest.fixture(scope="module")
def profiled() -> MemoryProfiler:
    model = make_tiny_model("llama")
    prompt = random_ids(PROMPT, seed=5)
    profiler = MemoryProfiler(interval=0.002)
    profiler.profile_generate(model, prompt, NEW, "uncompressed", pad_token_id=0)
    cfg = CompressionConfig(
        compression_ratio=0.25, reference_dtype="float16", chunk_size=16, residual_length=16
    )
    decomp = ChunkedDecomp(config=cfg)
    with decomp.applied(model):
        profiler.profile_generate(model, prompt, NEW, "compressed", pad_token_id=0)
    return profiler


def test_uncompressed_cache_grows_by_one_token_per_step(profiled):
    steps = profiled.segments[0].cache
    assert [s[0] for s in steps] == list(range(NEW))
    # after step i the cache holds the prompt and i + 1 generated tokens but the last, which is not fed back yet
    assert [s[2] for s in steps] == [(PROMPT + i) * BYTES_PER_TOKEN for i in range(NEW)]


def test_compressed_cache_is_smaller_at_every_step(profiled):
    full, comp = (seg.cache for seg in profiled.segments)
    assert len(comp) == NEW
    assert all(c[2] < 0.5 * f[2] for f, c in zip(full, comp))
    grew = [b[2] - a[2] for a, b in zip(comp, comp[1:])]
    assert any(g < 0 for g in grew), "a chunk leaving the residual window must shrink the cache"


def test_memory_samples_cover_the_block():
    profiler = MemoryProfiler(interval=0.002)
    with profiler.profile_inference("alloc") as seg:
        # A fresh anonymous mapping, every page written: resident whatever the allocator kept from earlier tests
        # (a torch tensor may reuse memory that is already resident, and then RSS does not move).
        block = mmap.mmap(-1, 64 * 1024 * 1024)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(0.05)
        block.close()
    assert len(seg.memory) >= 5
    assert seg.start <= seg.memory[1][0] <= seg.end
    assert seg.peak_bytes - seg.start_bytes >= 50 * 1024 * 1024


def test_report_text_and_dict(profiled):
    data = profiled.generate_report(as_dict=True)
    assert [s["label"] for s in data["segments"]] == ["uncompressed", "compressed"]
    full = data["segments"][0]
    assert full["decode_steps"] == NEW
    assert full["cache_bytes_per_step"] == pytest.approx(BYTES_PER_TOKEN)
    assert full["cache_mb_last_step"] == pytest.approx((PROMPT + NEW - 1) * BYTES_PER_TOKEN / 2**20)
    text = profiled.generate_report()
    assert "uncompressed" in text and "compressed" in text and "peak MB" in text
    assert f"{PROMPT * BYTES_PER_TOKEN / 2**20:.3f}" in text  # KV MB after the first step, uncompressed


def test_plot_is_a_png(profiled, tmp_path):
    path = profiled.plot_memory_timeline(tmp_path / "timeline.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["timeline.png"]


def test_misuse_is_refused(tmp_path):
    profiler = MemoryProfiler()
    with pytest.raises(RuntimeError, match="inside profile_inference"):
        profiler.record_cache(DynamicCache())
    with (
        profiler.profile_inference("outer"),
        pytest.raises(RuntimeError, match="inside"),
        profiler.profile_inference("inner"),
    ):
        pass
    with pytest.raises(ValueError, match="interval"):
        MemoryProfiler(interval=0)
    with pytest.raises(ValueError, match="nothing to plot"):
        MemoryProfiler().plot_memory_timeline(tmp_path / "x.png")
    assert "nothing profiled" in MemoryProfiler().generate_report()
