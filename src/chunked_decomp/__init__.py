"""ChunkedDecomp: chunked low-rank (SVD) compression of the KV cache of transformers language models.

``import chunked_decomp`` is light: the public names below are loaded on first use, so importing the package
loads no model, touches no GPU and imports neither transformers nor any evaluation dependency.
"""

from __future__ import annotations

import logging
import os
from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ChunkedDecomp": "chunked_decomp.hf.compressor",
    "CompressionConfig": "chunked_decomp.config",
    "load_presets": "chunked_decomp.config",
    "ChunkedSVDCache": "chunked_decomp.hf.cache",
    "ChunkedSVDLayer": "chunked_decomp.hf.layer",
    "MemoryTracker": "chunked_decomp.evaluation.memory",
    "PerformanceEvaluator": "chunked_decomp.evaluation.quality",
    "MemoryProfiler": "chunked_decomp.evaluation.profiler",
    "ComprehensiveBenchmark": "chunked_decomp.benchmarking.benchmark",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from chunked_decomp.benchmarking.benchmark import ComprehensiveBenchmark
    from chunked_decomp.config import CompressionConfig, load_presets
    from chunked_decomp.evaluation.memory import MemoryTracker
    from chunked_decomp.evaluation.profiler import MemoryProfiler
    from chunked_decomp.evaluation.quality import PerformanceEvaluator
    from chunked_decomp.hf.cache import ChunkedSVDCache
    from chunked_decomp.hf.compressor import ChunkedDecomp
    from chunked_decomp.hf.layer import ChunkedSVDLayer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chunked_decomp' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def _configure_logging() -> None:
    level = os.environ.get("CHUNKED_DECOMP_LOG_LEVEL")
    debug = os.environ.get("CHUNKED_DECOMP_DEBUG", "") not in ("", "0", "false", "False")
    if not level and not debug:
        return
    logger = logging.getLogger("chunked_decomp")
    resolved = logging.DEBUG if debug else getattr(logging, level.upper(), None)
    if not isinstance(resolved, int):
        raise ValueError(
            f"CHUNKED_DECOMP_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {level!r}"
        )
    logger.setLevel(resolved)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)


_configure_logging()
