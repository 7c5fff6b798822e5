"""The typed values the flags become, built once from the argparse namespace by :func:`from_namespace`.

Flags left unset get their ``--test_mode`` or full-run value here (``PROTOCOL_DEFAULTS``), so a command receives
complete options and never sees the namespace.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunked_decomp.cli.args import PROTOCOL_DEFAULTS, UsageError

if TYPE_CHECKING:
    from chunked_decomp.config import CompressionConfig

__all__ = [
    "BenchmarkOptions",
    "CalibrateOptions",
    "CommandOptions",
    "CompressOptions",
    "CompressionChoice",
    "EvaluateOptions",
    "LongctxOptions",
    "ModelOptions",
    "Protocol",
    "RunOptions",
    "Targets",
    "TextOptions",
    "from_namespace",
]


@dataclass(frozen=True)
class ModelOptions:
    """The model to load and where: ``--model_name``, ``--dtype``, ``--device``, ``--device_map``, ``--cache_dir``."""

    name: str
    dtype: str
    device: str
    device_map: str | None
    cache_dir: str | None


@dataclass(frozen=True)
class TextOptions:
    """The text to measure on: ``--dataset_name``, or ``--text_file`` instead, and ``--num_samples``."""

    dataset_name: str
    text_file: str | None
    num_samples: int | None

    @property
    def flag(self) -> str:
        """The flag that chose the text."""
        return "--text_file" if self.text_file else "--dataset_name"

    @property
    def source(self) -> str:
        """The text's flag and value, e.g. ``--text_file notes.txt``."""
        return f"--text_file {self.text_file}" if self.text_file else f"--dataset_name {self.dataset_name}"


@dataclass(frozen=True)
class RunOptions:
    """How a measuring command runs: its results folder, threads, progress output and tracking.

    ``arguments`` is every flag's value after defaults, as recorded in ``run_info.json`` and sent to wandb.
    """

    command: str
    output_dir: str
    test_mode: bool
    threads: int | None
    progress: bool
    wandb: bool
    wandb_project: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class CompressionChoice:
    """The setting the other flags modify: ``--preset`` (else the defaults) and ``--head_weights``."""

    preset: str | None
    head_weights: str | None

    @property
    def label(self) -> str:
        """The preset's name in the result tables."""
        return self.preset or "default"

    def config(self, **overrides: Any) -> CompressionConfig:
        """The preset (or defaults) with ``overrides`` (``None`` values ignored) and a 16-bit reference."""
        from chunked_decomp.config import CompressionConfig

        base = CompressionConfig.from_preset(self.preset) if self.preset else CompressionConfig()
        data = base.to_dict()
        data["reference_dtype"] = "float16"
        if self.head_weights is not None:
            data["head_weights"] = self.head_weights
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return CompressionConfig.from_dict(data)
        except ValueError as err:
            flags = "--preset/--compression_ratio/--chunk_size"
            raise UsageError(
                "--head_weights" if str(err).startswith("head_weights") else flags, str(err)
            ) from err


@dataclass(frozen=True)
class Protocol:
    """The continuation protocol of ``compress`` and ``evaluate``, in tokens.

    ``num_windows`` windows of ``context_length`` prefilled (and compressed) tokens then ``continuation_length``
    scored ones, from token ``start``; ``decode_tokens`` greedy steps timed; ``num_prompts`` prompts of
    ``prompt_length`` tokens from ``start``, each continued by ``generation_tokens`` greedy tokens (0: none).
    """

    context_length: int
    continuation_length: int
    start: int
    num_windows: int
    decode_tokens: int
    generation_tokens: int
    num_prompts: int
    prompt_length: int

    def tokens_needed(self) -> int:
        """Tokens of text the windows and prompts read."""
        need = self.start + (self.context_length + self.continuation_length) * self.num_windows
        if self.generation_tokens:
            need = max(need, self.start + self.prompt_length * self.num_prompts)
        return need

    def prompts(self, ids: Any) -> list:
        """``num_prompts`` consecutive spans of ``prompt_length`` tokens from ``start``; ``ids``: (num_tokens,)."""
        s, n = self.start, self.prompt_length
        return [ids[s + i * n : s + (i + 1) * n] for i in range(self.num_prompts)]


@dataclass(frozen=True)
class Targets:
    """What the recommended setting must reach: memory reduction and perplexity increase, in percent."""

    memory_reduction: float
    max_quality_loss: float


@dataclass(frozen=True)
class CompressOptions:
    """``compress``: every (ratio × chunk size) setting; ``None`` takes the preset's value."""

    run: RunOptions
    model: ModelOptions
    text: TextOptions
    compression: CompressionChoice
    ratios: list[float] | None
    chunk_sizes: list[int] | None
    protocol: Protocol


@dataclass(frozen=True)
class EvaluateOptions:
    """``evaluate``: quality per ratio, the optional comparison study, plots and recommendation."""

    run: RunOptions
    model: ModelOptions
    text: TextOptions
    compression: CompressionChoice
    ratios: list[float]
    chunk_size: int | None
    metrics: list[str]
    comparison_study: bool
    save_plots: bool
    targets: Targets
    protocol: Protocol


@dataclass(frozen=True)
class BenchmarkOptions:
    """``benchmark``: the scaling grid (ratios × sequence lengths × batch sizes) and the memory profile."""

    run: RunOptions
    model: ModelOptions
    text: TextOptions
    compression: CompressionChoice
    ratios: list[float]
    sequence_lengths: list[int]
    batch_sizes: list[int]
    chunk_size: int | None
    continuation_length: int
    start: int
    decode_tokens: int
    profile: bool  # --profile_compression, or implied by --save_timeline
    save_timeline: bool
    timeline_context: int
    timeline_tokens: int
    targets: Targets

    def tokens_needed(self) -> int:
        """Tokens of text the largest cell (its whole batch) and the profiled prompt read."""
        span = max(self.sequence_lengths) + self.continuation_length
        return max(self.start + span * max(self.batch_sizes), self.start + self.timeline_context)


@dataclass(frozen=True)
class CalibrateOptions:
    """``calibrate``: the windows of text, the file to write, and the flags recorded in it (``arguments``)."""

    output: Path
    overwrite: bool
    model: ModelOptions
    text: TextOptions
    start: int | None
    num_windows: int
    stride: int
    context_length: int
    continuation_length: int
    num_sink_tokens: int
    power: float
    names: list[str]
    threads: int | None
    progress: bool
    arguments: dict[str, Any]


@dataclass(frozen=True)
class LongctxOptions:
    """``longctx``: RULER-style tasks per (context length, task, sample, method); ``max_new_tokens`` ``None`` takes
    each task's RULER budget."""

    model: ModelOptions
    output_dir: str
    context_lengths: list[int]
    tasks: list[str]
    methods: list[str]
    num_samples: int
    seed: int
    max_new_tokens: int | None
    skip_unsolved: bool
    save_plots: bool
    threads: int | None
    progress: bool
    arguments: dict[str, Any]


CommandOptions = CompressOptions | EvaluateOptions | BenchmarkOptions | CalibrateOptions | LongctxOptions


def from_namespace(namespace: argparse.Namespace) -> CommandOptions:
    """The options of ``namespace.command``, with unset flags filled in for ``--test_mode`` or a full run."""
    values = dict(vars(namespace))
    command = values["command"]
    quick_run = values.get("test_mode", values.get("quick", False))
    for name, (quick, full) in PROTOCOL_DEFAULTS.get(command, {}).items():
        if name == "num_samples" and values.get("text_file"):
            continue  # a user's file is used whole unless --num_samples says otherwise
        if values.get(name) is None:
            values[name] = quick if quick_run else full
    return _BUILDERS[command](values)


def _model(v: dict[str, Any]) -> ModelOptions:
    return ModelOptions(v["model_name"], v["dtype"], v["device"], v["device_map"], v["cache_dir"])


def _text(v: dict[str, Any]) -> TextOptions:
    return TextOptions(v["dataset_name"], v["text_file"], v["num_samples"])


def _run(v: dict[str, Any]) -> RunOptions:
    return RunOptions(
        command=v["command"],
        output_dir=v["output_dir"],
        test_mode=v["test_mode"],
        threads=v["threads"],
        progress=not v["no_progress"],
        wandb=v["wandb"],
        wandb_project=v["wandb_project"],
        arguments=dict(v),
    )


def _protocol(v: dict[str, Any]) -> Protocol:
    return Protocol(
        context_length=v["context_length"],
        continuation_length=v["continuation_length"],
        start=v["start"],
        num_windows=v["num_windows"],
        decode_tokens=v["decode_tokens"],
        generation_tokens=v["generation_tokens"],
        num_prompts=v["num_prompts"],
        prompt_length=v["prompt_length"],
    )


def _shared(v: dict[str, Any]) -> dict[str, Any]:
    """The fields every measuring command has."""
    return {
        "run": _run(v),
        "model": _model(v),
        "text": _text(v),
        "compression": CompressionChoice(v["preset"], v["head_weights"]),
    }


def _compress(v: dict[str, Any]) -> CompressOptions:
    return CompressOptions(
        **_shared(v), ratios=v["compression_ratio"], chunk_sizes=v["chunk_size"], protocol=_protocol(v)
    )


def _evaluate(v: dict[str, Any]) -> EvaluateOptions:
    return EvaluateOptions(
        **_shared(v),
        ratios=v["compression_ratio"],
        chunk_size=v["chunk_size"],
        metrics=v["metrics"],
        comparison_study=v["comparison_study"],
        save_plots=v["save_plots"],
        targets=Targets(v["target_memory_reduction"], v["max_quality_loss"]),
        protocol=_protocol(v),
    )


def _benchmark(v: dict[str, Any]) -> BenchmarkOptions:
    return BenchmarkOptions(
        **_shared(v),
        ratios=v["compression_ratios"],
        sequence_lengths=v["sequence_lengths"],
        batch_sizes=v["batch_sizes"],
        chunk_size=v["chunk_size"],
        continuation_length=v["continuation_length"],
        start=v["start"],
        decode_tokens=v["decode_tokens"],
        profile=v["profile_compression"] or v["save_timeline"],
        save_timeline=v["save_timeline"],
        timeline_context=v["timeline_context"],
        timeline_tokens=v["timeline_tokens"],
        targets=Targets(v["target_memory_reduction"], v["max_quality_loss"]),
    )


def _calibrate(v: dict[str, Any]) -> CalibrateOptions:
    return CalibrateOptions(
        output=Path(v["output"]).expanduser(),
        overwrite=v["overwrite"],
        model=_model(v),
        text=_text(v),
        start=v["start"],
        num_windows=v["num_windows"],
        stride=v["stride"],
        context_length=v["context_length"],
        continuation_length=v["continuation_length"],
        num_sink_tokens=v["num_sink_tokens"],
        power=v["power"],
        names=v["names"],
        threads=v["threads"],
        progress=not v["no_progress"],
        arguments={k: x for k, x in v.items() if k not in ("device_map", "no_progress", "debug")},
    )


def _longctx(v: dict[str, Any]) -> LongctxOptions:
    return LongctxOptions(
        model=_model({**v, "device_map": None}),
        output_dir=v["output_dir"],
        context_lengths=v["context_lengths"],
        tasks=list(dict.fromkeys(v["tasks"])),
        methods=list(dict.fromkeys(v["methods"])),
        num_samples=v["num_samples"],
        seed=v["seed"],
        max_new_tokens=v["max_new_tokens"],
        skip_unsolved=v["skip_unsolved"],
        save_plots=v["save_plots"],
        threads=v["threads"],
        progress=not v["no_progress"],
        arguments={k: x for k, x in v.items() if k not in ("no_progress", "debug")},
    )


_BUILDERS = {
    "compress": _compress,
    "evaluate": _evaluate,
    "benchmark": _benchmark,
    "calibrate": _calibrate,
    "longctx": _longctx,
}
