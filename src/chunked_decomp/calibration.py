"""Per-head weights for the rank allocation, measured from how much a model's loss reacts to each head's error.

The adaptive allocation ranks components by their share of their unit's energy, which treats a relative error in
any head of any layer as equally harmful. It is not: :func:`head_sensitivity` measures, on calibration text, the
gradient of the continuation loss with respect to the cached keys and values of the context, and turns it into
``CompressionConfig.head_weights``. For a truncation that removes the share ε of a head's energy, spread over its
tokens in proportion to their norms and in no preferred direction, a second-order (Fisher) estimate of the loss
increase is ``ε / (2d) · Σ_t ‖g_t‖² ‖x_t‖²`` (x_t the token's key or value, g_t the loss gradient there, d the
head size); that sum is the head's sensitivity (the diagonal Fisher approximation used to weight compression
error in e.g. Kim et al. 2024, "SqueezeLLM").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def head_sensitivity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    starts: Sequence[int] = (1000, 3000),
    context_len: int = 1024,
    continuation_len: int = 512,
    num_sink_tokens: int = 4,
    power: float = 0.5,
) -> list[list[list[float]]]:
    """``head_weights`` for ``model``: ``[[key_weights, value_weights], ...]``, one pair per decoder layer.

    token_ids: (n,) calibration text, n ≥ ``max(starts) + context_len + continuation_len``. For each start, the
    context ``token_ids[start : start + context_len]`` is prefilled into a `DynamicCache`, then the next
    ``continuation_len`` tokens are scored teacher-forced and the summed loss is differentiated with respect to
    the cached keys and values (batch 1, ``(1, kv_heads, context_len, head_dim)`` per layer; the first
    ``num_sink_tokens``, kept exact by the cache, are left out). A head's sensitivity ``Σ_t ‖g_t‖² ‖x_t‖²`` is
    summed over the starts, divided by the mean over all heads of its kind (keys and values apart, so that
    ``key_weight`` keeps its meaning) and raised to ``power`` (< 1 damps the noise of a few calibration windows;
    measured on SmolLM2-135M at ρ 0.125: 0.5 was better than 1).

    The model's weights and their ``.grad`` are left untouched (gradients are taken with respect to the cache).
    """
    from transformers import DynamicCache

    from chunked_decomp.compat import cache_kwarg_name

    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    need = max(starts) + context_len + continuation_len
    if ids.numel() < need:
        raise ValueError(f"head_sensitivity needs {need} tokens for these starts, the text has {ids.numel()}")
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    device = next(model.parameters()).device
    kw = cache_kwarg_name(model)
    totals: list[list[torch.Tensor]] | None = None
    for start in starts:
        window = ids[start : start + context_len + continuation_len].to(device).unsqueeze(0)
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=window[:, :context_len], use_cache=True, **{kw: cache})
        leaves = []
        for layer in cache.layers:
            layer.keys = layer.keys.detach().float().requires_grad_(True)
            layer.values = layer.values.detach().float().requires_grad_(True)
            leaves += [layer.keys, layer.values]
        with torch.enable_grad():
            logits = model(input_ids=window[:, context_len:-1], use_cache=True, **{kw: cache}).logits[0]
            loss = F.cross_entropy(logits.float(), window[0, context_len + 1 :], reduction="sum")
            grads = torch.autograd.grad(loss, leaves)
        per_leaf = [
            (g[:, :, num_sink_tokens:].pow(2).sum(-1) * x.detach()[:, :, num_sink_tokens:].pow(2).sum(-1))
            .sum((0, 2))
            .double()
            .cpu()
            for x, g in zip(leaves, grads)
        ]  # each (kv_heads,)
        pairs = [per_leaf[i : i + 2] for i in range(0, len(per_leaf), 2)]
        totals = pairs if totals is None else [[a + b for a, b in zip(p, q)] for p, q in zip(totals, pairs)]
    keys = torch.stack([k for k, _ in totals])
    values = torch.stack([v for _, v in totals])
    # A head with no measurable effect still gets a positive weight (head_weights must be > 0).
    keys = (keys / keys.mean()).clamp_min(1e-6) ** power
    values = (values / values.mean()).clamp_min(1e-6) ** power
    return [[k.tolist(), v.tolist()] for k, v in zip(keys, values)]
