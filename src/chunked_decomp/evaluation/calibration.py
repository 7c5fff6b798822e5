"""Head-weight files: :func:`calibrate` records :func:`~chunked_decomp.hf.calibration.head_sensitivity` of a
model with where and how it was measured, for ``chunked-decomp calibrate``.

What the sensitivity is and why it weighs the heads: :mod:`chunked_decomp.hf.calibration`. A file is the
refinement of the automatic calibration there: more windows, a text of the user's choosing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from chunked_decomp.hf.calibration import head_sensitivity

__all__ = ["DEFAULT_NUM_WINDOWS", "DEFAULT_STRIDE", "calibrate", "default_starts", "head_sensitivity"]

#: Calibration windows of ``chunked-decomp calibrate`` by default: 8 windows 10,000 tokens apart, the last
#: ending within the text's last 1,000 tokens (see :func:`default_starts`).
DEFAULT_NUM_WINDOWS = 8
DEFAULT_STRIDE = 10_000


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
            "method": "chunked_decomp.hf.calibration.head_sensitivity",
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
