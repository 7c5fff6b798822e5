"""Attention over the compressed cache without rebuilding it: a transformers ``AttentionInterface`` function.

With ``decode_attention="factored"`` a cache layer hands the attention, instead of rebuilt keys and values, a
:class:`FactoredContext`: the exact sinks and residual window, and each run of equal-length chunks as zero-padded
factors, a chunk of keys being ``Uᵀ V`` with U: (w, T) per-token coefficients and V: (w, d) a basis. The
scores of a query q over a chunk are then ``(q Vᵀ) U`` and its share of the output ``(p Uᵀ) V``: two thin
products of cost w·(T + d) per query row instead of a rebuild of cost w·T·d per head. Keys must have been
factored after the rotary embedding for that (``compress_keys_pre_rope=False``); pre-rotary keys are rebuilt
as factored (one product) and rotated while they are scored (by the fused CPU kernel,
`chunked_decomp.kernels.rope_scores`; without it, rotated first), while values stay factored.

The function is registered as ``"chunked_decomp"``; for anything but a factored context (a prefill without
compressed chunks, another cache) it is transformers' SDPA attention. Masks come from transformers' SDPA mask
function, registered under the same name.

Shapes: query (batch, q_heads, q_len, d); the context's states (batch, kv_heads, tokens, d); grouped-query
heads share their KV head as ``repeat_kv`` does (query head i uses KV head i // (q_heads // kv_heads)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chunked_decomp import kernels, triton_attention

ATTENTION_NAME = "chunked_decomp"
CONTEXT_ATTR = "chunked_decomp_context"
_PREVIOUS_ATTR = "_chunked_decomp_previous_attn"


@dataclass
class FactoredContext:
    """One layer's cached states at one update (taken before any chunk ages out of the window).

    sink_*: (batch, kv_heads, S, d) exact; tail_*: (batch, kv_heads, L, d) exact, the new tokens last;
    key_runs / value_runs: per run of equal-length chunks, (token (batch, kv_heads, n, w, T), channel
    (batch, kv_heads, n, w, d)) float32; keys: the compressed keys rebuilt, (batch, kv_heads, C, d), when they
    are not factored (pre-rotary keys); values likewise when the layout has no runs. key_packed / value_packed:
    the quantised `PackedFactors` themselves, read by the fused kernel (`chunked_decomp.kernels`) instead of runs.
    triton: both packed kinds are read by the Triton kernel (`chunked_decomp.triton_attention`), with
    rope = (inv_freq, position of the first compressed token) when the keys were factored before the rotary
    embedding (rotated on chip), else None.
    keys_rope: (cos, sin), each (C, rotary_dim), when ``keys`` are rebuilt as factored, before the rotary
    embedding, for the fused kernel to rotate while it scores them (`chunked_decomp.kernels.rope_scores`); None
    when ``keys`` are in the model's rotary frame.
    """

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    key_runs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    value_runs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    key_packed: Any = None
    value_packed: Any = None
    triton: bool = False
    rope: tuple[torch.Tensor, int] | None = None
    keys_rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def length(self) -> int:
        """Tokens covered: sinks + compressed + tail."""
        if self.keys is not None:
            compressed = self.keys.shape[-2]
        elif self.key_packed is not None:
            compressed = self.key_packed.length
        else:
            compressed = sum(u.shape[2] * u.shape[4] for u, _ in self.key_runs)
        return self.sink_keys.shape[-2] + compressed + self.tail_keys.shape[-2]

    def handles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stand-ins for the keys and values a cache's ``update`` returns: meta tensors of the full shape that
        carry this context; any use other than by :func:`factored_attention` fails loudly instead of attending
        to part of the sequence."""
        b, h, _, d = self.tail_keys.shape
        dv = self.tail_values.shape[-1]
        keys = torch.empty(b, h, self.length, d, device="meta", dtype=self.tail_keys.dtype)
        values = torch.empty(b, h, self.length, dv, device="meta", dtype=self.tail_values.dtype)
        setattr(keys, CONTEXT_ATTR, self)
        setattr(values, CONTEXT_ATTR, self)
        return keys, values


def attend(
    query: torch.Tensor, ctx: FactoredContext, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of query (batch, q_heads, q, d) over the context; returns (batch, q, q_heads, d_v).

    attention_mask: None (causal), or (batch, 1, q, length) boolean (True = attend) or additive float.
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
        out = _attend_triton(qg, q, ctx, attention_mask, scaling)
        return out.view(b, hq, q, -1).transpose(1, 2).to(query.dtype)
    # The fused kernel scores the exact sinks and tail with the chunks, in one call per layer (the products of a
    # decoding step are small enough that each further call costs more than its arithmetic).
    if ctx.key_packed is not None:
        scores = kernels.scores(qg, ctx.key_packed, ctx.sink_keys, ctx.tail_keys)
    elif ctx.keys_rope is not None:
        scores = kernels.rope_scores(qg, ctx.keys, *ctx.keys_rope, ctx.sink_keys, ctx.tail_keys)
    else:
        parts = [qg @ ctx.sink_keys.float().transpose(-1, -2)]
        if ctx.key_runs is not None:
            for u, v in ctx.key_runs:
                # (q Vᵀ) U per chunk: (b, h, n, rows, w) then (b, h, n, rows, T), laid out chunk after chunk.
                s = torch.matmul(torch.matmul(qg.unsqueeze(2), v.transpose(-1, -2)), u)
                parts.append(s.transpose(2, 3).reshape(b, hkv, rows, -1))
        else:
            parts.append(qg @ ctx.keys.float().transpose(-1, -2))
        parts.append(qg @ ctx.tail_keys.float().transpose(-1, -2))
        scores = torch.cat(parts, dim=-1)
    scores = scores.mul_(scaling)
    length = scores.shape[-1]
    scores = scores.view(b, hkv, rep, q, length)
    if attention_mask is None:
        if q > 1:
            # Query i sits at position length - q + i and sees everything up to it.
            pos = torch.arange(length, device=scores.device)
            last = torch.arange(length - q, length, device=scores.device)
            scores = scores.masked_fill(pos[None, :] > last[:, None], float("-inf"))
    else:
        mask = attention_mask[:, :, None]  # (batch, 1, 1, q, length)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    if attention_mask is not None:
        probs = probs.nan_to_num(0.0)  # rows with every position masked (padding queries)
    probs = probs.view(b, hkv, rows, length)
    if ctx.value_packed is not None:
        out = kernels.values(probs, ctx.value_packed, ctx.sink_values, ctx.tail_values)
        return out.view(b, hq, q, -1).transpose(1, 2).to(query.dtype)
    s0 = ctx.sink_keys.shape[-2]
    out = probs[..., :s0] @ ctx.sink_values.float()
    at = s0
    if ctx.value_runs is not None:
        for u, v in ctx.value_runs:
            n, t = u.shape[2], u.shape[4]
            p = probs[..., at : at + n * t].reshape(b, hkv, rows, n, t).transpose(2, 3)  # (b, h, n, rows, T)
            out = out + torch.matmul(torch.matmul(p, u.transpose(-1, -2)), v).sum(2)
            at += n * t
    else:
        c = ctx.values.shape[-2]
        out = out + probs[..., at : at + c] @ ctx.values.float()
        at += c
    out = out + probs[..., at:] @ ctx.tail_values.float()
    return out.view(b, hq, q, -1).transpose(1, 2).to(query.dtype)


def _attend_triton(
    qg: torch.Tensor, q: int, ctx: FactoredContext, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """`attend` through the Triton kernel (`chunked_decomp.triton_attention`).
    qg: (batch, kv_heads, rows, d) float32, rows = (repeat, query position) for q query positions;
    returns (batch, kv_heads, rows, d_v) float32."""
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


def factored_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: attention over a :class:`FactoredContext` when ``key`` carries one,
    transformers' SDPA attention otherwise. Returns (batch, q_len, q_heads, d_v) and no weights."""
    ctx = getattr(key, CONTEXT_ATTR, None)
    if ctx is None:
        if key.device.type == "meta":
            raise ValueError(
                "the attention received stand-in keys without their compressed context: this model's attention "
                "changes the keys between the cache update and the attention call, which "
                "decode_attention='factored' cannot follow; use decode_attention='rebuild'"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout and module.training:
        raise ValueError("decode_attention='factored' is for inference: dropout must be 0")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(query, ctx, attention_mask, scale), None


def register() -> None:
    """Register the attention and mask functions under ``"chunked_decomp"`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, factored_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_factored_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` to the ``"chunked_decomp"`` attention (SDPA for everything but a factored cache);
    :func:`restore_attention` switches back."""
    register()
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) == ATTENTION_NAME:
        return
    model.__dict__[_PREVIOUS_ATTR] = config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)


def restore_attention(model: torch.nn.Module) -> None:
    """Undo :func:`use_factored_attention` (nothing when it was not used)."""
    previous = model.__dict__.pop(_PREVIOUS_ATTR, None)
    if previous is not None:
        model.set_attn_implementation(previous)
