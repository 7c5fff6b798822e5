"""Which compute path serves a layer: the Triton kernel on a GPU, the fused C++ kernel on the CPU, or the
PyTorch reference (no transformers import).

- :func:`rebuild`: a layer's compressed keys and values rebuilt, for the model's own attention.
- :func:`layer_context`: a layer's states as a `FactoredContext` in the form the chosen path reads.
- :func:`attend`: softmax attention of a query over a `FactoredContext`, through that path.

The fused C++ kernel is built on first use by the factored attention (:func:`layer_context`); the rebuild path
uses it only once built, so that the default decoding never waits for, nor writes, a compilation.
"""

from __future__ import annotations

import torch

from chunked_decomp.backends import cpu_kernel, reference
from chunked_decomp.backends import triton as triton_attention
from chunked_decomp.backends.context import FactoredContext
from chunked_decomp.core.rotary import range_cos_sin


def _dequant_into():
    """The fused dequantiser when the C++ kernel is built in this process (never starts a build), else None."""
    return cpu_kernel.dequant_into if cpu_kernel.built() else None


def rebuild(store) -> tuple[torch.Tensor, torch.Tensor]:
    """A `LayerStore`'s chunks rebuilt: keys and values (batch, kv_heads, compressed, d) in the layer's dtype,
    keys in the model's rotary frame."""
    return store.reconstruct(_dequant_into())


def layer_context(store, tail_keys: torch.Tensor, tail_values: torch.Tensor) -> FactoredContext:
    """A `LayerStore` with its layer's exact window as a `FactoredContext`: chunks as factors (values always;
    keys unless factored before the rotary embedding, then rebuilt: as factored with the cos / sin tables for the
    fused kernel to rotate them, or rotated here without it)."""
    ctx = FactoredContext(store.sink_keys, store.sink_values, tail_keys, tail_values)
    packed = store.packed()
    if packed is None:
        ctx.keys, ctx.values = rebuild(store)
        return ctx
    pre_rope = [c.keys_pre_rope for c in store.chunks]
    if (
        packed[0].quantized
        and packed[1].quantized
        and triton_attention.usable(store.device)
        and (all(pre_rope) or not any(pre_rope))
    ):
        # On a GPU, quantised factors are read by the Triton kernel, which rotates pre-rotary keys on chip.
        ctx.key_packed, ctx.value_packed, ctx.triton = packed[0], packed[1], True
        if pre_rope[0]:
            ctx.rope = (store.inv_freq, store.chunks[0].start)
        return ctx
    # Quantised factors on the CPU are read packed by the fused kernel when it is built.
    fused = packed[1].fusable and cpu_kernel.available()
    if fused:
        ctx.value_packed = packed[1]
    else:
        ctx.value_runs = packed[1].factors(_dequant_into())
    if all(pre_rope) and store.device.type == "cpu" and cpu_kernel.available():
        ctx.keys_rope = range_cos_sin(store.chunks[0].start, packed[0].length, store.inv_freq, store.device)
        if packed[0].basis_fusable:
            # On a shared basis the fused kernel rebuilds, rotates and scores a group of keys at a time.
            ctx.key_basis = packed[0]
        else:
            # Pre-rotary keys rebuilt as factored; the fused kernel rotates them while it scores them.
            ctx.keys = packed[0].reconstruct(_dequant_into())
    elif any(pre_rope):
        ctx.keys = store.rotate_back(packed[0].reconstruct(_dequant_into()))
    elif fused and packed[0].fusable:
        ctx.key_packed = packed[0]
    else:
        ctx.key_runs = packed[0].factors(_dequant_into())
    return ctx


def attend(
    query: torch.Tensor,
    ctx: FactoredContext,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of query (batch, q_heads, q, d) over the context; returns (batch, q, q_heads, d_v).

    attention_mask: None (causal), or (batch, 1, q, length) boolean (True = attend) or additive float. Grouped
    query heads share their KV head as ``repeat_kv`` does (query head i uses KV head i // (q_heads // kv_heads)).
    softcap: scores capped as ``tanh(s / softcap) * softcap`` after scaling (Gemma-2), or None.
    """
    b, hq, q, d = query.shape
    hkv = ctx.tail_keys.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of the cache's KV heads ({hkv})")
    rep = hq // hkv
    rows = rep * q
    qg = query.float().reshape(b, hkv, rows, d)  # row = (repeat, query position)
    if attention_mask is not None and attention_mask.shape[-1] != ctx.length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the cache holds {ctx.length}"
        )
    if ctx.triton:
        if softcap is not None:
            raise ValueError(
                "the Triton kernel does not cap scores (softcap): use decode_attention='rebuild'"
            )
        out = _attend_triton(qg, q, ctx, attention_mask, scaling)
        return out.view(b, hq, q, -1).transpose(1, 2).to(query.dtype)
    # The fused kernel scores the exact sinks and tail with the chunks, in one call per layer (the products of a
    # decoding step are small enough that each further call costs more than its arithmetic).
    if ctx.key_packed is not None:
        scores = cpu_kernel.scores(qg, ctx.key_packed, ctx.sink_keys, ctx.tail_keys)
    elif ctx.key_basis is not None:
        scores = cpu_kernel.basis_rope_scores(qg, ctx.key_basis, *ctx.keys_rope, ctx.sink_keys, ctx.tail_keys)
    elif ctx.keys_rope is not None:
        scores = cpu_kernel.rope_scores(qg, ctx.keys, *ctx.keys_rope, ctx.sink_keys, ctx.tail_keys)
    else:
        scores = reference.scores(qg, ctx)
    scores = scores.mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap).mul_(softcap)
    length = scores.shape[-1]
    probs = reference.masked_softmax(scores.view(b, hkv, rep, q, length), q, attention_mask)
    probs = probs.view(b, hkv, rows, length)
    if ctx.value_packed is not None:
        out = cpu_kernel.values(probs, ctx.value_packed, ctx.sink_values, ctx.tail_values)
    else:
        out = reference.values(probs, ctx)
    return out.view(b, hq, q, -1).transpose(1, 2).to(query.dtype)


def _attend_triton(
    qg: torch.Tensor, q: int, ctx: FactoredContext, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """`attend` through the Triton kernel. qg: (batch, kv_heads, rows, d) float32, rows = (repeat, query
    position) for q query positions; returns (batch, kv_heads, rows, d_v) float32."""
    b = qg.shape[0]
    s0, c = ctx.sink_keys.shape[-2], ctx.key_packed.length
    length = ctx.length
    bias = exact_bias = None
    if attention_mask is None and q > 1:
        # Query i sits at position length - q + i and sees everything up to it.
        pos = torch.arange(length, device=qg.device)
        attention_mask = (pos[None, :] <= torch.arange(length - q, length, device=qg.device)[:, None])[
            None, None
        ]
    if attention_mask is not None:
        mask = attention_mask[:, 0].expand(b, q, length)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        bias = mask[..., s0 : s0 + c].float().contiguous()
        exact_bias = torch.cat([mask[..., :s0], mask[..., s0 + c :]], dim=-1).float().contiguous()
    exact_k = torch.cat([ctx.sink_keys, ctx.tail_keys], dim=-2) if s0 else ctx.tail_keys
    exact_v = torch.cat([ctx.sink_values, ctx.tail_values], dim=-2) if s0 else ctx.tail_values
    inv_freq, offset = ctx.rope if ctx.rope is not None else (None, 0)
    return triton_attention.attention(
        qg, ctx.key_packed, ctx.value_packed, exact_k, exact_v, scaling,
        bias=bias, exact_bias=exact_bias, inv_freq=inv_freq, rope_offset=offset,
    )  # fmt: skip
