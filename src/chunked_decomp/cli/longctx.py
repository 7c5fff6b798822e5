"""``chunked-decomp longctx``: RULER-style long-context tasks per method, context length and task.

Every (sample, method) is one cell under ``--output_dir/cells/longctx`` (a rerun skips finished ones); the
methods of a sample not yet stored share one prefill forward. Unless ``--no-skip_unsolved``, the uncompressed
cache runs first on a task's samples and the other methods skip a (task, length) the uncompressed model scores
below 0.5 on, since it tells nothing about compression there. Writes
``samples.json/.csv`` (one row per sample and method), ``summary.json/.csv`` (per task, length and method), a
score-vs-bytes plot per task, ``run_info.json``, and prints the summary table.
"""

from __future__ import annotations

import time
from typing import Any

from chunked_decomp.cli.args import UsageError
from chunked_decomp.cli.console import log
from chunked_decomp.cli.context import calibrate_heads, versions
from chunked_decomp.cli.loading import load_model
from chunked_decomp.cli.options import LongctxOptions
from chunked_decomp.cli.tables import table

__all__ = ["run"]

_COLUMNS = {
    "task": ("task", ""),
    "context_length": ("tokens", "d"),
    "method": ("method", ""),
    "num_samples": ("n", "d"),
    "score": ("score", ".2f"),
    "score_delta": ("Δ vs full", "+.2f"),
    "ratio": ("ρ held", ".3f"),
    "stored_bytes_mb": ("MB held", ".2f"),
    "note": ("", ""),
}


def run(options: LongctxOptions) -> int:
    """Run every (length, task, sample, method) cell not yet stored, then write the tables and plots."""
    t0 = time.perf_counter()
    methods = _methods(options)  # bad specs are refused before the model loads
    from chunked_decomp.io import ResultStore, check_output_dir

    try:
        out = check_output_dir(options.output_dir)
    except ValueError as err:
        raise UsageError("--output_dir", str(err)) from err
    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    model, tokenizer, _ = load_model(options.model, options.progress)
    calibrate_heads(model, tokenizer, options.progress)
    store = ResultStore(out / "cells" / "longctx")
    records = _run_cells(options, model, tokenizer, methods, store)
    rows = _write(options, out, records)
    _finish(options, out, model, time.perf_counter() - t0)
    print(_table(rows))
    return 0


def _methods(options: LongctxOptions) -> list[Any]:
    from chunked_decomp.evaluation.longctx import as_deployed
    from chunked_decomp.evaluation.methods import FullCache, method_from_spec

    methods = []
    for spec in options.methods:
        try:
            method = method_from_spec(spec)
        except (ValueError, ImportError) as err:  # kvpress outside the peers environment: ImportError
            raise UsageError("--methods", str(err)) from err
        methods.append(as_deployed(method))
    # Every score is read against the uncompressed one, so it runs first, given or not.
    return [FullCache()] + [m for m in methods if not isinstance(m, FullCache)]


def _run_cells(
    options: LongctxOptions, model: Any, tokenizer: Any, methods: list[Any], store: Any
) -> list[dict]:
    from tqdm.auto import tqdm

    from chunked_decomp.evaluation.longctx import SOLVED, run_sample
    from chunked_decomp.evaluation.ruler import make_sample

    records: list[dict] = []
    total = len(options.context_lengths) * len(options.tasks) * options.num_samples * len(methods)
    bar = tqdm(total=total, desc="longctx cells", unit="cell", disable=not options.progress)

    def cells(group: list[Any], sample: Any) -> list[dict]:
        """The records of ``group`` on ``sample``: stored ones read, the missing ones run together."""
        params = {
            m.name: {
                "model": options.model.name,
                "dtype": options.model.dtype,
                "task": sample.task,
                "context_length": sample.context_length,
                "index": sample.index,
                "seed": options.seed,
                "max_new_tokens": sample.max_new_tokens,
                "method": m.name,
            }
            for m in group
        }
        found = {name: store.get(p) for name, p in params.items()}
        missing = [m for m in group if found[m.name] is None]
        if missing:
            names = ", ".join(m.name for m in missing)
            bar.set_postfix_str(f"{sample.task}@{sample.context_length} #{sample.index}: {names}")
            for record in run_sample(model, tokenizer, missing, sample):
                store.put(params[record["method"]], record)
                found[record["method"]] = record
        bar.update(len(group))
        return [found[m.name] for m in group]

    for length in options.context_lengths:
        for task in options.tasks:
            try:
                samples = [
                    make_sample(
                        task, tokenizer, length, i, options.seed, max_new_tokens=options.max_new_tokens
                    )
                    for i in range(options.num_samples)
                ]
            except ValueError as err:
                raise UsageError("--context_lengths", str(err)) from err

            if not options.skip_unsolved:
                records += [r for sample in samples for r in cells(methods, sample)]
                continue
            reference = [cells(methods[:1], sample)[0] for sample in samples]
            records += reference
            if sum(r["score"] for r in reference) < SOLVED * len(reference):
                bar.update(len(samples) * (len(methods) - 1))
                log(f"{task} at {length} tokens: uncompressed score < {SOLVED}, other methods skipped", True)
                continue
            records += [r for sample in samples for r in cells(methods[1:], sample)]
    bar.close()
    return records


def _write(options: LongctxOptions, out: Any, records: list[dict]) -> list[dict]:
    import pandas as pd

    from chunked_decomp.benchmarking.plots import plot_long_context
    from chunked_decomp.evaluation.longctx import summarize
    from chunked_decomp.io import atomic_write_json, write_table

    rows = summarize(records)
    atomic_write_json(out / "samples.json", records)
    write_table(pd.DataFrame(records), out / "samples")
    write_table(pd.DataFrame(rows), out / "summary")
    atomic_write_json(out / "summary.json", rows)
    if options.save_plots:
        for task in dict.fromkeys(r["task"] for r in rows):
            plot_long_context(rows, task, out / f"longctx_{task}.png")
    return rows


def _finish(options: LongctxOptions, out: Any, model: Any, seconds: float) -> None:
    import torch

    from chunked_decomp.hf.loading import model_info
    from chunked_decomp.io import atomic_write_json

    info = {"command": "longctx", "arguments": dict(options.arguments), "model": model_info(model)}
    info.update(seconds=seconds, versions=versions(), torch_threads=torch.get_num_threads())
    atomic_write_json(out / "run_info.json", info)


def _table(rows: list[dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(rows)
    if frame.empty:
        return "no cells"
    frame["stored_bytes_mb"] = frame["stored_bytes"] / 2**20
    frame["note"] = ["" if r["solved_by_reference"] else "full < 0.5: not informative" for r in rows]
    return table(frame, _COLUMNS)
