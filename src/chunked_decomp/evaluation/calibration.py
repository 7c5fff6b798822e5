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

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: Calibration windows of ``chunked-decomp calibrate`` by default: 8 windows 10,000 tokens apart, the last
#: ending within the text's last 1,000 tokens (see :func:`default_starts`).
DEFAULT_NUM_WINDOWS = 8
DEFAULT_STRIDE = 10_000


def head_sensitivity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    starts: Sequence[int] = (1000, 3000),
    context_len: int = 1024,
    continuation_len: int = 512,
    num_sink_tokens: int = 4,
    power: float = 0.5,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> list[list[list[float]]]:
    """``head_weights`` for ``model``: ``[[key_weights, value_weights], ...]``, one pair per decoder layer.

    token_ids: (n,) calibration text, n ≥ ``max(starts) + context_len + continuation_len``. For each start, the
    context ``token_ids[start : start + context_len]`` is prefilled into a `DynamicCache`, then the next
    ``continuation_len`` tokens are scored teacher-forced and the summed loss is differentiated with respect to
    the cached keys and values (batch 1, ``(1, kv_heads, context_len, head_dim)`` per layer; the first
    ``num_sink_tokens``, kept exact by the cache, are left out). A head's sensitivity ``Σ_t ‖g_t‖² ‖x_t‖²`` is
    summed over the starts, divided by the mean over all heads of its kind (keys and values apart, so that
    ``key_weight`` keeps its meaning) and raised to ``power`` (< 1 damps the noise of a few calibration windows).

    The model's weights and their ``.grad`` are left untouched (gradients are taken with respect to the cache).
    ``progress`` wraps the starts (e.g. ``tqdm``) to show one step per window.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    need = max(starts) + context_len + continuation_len
    if ids.numel() < need:
        raise ValueError(f"head_sensitivity needs {need} tokens for these starts, the text has {ids.numel()}")
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    device = next(model.parameters()).device
    totals: list[list[torch.Tensor]] | None = None
    for start in progress(starts) if progress is not None else starts:
        window = ids[start : start + context_len + continuation_len].to(device).unsqueeze(0)
        pairs = _window_sensitivity(model, window, context_len, num_sink_tokens)
        totals = pairs if totals is None else [[a + b for a, b in zip(p, q)] for p, q in zip(totals, pairs)]
    keys = torch.stack([k for k, _ in totals])
    values = torch.stack([v for _, v in totals])
    # A head with no measurable effect still gets a positive weight (head_weights must be > 0).
    keys = (keys / keys.mean()).clamp_min(1e-6) ** power
    values = (values / values.mean()).clamp_min(1e-6) ** power
    return [[k.tolist(), v.tolist()] for k, v in zip(keys, values)]


def _window_sensitivity(
    model: torch.nn.Module, window: torch.Tensor, context_len: int, num_sink_tokens: int
) -> list[list[torch.Tensor]]:
    """``[[keys, values], ...]`` per layer, each ``(kv_heads,)`` float64 on the CPU: ``Σ_t ‖g_t‖² ‖x_t‖²`` over the
    context's tokens after the sinks, for one window ``(1, context_len + continuation_len)`` on ``model``'s
    device (its context prefilled into a `DynamicCache`, its continuation's summed loss differentiated with
    respect to the cached keys and values)."""
    from transformers import DynamicCache

    from chunked_decomp.hf.models import cache_kwarg_name

    kw = cache_kwarg_name(model)
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
    return [per_leaf[i : i + 2] for i in range(0, len(per_leaf), 2)]


def default_starts(
    num_tokens: int,
    num_windows: int = DEFAULT_NUM_WINDOWS,
    stride: int = DEFAULT_STRIDE,
    span: int = 1536,
) -> list[int]:
    """Window starts at the end of a text of ``num_tokens`` tokens: ``num_windows`` starts ``stride`` apart, the
    first rounded down to a multiple of 1,000, so the last window of ``span`` tokens ends within the text.

    The end of the text because the evaluations that ship with the package read its beginning (the command
    line from token 0 or 5,000, ``benchmarks/bench_core.py`` windows up to token ~80,000 with recall filler);
    calibration text must not be evaluation text. On the default Wikipedia stream with the SmolLM2 tokenizer
    (546,260 tokens) this gives 474,000, 484,000, …, 544,000.
    """
    if num_windows < 1 or stride < 1 or span < 1:
        raise ValueError(f"num_windows, stride and span must be >= 1, got {num_windows}, {stride} and {span}")
    first = num_tokens - span - stride * (num_windows - 1)
    if first < 0:
        raise ValueError(
            f"{num_windows} calibration windows of {span} tokens {stride} tokens apart need "
            f"{span + stride * (num_windows - 1)} tokens, the text has {num_tokens}; use more text, fewer "
            "windows or a smaller stride"
        )
    first = first // 1000 * 1000
    return [first + stride * i for i in range(num_windows)]


def _versions() -> dict[str, str]:
    """The versions a head-weight file records: the package, torch, transformers and Python."""
    import platform

    import transformers

    import chunked_decomp

    return {
        "chunked_decomp": chunked_decomp.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def calibrate(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    starts: Sequence[int],
    context_len: int = 1024,
    continuation_len: int = 512,
    num_sink_tokens: int = 4,
    power: float = 0.5,
    names: Sequence[str] = (),
    source: dict[str, Any] | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> dict[str, Any]:
    """A head-weight file's record (:mod:`chunked_decomp.config.head_weights`): :func:`head_sensitivity` of ``model``
    on ``token_ids`` (``(n,)``) at ``starts``, with the model's fingerprint and how the weights were made.

    names: names of the model the weights are for (matched against the last part of ``name_or_path`` when
    ``head_weights="auto"``); the model's own name is always included. source: what the text is (dataset,
    tokens), stored as given. Write the record with :func:`chunked_decomp.io.atomic_write_json`.
    """
    from chunked_decomp.config.head_weights import FORMAT, FORMAT_VERSION, model_fingerprint

    weights = head_sensitivity(
        model,
        token_ids,
        starts=starts,
        context_len=context_len,
        continuation_len=continuation_len,
        num_sink_tokens=num_sink_tokens,
        power=power,
        progress=progress,
    )
    fingerprint = model_fingerprint(model.config)
    own = fingerprint.pop("name")
    all_names = list(dict.fromkeys([*([own] if own else []), *names]))
    param = next(model.parameters())
    ids = torch.as_tensor(token_ids).flatten()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {**fingerprint, "names": all_names},
        "calibration": {
            "method": "chunked_decomp.evaluation.calibration.head_sensitivity",
            "power": power,
            "starts": list(starts),
            "context_len": context_len,
            "continuation_len": continuation_len,
            "num_sink_tokens": num_sink_tokens,
            "token_ranges": [[s, s + context_len + continuation_len] for s in starts],
            "num_tokens_in_text": int(ids.numel()),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": param.device.type,
            **({"source": source} if source else {}),
        },
        "versions": _versions(),
        "head_weights": weights,
    }
