"""The run context of a measuring command: what ``compress``, ``evaluate`` and ``benchmark`` work on, set up once.

:func:`open_run` checks the output folder and the tracker, then loads the model and the text, in that order, so that
bad input is refused before any slow step and nothing is written for a run that cannot start.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunked_decomp.cli.args import UsageError
from chunked_decomp.cli.console import log, progress
from chunked_decomp.cli.loading import load_model, load_texts, token_ids
from chunked_decomp.cli.options import ModelOptions, RunOptions, TextOptions
from chunked_decomp.cli.tracking import INSTALL_HINT, NullTracker, start_tracker

if TYPE_CHECKING:
    from chunked_decomp.io import ResultStore

__all__ = ["RunContext", "open_run"]


@dataclass
class RunContext:
    """A measuring command's output folder, model, text and tracker.

    Attributes:
        command: the command's name.
        out: the checked output folder.
        model, tokenizer: the loaded model (checked to keep a decoder KV cache) and its tokenizer.
        ids: the text as a ``(num_tokens,)`` int64 tensor of token ids.
        device: where inputs go (``--device``, or under ``--device_map`` the embeddings' device).
        tracker: the wandb run, or a :class:`NullTracker` without ``--wandb``.
        arguments: every flag's value after defaults, ``device`` resolved as above.
        show_progress: whether status lines and progress bars are shown.
    """

    command: str
    out: Path
    model: Any
    tokenizer: Any
    ids: Any
    device: str
    tracker: NullTracker
    arguments: dict[str, Any]
    show_progress: bool

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the token ids: cells computed on other text are not reused."""
        from chunked_decomp.benchmarking.benchmark import token_fingerprint

        return token_fingerprint(self.ids)

    def store(self, name: str) -> ResultStore:
        """The finished cells of one study, under ``out/cells/<name>``."""
        from chunked_decomp.io import ResultStore

        return ResultStore(self.out / "cells" / name)

    def progress(self, items: Sequence, desc: str) -> Iterable:
        """``items`` under a progress bar."""
        return progress(items, desc, self.show_progress)

    def log_numbers(self, values: Mapping[str, Any]) -> None:
        """Send the numeric entries of ``values`` (a row) to the tracker."""
        self.tracker.log(
            {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )

    def finish(self, seconds: float, plots: list[Path], frame: Any, table: str, **extra: Any) -> None:
        """Write ``run_info.json`` (naming ``plots`` and holding ``extra``), send the plots and the result table
        ``frame`` (under the name ``table``) to the tracker, and close it."""
        from chunked_decomp.io import atomic_write_json

        info = self.run_info(seconds, files=[p.name for p in plots], **extra)
        atomic_write_json(self.out / "run_info.json", info)
        for p in plots:
            self.tracker.log_image(p.stem, p)
        self.tracker.log_table(table, frame)
        self.tracker.finish()

    def run_info(self, seconds: float, **extra: Any) -> dict[str, Any]:
        """What ran, on what, how long: the command, its arguments, the model, versions and machine."""
        import torch

        from chunked_decomp.hf.loading import model_info

        return {
            "command": self.command,
            "arguments": dict(self.arguments),
            "model": model_info(self.model),
            "seconds": seconds,
            "versions": versions(),
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
            },
            **extra,
        }


def versions() -> dict[str, str]:
    """The versions a result depends on: this package, torch, transformers and Python."""
    import torch
    import transformers

    import chunked_decomp

    return {
        "chunked_decomp": chunked_decomp.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def open_run(run: RunOptions, model: ModelOptions, text: TextOptions, tokens_needed: int) -> RunContext:
    """Check the output folder and ``--wandb``, set the threads, load the model and at least ``tokens_needed``
    tokens of text, and start the tracker."""
    from chunked_decomp.io import check_output_dir

    try:
        out = check_output_dir(run.output_dir)
    except ValueError as err:
        raise UsageError(None, str(err)) from err
    if run.threads is not None:
        import torch

        torch.set_num_threads(run.threads)
    if run.wandb and importlib.util.find_spec("wandb") is None:
        raise UsageError("--wandb", f"needs the wandb package, which is not installed: {INSTALL_HINT}")
    # A user's file is read first: a missing one is refused before the model loads.
    texts = load_texts(text) if text.text_file else None
    loaded, tokenizer, device = load_model(model, run.progress)
    calibrate_heads(loaded, tokenizer, run.progress)
    if texts is None:
        log(f"loading text {text.dataset_name!r} ...", run.progress)
        texts = load_texts(text)
    ids = token_ids(tokenizer, texts, tokens_needed, text)
    arguments = {**run.arguments, "device": device}
    tracker = start_tracker(
        run.wandb, run.wandb_project, arguments, out, name=f"{run.command}-{Path(out).name}"
    )
    return RunContext(
        command=run.command,
        out=out,
        model=loaded,
        tokenizer=tokenizer,
        ids=ids,
        device=device,
        tracker=tracker,
        arguments=arguments,
        show_progress=run.progress,
    )


def calibrate_heads(model: Any, tokenizer: Any, show: bool) -> None:
    """Measure the head weights ``head_weights="auto"`` uses for a model no shipped file covers (seconds)."""
    import time

    from chunked_decomp.config.head_weights import shipped_weights_for
    from chunked_decomp.hf.calibration import ensure_head_weights

    if shipped_weights_for(model.config) is not None:
        return
    log("calibrating head weights on the Python language reference ...", show)
    started = time.perf_counter()
    ensure_head_weights(model, tokenizer)
    log(f"head weights calibrated in {time.perf_counter() - started:.1f} s", show)
