"""What ``compress`` and ``evaluate`` share: settings checked against the model, the evaluator of the continuation
protocol, the parameters that key a finished cell, and the flattening of an evaluation into table columns."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from chunked_decomp.cli.args import UsageError

if TYPE_CHECKING:
    from chunked_decomp.cli.context import RunContext
    from chunked_decomp.cli.options import ModelOptions, Protocol
    from chunked_decomp.config import CompressionConfig
    from chunked_decomp.evaluation.quality import PerformanceEvaluator

__all__ = ["cell_params", "check_settings", "evaluation_row", "make_evaluator"]


def check_settings(configs: list[CompressionConfig], model: Any) -> None:
    """Refuse, naming ``--chunk_size``, a setting the model cannot take (before any cell runs)."""
    from chunked_decomp.hf.compressor import ChunkedDecomp

    for cfg in configs:
        try:
            ChunkedDecomp(config=cfg).validate_for(model)
        except ValueError as err:
            raise UsageError("--chunk_size", str(err)) from err


def make_evaluator(tokenizer: Any, protocol: Protocol) -> PerformanceEvaluator:
    """The evaluator of ``protocol``'s windows and decoding steps."""
    from chunked_decomp.evaluation.quality import PerformanceEvaluator

    return PerformanceEvaluator(
        tokenizer,
        context_length=protocol.context_length,
        continuation_length=protocol.continuation_length,
        start=protocol.start,
        num_windows=protocol.num_windows,
        decode_tokens=protocol.decode_tokens,
    )


def cell_params(ctx: RunContext, model: ModelOptions, protocol: Protocol) -> dict[str, Any]:
    """What a cell's result depends on besides its setting: command, model, dtype, device, text and protocol."""
    return {
        "command": ctx.command,
        "model": model.name,
        "dtype": model.dtype,
        "device": ctx.device,
        "text": ctx.fingerprint,
        "protocol": asdict(protocol),
    }


def evaluation_row(result: dict[str, Any]) -> dict[str, Any]:
    """Flatten `PerformanceEvaluator.evaluate_compression` output into table columns."""
    row = {k: v for k, v in result.items() if k != "config"}
    row["compression_ratio_achieved"] = row.pop("compression_ratio")
    return row
