"""ChunkedDecomp against its peers, every method through the same protocols at equal stored bytes.

Rows: the uncompressed cache, ChunkedDecomp (a preset at each budget), transformers' QuantizedCache (quanto 4
and 2 bits) and every kvpress press at each budget (only where kvpress imports: it needs transformers<5.3, see
``scripts/setup_peers_env.sh``). Columns: ρ (stored bytes ÷ an uncompressed 16-bit cache), the ratio against the
model's own dtype, stored bytes, continuation perplexity and its increase, recall perplexity and its increase,
passkey accuracy. Protocols: :mod:`chunked_decomp.evaluation.perplexity` and
:mod:`chunked_decomp.evaluation.passkey` (docs/results.md describes "continuation" and "recall").

Run from the repository root, in the main environment and in the peers environment::

    bash scripts/setup_peers_env.sh                            # once: .venv-peers with kvpress (about 5 min)
    python benchmarks/compare_peers.py --quick                 # 4 rows, about 5 min (no kvpress rows)
    .venv-peers/bin/python benchmarks/compare_peers.py --quick # + 3 kvpress rows, about 7 min
    python benchmarks/compare_peers.py                         # budgets 0.5/0.25/0.125, passkeys 1k and 2k
    .venv-peers/bin/python benchmarks/compare_peers.py         # + 15 kvpress rows, about an hour

(Times on this project's 2-core CPU machine, one torch thread, SmolLM2-135M in float32; ``--quick`` runs budget
0.25 only, three presses, passkeys of 1,024 tokens at three depths. A row costs about 1-1.5 min in quick mode.)

It prints a table, writes JSON and CSV (``--output-dir``, default ``benchmarks/results/peers``, one file per
transformers version) and ends with one JSON line summarising the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import add_model_options, add_overrides_option, load_model_and_text, run_metadata, timed

from chunked_decomp.config import CompressionConfig, parse_overrides
from chunked_decomp.evaluation.methods import (
    ChunkedDecompMethod,
    FullCache,
    KVMethod,
    chunked_method,
    method_from_spec,
)
from chunked_decomp.evaluation.passkey import passkey_accuracy
from chunked_decomp.evaluation.peers import (
    KVPRESS_PRESSES,
    KVPressMethod,
    QuantizedCacheMethod,
    kvpress_available,
)
from chunked_decomp.evaluation.perplexity import continuation_perplexity, recall_perplexity
from chunked_decomp.io import atomic_open, atomic_write_json

FULL_BUDGETS = (0.5, 0.25, 0.125)
QUICK_BUDGETS = (0.25,)
QUICK_PRESSES = ("knorm", "snapkv", "expectedattention")


def build_methods(args: argparse.Namespace) -> list[KVMethod]:
    """The rows, in table order."""
    if args.methods:
        methods = [method_from_spec(spec) for spec in args.methods]
        if not any(isinstance(m, FullCache) for m in methods):
            methods.insert(0, FullCache())
        return methods
    methods: list[KVMethod] = [FullCache()]
    methods += [chunked_method(args.preset, budget) for budget in args.budgets]
    methods += [QuantizedCacheMethod(nbits=4), QuantizedCacheMethod(nbits=2)]
    if kvpress_available():
        for press in args.presses:
            methods += [KVPressMethod(press, budget) for budget in args.budgets]
    return methods


def run_method(
    model: torch.nn.Module,
    tokenizer: Any,
    token_ids: torch.Tensor,
    method: KVMethod,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One row: the method through every protocol, and the seconds it took (the device synchronised)."""
    row: dict[str, Any] = {"method": method.name}
    with timed(next(model.parameters()).device) as elapsed:
        cont = continuation_perplexity(
            model,
            method,
            token_ids,
            context_len=args.context_len,
            continuation_len=args.continuation_len,
            start=args.start,
        )
        row.update(
            rho=cont.ratio,
            ratio_cache_dtype=cont.ratio_cache_dtype,
            stored_bytes=cont.stored_bytes,
            reference_bytes=cont.reference_bytes,
            continuation_ppl=cont.perplexity,
        )
        if not args.no_recall:
            recall = recall_perplexity(model, method, token_ids, start=args.start)
            row["recall_ppl"] = recall.perplexity
            row["recall_rho"] = recall.ratio
        if not args.no_passkey:
            row.update(passkey_fields(model, tokenizer, method, args))
    row["seconds"] = elapsed.seconds
    return row


def passkey_fields(
    model: torch.nn.Module, tokenizer: Any, method: KVMethod, args: argparse.Namespace
) -> dict:
    """The passkey protocol's accuracy, per length and per trial."""
    passkey = passkey_accuracy(
        model,
        tokenizer,
        method,
        lengths=args.passkey_lengths,
        depths=args.passkey_depths,
        trials_per_cell=args.passkey_trials,
        seed=args.seed,
    )
    return {
        "passkey_acc": passkey.accuracy,
        "passkey_by_length": {str(k): v for k, v in passkey.by_length.items()},
        "passkey_trials": [
            {k: t[k] for k in ("length", "depth", "correct", "output")} for t in passkey.trials
        ],
    }


def add_increases(rows: list[dict[str, Any]]) -> None:
    base = next(r for r in rows if r["method"] == "full")
    for row in rows:
        for key in ("continuation_ppl", "recall_ppl"):
            if key in row:
                row[key.replace("_ppl", "_increase_pct")] = 100.0 * (row[key] / base[key] - 1.0)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "method",
        "ρ16",
        "ρdtype",
        "stored MB",
        "cont ppl",
        "cont +%",
        "recall ppl",
        "recall +%",
        "passkey",
        "s",
    ]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["method"], *(["error"] + ["-"] * (len(header) - 2))])
            continue
        lines.append(
            [
                r["method"],
                f"{r['rho']:.3f}",
                f"{r['ratio_cache_dtype']:.3f}",
                f"{r['stored_bytes'] / 2**20:.2f}",
                f"{r['continuation_ppl']:.3f}",
                f"{r['continuation_increase_pct']:+.1f}",
                f"{r['recall_ppl']:.3f}" if "recall_ppl" in r else "-",
                f"{r['recall_increase_pct']:+.1f}" if "recall_ppl" in r else "-",
                f"{r['passkey_acc']:.2f}" if "passkey_acc" in r else "-",
                f"{r['seconds']:.0f}",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), sep, *(fmt(line) for line in lines)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="budget 0.25 only, 3 presses, short passkeys")
    add_model_options(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--preset", default="balanced", help="ChunkedDecomp preset run at every budget")
    parser.add_argument(
        "--budgets", type=float, nargs="+", help=f"ρ vs a 16-bit cache (default {FULL_BUDGETS})"
    )
    parser.add_argument("--presses", nargs="+", help=f"kvpress presses (default {sorted(KVPRESS_PRESSES)})")
    parser.add_argument(
        "--methods", nargs="+", help="explicit method specs instead (e.g. full quanto4 chunked@0.25)"
    )
    add_overrides_option(parser, "every ChunkedDecomp row")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="ChunkedDecomp rows get head_weights from chunked_decomp.evaluation.calibration.head_sensitivity\n"
        "(continuation loss on tokens 1,000-4,535 of the text, before the protocols' windows)",
    )
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--continuation-len", type=int, default=512)
    parser.add_argument("--start", type=int, default=5000)
    parser.add_argument("--passkey-lengths", type=int, nargs="+")
    parser.add_argument("--passkey-depths", type=float, nargs="+")
    parser.add_argument("--passkey-trials", type=int, default=1, help="random passkeys per (length, depth)")
    parser.add_argument("--no-passkey", action="store_true")
    parser.add_argument("--no-recall", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 0 = torch's choice. Default 1: on a shared 2-core machine, threaded LAPACK and\n"
        "matmuls under contention made the quick run 3-13x slower (28 min instead of 8)",
    )
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first method that fails")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/peers"))
    parser.add_argument(
        "--tag", default="", help="suffix of the output files' names (keeps other runs' files)"
    )
    args = parser.parse_args(argv)
    if args.budgets is None:
        args.budgets = QUICK_BUDGETS if args.quick else FULL_BUDGETS
    if args.presses is None:
        args.presses = QUICK_PRESSES if args.quick else tuple(KVPRESS_PRESSES)
    if args.passkey_lengths is None:
        args.passkey_lengths = (1024,) if args.quick else (1024, 2048)
    if args.passkey_depths is None:
        args.passkey_depths = (0.1, 0.5, 0.9) if args.quick else (0.0, 0.25, 0.5, 0.75, 1.0)
    return args


def with_overrides(
    methods: list[KVMethod], model: torch.nn.Module, token_ids: torch.Tensor, args: argparse.Namespace
) -> None:
    """Apply ``--set`` (and ``--calibrate``'s head weights) to every ChunkedDecomp row, in place; a malformed
    ``--set`` exits naming it."""
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.calibrate:
        from chunked_decomp.evaluation.calibration import head_sensitivity

        overrides["head_weights"] = head_sensitivity(model, token_ids, starts=(1000, 3000))
    for method in methods:
        if isinstance(method, ChunkedDecompMethod) and overrides:
            method.config = CompressionConfig.from_dict({**method.config.to_dict(), **overrides})
            method.name += "+calibrated" if args.calibrate else ""


def run_rows(
    model: torch.nn.Module,
    tokenizer: Any,
    token_ids: torch.Tensor,
    methods: list[KVMethod],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """A row per method, in order; a method that fails gets an ``error`` row (unless ``--fail-fast``)."""
    rows = []
    for method in methods:
        try:
            row = run_method(model, tokenizer, token_ids, method, args)
        except Exception as err:  # one broken method must not lose the others' rows
            if args.fail_fast or isinstance(method, FullCache):
                raise
            print(f"  {method.name}: FAILED {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            rows.append({"method": method.name, "error": f"{type(err).__name__}: {err}"})
            continue
        rows.append(row)
        print(
            f"  {row['method']}: ρ {row['rho']:.3f}, continuation {row['continuation_ppl']:.3f}, "
            f"{row['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    add_increases(rows)
    return rows


def run_meta(args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """The JSON file's ``meta``: what ran, on which versions, and each protocol's settings."""
    return {
        "model": args.model_name,
        "dataset": args.dataset,
        "device": args.device,
        "dtype": args.dtype,
        **run_metadata("torch", "transformers", "kvpress", "optimum_quanto", "python", "threads"),
        "quick": args.quick,
        "overrides": [*args.overrides, *(["calibrated head_weights"] if args.calibrate else [])],
        "protocols": {
            "continuation": {
                "context_len": args.context_len,
                "continuation_len": args.continuation_len,
                "start": args.start,
            },
            "recall": {"passage_len": 512, "filler_len": 512, "repeat_len": 256, "start": args.start},
            "passkey": {
                "lengths": list(args.passkey_lengths),
                "depths": list(args.passkey_depths),
                "trials_per_cell": args.passkey_trials,
                "seed": args.seed,
            },
        },
        "seconds": seconds,
    }


def write_outputs(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """JSON (meta and rows) and CSV (the rows' scalar columns), named after the run and transformers' version."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    stem = f"compare_peers{'_quick' if args.quick else ''}{tag}-transformers{meta['transformers']}"
    json_path, csv_path = args.output_dir / f"{stem}.json", args.output_dir / f"{stem}.csv"
    atomic_write_json(json_path, {"meta": meta, "rows": rows})
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (dict, list))]
    with atomic_open(csv_path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {json_path} and {csv_path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tokenizer, token_ids = load_model_and_text(
        args.model_name, args.dataset, dtype=args.dtype, device=args.device, calibrate_heads=True
    )
    methods = build_methods(args)
    with_overrides(methods, model, token_ids, args)
    if not kvpress_available():
        print("kvpress not importable here (needs transformers<5.3): no kvpress rows", file=sys.stderr)
    rows = run_rows(model, tokenizer, token_ids, methods, args)
    print(format_table(rows))
    meta = run_meta(args, time.perf_counter() - t_start)
    write_outputs(args, meta, rows)
    summary = {r["method"]: round(r["continuation_increase_pct"], 2) for r in rows if "error" not in r}
    print(
        json.dumps(
            {
                "benchmark": "compare_peers",
                "seconds": round(meta["seconds"], 1),
                "continuation_increase_pct": summary,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
