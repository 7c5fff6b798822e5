"""The presets file (``compression_configs.yaml``, data read with ``yaml.safe_load``) and ``KEY=VALUE``
overrides: both land in a `CompressionConfig`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from chunked_decomp.config.compression import CompressionConfig


def presets_path() -> Path:
    """Path of the packaged preset file (``configs/compression_configs.yaml`` in the repository)."""
    return Path(str(resources.files("chunked_decomp.config") / "compression_configs.yaml"))


def load_presets(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Read presets with ``yaml.safe_load``; each preset is validated by building a `CompressionConfig`.

    Raises ``ValueError`` naming the file for a missing file, malformed YAML or a bad preset.
    """
    path = Path(path) if path is not None else presets_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read presets file {str(path)!r}: {err.strerror or err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"presets file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"presets file {str(path)!r} must map preset names to option mappings")
    for name, values in data.items():
        try:
            CompressionConfig.from_dict(values)
        except ValueError as err:
            raise ValueError(f"preset {name!r} in {str(path)!r} is invalid: {err}") from err
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Config fields from ``KEY=VALUE`` strings (the value read as YAML: ``4``, ``pooled``, ``[1, 2]``), as the
    benchmarks' ``--set`` flags give them (the flag is built in ``benchmarks/common.py``); an item without ``=``
    raises a ValueError naming it. The fields are checked when a `CompressionConfig` is built from them."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out
