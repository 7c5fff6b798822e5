"""``chunked-decomp calibrate``: per-head weights of the rank allocation, measured on windows of the text.

Runs :func:`chunked_decomp.evaluation.calibration.calibrate` and writes one JSON file, atomically, to
``--output`` (never over an existing file without ``--overwrite``); use it with ``--head_weights <file>``.
"""

from __future__ import annotations

import time
from typing import Any

from chunked_decomp.cli.args import UsageError
from chunked_decomp.cli.console import log, progress
from chunked_decomp.cli.loading import load_model, load_texts, token_ids
from chunked_decomp.cli.options import CalibrateOptions

__all__ = ["run"]


def run(options: CalibrateOptions) -> int:
    """Calibrate, write the file and print the range of the weights; returns the exit code."""
    t0 = time.perf_counter()
    _check(options)  # before torch is imported, so that bad input is refused at once
    from chunked_decomp.evaluation.calibration import calibrate
    from chunked_decomp.io import atomic_write_json

    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    model, tokenizer, ids, texts = _load(options)
    starts = _window_starts(options, tokenizer, texts, ids)
    record = calibrate(
        model,
        ids,
        starts,
        context_len=options.context_length,
        continuation_len=options.continuation_length,
        num_sink_tokens=options.num_sink_tokens,
        power=options.power,
        names=options.names,
        source=_source(options, tokenizer, ids),
        progress=lambda items: progress(items, "calibration windows", options.progress),
    )
    record["calibration"]["arguments"] = dict(options.arguments)
    output = options.output
    # Checked against --overwrite again: a file that appeared while calibrating is not replaced either.
    if output.exists() and not options.overwrite:
        raise UsageError(
            "--output", f"{str(output)!r} appeared while calibrating; pass --overwrite to replace it"
        )
    atomic_write_json(output, record)
    seconds = time.perf_counter() - t0
    _print_summary(options, record, starts)
    print(f"wrote {output} in {seconds:.1f} s; use it with --head_weights {output}")
    return 0


def _check(options: CalibrateOptions) -> None:
    """Refuse, before any work, an ``--output`` that is a folder or exists, and a ``--power`` that is not > 0."""
    output = options.output
    if output.is_dir():
        raise UsageError("--output", f"{str(output)!r} is a folder; give the path of a .json file")
    if output.exists() and not options.overwrite:
        raise UsageError("--output", f"{str(output)!r} exists; pass --overwrite to replace it")
    if not options.power > 0:
        raise UsageError("--power", f"must be > 0, got {options.power}")


def _load(options: CalibrateOptions) -> tuple[Any, Any, Any, list[str]]:
    """``(model, tokenizer, ids, texts)``: a user's file is read before the model, a dataset after it."""
    from chunked_decomp.evaluation.data import load_token_ids

    texts = load_texts(options.text) if options.text.text_file else None
    model, tokenizer, _ = load_model(options.model, options.progress)
    if texts is None:
        log(f"loading text {options.text.dataset_name!r} ...", options.progress)
        texts = load_texts(options.text)
    return model, tokenizer, load_token_ids(tokenizer, texts), texts


def _window_starts(options: CalibrateOptions, tokenizer: Any, texts: list[str], ids: Any) -> list[int]:
    """The first token of each window: ``--stride`` apart from ``--start``, else at the end of the text."""
    from chunked_decomp.evaluation.calibration import default_starts

    span = options.context_length + options.continuation_length
    if options.start is None:
        try:
            return default_starts(ids.numel(), options.num_windows, options.stride, span)
        except ValueError as err:
            raise UsageError("--num_windows", str(err)) from err
    starts = [options.start + options.stride * i for i in range(options.num_windows)]
    token_ids(
        tokenizer, texts, starts[-1] + span, options.text
    )  # refuses a text too short for the last window
    return starts


def _source(options: CalibrateOptions, tokenizer: Any, ids: Any) -> dict[str, Any]:
    """Where the calibration text came from, recorded in the file."""
    from chunked_decomp.benchmarking.benchmark import token_fingerprint

    text = options.text
    return {
        "text_file" if text.text_file else "dataset_name": text.text_file or text.dataset_name,
        "num_samples": text.num_samples,
        "token_fingerprint": token_fingerprint(ids),
        "tokenizer": type(tokenizer).__name__,
    }


def _print_summary(options: CalibrateOptions, record: dict[str, Any], starts: list[int]) -> None:
    weights = record["head_weights"]
    keys = [w for layer in weights for w in layer[0]]
    values = [w for layer in weights for w in layer[1]]
    span = options.context_length + options.continuation_length
    print(
        f"head weights of {options.model.name} ({len(weights)} layers x {len(weights[0][0])} KV heads), windows from "
        f"tokens {starts[0]}..{starts[-1]} (+{span}), power {options.power:g}: keys {min(keys):.3f}-{max(keys):.3f}, "
        f"values {min(values):.3f}-{max(values):.3f}"
    )
