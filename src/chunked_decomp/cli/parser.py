"""The parsers: the whole ``chunked-decomp`` command line, or one command alone (what ``scripts/`` run)."""

from __future__ import annotations

import argparse

from chunked_decomp.cli.args import (
    CALIBRATION_STRIDE,
    CALIBRATION_WINDOWS,
    DEFAULT_MODEL,
    DTYPES,
    LONGCTX_DEFAULT_TASKS,
    LONGCTX_TASKS,
    METRICS,
    PROTOCOL_DEFAULTS,
    add_common,
    add_model_and_text,
    add_protocol,
    add_ratios,
    add_recommendation_targets,
    finite_type,
    int_at_least,
)

__all__ = ["COMMANDS", "build_parser"]


def _configure_compress(p: argparse.ArgumentParser) -> None:
    add_ratios(
        p,
        "--compression_ratio",
        "--compression_ratios",
        help="target ratio(s) ρ in (0, 1] (default: the preset's, else 0.25)",
    )
    p.add_argument(
        "--chunk_size",
        type=int_at_least(4),
        nargs="+",
        default=None,
        metavar="C",
        help="tokens per compressed chunk, >= 4 (default: the preset's, else 256)",
    )
    add_common(p, "compress")
    add_protocol(p)
    p.set_defaults(command="compress")


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    add_ratios(
        p,
        "--compression_ratio",
        "--compression_ratios",
        help="target ratio(s) ρ in (0, 1] (default: 0.5 0.25 0.125; 0.5 0.25 with --test_mode)",
    )
    p.add_argument(
        "--chunk_size", type=int_at_least(4), default=None, help="tokens per chunk (default: the preset's)"
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
    add_recommendation_targets(p)
    add_common(p, "evaluate")
    add_protocol(p)
    p.set_defaults(command="evaluate")


def _configure_benchmark(p: argparse.ArgumentParser) -> None:
    add_ratios(
        p,
        "--compression_ratios",
        "--compression_ratio",
        help="target ratio(s) ρ in (0, 1] (default: 0.5 0.25 0.125)",
    )
    p.add_argument(
        "--sequence_lengths",
        type=int_at_least(8),
        nargs="+",
        default=None,
        metavar="N",
        help="context lengths",
    )
    p.add_argument(
        "--batch_sizes", type=int_at_least(1), nargs="+", default=None, metavar="B", help="batch sizes"
    )
    p.add_argument(
        "--chunk_size", type=int_at_least(4), default=None, help="tokens per chunk (default: the preset's)"
    )
    p.add_argument(
        "--continuation_length", type=int_at_least(1), default=None, help="tokens scored after each context"
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
        type=int_at_least(1),
        default=None,
        help="prompt tokens of the profiled generation",
    )
    p.add_argument(
        "--timeline_tokens", type=int_at_least(1), default=None, help="tokens generated while profiling"
    )
    add_recommendation_targets(p)
    add_common(p, "benchmark")
    p.set_defaults(command="benchmark")


def _configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="head-weight JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_model_and_text(p, "calibrate", "texts (articles) to load (default: all)")
    _add_calibration_windows(p)
    p.add_argument(
        "--names",
        nargs="+",
        default=[],
        metavar="NAME",
        help="other names of the model for head_weights='auto' (the model's own name is always recorded)",
    )
    _add_device_and_output_flags(p)
    p.set_defaults(command="calibrate", device_map=None)


def _add_device_and_output_flags(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --cache_dir, --threads, --no_progress and --debug of the commands without
    :func:`add_common` (``calibrate``, ``longctx``)."""
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype")
    p.add_argument(
        "--cache_dir",
        default=None,
        help="where the embedded model is converted once (default: ~/.cache/chunked_decomp)",
    )
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads for torch")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _add_calibration_windows(p: argparse.ArgumentParser) -> None:
    """Where the calibration windows sit and what is differentiated in them."""
    p.add_argument(
        "--start",
        type=int_at_least(0),
        default=None,
        help="first token of the first calibration window (default: windows at the end of the text, away from "
        "the evaluation windows, which read its beginning)",
    )
    p.add_argument(
        "--num_windows",
        type=int_at_least(1),
        default=CALIBRATION_WINDOWS,
        help="calibration windows (default: %(default)s)",
    )
    p.add_argument(
        "--stride",
        type=int_at_least(1),
        default=CALIBRATION_STRIDE,
        help="tokens from one window's start to the next (default: %(default)s)",
    )
    p.add_argument(
        "--context_length",
        type=int_at_least(8),
        default=1024,
        help="context tokens per window (default: %(default)s)",
    )
    p.add_argument(
        "--continuation_length",
        type=int_at_least(2),
        default=512,
        help="tokens whose loss is differentiated (default: %(default)s)",
    )
    p.add_argument(
        "--num_sink_tokens",
        type=int_at_least(0),
        default=4,
        help="first tokens left out, as the cache keeps them exact (default: %(default)s)",
    )
    p.add_argument(
        "--power",
        type=finite_type,
        default=0.5,
        help="exponent of the normalised sensitivities, > 0 (default: %(default)s)",
    )


def _configure_longctx(p: argparse.ArgumentParser) -> None:
    quick, full = PROTOCOL_DEFAULTS["longctx"]["methods"]
    p.add_argument(
        "--model_name",
        default=DEFAULT_MODEL,
        help=f"model: {DEFAULT_MODEL!r} (embedded, offline), a save_pretrained folder, or a hub id (default: %(default)s)",
    )
    p.add_argument(
        "--context_lengths",
        type=int_at_least(256),
        nargs="+",
        default=None,
        metavar="N",
        help="prompt + answer tokens per sample, as RULER counts them (default: 4096 8192; 1024 with --quick)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=LONGCTX_TASKS,
        default=list(LONGCTX_DEFAULT_TASKS),
        metavar="TASK",
        help=f"RULER-style tasks, from {', '.join(LONGCTX_TASKS)} (default: %(default)s)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="'full', 'chunked[:PRESET][@RATIO][,KEY=VALUE...]' (config fields overridden, e.g. "
        "'chunked:aggressive@0.125,basis_sharing=keys'), 'quanto4', 'quanto2', 'hqq:BITS', 'kvpress:PRESS@RATIO' (kvpress "
        f"in the peers environment); the uncompressed cache always runs (default: {' '.join(full)}; "
        f"{' '.join(quick)} with --quick)",
    )
    p.add_argument(
        "--num_samples",
        type=int_at_least(1),
        default=None,
        help="samples per task and length (default: 10; 2 with --quick)",
    )
    p.add_argument("--seed", type=int_at_least(0), default=0, help="the samples' seed (default: %(default)s)")
    p.add_argument(
        "--max_new_tokens",
        type=int_at_least(1),
        default=None,
        help="greedy tokens per answer, also reserved in the context length (default: RULER's per task: "
        "128 for needles, 30 variable tracking, 120 common words; 16 passkey)",
    )
    p.add_argument(
        "--skip_unsolved",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip the other methods where the uncompressed score is < 0.5 (default: on; off, every method "
        "of a sample shares one prefill, which is faster when the tasks are known to be solved)",
    )
    p.add_argument(
        "--save_plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write PNG plots (default: on)",
    )
    p.add_argument("--quick", action="store_true", help="one short context and two samples (a smoke run)")
    p.add_argument("--output_dir", default="results/longctx", help="where results go (default: %(default)s)")
    _add_device_and_output_flags(p)
    p.set_defaults(command="longctx")


COMMANDS = {
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
    "longctx": (
        _configure_longctx,
        "RULER-style long-context tasks (needles, variable tracking, common words, passkey) per method",
    ),
}


def build_parser(command: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The full ``chunked-decomp`` parser, or one command's parser alone (for the scripts)."""
    formatter = argparse.HelpFormatter
    if command is not None:
        configure, description = COMMANDS[command]
        parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter)
        configure(parser)
        return parser
    parser = argparse.ArgumentParser(
        prog=prog or "chunked-decomp",
        description="Chunked low-rank (SVD) compression of transformers KV caches.",
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", required=True)
    for name, (configure, description) in COMMANDS.items():
        configure(sub.add_parser(name, help=description, description=description, formatter_class=formatter))
    return parser
