"""Attention over a `FactoredContext` in plain PyTorch: the reference every fused kernel is tested against,
and the path where no kernel serves the device or the layout.

A chunk of keys is ``Uᵀ V`` with U: (w, T) per-token coefficients and V: (w, d) a basis, so the scores of a query
q over it are ``(q Vᵀ) U`` and its share of the output ``(p Uᵀ) V``: two thin products of cost w·(T + d) per query
row instead of a rebuild of cost w·T·d per head.

Shapes: qg (batch, kv_heads, rows, d) float32, rows = (repeat, query position) of the query heads of a group.
"""

from __future__ import annotations

import torch

from chunked_decomp.backends.context import FactoredContext


def scores(qg: torch.Tensor, ctx: FactoredContext) -> torch.Tensor:
    """(batch, kv_heads, rows, S + C + L): scores over the exact sinks, the compressed tokens and the tail."""
    b, hkv, rows, _ = qg.shape
    parts = [qg @ ctx.sink_keys.float().transpose(-1, -2)]
    if ctx.key_runs is not None:
        for u, v in ctx.key_runs:
            # (q Vᵀ) U per chunk: (b, h, n, rows, w) then (b, h, n, rows, T), laid out chunk after chunk.
            s = torch.matmul(torch.matmul(qg.unsqueeze(2), v.transpose(-1, -2)), u)
            parts.append(s.transpose(2, 3).reshape(b, hkv, rows, -1))
    else:
        parts.append(qg @ ctx.keys.float().transpose(-1, -2))
    parts.append(qg @ ctx.tail_keys.float().transpose(-1, -2))
    return torch.cat(parts, dim=-1)


def values(probs: torch.Tensor, ctx: FactoredContext) -> torch.Tensor:
    """probs (batch, kv_heads, rows, S + C + L) → (batch, kv_heads, rows, d_v): the weighted sum of the values."""
    b, hkv, rows, _ = probs.shape
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
    return out + probs[..., at:] @ ctx.tail_values.float()


def masked_softmax(scores: torch.Tensor, q: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax of scores (batch, kv_heads, repeat, q, length) over the positions each query may see.

    attention_mask: None (causal: query i sits at position length - q + i), or (batch, 1, q, length) boolean
    (True = attend) or additive float.
    """
    length = scores.shape[-1]
    if attention_mask is None:
        if q > 1:
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
    return probs
