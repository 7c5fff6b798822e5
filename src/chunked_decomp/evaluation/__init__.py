"""Evaluation protocols: every way of holding a KV cache (ChunkedDecomp, the full cache, transformers'
QuantizedCache, kvpress presses) through the same perplexity and passkey protocols at equal stored bytes.

Names are imported lazily, so ``import chunked_decomp.evaluation`` loads neither transformers nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "methods": [
        "KVMethod",
        "PrefilledContext",
        "StorageStats",
        "FullCache",
        "ChunkedDecompMethod",
        "chunked_method",
        "method_from_spec",
        "forward_with_cache",
        "tensor_nbytes",
        "kv_geometry",
    ],
    "peers": ["QuantizedCacheMethod", "KVPressMethod", "KVPRESS_PRESSES", "kvpress_available"],
    "perplexity": [
        "PerplexityResult",
        "continuation_logits",
        "continuation_nll",
        "continuation_perplexity",
        "streaming_perplexity",
        "recall_perplexity",
        "recall_layout",
        "compare_methods",
    ],
    "passkey": [
        "PasskeyPrompt",
        "PasskeyResult",
        "build_passkey_prompt",
        "passkey_accuracy",
        "greedy_decode",
    ],
    "ruler": ["TASKS", "TaskSample", "make_sample", "string_match_all"],
    "longctx": ["run_sample", "summarize"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
