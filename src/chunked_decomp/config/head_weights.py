"""Head-weight files: calibrated ``CompressionConfig.head_weights`` stored as JSON, shipped or user-made.

``CompressionConfig.head_weights`` takes explicit weights, ``None`` (all 1), a path to a JSON file written by
``chunked-decomp calibrate`` (:func:`chunked_decomp.evaluation.calibration.calibrate`), or ``"auto"``: the weights shipped
with the package for the model at hand (``config/head_weights_*.json``), found by the model's fingerprint —
``model_type``, layer count, KV heads and head size, and the last part of ``name_or_path`` when the model has
one (calibrated weights belong to a model's weights, not only its shape). A model without shipped weights gets
uniform weights and one warning per fingerprint. Strings are resolved by :func:`resolve_head_weights` when the
cache meets the model (:meth:`chunked_decomp.hf.cache.ChunkedSVDCache.from_model`).

A file holds ``{"format": "chunked_decomp.head_weights", "format_version": 1, "head_weights": [[key_weights,
value_weights], ...], "model": {fingerprint, "names": [...]}, "calibration": {...}, "versions": {...}}``; only
``head_weights`` and ``model`` are read back, the rest records how the file was made.

Light on purpose (json only): `CompressionConfig` validates a path through it when it is built.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from chunked_decomp.config.checks import number

__all__ = [
    "AUTO",
    "FORMAT",
    "HeadWeightsFile",
    "load_head_weights_file",
    "model_fingerprint",
    "resolve_head_weights",
    "shipped_head_weights_files",
    "shipped_weights_for",
]

logger = logging.getLogger(__name__)

AUTO = "auto"
FORMAT = "chunked_decomp.head_weights"
FORMAT_VERSION = 1
#: Fingerprint fields that must be equal for a file to fit a model (the name is matched apart).
ARCHITECTURE_KEYS = ("model_type", "num_hidden_layers", "num_key_value_heads", "head_dim")
ALLOWED = (
    "None (all 1), 'auto' (the weights shipped for this model, else all 1), a path to a JSON file written by "
    "`chunked-decomp calibrate`, or [[key_weights, value_weights], ...] (one pair of per-KV-head lists per layer)"
)
_warned: set[tuple[Any, ...]] = set()


@dataclass(frozen=True)
class HeadWeightsFile:
    """A head-weight file read back: ``weights`` (``[[key_weights, value_weights], ...]``, one pair per layer,
    ``kv_heads`` floats each) and the whole ``record``; ``model`` is its fingerprint with the accepted ``names``."""

    path: Path
    record: dict[str, Any]
    weights: list[list[list[float]]]

    @property
    def model(self) -> dict[str, Any]:
        return self.record["model"]

    def matches(self, fingerprint: dict[str, Any]) -> bool:
        """Same architecture, and — when the model has a name — one of the file's ``names`` (case-insensitive)."""
        if any(self.model.get(k) != fingerprint.get(k) for k in ARCHITECTURE_KEYS):
            return False
        name = fingerprint.get("name")
        return not name or name.lower() in {n.lower() for n in self.model.get("names", [])}


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What identifies a model's calibration: ``model_type``, ``num_hidden_layers``, ``num_key_value_heads``,
    ``head_dim`` and ``name`` (last part of ``name_or_path``, ``None`` without one) of a transformers config
    (the decoder's text config for a multimodal one)."""
    get_text = getattr(config, "get_text_config", None)
    text = get_text(decoder=True) if get_text is not None else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    name = str(getattr(config, "name_or_path", "") or "").rstrip("/\\")
    name = name.replace("\\", "/").rsplit("/", 1)[-1] or None
    return {
        "model_type": getattr(text, "model_type", None) or getattr(config, "model_type", None),
        "num_hidden_layers": None if layers is None else int(layers),
        "num_key_value_heads": None if kv is None else int(kv),
        "head_dim": None if head_dim is None else int(head_dim),
        "name": name,
    }


def load_head_weights_file(path: str | Path) -> HeadWeightsFile:
    """Read and check a head-weight file; ``ValueError`` naming ``head_weights`` and the file if it is missing,
    not JSON, of another format, or holds malformed weights."""
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError as err:
        raise ValueError(
            f"head_weights: no head-weight file at {str(path)!r} ({err.strerror or err}); head_weights must be "
            f"{ALLOWED}"
        ) from err
    return _load_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _load_cached(path: str, _mtime_ns: int, _size: int) -> HeadWeightsFile:
    # Keyed by modification time and size too, so a rewritten file is read again.

    where = f"head_weights file {path!r}"
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} cannot be read: {err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{where} is not a head-weight file (its 'format' must be {FORMAT!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version {record.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    if not isinstance(record.get("model"), dict):
        raise ValueError(f"{where} has no 'model' fingerprint")
    try:
        weights = check_head_weights(record.get("head_weights"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    arch = record["model"]
    if arch.get("num_hidden_layers") != len(weights) or arch.get("num_key_value_heads") != len(weights[0][0]):
        raise ValueError(
            f"{where}: its weights ({len(weights)} layers x {len(weights[0][0])} heads) do not fit its model "
            f"fingerprint ({arch.get('num_hidden_layers')} layers x {arch.get('num_key_value_heads')} KV heads)"
        )
    return HeadWeightsFile(Path(path), record, weights)


def shipped_head_weights_files() -> list[HeadWeightsFile]:
    """The head-weight files shipped in the package (``config/head_weights_*.json``), by name."""
    folder = resources.files("chunked_decomp.config")
    paths = sorted(
        Path(str(p))
        for p in folder.iterdir()
        if p.name.startswith("head_weights_") and p.name.endswith(".json")
    )
    return [load_head_weights_file(p) for p in paths]


def shipped_weights_for(model_config: Any) -> list[list[list[float]]] | None:
    """The shipped head weights whose fingerprint matches a model with this config, or ``None``."""
    fingerprint = model_fingerprint(model_config)
    for shipped in shipped_head_weights_files():
        if shipped.matches(fingerprint):
            return shipped.weights
    return None


def resolve_head_weights(
    value: Any, model_config: Any, calibrated: list[list[list[float]]] | None = None
) -> list[list[list[float]]] | None:
    """The explicit weights ``value`` stands for, for a model with this (transformers) config.

    value: ``CompressionConfig.head_weights`` — ``None`` or a list is returned as is; ``"auto"`` gives the shipped
    weights whose fingerprint matches (:func:`model_fingerprint`), else ``calibrated`` (the weights measured for
    this model when it was wired, :mod:`chunked_decomp.hf.calibration`), else ``None`` (uniform) with a warning
    logged once per fingerprint; any other string is a file path, whose fingerprint must match the model's
    architecture (``ValueError`` naming ``head_weights`` otherwise; a different name is only logged).
    Returns ``[[key_weights, value_weights], ...]``, one pair per decoder layer, or ``None``.
    """
    if value is None or not isinstance(value, str):
        return value
    fingerprint = model_fingerprint(model_config)
    if value == AUTO:
        shipped = shipped_weights_for(model_config)
        if shipped is not None:
            return shipped
        if calibrated is not None:
            return calibrated
        key = tuple(sorted(fingerprint.items()))
        if key not in _warned:
            _warned.add(key)
            logger.warning(
                "head_weights='auto': no calibrated head weights ship for this model (%s); using uniform "
                "weights. Pass the tokenizer to compress_model(model, tokenizer) to measure them in a few seconds, or "
                "calibrate a file with `chunked-decomp calibrate` and pass head_weights=<file>.",
                ", ".join(f"{k}={v}" for k, v in fingerprint.items()),
            )
        return None
    loaded = load_head_weights_file(value)
    wrong = [k for k in ARCHITECTURE_KEYS if loaded.model.get(k) != fingerprint.get(k)]
    if wrong:
        raise ValueError(
            f"head_weights file {value!r} was calibrated for another model: "
            + ", ".join(
                f"{k} {loaded.model.get(k)!r} in the file, {fingerprint.get(k)!r} in the model" for k in wrong
            )
        )
    if not loaded.matches(fingerprint):
        logger.info(
            "head_weights file %r was calibrated for %s, not %r; using it as asked",
            value,
            loaded.model.get("names"),
            fingerprint.get("name"),
        )
    return loaded.weights


def check_head_weights(value: Any) -> list[list[list[float]]]:
    """``head_weights`` as nested lists of floats: one ``[key_weights, value_weights]`` pair per layer, each a
    non-empty list of positive finite numbers of the same length."""
    shape = "[[key_weights, value_weights], ...] (one pair of lists of per-head weights per layer)"
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"head_weights must be a non-empty list {shape}, got {value!r}")
    out = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"head_weights[{i}] must be a pair [key_weights, value_weights], got {pair!r}")
        kinds = []
        for kind, weights in zip(("key", "value"), pair):
            if not isinstance(weights, (list, tuple)) or not weights:
                raise ValueError(
                    f"head_weights[{i}] {kind} weights must be a non-empty list, got {weights!r}"
                )
            nums = [number(f"head_weights[{i}] {kind} weight", w) for w in weights]
            if not all(w > 0 for w in nums):
                raise ValueError(f"head_weights[{i}] {kind} weights must be > 0, got {weights!r}")
            kinds.append(nums)
        if len(kinds[0]) != len(kinds[1]):
            raise ValueError(
                f"head_weights[{i}] has {len(kinds[0])} key and {len(kinds[1])} value weights; give one per KV head"
            )
        out.append(kinds)
    if len({len(k) for k, _ in out}) != 1:
        raise ValueError("head_weights must give every layer the same number of KV heads")
    return out
