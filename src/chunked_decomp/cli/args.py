"""Argument types, defaults and the arguments several commands share.

Each type names what is allowed; argparse prefixes the flag and exits with code 2. The few library defaults the
help text quotes are copied here rather than imported, so that ``--help`` loads neither torch nor transformers
(tests check that the copies agree).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "CALIBRATION_STRIDE",
    "CALIBRATION_WINDOWS",
    "DEFAULT_DATASET",
    "DEFAULT_MODEL",
    "DTYPES",
    "LONGCTX_DEFAULT_TASKS",
    "LONGCTX_TASKS",
    "METRICS",
    "PROTOCOL_DEFAULTS",
    "UsageError",
    "add_common",
    "add_model_and_text",
    "add_protocol",
    "add_ratios",
    "add_recommendation_targets",
    "dataset_type",
    "finite_type",
    "head_weights_type",
    "int_at_least",
    "percent_type",
    "preset_type",
    "ratio_type",
    "reduction_type",
]

DEFAULT_MODEL = "smollm2-135m"  # chunked_decomp.hf.loading.DEFAULT_MODEL, without importing transformers
DEFAULT_DATASET = "wikipedia"
DTYPES = ["float32", "float16", "bfloat16"]
# chunked_decomp.evaluation.ruler.TASKS / DEFAULT_TASKS, without importing torch
LONGCTX_TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "passkey",
)  # fmt: skip
LONGCTX_DEFAULT_TASKS = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "cwe", "passkey")
METRICS = ("perplexity", "bleu", "rouge", "semantic")
# chunked_decomp.evaluation.calibration.DEFAULT_NUM_WINDOWS / DEFAULT_STRIDE, without importing torch
CALIBRATION_WINDOWS = 8
CALIBRATION_STRIDE = 10_000

# Settings per command: (quick --test_mode value, full-run value). A flag given on the command line wins.
PROTOCOL_DEFAULTS: dict[str, dict[str, tuple[Any, Any]]] = {
    "compress": {
        "threads": (1, None),
        "num_samples": (2, None),
        "context_length": (256, 1024),
        "continuation_length": (64, 512),
        "start": (0, 5000),
        "num_windows": (1, 1),
        "decode_tokens": (4, 16),
        "generation_tokens": (8, 32),
        "num_prompts": (1, 2),
        "prompt_length": (192, 512),
    },
    "evaluate": {
        "threads": (1, None),
        "compression_ratio": ([0.5, 0.25], [0.5, 0.25, 0.125]),
        "num_samples": (2, None),
        "context_length": (256, 1024),
        "continuation_length": (64, 512),
        "start": (0, 5000),
        "num_windows": (1, 1),
        "decode_tokens": (4, 16),
        "generation_tokens": (8, 32),
        "num_prompts": (1, 4),
        "prompt_length": (192, 512),
    },
    "benchmark": {
        "threads": (1, None),
        "compression_ratios": ([0.5, 0.25], [0.5, 0.25, 0.125]),
        "sequence_lengths": ([128, 256], [512, 1024, 2048]),
        "batch_sizes": ([1, 2], [1, 4]),
        "num_samples": (3, None),
        "continuation_length": (32, 128),
        "start": (0, 0),
        "decode_tokens": (4, 16),
        "timeline_context": (192, 1024),
        "timeline_tokens": (24, 128),
    },
    # --quick: one short context, two samples, the default preset at 0.25 against the uncompressed cache
    "longctx": {
        "context_lengths": ([1024], [4096, 8192]),
        "num_samples": (2, 10),
        "methods": (
            ["full", "chunked:balanced@0.25"],
            ["full", "chunked:balanced@0.25", "chunked:aggressive@0.125", "quanto4", "quanto2"],
        ),
    },
}


class UsageError(ValueError):
    """Bad input, reported as ``error: <flag>: <message>`` with exit code 2."""

    def __init__(self, flag: str | None, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}" if flag else message)


# ---- argument types ------------------------------------------------------------------------------------------


def finite_type(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def ratio_type(text: str) -> float:
    """A compression ratio: stored ÷ 16-bit bytes, in (0, 1]."""
    value = finite_type(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1] (stored bytes ÷ an uncompressed 16-bit cache, e.g. 0.25), got {text}"
        )
    return value


def int_at_least(minimum: int, what: str = "an integer") -> Callable[[str], int]:
    """An argument type for integers ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what} >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def percent_type(text: str) -> float:
    """A percentage >= 0."""
    value = finite_type(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a percentage >= 0, got {text}")
    return value


def reduction_type(text: str) -> float:
    """A reduction in percent, in [0, 100)."""
    value = percent_type(text)
    if value >= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage in [0, 100), got {text}")
    return value


def preset_type(text: str) -> str:
    """The name of a packaged compression preset."""
    from chunked_decomp.config import load_presets

    try:
        names = sorted(load_presets())
    except ValueError as err:  # a broken presets file: say why, not argparse's bare "invalid value"
        raise argparse.ArgumentTypeError(" ".join(str(err).split())) from None
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; choose from {', '.join(names)}")
    return text


def head_weights_type(text: str) -> str:
    """``auto`` or the path of a head-weight file written by ``chunked-decomp calibrate``."""
    from chunked_decomp.config.head_weights import AUTO, load_head_weights_file

    if text == AUTO:
        return text
    try:
        load_head_weights_file(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' (the weights shipped for the model) or a head-weight file written by "
            f"`chunked-decomp calibrate`: {' '.join(str(err).split())}"
        ) from None
    return text


def dataset_type(text: str) -> str:
    """The name of a known dataset, lower-cased."""
    from chunked_decomp.evaluation.data import DATASETS

    if text.strip().lower() not in DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; choose from {', '.join(DATASETS)} (or pass --text_file)"
        )
    return text.strip().lower()


# ---- arguments shared by several commands ------------------------------------------------------------------


def add_model_and_text(p: argparse.ArgumentParser, purpose: str, num_samples_help: str) -> None:
    """--model_name, --dataset_name, --text_file and --num_samples, for text used to ``purpose`` (a verb)."""
    p.add_argument(
        "--model_name",
        default=DEFAULT_MODEL,
        help=f"model: {DEFAULT_MODEL!r} (embedded, offline), a save_pretrained folder, or a hub id (default: %(default)s)",
    )
    p.add_argument(
        "--dataset_name",
        type=dataset_type,
        default=DEFAULT_DATASET,
        help=f"text to {purpose} on (default: %(default)s)",
    )
    p.add_argument(
        "--text_file", default=None, help=f"UTF-8 text file to {purpose} on instead of --dataset_name"
    )
    p.add_argument("--num_samples", type=int_at_least(1), default=None, help=num_samples_help)


def add_ratios(p: argparse.ArgumentParser, *flags: str, help: str) -> None:
    """The target compression ratio(s) under two spellings; the first names the destination."""
    p.add_argument(
        *flags, dest=flags[0][2:], type=ratio_type, nargs="+", default=None, metavar="R", help=help
    )


def add_recommendation_targets(p: argparse.ArgumentParser) -> None:
    """--target_memory_reduction and --max_quality_loss, the goals of the recommended setting."""
    p.add_argument(
        "--target_memory_reduction", type=reduction_type, default=70.0, help="percent, for the recommendation"
    )
    p.add_argument(
        "--max_quality_loss", type=percent_type, default=5.0, help="percent perplexity increase allowed"
    )


def add_common(p: argparse.ArgumentParser, command: str) -> None:
    """The arguments of every measuring command: model and text, preset, output folder, device, tracking."""
    d = PROTOCOL_DEFAULTS[command]
    add_model_and_text(
        p, "evaluate", f"texts (articles) to load (default: all; {d['num_samples'][0]} with --test_mode)"
    )
    p.add_argument(
        "--preset", type=preset_type, default=None, help="compression preset the other flags modify"
    )
    p.add_argument(
        "--head_weights",
        type=head_weights_type,
        default=None,
        metavar="auto|PATH",
        help="per-head weights of the rank allocation: 'auto' (calibrated weights shipped for the model, else "
        "uniform) or a file from `chunked-decomp calibrate` (default: the preset's)",
    )
    p.add_argument(
        "--output_dir", default=f"results/{command}", help="where results go (default: %(default)s)"
    )
    p.add_argument(
        "--test_mode", action="store_true", help="a quick, small run (short contexts, few samples)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument(
        "--device_map",
        default=None,
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="place the layers of a model larger than one device (accelerate) instead of --device; inputs go to "
        "the device of the embeddings",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype")
    p.add_argument(
        "--cache_dir",
        default=None,
        help="where the embedded model is converted once (default: ~/.cache/chunked_decomp)",
    )
    p.add_argument(
        "--start", type=int_at_least(0), default=None, help="first token of the evaluation windows"
    )
    p.add_argument(
        "--decode_tokens", type=int_at_least(1), default=None, help="greedy decoding steps timed for speed"
    )
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--wandb", action="store_true", help="log the run to Weights & Biases (offline without WANDB_API_KEY)"
    )
    p.add_argument("--wandb_project", default="chunked-decomp", help="wandb project (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int_at_least(1),
        default=None,
        help="CPU threads for torch (default: torch's choice, 1 with --test_mode; on a CPU shared with other work "
        "1 thread is several times faster than 2)",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def add_protocol(p: argparse.ArgumentParser) -> None:
    """The continuation protocol of ``compress`` and ``evaluate``: windows and generation prompts."""
    p.add_argument(
        "--context_length",
        type=int_at_least(8),
        default=None,
        help="context tokens, prefilled and compressed",
    )
    p.add_argument(
        "--continuation_length", type=int_at_least(1), default=None, help="tokens scored after the context"
    )
    p.add_argument(
        "--num_windows", type=int_at_least(1), default=None, help="context+continuation windows evaluated"
    )
    p.add_argument(
        "--generation_tokens",
        type=int_at_least(0),
        default=None,
        help="greedy tokens generated per prompt (0: skip)",
    )
    p.add_argument(
        "--num_prompts", type=int_at_least(1), default=None, help="prompts for the generation comparison"
    )
    p.add_argument("--prompt_length", type=int_at_least(1), default=None, help="tokens per generation prompt")
