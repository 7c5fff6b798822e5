"""Chunks built from a step's encoded factors: each chunk keeps its own ranks' rows of the stacks.

A stack holds the encoded factors of every chunk of one length (of one or several layers) at the largest rank
any of them keeps. Each tensor's kept rows of all the chunks are gathered in one copy (one index per tensor, not
per chunk: on a GPU every gather and every host-to-device index copy per chunk cost launches and a
synchronisation), and each chunk's factors are views of that buffer, which then holds exactly the kept bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from chunked_decomp.core.factors import CompressedChunk, FactorSet, take_rank
from chunked_decomp.core.quantization import QuantizedTensor


def take_all(f: torch.Tensor | QuantizedTensor, picks: list[tuple[int, list[int]]]) -> list[list]:
    """For each pick ``(j, ranks)``, ``[take_rank(f[j, g], r) for g, r in enumerate(ranks)]``, all in one copy per
    tensor (codes, scales and minima each). f: (n_chunks, groups, batch, k, ·)."""
    quantized = isinstance(f, QuantizedTensor)
    if quantized and f.group_dim % len(f.shape) != len(f.shape) - 1:
        return [[take_rank(f[j, g], r) for g, r in enumerate(ranks)] for j, ranks in picks]
    parts = (f.codes, f.scale, f.minimum) if quantized else (f,)
    groups, batch, k = parts[0].shape[1:4]
    # Row (j, g, b, i) of the stack is kept when i < ranks[g] of pick j.
    index = np.arange(groups * batch * k).reshape(groups, batch, k)
    per_chunk = groups * batch * k
    rows = np.concatenate(
        [
            j * per_chunk + index[np.broadcast_to(np.arange(k) < np.asarray(rs)[:, None, None], index.shape)]
            for j, rs in picks
        ]
    )
    rows = torch.from_numpy(rows).to(parts[0].device)
    ranks = [r for _, rs in picks for r in rs]
    views = []
    for p in parts:  # flatten(0, -2) is a view even when p is a slice along its last dimension
        kept = p.flatten(0, -2).index_select(0, rows).split([batch * r for r in ranks])
        views.append([v.view(batch, r, p.shape[-1]) if r else None for v, r in zip(kept, ranks)])
    if quantized:
        shape = tuple(f.shape[2:-2])
        views = [
            [
                None
                if r == 0
                else QuantizedTensor(
                    c, sc, mn, (*shape, r, f.shape[-1]), f.bits, f.group_size, f.group_dim, f.dtype
                )
                for r, c, sc, mn in zip(ranks, *views)
            ]
        ]
    out, at = [], 0
    for _, rs in picks:
        out.append(views[0][at : at + len(rs)])
        at += len(rs)
    return out


def build_chunks(job, length: int, idxs: list[int]) -> list[CompressedChunk]:
    """Chunks ``idxs`` of the job (all of ``length``), from its encoded factors of that length."""
    store = job.store
    (tok_k, chan_k, at_k), (tok_v, chan_v, at_v) = job.encoded[length]
    groups = len(job.ranks[idxs[0]]) // 2
    picks_k = [(at_k + job.slot[i], job.ranks[i][:groups]) for i in idxs]
    picks_v = [(at_v + job.slot[i], job.ranks[i][groups:]) for i in idxs]
    n = len(idxs)

    def take(f_k, f_v) -> tuple[list, list]:
        # Keys and values encoded as one stack are gathered in one copy per tensor.
        if f_k is f_v:
            both = take_all(f_k, picks_k + picks_v)
            return both[:n], both[n:]
        return take_all(f_k, picks_k), take_all(f_v, picks_v)

    def take_channels(chan, picks) -> list:
        # A list: one `SharedRows` per group, the layer's basis (nothing to gather).
        if isinstance(chan, list):
            return [[take_rank(c, r) for c, r in zip(chan, rs)] for _, rs in picks]
        return take_all(chan, picks)

    tokens = take(tok_k, tok_v)
    if isinstance(chan_k, list) or isinstance(chan_v, list):
        channels = (take_channels(chan_k, picks_k), take_channels(chan_v, picks_v))
    else:
        channels = take(chan_k, chan_v)
    joined = store.plan.joined
    chunks = []
    for m, i in enumerate(idxs):
        sets = [
            FactorSet(list(zip(t[m], c[m])), store.batch, length, store.heads, d, joined)
            for t, c, d in zip(tokens, channels, (store.head_dim, store.v_head_dim))
        ]
        chunks.append(CompressedChunk(job.start + job.offsets[i], length, sets[0], sets[1], job.pre_rope))
    return chunks
