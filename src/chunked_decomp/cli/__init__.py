"""The ``chunked-decomp`` command line: ``compress``, ``evaluate``, ``benchmark``, ``calibrate`` and ``longctx``.

Each command checks its input before any work (a bad flag gets one ``error: ...`` line naming it and exit code 2;
``--debug`` shows the traceback instead), writes JSON, CSV and PNG files into ``--output_dir`` atomically, keeps
every finished cell under ``--output_dir/cells`` so that a rerun skips it, shows progress bars and ends with a
summary table. ``scripts/run_compression.py``, ``scripts/evaluate_model.py``, ``scripts/benchmark_memory.py`` and
``scripts/calibrate_head_weights.py`` run the same commands; ``python -m chunked_decomp.cli`` works too.

Examples::

    chunked-decomp compress --test_mode
    chunked-decomp compress --compression_ratio 0.5 0.25 --chunk_size 32 64 --output_dir results/compress
    chunked-decomp evaluate --compression_ratio 0.5 0.25 0.125 --metrics perplexity bleu rouge --comparison_study
    chunked-decomp benchmark --sequence_lengths 512 1024 --batch_sizes 1 4 --profile_compression --save_timeline
    chunked-decomp calibrate --output head_weights.json            # then: --head_weights head_weights.json
    chunked-decomp longctx --context_lengths 4096 8192 --num_samples 5    # RULER-style tasks per method

``calibrate`` writes one JSON file (refusing to replace one without ``--overwrite``) instead of a results folder.

The modules, from the edge inward: ``parser`` builds the parsers from ``args`` (argument types and shared flags);
``options`` turns the parsed flags into typed dataclasses, the only values the commands receive; ``context`` sets
up a measuring run (output folder, model and text through ``loading``, tracker, result store); one module per
command (``compress``, ``evaluate``, ``benchmark``, ``calibrate``, ``longctx``, with ``sweep`` shared by the first two);
``tables`` formats what they print. Heavy libraries (torch, transformers, pandas, matplotlib) are imported only
when a command runs; wandb only with ``--wandb``.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

from chunked_decomp.cli import benchmark, calibrate, compress, evaluate, longctx
from chunked_decomp.cli.args import UsageError
from chunked_decomp.cli.options import from_namespace
from chunked_decomp.cli.parser import build_parser

__all__ = ["main"]

_RUNNERS = {
    "compress": compress.run,
    "evaluate": evaluate.run,
    "benchmark": benchmark.run,
    "calibrate": calibrate.run,
    "longctx": longctx.run,
}


def main(argv: Sequence[str] | None = None, command: str | None = None, prog: str | None = None) -> int:
    """Run ``chunked-decomp``; returns the exit code (0 ok, 2 bad input, 1 unexpected failure, 130 interrupted).

    ``command`` builds a single command's parser (what the scripts in ``scripts/`` use); ``prog`` names it in
    messages.
    """
    namespace = build_parser(command, prog).parse_args(argv)
    if command is not None:
        namespace.command = command
    try:
        return _RUNNERS[namespace.command](from_namespace(namespace))
    except KeyboardInterrupt:
        print("interrupted; finished cells are kept and a rerun resumes from them", file=sys.stderr)
        return 130
    except Exception as err:
        if namespace.debug:
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
