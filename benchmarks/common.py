"""What the benchmark scripts share: loading the default model and text, the run's metadata, synchronised timers,
the ``--set KEY=VALUE`` option and the results' last step (a JSON file, and one JSON line on stdout).

The scripts run as ``python benchmarks/<name>.py``, which puts this folder first on ``sys.path``: they import this
module as ``common``. The tests import it as ``benchmarks.common`` from the repository root. Model, text and
transformers are imported only when a function needs them, so a script's ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chunked_decomp.config import CompressionConfig, parse_overrides
from chunked_decomp.io import atomic_write_json

#: The model and text every script measures on unless told otherwise (SmolLM2-135M, embedded; no network).
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEXT = "wikipedia"
#: Where the scripts write their results by default (``benchmarks/results``, wherever they are run from).
RESULTS = Path(__file__).resolve().parent / "results"


# ---- loading ------------------------------------------------------------------------------------------------
def load_model(
    name: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu", calibrate_heads: bool = False
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``name`` in eval mode (:func:`chunked_decomp.hf.loading.load_model_and_tokenizer`).

    calibrate_heads: measure the head weights ``head_weights="auto"`` uses where no shipped file covers the model,
    as ``compress_model(model, tokenizer)`` does for a user (the quality benchmarks). Off by default: the
    measurement's backward pass would raise the process's peak memory, which the memory benchmarks report.
    """
    from chunked_decomp.hf.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(name, dtype=dtype, device=device)
    if calibrate_heads:
        from chunked_decomp.hf.calibration import ensure_head_weights

        ensure_head_weights(model, tokenizer)
    return model, tokenizer


def text_token_ids(
    tokenizer: Any,
    dataset: str = DEFAULT_TEXT,
    *,
    min_tokens: int | None = None,
    num_samples: int | None = None,
) -> torch.Tensor:
    """The text ``dataset`` as one token stream ``(n,)`` int64 (``load_texts`` then ``load_token_ids``); at least
    ``min_tokens`` tokens or a ValueError saying how many there are."""
    from chunked_decomp.evaluation.data import load_texts, load_token_ids

    return load_token_ids(tokenizer, load_texts(dataset, num_samples=num_samples), min_tokens=min_tokens)


def load_model_and_text(
    name: str = DEFAULT_MODEL,
    dataset: str = DEFAULT_TEXT,
    *,
    min_tokens: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    calibrate_heads: bool = False,
) -> tuple[Any, Any, torch.Tensor]:
    """``(model, tokenizer, token_ids (n,))``: :func:`load_model`, then :func:`text_token_ids` of ``dataset``."""
    model, tokenizer = load_model(name, dtype=dtype, device=device, calibrate_heads=calibrate_heads)
    return model, tokenizer, text_token_ids(tokenizer, dataset, min_tokens=min_tokens)


# ---- run metadata -------------------------------------------------------------------------------------------
def package_version(dist: str) -> str | None:
    """Installed version of the distribution ``dist`` (``"optimum-quanto"``), ``None`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def library_info() -> dict[str, Any]:
    """Where ``chunked_decomp`` is imported from, its git commit when it sits in a checkout (and whether its
    ``src`` has uncommitted changes), and whether its fused CPU kernels are available — built here, before any
    measured run, when they are new."""
    import chunked_decomp

    folder = Path(chunked_decomp.__file__).resolve().parent
    info: dict[str, Any] = {"path": str(folder), "git_commit": None, "git_dirty_src": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(folder)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip()
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "."], capture_output=True, text=True, timeout=30
            )
            info["git_dirty_src"] = bool(dirty.stdout.strip())
    try:
        from chunked_decomp.backends import cpu_kernel as kernels
    except ImportError:
        info["fused_kernels"] = None
    else:
        info["fused_kernels"] = kernels.available()
    return info


#: The fields a script may record about its run, each read when asked for.
METADATA_FIELDS: dict[str, Callable[[], Any]] = {
    "torch": lambda: torch.__version__,
    "transformers": lambda: importlib.import_module("transformers").__version__,
    "triton": lambda: importlib.import_module("triton").__version__,
    "kvpress": lambda: package_version("kvpress"),
    "optimum_quanto": lambda: package_version("optimum-quanto"),
    "python": platform.python_version,
    "machine": platform.machine,
    "platform": platform.platform,
    "cpus": os.cpu_count,
    "threads": torch.get_num_threads,
    "gpu": lambda: torch.cuda.get_device_name(),
    "library": library_info,
}


def run_metadata(*fields: str) -> dict[str, Any]:
    """The named :data:`METADATA_FIELDS` of this run, in the order asked (the order they take in the JSON);
    ``threads`` is torch's intra-op thread count now. An unknown name raises a ValueError naming it."""
    unknown = [f for f in fields if f not in METADATA_FIELDS]
    if unknown:
        raise ValueError(f"unknown metadata field(s) {unknown}; known: {sorted(METADATA_FIELDS)}")
    return {f: METADATA_FIELDS[f]() for f in fields}


# ---- timers -------------------------------------------------------------------------------------------------
def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` (a CUDA device); nothing on the CPU, whose work is done on return."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """What :func:`timed` measured: wall-clock seconds and this process's CPU seconds (all threads)."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0


@contextlib.contextmanager
def timed(device: torch.device | str | None = None) -> Iterator[Timing]:
    """Time the block: ``device`` is synchronised before the clock starts (work queued earlier is not counted)
    and before it stops (work queued inside is). The `Timing` is filled when the block ends without error."""
    timing = Timing()
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    yield timing
    synchronize(device)
    timing.seconds = time.perf_counter() - start
    timing.cpu_seconds = time.process_time() - cpu


# ---- the --set option ---------------------------------------------------------------------------------------
def add_model_options(parser: argparse.ArgumentParser, dataset: bool = True) -> None:
    """``--model_name`` (also ``--model``) and, with ``dataset``, ``--dataset``: what a script measures on."""
    parser.add_argument(
        "--model_name",
        "--model",
        dest="model_name",
        default=DEFAULT_MODEL,
        help=f"model: the embedded {DEFAULT_MODEL!r} (default), the offline 'qwen2.5-coder-0.5b', a local folder "
        "or a hub id",
    )
    if dataset:
        parser.add_argument(
            "--dataset",
            default=DEFAULT_TEXT,
            help=f"text: {DEFAULT_TEXT!r} (default), 'python' (standard-library code), 'pydoc'",
        )


def add_overrides_option(parser: argparse.ArgumentParser, what: str) -> None:
    """The repeatable ``--set KEY=VALUE`` flag (into ``args.overrides``, for :func:`overrides_from`); ``what``
    says which configs it overrides."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field of {what} (repeatable; VALUE read as YAML)",
    )


def overrides_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Config fields of ``args.overrides`` (:func:`chunked_decomp.config.parse_overrides`); a malformed item is
    refused with ``parser.error`` (exit status 2), naming ``--set`` and the item."""
    try:
        return parse_overrides(args.overrides)
    except ValueError as err:
        parser.error(str(err))


def preset_config(parser: argparse.ArgumentParser, preset: str, **fields: Any) -> CompressionConfig:
    """``CompressionConfig.from_preset(preset, **fields)``; an unknown preset or a bad field value is refused with
    ``parser.error`` (exit status 2) and the config's own message, before any work."""
    try:
        return CompressionConfig.from_preset(preset, **fields)
    except ValueError as err:
        parser.error(str(err))


# ---- results ------------------------------------------------------------------------------------------------
def write_results(
    path: str | Path, summary: dict[str, Any], *, leave_out: Iterable[str] = (), indent: int | None = 2
) -> Path:
    """Write ``summary`` to ``path`` as JSON (atomically), then print it as the last line of stdout, without the
    keys ``leave_out`` (the raw samples that make the file large)."""
    left_out = set(leave_out)
    written = atomic_write_json(Path(path), summary, indent=indent)
    print(json.dumps({k: v for k, v in summary.items() if k not in left_out}))
    return written
