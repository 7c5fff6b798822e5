"""The ``chunked-decomp`` command line: ``compress``, ``evaluate``, ``benchmark`` and ``calibrate``.

Each command checks its input before any work (a bad flag gets one ``error: ...`` line naming it and exit code 2;
``--debug`` shows the traceback instead), writes JSON, CSV and PNG files into ``--output_dir`` atomically, keeps
every finished cell under ``--output_dir/cells`` so that a rerun skips it, shows progress bars and ends with a
summary table. ``scripts/run_compression.py``, ``scripts/evaluate_model.py`` and ``scripts/benchmark_memory.py``
run the same commands; ``python -m chunked_decomp.cli.commands`` works too.

Examples::

    chunked-decomp compress --test_mode
    chunked-decomp compress --compression_ratio 0.5 0.25 --chunk_size 32 64 --output_dir results/compress
    chunked-decomp evaluate --compression_ratio 0.5 0.25 0.125 --metrics perplexity bleu rouge --comparison_study
    chunked-decomp benchmark --sequence_lengths 512 1024 --batch_sizes 1 4 --profile_compression --save_timeline
    chunked-decomp calibrate --output head_weights.json            # then: --head_weights head_weights.json

``calibrate`` writes one JSON file (refusing to replace one without ``--overwrite``) instead of a results folder.

Heavy libraries (torch, transformers, pandas, matplotlib) are imported only when a command runs; wandb only
with ``--wandb``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "run_benchmark", "run_calibrate", "run_compress", "run_evaluate"]

DEFAULT_MODEL = "smollm2-135m"  # chunked_decomp.hf.loading.DEFAULT_MODEL, without importing transformers
DEFAULT_DATASET = "wikipedia"
METRICS = ("perplexity", "bleu", "rouge", "semantic")
_METRIC_KEYS = {"bleu": "bleu", "rouge": "rouge_l", "semantic": "semantic_sim"}
_MB = 1024 * 1024

# Settings per command: (quick --test_mode value, full-run value). A flag given on the command line wins.
_PROTOCOL_DEFAULTS: dict[str, dict[str, tuple[Any, Any]]] = {
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
}


class UsageError(ValueError):
    """Bad input, reported as ``error: <flag>: <message>`` with exit code 2."""

    def __init__(self, flag: str | None, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}" if flag else message)


# ----------------------------------------------------------------------------------------------------------------
# Argument types: each names what is allowed; argparse prefixes the flag and exits with code 2.


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def ratio_type(text: str) -> float:
    """A compression ratio: stored ÷ 16-bit bytes, in (0, 1]."""
    value = _finite(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1] (stored bytes ÷ an uncompressed 16-bit cache, e.g. 0.25), got {text}"
        )
    return value


def _int_at_least(minimum: int, what: str = "an integer") -> Callable[[str], int]:
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
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a percentage >= 0, got {text}")
    return value


def reduction_type(text: str) -> float:
    value = percent_type(text)
    if value >= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage in [0, 100), got {text}")
    return value


def preset_type(text: str) -> str:
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
    from chunked_decomp.evaluation.data import DATASETS

    if text.strip().lower() not in DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; choose from {', '.join(DATASETS)} (or pass --text_file)"
        )
    return text.strip().lower()


# ----------------------------------------------------------------------------------------------------------------
# Parser


def _add_model_and_text(p: argparse.ArgumentParser, purpose: str, num_samples_help: str) -> None:
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
    p.add_argument("--num_samples", type=_int_at_least(1), default=None, help=num_samples_help)


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    d = _PROTOCOL_DEFAULTS[command]
    _add_model_and_text(
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
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype"
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="where the embedded model is converted once (default: ~/.cache/chunked_decomp)",
    )
    p.add_argument(
        "--start", type=_int_at_least(0), default=None, help="first token of the evaluation windows"
    )
    p.add_argument(
        "--decode_tokens", type=_int_at_least(1), default=None, help="greedy decoding steps timed for speed"
    )
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--wandb", action="store_true", help="log the run to Weights & Biases (offline without WANDB_API_KEY)"
    )
    p.add_argument("--wandb_project", default="chunked-decomp", help="wandb project (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="CPU threads for torch (default: torch's choice, 1 with --test_mode; on a CPU shared with other work "
        "1 thread is several times faster than 2)",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _add_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--context_length",
        type=_int_at_least(8),
        default=None,
        help="context tokens, prefilled and compressed",
    )
    p.add_argument(
        "--continuation_length", type=_int_at_least(1), default=None, help="tokens scored after the context"
    )
    p.add_argument(
        "--num_windows", type=_int_at_least(1), default=None, help="context+continuation windows evaluated"
    )
    p.add_argument(
        "--generation_tokens",
        type=_int_at_least(0),
        default=None,
        help="greedy tokens generated per prompt (0: skip)",
    )
    p.add_argument(
        "--num_prompts", type=_int_at_least(1), default=None, help="prompts for the generation comparison"
    )
    p.add_argument(
        "--prompt_length", type=_int_at_least(1), default=None, help="tokens per generation prompt"
    )


def _configure_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compression_ratio",
        "--compression_ratios",
        dest="compression_ratio",
        type=ratio_type,
        nargs="+",
        default=None,
        metavar="R",
        help="target ratio(s) ρ in (0, 1] (default: the preset's, else 0.25)",
    )
    p.add_argument(
        "--chunk_size",
        type=_int_at_least(4),
        nargs="+",
        default=None,
        metavar="C",
        help="tokens per compressed chunk, >= 4 (default: the preset's, else 256)",
    )
    _add_common(p, "compress")
    _add_protocol(p)
    p.set_defaults(func=run_compress, command="compress")


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compression_ratio",
        "--compression_ratios",
        dest="compression_ratio",
        type=ratio_type,
        nargs="+",
        default=None,
        metavar="R",
        help="target ratio(s) ρ in (0, 1] (default: 0.5 0.25 0.125; 0.5 0.25 with --test_mode)",
    )
    p.add_argument(
        "--chunk_size", type=_int_at_least(4), default=None, help="tokens per chunk (default: the preset's)"
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=["perplexity", "bleu", "rouge"],
        help="perplexity (continuation protocol) and generation fidelity vs the uncompressed model (default: %(default)s)",
    )
    p.add_argument(
        "--comparison_study",
        action="store_true",
        help="also compare presets and peers (QuantizedCache, kvpress where installed) at their stored bytes",
    )
    p.add_argument(
        "--save_plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write PNG plots (default: on)",
    )
    p.add_argument(
        "--target_memory_reduction", type=reduction_type, default=70.0, help="percent, for the recommendation"
    )
    p.add_argument(
        "--max_quality_loss", type=percent_type, default=5.0, help="percent perplexity increase allowed"
    )
    _add_common(p, "evaluate")
    _add_protocol(p)
    p.set_defaults(func=run_evaluate, command="evaluate")


def _configure_benchmark(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compression_ratios",
        "--compression_ratio",
        dest="compression_ratios",
        type=ratio_type,
        nargs="+",
        default=None,
        metavar="R",
        help="target ratio(s) ρ in (0, 1] (default: 0.5 0.25 0.125)",
    )
    p.add_argument(
        "--sequence_lengths",
        type=_int_at_least(8),
        nargs="+",
        default=None,
        metavar="N",
        help="context lengths",
    )
    p.add_argument(
        "--batch_sizes", type=_int_at_least(1), nargs="+", default=None, metavar="B", help="batch sizes"
    )
    p.add_argument(
        "--chunk_size", type=_int_at_least(4), default=None, help="tokens per chunk (default: the preset's)"
    )
    p.add_argument(
        "--continuation_length", type=_int_at_least(1), default=None, help="tokens scored after each context"
    )
    p.add_argument(
        "--profile_compression",
        action="store_true",
        help="profile memory while generating with and without compression (report in memory_profile.json/.txt)",
    )
    p.add_argument(
        "--save_timeline",
        action="store_true",
        help="save the memory timeline plot (implies --profile_compression)",
    )
    p.add_argument(
        "--timeline_context",
        type=_int_at_least(1),
        default=None,
        help="prompt tokens of the profiled generation",
    )
    p.add_argument(
        "--timeline_tokens", type=_int_at_least(1), default=None, help="tokens generated while profiling"
    )
    p.add_argument(
        "--target_memory_reduction", type=reduction_type, default=70.0, help="percent, for the recommendation"
    )
    p.add_argument(
        "--max_quality_loss", type=percent_type, default=5.0, help="percent perplexity increase allowed"
    )
    _add_common(p, "benchmark")
    p.set_defaults(func=run_benchmark, command="benchmark")


# chunked_decomp.evaluation.calibration.DEFAULT_NUM_WINDOWS / DEFAULT_STRIDE, without importing torch
_CALIBRATION_WINDOWS = 8
_CALIBRATION_STRIDE = 10_000


def _configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="head-weight JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    _add_model_and_text(p, "calibrate", "texts (articles) to load (default: all)")
    p.add_argument(
        "--start",
        type=_int_at_least(0),
        default=None,
        help="first token of the first calibration window (default: windows at the end of the text, away from "
        "the evaluation windows, which read its beginning)",
    )
    p.add_argument(
        "--num_windows",
        type=_int_at_least(1),
        default=_CALIBRATION_WINDOWS,
        help="calibration windows (default: %(default)s)",
    )
    p.add_argument(
        "--stride",
        type=_int_at_least(1),
        default=_CALIBRATION_STRIDE,
        help="tokens from one window's start to the next (default: %(default)s)",
    )
    p.add_argument(
        "--context_length",
        type=_int_at_least(8),
        default=1024,
        help="context tokens per window (default: %(default)s)",
    )
    p.add_argument(
        "--continuation_length",
        type=_int_at_least(2),
        default=512,
        help="tokens whose loss is differentiated (default: %(default)s)",
    )
    p.add_argument(
        "--num_sink_tokens",
        type=_int_at_least(0),
        default=4,
        help="first tokens left out, as the cache keeps them exact (default: %(default)s)",
    )
    p.add_argument(
        "--power",
        type=_finite,
        default=0.5,
        help="exponent of the normalised sensitivities, > 0 (default: %(default)s)",
    )
    p.add_argument(
        "--names",
        nargs="+",
        default=[],
        metavar="NAME",
        help="other names of the model for head_weights='auto' (the model's own name is always recorded)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype"
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="where the embedded model is converted once (default: ~/.cache/chunked_decomp)",
    )
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads for torch")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=run_calibrate, command="calibrate", device_map=None)


_COMMANDS = {
    "compress": (
        _configure_compress,
        "compression statistics, quality and memory per (ratio, chunk size) setting",
    ),
    "evaluate": (
        _configure_evaluate,
        "quality vs. compression: perplexity and generation fidelity, plots, recommendation",
    ),
    "benchmark": (
        _configure_benchmark,
        "memory, quality and speed over sequence lengths and batch sizes; timelines",
    ),
    "calibrate": (
        _configure_calibrate,
        "measure per-head weights of the rank allocation (head_weights) for a model; writes a JSON file",
    ),
}


def build_parser(command: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The full ``chunked-decomp`` parser, or one command's parser alone (for the scripts)."""
    formatter = argparse.HelpFormatter
    if command is not None:
        configure, description = _COMMANDS[command]
        parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter)
        configure(parser)
        return parser
    parser = argparse.ArgumentParser(
        prog=prog or "chunked-decomp",
        description="Chunked low-rank (SVD) compression of transformers KV caches.",
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(_COMMANDS) + "}", required=True)
    for name, (configure, description) in _COMMANDS.items():
        configure(sub.add_parser(name, help=description, description=description, formatter_class=formatter))
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Shared steps


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Fill flags left unset with the quick (``--test_mode``) or the full-run value."""
    for name, (quick, full) in _PROTOCOL_DEFAULTS[args.command].items():
        if name == "num_samples" and args.text_file:
            continue  # a user's file is used whole unless --num_samples says otherwise
        if getattr(args, name, None) is None:
            setattr(args, name, quick if args.test_mode else full)


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(message, file=sys.stderr, flush=True)


def _base_config(args: argparse.Namespace, **overrides: Any):
    """The preset (or defaults) with the given fields and a 16-bit reference, validated."""
    from chunked_decomp.config import CompressionConfig

    data = (
        CompressionConfig.from_preset(args.preset).to_dict() if args.preset else CompressionConfig().to_dict()
    )
    data["reference_dtype"] = "float16"
    if getattr(args, "head_weights", None) is not None:
        data["head_weights"] = args.head_weights
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CompressionConfig.from_dict(data)
    except ValueError as err:
        flags = "--preset/--compression_ratio/--chunk_size"
        raise UsageError(
            "--head_weights" if str(err).startswith("head_weights") else flags, str(err)
        ) from err


_ENCODER_ONLY_TYPES = {
    "albert", "bert", "big_bird", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2", "distilbert",
    "electra", "ernie", "esm", "flaubert", "funnel", "ibert", "layoutlm", "longformer", "megatron-bert", "mobilebert",
    "modernbert", "mpnet", "nezha", "nystromformer", "rembert", "roberta", "roberta-prelayernorm", "roc_bert",
    "roformer", "squeezebert", "xlm-roberta", "xlm-roberta-xl", "xmod", "yoso",
}  # fmt: skip


def check_causal_lm_config(config: Any, name: str) -> None:
    """Refuse encoder-only and encoder-decoder models from their config, before loading weights.

    transformers will happily build ``BertLMHeadModel`` from a BERT checkpoint for ``AutoModelForCausalLM``; an
    encoder keeps no KV cache worth compressing, so it is refused by its config (model type and architectures).
    """
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(
            "--model_name",
            f"{name!r} is an encoder-decoder model ({model_type}); ChunkedDecomp compresses the self-attention "
            "KV cache of decoder-only causal LMs (Llama, Qwen2, Mistral, GPT-2 families)",
        )
    architectures = list(getattr(config, "architectures", None) or [])
    causal = [
        a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
    ]
    encoder = model_type in _ENCODER_ONLY_TYPES and not getattr(config, "is_decoder", False)
    if encoder or (architectures and not causal):
        what = ", ".join(architectures) or model_type
        raise UsageError(
            "--model_name",
            f"{name!r} is an encoder-only model ({what}): it attends to the whole input at once and keeps no "
            "key-value cache to compress. Use a decoder-only causal LM, e.g. the default smollm2-135m",
        )


def _load_model(args: argparse.Namespace):
    from chunked_decomp.hf.loading import load_model_and_tokenizer

    local = Path(args.model_name).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UsageError("--model_name", f"cannot read {str(local / 'config.json')!r}: {err}") from err
        check_causal_lm_config(config, args.model_name)
    _log(args, f"loading model {args.model_name} ...")
    try:
        model, tokenizer = load_model_and_tokenizer(
            args.model_name,
            dtype=args.dtype,
            device=args.device,
            cache_dir=args.cache_dir,
            device_map=args.device_map,
        )
    except (ValueError, OSError) as err:  # OSError covers FileNotFoundError and HubUnavailableError
        message = str(err).split("\n")[0]
        flag = (
            "--device_map"
            if message.startswith(("device_map", "give either device"))
            else "--device"
            if message.startswith("device")
            else "--dtype"
            if message.startswith("dtype")
            else "--model_name"
        )
        raise UsageError(flag, message) from err
    check_causal_lm_config(model.config, args.model_name)
    if args.device_map is not None:
        # Layers spread over devices: inputs enter where the embeddings are; accelerate's hooks move the rest.
        args.device = str(model.get_input_embeddings().weight.device)
    from chunked_decomp.hf.models import check_decoder_only

    try:
        check_decoder_only(model)
    except ValueError as err:
        raise UsageError("--model_name", str(err)) from err
    return model, tokenizer


def _load_texts(args: argparse.Namespace) -> list[str]:
    from chunked_decomp.evaluation.data import load_texts

    flag = "--text_file" if args.text_file else "--dataset_name"
    try:
        if args.text_file:  # a user's file: every non-blank paragraph counts, however short
            return load_texts(text_file=args.text_file, num_samples=args.num_samples, min_chars=0)
        return load_texts(args.dataset_name, num_samples=args.num_samples)
    except (ValueError, OSError) as err:
        raise UsageError(flag, str(err).split("\n")[0]) from err


def _token_ids(args: argparse.Namespace, tokenizer: Any, texts: list[str], need: int):
    from chunked_decomp.evaluation.data import load_token_ids

    ids = load_token_ids(tokenizer, texts)
    if ids.numel() < need:
        source = f"--text_file {args.text_file}" if args.text_file else f"--dataset_name {args.dataset_name}"
        raise UsageError(
            "--num_samples" if args.num_samples else ("--text_file" if args.text_file else "--dataset_name"),
            f"{source} gives {ids.numel()} tokens but this run needs {need} (context, continuation and windows "
            "from --start); use more text (--num_samples), a longer file or shorter windows",
        )
    return ids


def _prepare(args: argparse.Namespace) -> tuple[Path, Any, Any, Any, Any]:
    """Check the output folder and tracker, load the model and text: ``(out, model, tokenizer, ids, tracker)``."""
    from chunked_decomp.io import check_output_dir

    try:
        out = check_output_dir(args.output_dir)
    except ValueError as err:
        raise UsageError(None, str(err)) from err
    _resolve_defaults(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            from chunked_decomp.cli.tracking import INSTALL_HINT

            raise UsageError("--wandb", f"needs the wandb package, which is not installed: {INSTALL_HINT}")
    texts = _load_texts(args) if args.text_file else None
    model, tokenizer = _load_model(args)
    if texts is None:
        _log(args, f"loading text {args.dataset_name!r} ...")
        texts = _load_texts(args)
    ids = _token_ids(args, tokenizer, texts, _tokens_needed(args))
    from chunked_decomp.cli.tracking import start_tracker

    config = {k: v for k, v in vars(args).items() if k != "func"}
    tracker = start_tracker(
        args.wandb, args.wandb_project, config, out, name=f"{args.command}-{Path(out).name}"
    )
    return out, model, tokenizer, ids, tracker


def _tokens_needed(args: argparse.Namespace) -> int:
    if args.command == "benchmark":
        span = max(args.sequence_lengths) + args.continuation_length
        return max(args.start + span * max(args.batch_sizes), args.start + args.timeline_context)
    need = args.start + (args.context_length + args.continuation_length) * args.num_windows
    if args.generation_tokens:
        need = max(need, args.start + args.prompt_length * args.num_prompts)
    return need


def _prompts(args: argparse.Namespace, ids) -> list:
    """``num_prompts`` consecutive spans of ``prompt_length`` tokens from ``--start``."""
    s, n = args.start, args.prompt_length
    return [ids[s + i * n : s + (i + 1) * n] for i in range(args.num_prompts)]


def _run_info(args: argparse.Namespace, model: Any, seconds: float, **extra: Any) -> dict[str, Any]:
    import torch
    import transformers

    import chunked_decomp
    from chunked_decomp.hf.loading import model_info

    return {
        "command": args.command,
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "model": model_info(model),
        "seconds": seconds,
        "versions": {
            "chunked_decomp": chunked_decomp.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        **extra,
    }


def _fingerprint(ids) -> str:
    from chunked_decomp.benchmarking.benchmark import token_fingerprint

    return token_fingerprint(ids)


def _progress(args: argparse.Namespace, items: Sequence, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="cell", disable=args.no_progress, file=sys.stderr)


def _table(frame: Any, columns: dict[str, tuple[str, str]]) -> str:
    """``frame`` as an aligned text table: column → (header, format spec)."""
    present = [c for c in columns if c in frame.columns]
    rows = [[columns[c][0] for c in present]]
    for _, r in frame.iterrows():
        cells = []
        for c in present:
            v = r[c]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("-")
            else:
                cells.append(format(v, columns[c][1]) if columns[c][1] else str(v))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(present))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``n`` bytes as B, KB, MB or GB (powers of 1024), three significant figures or so."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return (
                f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
            )
        n /= 1024
    return f"{n:.1f} GB"


def _summary_line(row: dict[str, Any]) -> str:
    """E.g. 'KV cache: 23.6 MB → 5.9 MB (25.0% of a 16-bit cache), perplexity 15.76 → 15.85 (+0.6%)'."""
    text = (
        f"KV cache: {human_bytes(row['kv_bytes_reference'])} → {human_bytes(row['kv_bytes_compressed'])} "
        f"({100 * row['compression_ratio_achieved']:.1f}% of a 16-bit cache), perplexity "
        f"{row['perplexity_original']:.2f} → {row['perplexity_compressed']:.2f} ({row['perplexity_increase']:+.1f}%)"
    )
    if row.get("speed_improvement") is not None:
        text += f", decoding {row['speed_improvement']:.2f}× the uncompressed speed"
    if row.get("first_divergence") is not None and row.get("generation_tokens"):
        text += (
            f", greedy generations identical for the first {row['first_divergence']:.0f} of "
            f"{row['generation_tokens']} tokens"
        )
    return text


def _evaluation_row(result: dict[str, Any]) -> dict[str, Any]:
    """Flatten `PerformanceEvaluator.evaluate_compression` output into table columns."""
    row = {k: v for k, v in result.items() if k != "config"}
    row["compression_ratio_achieved"] = row.pop("compression_ratio")
    return row


# ----------------------------------------------------------------------------------------------------------------
# compress


def run_compress(args: argparse.Namespace) -> int:
    """``compress``: per (ratio × chunk size) setting, compression statistics, quality and memory."""
    t0 = time.perf_counter()
    out, model, tokenizer, ids, tracker = _prepare(args)
    import pandas as pd

    from chunked_decomp.benchmarking.plots import plot_compression_summary, plot_ranks
    from chunked_decomp.evaluation.quality import PerformanceEvaluator
    from chunked_decomp.hf.compressor import ChunkedDecomp
    from chunked_decomp.io import ResultStore, atomic_write_json, write_table

    base = _base_config(args)
    ratios = args.compression_ratio or [base.compression_ratio]
    chunks = args.chunk_size or [base.chunk_size]
    configs = [_base_config(args, compression_ratio=r, chunk_size=c) for r in ratios for c in chunks]
    for cfg in configs:
        try:
            ChunkedDecomp(config=cfg).validate_for(model)
        except ValueError as err:
            raise UsageError("--chunk_size", str(err)) from err
    evaluator = PerformanceEvaluator(
        tokenizer,
        context_length=args.context_length,
        continuation_length=args.continuation_length,
        start=args.start,
        num_windows=args.num_windows,
        decode_tokens=args.decode_tokens,
    )
    prompts = _prompts(args, ids) if args.generation_tokens else []
    store = ResultStore(out / "cells" / "compress")
    protocol = {
        k: getattr(args, k)
        for k in (
            "context_length",
            "continuation_length",
            "start",
            "num_windows",
            "decode_tokens",
            "generation_tokens",
            "num_prompts",
            "prompt_length",
        )
    }
    common = {
        "command": "compress",
        "model": args.model_name,
        "dtype": args.dtype,
        "device": args.device,
        "text": _fingerprint(ids),
        "protocol": protocol,
    }

    def measure(cfg) -> dict[str, Any]:
        decomp = ChunkedDecomp(config=cfg)
        with decomp.applied(model):
            result = evaluator.evaluate_compression(model, model, ids)
            layers = [
                {
                    "layer_idx": s.layer_idx,
                    "mean_key_rank": s.mean_key_rank,
                    "mean_value_rank": s.mean_value_rank,
                    "stored_bytes": s.stored_bytes,
                }
                for s in decomp.last_cache.memory_stats().per_layer
            ]
            row = _evaluation_row(result)
            if prompts:
                gen = evaluator.compare_generations(model, model, prompts, args.generation_tokens, metrics=())
                row.update({k: gen[k] for k in ("first_divergence", "token_agreement", "exact_match")})
                row["generation_compressed_tokens"] = sum(
                    p["compressed_tokens"] for p in gen["per_prompt"]
                ) / len(prompts)
        row["per_layer"] = layers
        return row

    rows = []
    for cfg in _progress(args, configs, "compress settings"):
        row, cached = store.get_or_compute({**common, "config": cfg.to_dict()}, lambda cfg=cfg: measure(cfg))
        row = {
            "preset": args.preset or "default",
            "compression_ratio": cfg.compression_ratio,
            "chunk_size": cfg.chunk_size,
            "generation_tokens": args.generation_tokens,
            **row,
            "cached": cached,
        }
        rows.append(row)
        tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        frame = pd.DataFrame([{k: v for k, v in r.items() if k != "per_layer"} for r in rows])
        write_table(frame, out / "compress_results")
    atomic_write_json(out / "compress_results.json", rows)  # with per-layer ranks
    plots = [plot_compression_summary(frame, out / "compression_summary.png")]
    ranks = {f"ρ={r['compression_ratio']:g}, chunk {r['chunk_size']}": r["per_layer"] for r in rows}
    plots.append(plot_ranks(ranks, out / "ranks_per_layer.png"))
    seconds = time.perf_counter() - t0
    atomic_write_json(out / "run_info.json", _run_info(args, model, seconds, files=[p.name for p in plots]))
    for p in plots:
        tracker.log_image(p.stem, p)
    tracker.log_table("compress_results", frame)
    tracker.finish()

    print(
        f"\nChunkedDecomp on {args.model_name} ({frame['context_length'].iloc[0]}-token context, "
        f"{frame['scored_tokens'].iloc[0]} scored tokens{', test mode' if args.test_mode else ''})"
    )
    for r in rows:
        print(f"  ρ={r['compression_ratio']:g}, chunk {r['chunk_size']}: {_summary_line(r)}")
    print()
    print(_table(frame, _COMPRESS_COLUMNS))
    print(
        f"\nwrote {out}/compress_results.{{json,csv}}, {', '.join(p.name for p in plots)} in {seconds:.1f} s "
        f"({sum(r['cached'] for r in rows)} of {len(rows)} settings reused from an earlier run)"
    )
    return 0


_COMPRESS_COLUMNS = {
    "compression_ratio": ("target ρ", "g"),
    "chunk_size": ("chunk", ""),
    "compression_ratio_achieved": ("ρ", ".3f"),
    "kv_bytes_compressed": ("KV bytes", ",d"),
    "memory_reduction": ("mem -%", ".1f"),
    "perplexity_original": ("ppl full", ".2f"),
    "perplexity_compressed": ("ppl comp", ".2f"),
    "perplexity_increase": ("ppl +%", "+.2f"),
    "speed_improvement": ("speed ×", ".2f"),
    "mean_key_rank": ("k rank", ".1f"),
    "mean_value_rank": ("v rank", ".1f"),
    "token_agreement": ("tok agree", ".2f"),
    "compression_seconds": ("comp s", ".2f"),
}


# ----------------------------------------------------------------------------------------------------------------
# evaluate


def run_evaluate(args: argparse.Namespace) -> int:
    """``evaluate``: perplexity and generation fidelity per ratio, plots, comparison study, recommendation."""
    t0 = time.perf_counter()
    out, model, tokenizer, ids, tracker = _prepare(args)
    import pandas as pd

    from chunked_decomp.benchmarking.benchmark import recommend_from_results
    from chunked_decomp.benchmarking.plots import plot_comparison, plot_quality
    from chunked_decomp.evaluation.quality import PerformanceEvaluator
    from chunked_decomp.hf.compressor import ChunkedDecomp
    from chunked_decomp.io import ResultStore, atomic_write_json, write_table

    configs = [
        _base_config(args, compression_ratio=r, chunk_size=args.chunk_size) for r in args.compression_ratio
    ]
    for cfg in configs:
        try:
            ChunkedDecomp(config=cfg).validate_for(model)
        except ValueError as err:
            raise UsageError("--chunk_size", str(err)) from err
    text_metrics = [_METRIC_KEYS[m] for m in args.metrics if m in _METRIC_KEYS]
    generate = bool(text_metrics) and args.generation_tokens > 0
    evaluator = PerformanceEvaluator(
        tokenizer,
        context_length=args.context_length,
        continuation_length=args.continuation_length,
        start=args.start,
        num_windows=args.num_windows,
        decode_tokens=args.decode_tokens,
    )
    prompts = _prompts(args, ids) if generate else []
    store = ResultStore(out / "cells" / "evaluate")
    protocol = {
        k: getattr(args, k)
        for k in (
            "context_length",
            "continuation_length",
            "start",
            "num_windows",
            "decode_tokens",
            "generation_tokens",
            "num_prompts",
            "prompt_length",
        )
    }
    fingerprint = _fingerprint(ids)
    common = {
        "command": "evaluate",
        "model": args.model_name,
        "dtype": args.dtype,
        "device": args.device,
        "text": fingerprint,
        "protocol": protocol,
    }

    def measure(cfg) -> dict[str, Any]:
        decomp = ChunkedDecomp(config=cfg)
        row: dict[str, Any] = {}
        with decomp.applied(model):
            result = evaluator.evaluate_compression(model, model, ids)
            row.update(_evaluation_row(result))
            if "perplexity" not in args.metrics:  # the bytes are still needed; drop what was not asked for
                for key in ("perplexity_original", "perplexity_compressed", "perplexity_increase"):
                    row[key] = None
            if generate:
                gen = evaluator.compare_generations(
                    model, model, prompts, args.generation_tokens, metrics=text_metrics
                )
                row.update({k: v for k, v in gen.items() if not k.endswith("_per_text")})
        return row

    rows = []
    for cfg in _progress(args, configs, "evaluate ratios"):
        params = {**common, "metrics": sorted(args.metrics), "config": cfg.to_dict()}
        row, cached = store.get_or_compute(params, lambda cfg=cfg: measure(cfg))
        row = {
            "method": "chunked",
            "preset": args.preset or "default",
            "compression_ratio": cfg.compression_ratio,
            "chunk_size": cfg.chunk_size,
            **row,
            "cached": cached,
        }
        rows.append(row)
        tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        frame = pd.DataFrame([{k: v for k, v in r.items() if k != "per_prompt"} for r in rows])
        write_table(frame, out / "evaluate_results")
    atomic_write_json(out / "evaluate_results.json", rows)  # with the generations of every prompt
    frame["memory_reduction_pct"] = frame["memory_reduction"]
    frame["perplexity_increase_pct"] = frame["perplexity_increase"]
    frame["speed_ratio"] = frame["speed_improvement"]

    comparison = None
    if args.comparison_study:
        comparison = _comparison_study(args, model, ids, out, fingerprint, tracker)

    plots = []
    if args.save_plots:
        plots.append(plot_quality(frame, out / "quality_vs_compression.png"))
        if comparison is not None:
            plots.append(plot_comparison(comparison, out / "comparison.png"))
    recommendation = None
    if "perplexity" in args.metrics:
        recommendation = recommend_from_results(frame, args.target_memory_reduction, args.max_quality_loss)
        atomic_write_json(out / "recommendation.json", recommendation)
    seconds = time.perf_counter() - t0
    atomic_write_json(out / "run_info.json", _run_info(args, model, seconds, files=[p.name for p in plots]))
    for p in plots:
        tracker.log_image(p.stem, p)
    tracker.log_table("evaluate_results", frame)
    tracker.finish()

    print(f"\nQuality vs. compression on {args.model_name}{' (test mode)' if args.test_mode else ''}")
    print(_table(frame, _EVALUATE_COLUMNS))
    if comparison is not None:
        print("\nComparison study (continuation protocol, ρ = stored bytes ÷ 16-bit cache):")
        print(
            _table(
                comparison,
                {
                    "method": ("method", ""),
                    "ratio": ("ρ", ".3f"),
                    "perplexity": ("ppl", ".2f"),
                    "increase_pct": ("ppl +%", "+.2f"),
                },
            )
        )
    if recommendation is not None:
        print("\n" + recommendation["message"])
    print(
        f"\nwrote {out}/evaluate_results.{{json,csv}}{', ' if plots else ''}{', '.join(p.name for p in plots)} in {seconds:.1f} s"
    )
    return 0


_EVALUATE_COLUMNS = {
    "compression_ratio": ("target ρ", "g"),
    "compression_ratio_achieved": ("ρ", ".3f"),
    "memory_reduction": ("mem -%", ".1f"),
    "perplexity_original": ("ppl full", ".2f"),
    "perplexity_compressed": ("ppl comp", ".2f"),
    "perplexity_increase": ("ppl +%", "+.2f"),
    "bleu": ("BLEU", ".1f"),
    "rouge_l": ("ROUGE-L", ".3f"),
    "semantic_sim": ("semantic", ".3f"),
    "token_agreement": ("tok agree", ".2f"),
    "first_divergence": ("same first", ".1f"),
    "speed_improvement": ("speed ×", ".2f"),
}


def _comparison_methods(args: argparse.Namespace) -> list:
    """Full cache, ChunkedDecomp presets and ratios, and the peers that can run here."""
    import importlib.util

    from chunked_decomp.config import load_presets
    from chunked_decomp.evaluation.methods import FullCache, chunked_method

    methods = [FullCache()]
    for preset in ("conservative", "balanced", "aggressive"):
        if preset in load_presets():
            methods.append(chunked_method(preset))
    seen = [m.config.to_dict() for m in methods[1:]]
    for ratio in args.compression_ratio:
        overrides = {"chunk_size": args.chunk_size} if args.chunk_size else {}
        if args.head_weights is not None:
            overrides["head_weights"] = args.head_weights
        method = chunked_method(args.preset, ratio, **overrides)
        if method.config.to_dict() not in seen:  # a ratio that is exactly a preset runs once, under its name
            methods.append(method)
    if (
        importlib.util.find_spec("optimum") is not None
        and importlib.util.find_spec("optimum.quanto") is not None
    ):
        from chunked_decomp.evaluation.peers import QuantizedCacheMethod

        methods += [QuantizedCacheMethod(nbits=4), QuantizedCacheMethod(nbits=2)]
    from chunked_decomp.evaluation.peers import KVPressMethod, kvpress_available

    if kvpress_available():
        for ratio in args.compression_ratio:
            methods += [KVPressMethod("snapkv", ratio), KVPressMethod("knorm", ratio)]
    return methods


def _comparison_study(args, model, ids, out: Path, fingerprint: str, tracker) -> Any:
    import pandas as pd

    from chunked_decomp.evaluation.perplexity import continuation_perplexity
    from chunked_decomp.io import ResultStore, write_table

    store = ResultStore(out / "cells" / "comparison")
    methods = _comparison_methods(args)
    rows = []
    for method in _progress(args, methods, "comparison methods"):
        config = getattr(method, "config", None)
        params = {
            "command": "comparison",
            "model": args.model_name,
            "dtype": args.dtype,
            "text": fingerprint,
            "context_length": args.context_length,
            "continuation_length": args.continuation_length,
            "start": args.start,
            "method": method.name,
            "config": config.to_dict() if config is not None else None,
        }

        def compute(method=method) -> dict[str, Any]:
            return continuation_perplexity(
                model,
                method,
                ids,
                context_len=args.context_length,
                continuation_len=args.continuation_length,
                start=args.start,
            ).to_dict()

        row, cached = store.get_or_compute(params, compute)
        rows.append({**row, "cached": cached})
    frame = pd.DataFrame(rows)
    base = frame.loc[frame["method"] == "full", "perplexity"].iloc[0]
    frame["increase_pct"] = 100.0 * (frame["perplexity"] / base - 1.0)
    frame = frame.drop(columns=["extra"], errors="ignore")
    write_table(frame, out / "comparison")
    tracker.log_table("comparison", frame)
    return frame


# ----------------------------------------------------------------------------------------------------------------
# benchmark


def run_benchmark(args: argparse.Namespace) -> int:
    """``benchmark``: scaling over sequence lengths and batch sizes, memory timelines, recommendation."""
    t0 = time.perf_counter()
    out, model, tokenizer, ids, tracker = _prepare(args)
    from chunked_decomp.benchmarking.benchmark import ComprehensiveBenchmark
    from chunked_decomp.io import atomic_write_json, atomic_write_text

    overrides = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    if args.head_weights is not None:
        overrides["head_weights"] = args.head_weights
    for ratio in args.compression_ratios:
        _base_config(args, compression_ratio=ratio, **overrides)
    bench = ComprehensiveBenchmark(
        out,
        model=model,
        tokenizer=tokenizer,
        token_ids=ids,
        preset=args.preset,
        config_overrides=overrides,
        continuation_length=args.continuation_length,
        decode_tokens=args.decode_tokens,
        start=args.start,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
    )
    frame = bench.run_scaling_analysis(
        args.model_name, args.compression_ratios, args.sequence_lengths, args.batch_sizes
    )
    plots = [bench.plot_scaling(out / "scaling_analysis.png")]
    for _, row in frame.iterrows():
        tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    recommendation = bench.recommend_optimal_settings(args.target_memory_reduction, args.max_quality_loss)
    atomic_write_json(out / "recommendation.json", recommendation)

    report = None
    if args.profile_compression or args.save_timeline:
        profiler = _profile_generation(args, model, ids, bench)
        report = profiler.generate_report()
        atomic_write_text(out / "memory_profile.txt", report + "\n")
        atomic_write_json(out / "memory_profile.json", profiler.generate_report(as_dict=True))
        if args.save_timeline:
            plots.append(
                profiler.plot_memory_timeline(
                    out / "memory_timeline.png",
                    title=(
                        f"Process memory while generating {args.timeline_tokens} tokens after a "
                        f"{args.timeline_context}-token prompt ({args.model_name})"
                    ),
                )
            )
    seconds = time.perf_counter() - t0
    atomic_write_json(
        out / "run_info.json",
        _run_info(
            args,
            model,
            seconds,
            files=[p.name for p in plots],
            cells_computed=bench.cells_computed,
            cells_reused=bench.cells_reused,
        ),
    )
    for p in plots:
        tracker.log_image(p.stem, p)
    tracker.log_table("scaling_results", frame)
    tracker.finish()

    print(f"\nScaling analysis on {args.model_name}{' (test mode)' if args.test_mode else ''}")
    print(_table(frame, _BENCHMARK_COLUMNS))
    if report is not None:
        print("\n" + report)
    print("\n" + recommendation["message"])
    print(
        f"\nwrote {out}/scaling_results.{{json,csv}}, {', '.join(p.name for p in plots)} in {seconds:.1f} s "
        f"({bench.cells_reused} of {bench.cells_reused + bench.cells_computed} cells reused from an earlier run)"
    )
    return 0


_BENCHMARK_COLUMNS = {
    "method": ("method", ""),
    "compression_ratio": ("target ρ", "g"),
    "seq_len": ("seq", "d"),
    "batch_size": ("batch", "d"),
    "achieved_ratio": ("ρ", ".3f"),
    "kv_mb": ("KV MB", ".2f"),
    "memory_reduction_pct": ("mem -%", ".1f"),
    "peak_memory_mb": ("peak MB", ".0f"),
    "perplexity": ("ppl", ".2f"),
    "perplexity_increase_pct": ("ppl +%", "+.2f"),
    "decode_tokens_per_s": ("tok/s", ".1f"),
    "speed_ratio": ("speed ×", ".2f"),
}


def _profile_generation(args: argparse.Namespace, model: Any, ids, bench: Any):
    """Generate ``timeline_tokens`` tokens after a ``timeline_context``-token prompt, uncompressed and at each
    ratio, recording process memory and the cache's bytes after every step."""
    import torch

    from chunked_decomp.evaluation.profiler import MemoryProfiler
    from chunked_decomp.hf.compressor import ChunkedDecomp

    profiler = MemoryProfiler(interval=0.005)
    device = next(model.parameters()).device
    prompt = ids[args.start : args.start + args.timeline_context].unsqueeze(0).to(device)
    pad = getattr(model.generation_config, "pad_token_id", None)
    kwargs = {"pad_token_id": pad if pad is not None else 0}
    runs = [None, *args.compression_ratios]
    for ratio in _progress(args, runs, "memory profile"):
        if ratio is None:
            profiler.profile_generate(model, prompt, args.timeline_tokens, "uncompressed", **kwargs)
            continue
        decomp = ChunkedDecomp(config=bench.method(ratio).config)
        with decomp.applied(model), torch.no_grad():
            profiler.profile_generate(
                model, prompt, args.timeline_tokens, f"ChunkedDecomp ρ={ratio:g}", **kwargs
            )
    return profiler


# ----------------------------------------------------------------------------------------------------------------
# calibrate


def run_calibrate(args: argparse.Namespace) -> int:
    """``calibrate``: :func:`chunked_decomp.evaluation.calibration.calibrate` on windows of the text, written atomically to
    ``--output`` (never over an existing file without ``--overwrite``)."""
    t0 = time.perf_counter()
    output = Path(args.output).expanduser()
    if output.is_dir():
        raise UsageError("--output", f"{str(output)!r} is a folder; give the path of a .json file")
    if output.exists() and not args.overwrite:
        raise UsageError("--output", f"{str(output)!r} exists; pass --overwrite to replace it")
    if not args.power > 0:
        raise UsageError("--power", f"must be > 0, got {args.power}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    texts = _load_texts(args) if args.text_file else None
    model, tokenizer = _load_model(args)
    if texts is None:
        _log(args, f"loading text {args.dataset_name!r} ...")
        texts = _load_texts(args)
    from chunked_decomp.evaluation.calibration import calibrate, default_starts
    from chunked_decomp.evaluation.data import load_token_ids
    from chunked_decomp.io import atomic_write_json

    ids = load_token_ids(tokenizer, texts)
    span = args.context_length + args.continuation_length
    if args.start is None:
        try:
            starts = default_starts(ids.numel(), args.num_windows, args.stride, span)
        except ValueError as err:
            raise UsageError("--num_windows", str(err)) from err
    else:
        starts = [args.start + args.stride * i for i in range(args.num_windows)]
        _token_ids(args, tokenizer, texts, starts[-1] + span)
    source = {
        "text_file" if args.text_file else "dataset_name": args.text_file or args.dataset_name,
        "num_samples": args.num_samples,
        "token_fingerprint": _fingerprint(ids),
        "tokenizer": type(tokenizer).__name__,
    }
    record = calibrate(
        model,
        ids,
        starts,
        context_len=args.context_length,
        continuation_len=args.continuation_length,
        num_sink_tokens=args.num_sink_tokens,
        power=args.power,
        names=args.names,
        source=source,
        progress=lambda items: _progress(args, items, "calibration windows"),
    )
    record["calibration"]["arguments"] = {
        k: v for k, v in vars(args).items() if k not in ("func", "device_map", "no_progress", "debug")
    }
    # Checked against --overwrite again: a file that appeared while calibrating is not replaced either.
    if output.exists() and not args.overwrite:
        raise UsageError(
            "--output", f"{str(output)!r} appeared while calibrating; pass --overwrite to replace it"
        )
    atomic_write_json(output, record)
    seconds = time.perf_counter() - t0
    weights = record["head_weights"]
    keys = [w for layer in weights for w in layer[0]]
    values = [w for layer in weights for w in layer[1]]
    print(
        f"head weights of {args.model_name} ({len(weights)} layers x {len(weights[0][0])} KV heads), windows from "
        f"tokens {starts[0]}..{starts[-1]} (+{span}), power {args.power:g}: keys {min(keys):.3f}-{max(keys):.3f}, "
        f"values {min(values):.3f}-{max(values):.3f}"
    )
    print(f"wrote {output} in {seconds:.1f} s; use it with --head_weights {output}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None, command: str | None = None, prog: str | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 1 unexpected failure, 130 interrupted).

    ``command`` builds a single command's parser (what the scripts in ``scripts/`` use).
    """
    parser = build_parser(command, prog)
    args = parser.parse_args(argv)
    if command is not None:
        args.command = command
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; finished cells are kept and a rerun resumes from them", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        usage = isinstance(err, (UsageError, ImportError)) or type(err) is ValueError
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if usage:
            print(f"error: {message}", file=sys.stderr)
            return 2
        print(
            f"error: {type(err).__name__}: {message} (rerun with --debug for the traceback)", file=sys.stderr
        )
        return 1
