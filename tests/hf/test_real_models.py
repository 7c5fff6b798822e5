"""The real models, pinned: full rank is the uncompressed cache, and each preset's cost and bytes stay in band.

Slow: each model loads once per module (SmolLM2-135M in seconds, Qwen2.5-Coder-0.5B in about 40 s). The text
windows are ones no preset or threshold was chosen on (docs/results.md tunes on Wikipedia from token 5,000 and
checks from 205,000; code from 5,000 to 35,000), so a band holding here is the claim holding on new text.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from chunked_decomp import ChunkedSVDCache, CompressionConfig
from chunked_decomp.evaluation.data import load_texts, load_token_ids
from chunked_decomp.evaluation.methods import ChunkedDecompMethod, FullCache
from chunked_decomp.evaluation.perplexity import continuation_perplexity
from chunked_decomp.hf.calibration import ensure_head_weights
from chunked_decomp.hf.models import cache_geometry, cache_kwarg_name
from tests.helpers.storage import held_bytes

pytestmark = pytest.mark.slow

# model -> (text, first token of the context window)
TEXTS = {"smollm2-135m": ("wikipedia", 105_000), "qwen2.5-coder-0.5b": ("python", 45_000)}

# (model, preset) -> the most pooled continuation perplexity may rise (%, 1,024-token contexts compressed whole,
# the next 512 tokens scored, three windows 10,000 tokens apart), in brackets what it was when the band was set.
# Each band sits well below what a known defect gives: on these windows Qwen with fixed 4-bit bases (basis_bits: 4)
# rises by +5.0% (balanced) and +17.9% (aggressive).
BANDS = {
    ("smollm2-135m", "balanced"): 0.8,  # (+0.30)
    ("smollm2-135m", "long_context"): 0.8,  # (+0.22)
    ("smollm2-135m", "fast"): 0.8,  # (+0.20)
    ("smollm2-135m", "aggressive"): 1.0,  # (+0.00)
    ("qwen2.5-coder-0.5b", "balanced"): 0.8,  # (+0.27)
    ("qwen2.5-coder-0.5b", "long_context"): 1.5,  # (+0.85)
    ("qwen2.5-coder-0.5b", "fast"): 1.5,  # (+0.69)
    ("qwen2.5-coder-0.5b", "aggressive"): 4.0,  # (+2.53)
}


@pytest.fixture(scope="module", params=list(TEXTS))
def real(request):
    from chunked_decomp.hf.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(request.param)
    ensure_head_weights(model, tokenizer)  # what compress_model(model, tokenizer) does for a user
    dataset, start = TEXTS[request.param]
    ids = load_token_ids(tokenizer, load_texts(dataset))
    yield request.param, model, ids, start
    del model


@torch.no_grad()
def test_full_rank_is_the_uncompressed_cache(real) -> None:
    """1,024 tokens prefilled (three chunks factored at once, keys through the rotary round trip), then 64
    greedy steps: the same tokens, and every step's logits within float32 rounding of DynamicCache's."""
    name, model, ids, start = real
    _, _, head_dim = cache_geometry(model)
    config = CompressionConfig(
        target_rank=head_dim, adaptive_rank=False, use_quantization=False, factor_dtype="float32"
    )
    prompt = ids[start : start + 1024].unsqueeze(0)
    kw = cache_kwarg_name(model)
    runs = []
    for cache in (DynamicCache(), ChunkedSVDCache.from_model(model, config)):
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=64,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **{kw: cache},
        )
        runs.append((out.sequences, torch.stack(out.scores)))
    (ref_tokens, ref_logits), (got_tokens, got_logits) = runs
    assert sum(len(layer.chunks) for layer in cache.layers) == 3 * len(cache.layers)
    assert torch.equal(got_tokens, ref_tokens)
    error = (got_logits - ref_logits).norm() / ref_logits.norm()
    assert error < 1e-5, f"{name}: relative logit error {error:.2e}"


@pytest.mark.parametrize("preset", ["balanced", "long_context", "fast", "aggressive"])
def test_preset_cost_and_bytes_in_band(real, preset) -> None:
    """Continuation perplexity pooled over three windows (the geometric mean of the ratios, as the docs
    report it) within the band, and the budget held on the bytes the cache holds."""
    name, model, ids, start = real
    config = CompressionConfig.from_preset(preset)
    method = ChunkedDecompMethod(config)
    logs, ratios = [], []
    for window in WINDOWS:
        at = start + window
        base = _baseline(name, model, ids, at)
        got = continuation_perplexity(model, method, ids, 1024, 512, start=at)
        logs.append(math.log(got.perplexity / base))
        ratios.append(got.ratio)
    increase = 100 * (math.exp(sum(logs) / len(logs)) - 1)
    print(f"{name} {preset}: continuation {increase:+.2f}% pooled, rho16 {max(ratios):.4f}")
    assert -2.0 < increase < BANDS[(name, preset)], f"{name} {preset}: {increase:+.2f}%"
    assert all(config.compression_ratio * 0.85 < r <= config.compression_ratio * 1.02 for r in ratios), ratios
    # What the cache reports is every byte it holds.
    cache = method.new_cache(model)
    with torch.no_grad():
        model(
            input_ids=ids[start : start + 1024].unsqueeze(0),
            use_cache=True,
            **{cache_kwarg_name(model): cache},
        )
    method.after_prefill(cache)
    assert held_bytes(cache, exclude=(model,)) == cache.memory_stats().stored_bytes


WINDOWS = (0, 10_000, 20_000)
_BASELINES: dict[tuple[str, int], float] = {}


def _baseline(name: str, model, ids, start: int) -> float:
    if (name, start) not in _BASELINES:
        _BASELINES[name, start] = continuation_perplexity(
            model, FullCache(), ids, 1024, 512, start=start
        ).perplexity
    return _BASELINES[name, start]
