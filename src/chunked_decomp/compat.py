"""Small compatibility shims across transformers 5.x releases.

transformers renamed the cache argument of ``forward``/``generate`` from ``past_key_values`` to ``cache``
(the old name is deprecated until 5.40). kvpress pins transformers < 5.3, where only ``past_key_values``
exists, so the library speaks both.
"""

from __future__ import annotations

import inspect

import torch


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """Name of the keyword under which ``model.forward`` takes its KV cache: ``"cache"`` or ``"past_key_values"``."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    return "past_key_values"


def output_cache(outputs) -> object | None:
    """The cache object returned by a model forward, whichever attribute name this transformers uses."""
    for name in ("cache", "past_key_values"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None
