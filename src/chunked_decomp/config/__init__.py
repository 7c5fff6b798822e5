"""Options of the compressed cache: `CompressionConfig` (one validated dataclass that flags, YAML presets and code
all build), the presets file, and per-head weights (:mod:`chunked_decomp.config.head_weights`)."""

from chunked_decomp.config.compression import CompressionConfig
from chunked_decomp.config.presets import load_presets, parse_overrides, presets_path

__all__ = ["CompressionConfig", "load_presets", "parse_overrides", "presets_path"]
