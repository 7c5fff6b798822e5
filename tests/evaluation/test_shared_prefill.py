"""One shared prefill leaves every method's cache as its own prefill would: same bytes, same logits after."""

from __future__ import annotations

import contextlib

import pytest
import torch

from chunked_decomp.config import CompressionConfig
from chunked_decomp.evaluation.methods import ChunkedDecompMethod, FullCache, KVMethod, forward_with_cache
from chunked_decomp.evaluation.peers import QuantizedCacheMethod
from chunked_decomp.evaluation.shared_prefill import prefill_together
from tests.helpers.models import make_tiny_model, random_ids

BASE = dict(chunk_size=8, residual_length=8, num_sink_tokens=2, quant_group_size=8, compression_ratio=0.25)
CONFIGS = {
    "default": {},
    "factored": {"decode_attention": "factored"},
    "post_rope_keys": {"compress_keys_pre_rope": False},
    "shared_basis_auto_bits": {"basis_sharing": "layer", "basis_bits": "auto"},
}


def chunked(name: str, compress_all: bool) -> KVMethod:
    config = CompressionConfig(**BASE, **CONFIGS[name])
    return ChunkedDecompMethod(config, name=f"{name}/{compress_all}", compress_all=compress_all)


def methods(model_name: str) -> list[KVMethod]:
    out: list[KVMethod] = [FullCache()]
    if model_name != "qwen2_hybrid":  # QuantizedCache refuses sliding-window layers
        out.append(QuantizedCacheMethod(nbits=4, q_group_size=16, residual_length=8))
    return out + [chunked(name, all_) for name in CONFIGS for all_ in (False, True)]


def greedy_logits(model, prefilled, steps: int = 6) -> torch.Tensor:
    token, position, rows = prefilled.last_logits.argmax(-1), prefilled.context_length, []
    for _ in range(steps):
        logits = forward_with_cache(model, prefilled.cache, token.view(1, 1), position)[0, -1]
        rows.append(logits)
        token, position = logits.argmax(-1), position + 1
    return torch.stack(rows)


@pytest.mark.parametrize("model_name", ["llama", "qwen2_hybrid", "gpt2"])
def test_shared_prefill_equals_each_methods_own(model_name):
    model = make_tiny_model(model_name, peaked=True)
    ids = random_ids(100)
    together = prefill_together(model, methods(model_name), ids)
    for method, shared in zip(methods(model_name), together):
        own = method.prefill(model, ids)
        assert shared.storage == own.storage, method.name
        assert torch.equal(shared.last_logits, own.last_logits), method.name
        assert torch.equal(greedy_logits(model, shared), greedy_logits(model, own)), method.name
    # The compressing methods compressed something, or the test proves nothing.
    assert all(p.storage.ratio < 0.7 for p in together[1:])


class Hooked(FullCache):
    """A method acting during the forward: it must prefill on its own."""

    name = "hooked"
    exact_prefill = False
    calls = 0

    def prefill_context(self, model):
        Hooked.calls += 1
        return contextlib.nullcontext()


def test_a_method_acting_during_the_forward_prefills_on_its_own():
    model = make_tiny_model("llama")
    ids = random_ids(40)
    Hooked.calls = 0
    out = prefill_together(model, [FullCache(), Hooked(), chunked("default", False)], ids)
    assert Hooked.calls == 1
    assert torch.equal(out[0].last_logits, out[1].last_logits)


def test_refuses_unbatched_ids():
    with pytest.raises(ValueError, match="input_ids"):
        prefill_together(make_tiny_model("llama"), [FullCache()], torch.arange(5))
