"""Logit comparisons and an independent rebuild of a compressed cache, for the tests."""

from __future__ import annotations

import torch
from transformers import DynamicCache

# Largest |got - ref| where two paths must agree to float rounding, relative to the largest |ref| (float32 on the
# peaked tiny models: measured up to 7e-6).
EXACT_TOL = 2e-5


def assert_exact(got: torch.Tensor, ref: torch.Tensor, tol: float = EXACT_TOL) -> None:
    """``got`` equals ``ref`` to float rounding: max |got - ref| <= tol × max |ref|."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert err <= tol * scale, (
        f"max |got - ref| = {err:.3g}, allowed {tol * scale:.3g} (max |ref| = {scale:.3g})"
    )


def _rotate_like_the_model(model: torch.nn.Module, keys: torch.Tensor, start: int) -> torch.Tensor:
    """keys (batch, kv_heads, T, d) rotated to positions start … start + T - 1 by the model's own rotary embedding
    and transformers' ``apply_rotary_pos_emb`` (not the library's rotation)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary = next(m for name, m in model.named_modules() if name.endswith("rotary_emb"))
    positions = torch.arange(start, start + keys.shape[-2])[None]
    cos, sin = rotary(keys, positions)
    _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
    return rotated


def rebuilt_reference_cache(model: torch.nn.Module, cache) -> DynamicCache:
    """A DynamicCache holding what ``cache`` (a `ChunkedSVDCache`) stores, rebuilt the slow way: each chunk's factors
    multiplied out on their own (`FactorSet.reconstruct`), pre-rotary keys rotated by the model's rotary embedding,
    then sinks, chunks and window side by side. Sliding-window layers are copied as they are."""
    from chunked_decomp.hf.layer import ChunkedSVDLayer

    reference = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, ChunkedSVDLayer):
            reference.layers[i] = type(layer)(sliding_window=layer.sliding_window)
            reference.layers[i].update(layer.keys.clone(), layer.values.clone())
            continue
        keys, values = [layer.sink_keys], [layer.sink_values]
        for chunk in layer.chunks:
            k = chunk.keys.reconstruct(torch.float32)
            if chunk.keys_pre_rope:
                k = _rotate_like_the_model(model, k, chunk.start)
            keys.append(k.to(layer.keys.dtype))
            values.append(chunk.values.reconstruct(torch.float32).to(layer.values.dtype))
        reference.update(torch.cat([*keys, layer.keys], -2), torch.cat([*values, layer.values], -2), i)
    return reference
