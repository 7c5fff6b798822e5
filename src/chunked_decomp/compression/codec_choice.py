"""Each layer's channel-factor format, chosen from the data (``basis_bits="auto"``).

A basis vector (a channel factor's row) with a few large channels is quantised coarsely elsewhere when one scale
spans its whole row: a model whose keys carry such outliers loses far more at 4 bits than one whose keys do not,
and a budget that would buy finer steps for one model buys rank for another. So at a layer's first compression
each format of the plan's ``codec_choices`` is tried, for keys and for values: each component's energy share is
lowered by the squared error its factors would have in that format (both rows, measured by encoding them), the
layer's units get their ranks within the budget as in the pooled allocation, and the formats that keep the most
weighted energy are the layer's for good (its chunks then all share one layout, which the packed rebuild and the
kernels read). Kinds on a shared basis keep the plan's format (their basis, stored once, is at 8 bits).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from chunked_decomp.compression.ranks import choose_ranks_linear, pad_rows
from chunked_decomp.core.factors import FactorCodec
from chunked_decomp.core.quantization import QuantizedTensor


def _row_errors(rows: torch.Tensor, quantized) -> torch.Tensor:
    """Squared error of each encoded row relative to its squared norm: rows (n, g, b, k, m) → (n, g, k), the
    batch mean."""
    decoded = quantized.dequantize().float() if isinstance(quantized, QuantizedTensor) else quantized.float()
    err = (decoded - rows).pow(2).sum(-1) / rows.pow(2).sum(-1).clamp_min(1e-30)
    return err.mean(2)


def _errors(f, codec: FactorCodec) -> torch.Tensor:
    """(n, g, k): each component's relative squared error in its token and channel rows in ``codec``."""
    k = f.energy.shape[-1]
    token, channel = f.token_rows(k).float(), f.channel_rows(k).float()
    token_q, channel_q = codec.encode(token, channel)
    return _row_errors(token, token_q) + _row_errors(channel, channel_q)


def _value(job, store, codecs: dict[str, FactorCodec], errors: dict) -> float:
    """Weighted energy the job's chunks keep within their budget when ``codecs`` store the kinds."""
    rows, costs, floors = [], [], []
    for s, (fk, fv) in job.factored.items():
        weights = store.unit_weights(fk.groups, fv.groups)
        for kind, f, lo in (("k", fk, 0), ("v", fv, fk.groups)):
            share = f.energy.double().cpu().numpy()  # (n, g, k)
            if kind in codecs:
                share = share * np.clip(1.0 - errors[s, kind, codecs[kind]], 0.0, None)
            k = share.shape[-1]
            cost = codecs.get(kind, store.plan.codec).rank_cost(store.batch, s, f.columns, False)
            for j in range(share.shape[0]):
                for g in range(f.groups):
                    rows.append(share[j, g] * weights[lo + g] * s)
            costs += [cost] * (share.shape[0] * f.groups)
            floors += [min(k, math.ceil(store.plan.min_rank_ratio * k))] * (share.shape[0] * f.groups)
    scores = pad_rows(rows)
    ranks = choose_ranks_linear(scores, costs, store.chunk_budget(sum(job.sizes)), floors)
    return float(sum(np.nansum(np.where(np.isfinite(r[:n]), r[:n], 0.0)) for r, n in zip(scores, ranks)))


def choose_codecs(job) -> None:
    """Give ``job.store`` its channel format per kind (see the module docstring)."""
    store = job.store
    options = store.plan.codec_choices
    kinds = [k for k in ("k", "v") if store.basis is None or not store.basis.shares(k)]
    errors = {
        (s, kind, codec): _errors(f, codec).cpu().double().numpy()
        for s, pair in job.factored.items()
        for kind, f in zip(("k", "v"), pair)
        if kind in kinds
        for codec in options
    }
    best = max(
        (dict(zip(kinds, combo)) for combo in itertools.product(options, repeat=len(kinds))),
        key=lambda codecs: _value(job, store, codecs, errors),
    )
    store.codecs = {kind: best.get(kind, store.plan.codec) for kind in ("k", "v")}
