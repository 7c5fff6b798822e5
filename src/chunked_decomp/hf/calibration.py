"""Per-head weights for the rank allocation, measured from how much a model's loss reacts to each head's error.

The adaptive allocation ranks components by their share of their unit's energy, which treats a relative error in
any head of any layer as equally harmful. It is not: :func:`head_sensitivity` measures, on calibration text, the
gradient of the continuation loss with respect to the cached keys and values of the context, and turns it into
``CompressionConfig.head_weights``. For a truncation that removes the share ε of a head's energy, spread over its
tokens in proportion to their norms and in no preferred direction, a second-order (Fisher) estimate of the loss
increase is ``ε / (2d) · Σ_t ‖g_t‖² ‖x_t‖²`` (x_t the token's key or value, g_t the loss gradient there, d the
head size); that sum is the head's sensitivity (the diagonal Fisher approximation used to weight compression
error in e.g. Kim et al. 2024, "SqueezeLLM").

:func:`calibrate_model` does this within ``compress_model`` for a model that has no shipped head-weight file:
one window of the Python language reference (``pydoc_data.topics``, part of every Python installation, so it
works offline and is never an evaluation text of a user's), a few seconds on a CPU. The weights are kept for
that model object (:func:`calibrated_weights`), so every cache made for it with ``head_weights="auto"`` uses them.
"""

from __future__ import annotations

import logging
import re
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("chunked_decomp")

#: The calibration window of :func:`calibrate_model`: tokens ``[START, START + CONTEXT + CONTINUATION)`` of the
#: calibration text (the same shape as the evaluations: a 1,024-token context scored on the next 512).
AUTO_START, AUTO_CONTEXT, AUTO_CONTINUATION = 1000, 1024, 512
#: head_sensitivity's damping of the automatic weights (that of the shipped file).
AUTO_POWER = 0.5

# model -> weights; weak so that a model dropped by the user takes its weights with it.
_CALIBRATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def pydoc_topics() -> list[str]:
    """Prose of each ``pydoc_data.topics`` entry: headings, underlines and indented code blocks dropped."""
    from pydoc_data.topics import topics

    samples = []
    for key in sorted(topics):
        paragraphs = []
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            lines = block.splitlines()
            if not lines or lines[0][:1].isspace():
                continue  # indented: grammar or code example
            # A heading is its title line followed by a line of '*', '=' or '-'.
            if len(lines) >= 2 and set(lines[1].strip()) <= set("*=-") and lines[1].strip():
                lines = lines[2:]
            prose = " ".join(line.strip() for line in lines).strip()
            if prose:
                paragraphs.append(prose)
        if paragraphs:
            samples.append("\n\n".join(paragraphs))
    return samples


def calibration_window(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(start, context_len, continuation_len)`` of the automatic calibration, shrunk to fit a model whose
    context is shorter than the default window."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    context, continuation = AUTO_CONTEXT, AUTO_CONTINUATION
    if limit is not None and context + continuation > limit:
        context, continuation = max(limit * 2 // 3, 2), max(limit // 3, 1)
    return AUTO_START, context, continuation


def calibrate_model(
    model: torch.nn.Module, tokenizer: Any, num_sink_tokens: int = 4
) -> list[list[list[float]]]:
    """Head weights of ``model`` measured on the Python language reference, kept for this model object.

    tokenizer: the model's (a transformers tokenizer: ``tokenizer(text)["input_ids"]``). The text is joined and
    tokenized once without special tokens; the window of :func:`calibration_window` is scored, its first
    ``num_sink_tokens`` left out. Calling it again for the same model returns the kept weights.
    """
    kept = calibrated_weights(model)
    if kept is not None:
        return kept
    started = time.perf_counter()
    start, context, continuation = calibration_window(model)
    ids = tokenizer("\n\n".join(pydoc_topics()), add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    start = min(start, max(ids.numel() - context - continuation, 0))
    weights = head_sensitivity(
        model,
        ids,
        starts=(start,),
        context_len=context,
        continuation_len=continuation,
        num_sink_tokens=num_sink_tokens,
        power=AUTO_POWER,
    )
    _CALIBRATED[model] = weights
    logger.info(
        "head weights calibrated for %s in %.1f s (tokens %d-%d of the Python language reference)",
        type(model).__name__,
        time.perf_counter() - started,
        start,
        start + context + continuation,
    )
    return weights


def ensure_head_weights(model: torch.nn.Module, tokenizer: Any = None) -> bool:
    """Measure ``model``'s head weights unless a shipped file covers it or they are kept already; True when
    ``head_weights="auto"`` will find weights for it. ``tokenizer``: the model's, else :func:`find_tokenizer`'s."""
    from chunked_decomp.config.head_weights import shipped_weights_for

    if shipped_weights_for(model.config) is not None or calibrated_weights(model) is not None:
        return True
    tokenizer = tokenizer if tokenizer is not None else find_tokenizer(model)
    if tokenizer is None:
        return False  # the cache logs the uniform fallback once
    calibrate_model(model, tokenizer)
    return True


def calibrated_weights(model: torch.nn.Module) -> list[list[list[float]]] | None:
    """The weights :func:`calibrate_model` measured for this model object, or ``None``."""
    try:
        return _CALIBRATED.get(model)
    except TypeError:  # an object that cannot be weakly referenced was never calibrated
        return None


def find_tokenizer(model: torch.nn.Module) -> Any | None:
    """The tokenizer saved beside a model loaded from a local folder, or ``None`` (never downloads)."""
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means no tokenizer can be found offline
        return None
