"""``chunked-decomp longctx``: bad input refused before work, files written, cells resumed, real scores pinned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_cli import assets, run  # noqa: F401 - the fixture is used by name

TINY = [
    "--quick",
    "--num_samples",
    "1",
    "--context_lengths",
    "2048",
    "--max_new_tokens",
    "8",
    "--no-skip_unsolved",
    "--no_progress",
]


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--methods", "chunked:nope"], "--methods"),
        (["--methods", "quanto7"], "--methods"),
        (["--context_lengths", "100"], "--context_lengths"),
        (["--tasks", "niah_single_9"], "--tasks"),
        (["--num_samples", "0"], "--num_samples"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(extra, flag, tmp_path, capsys):
    code, _, err = run(["longctx", "--output_dir", str(tmp_path / "out"), *extra], capsys)
    assert code == 2 and flag in err, err
    assert not (tmp_path / "out").exists()  # refused before the model loads or a folder is made


def test_context_too_short_for_a_task_names_the_flag(assets, tmp_path, capsys):  # noqa: F811
    argv = ["longctx", "--model_name", str(assets["model"]), "--output_dir", str(tmp_path), "--quick"]
    code, _, err = run([*argv, "--context_lengths", "256", "--tasks", "cwe", "--no_progress"], capsys)
    assert code == 2 and "--context_lengths" in err and "too short for task 'cwe'" in err, err


def test_longctx_end_to_end_and_resume(assets, tmp_path, capsys):  # noqa: F811
    # No QuantizedCache here: quanto's groups of 64 need the tiny model's 32 values per token to come in even
    # token counts (real models have >= 64); tests/evaluation/test_shared_prefill.py runs it.
    methods = ["chunked:balanced@0.25", "chunked:aggressive@0.125"]
    argv = ["longctx", "--model_name", str(assets["model"]), "--output_dir", str(tmp_path), *TINY,
            "--tasks", "passkey", "niah_single_1", "--methods", *methods]  # fmt: skip
    code, out, err = run(argv, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "summary.json").read_text())
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert [(r["task"], r["method"]) for r in rows] == [
        (t, m) for t in ("passkey", "niah_single_1") for m in ("full", *methods)
    ]  # the uncompressed cache added and run first
    for s in samples:
        found = sum(a.lower() in s["output"].lower() for a in s["answers"]) / len(s["answers"])
        assert s["score"] == found
        assert s["prompt_tokens"] + 8 <= 2048 and s["new_tokens"] <= 8
        assert s["stored_bytes"] / s["reference_bytes"] == pytest.approx(s["ratio"])
    by = {(r["task"], r["method"]): r for r in rows}
    assert by[("passkey", "full")]["ratio"] == 1.0
    assert 0.2 < by[("passkey", "chunked:balanced@0.25")]["ratio"] < 1.0  # the exact window counts
    assert all(r["score_delta"] == r["score"] - r["reference_score"] for r in rows)
    for name in (
        "summary.csv",
        "samples.csv",
        "run_info.json",
        "longctx_passkey.png",
        "longctx_niah_single_1.png",
    ):
        assert (tmp_path / name).is_file()
    assert "passkey" in out and "chunked:balanced@0.25" in out
    cells = sorted((tmp_path / "cells" / "longctx").glob("*.json"))
    assert len(cells) == 6
    stamps = [c.stat().st_mtime_ns for c in cells]
    code, out2, _ = run(argv, capsys)
    assert code == 0 and [c.stat().st_mtime_ns for c in cells] == stamps  # nothing recomputed
    assert json.loads((tmp_path / "summary.json").read_text()) == rows

    # Every method of a sample in one shared prefill: the same outputs and bytes, only the timings differ.
    shared = tmp_path / "shared"
    argv[argv.index(str(tmp_path))] = str(shared)
    code, _, err = run([*argv, "--no-skip_unsolved"], capsys)
    assert code == 0, err
    timings = ("seconds", "prefill_seconds")
    untimed = [[{k: v for k, v in s.items() if k not in timings} for s in sorted(
        json.loads((d / "samples.json").read_text()), key=lambda s: (s["task"], s["index"], s["method"])
    )] for d in (tmp_path, shared)]  # fmt: skip
    assert untimed[0] == untimed[1]


def test_task_names_copied_for_a_light_help_agree_with_the_library():
    from chunked_decomp.cli import args
    from chunked_decomp.evaluation import ruler

    assert tuple(ruler.TASKS) == args.LONGCTX_TASKS
    assert args.LONGCTX_DEFAULT_TASKS == ruler.DEFAULT_TASKS


@pytest.mark.slow
def test_quick_run_on_the_real_model(tmp_path):
    """SmolLM2-135M finds the passkey and a needle in 1,024 tokens, uncompressed and with ``balanced``."""
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "chunked-decomp"),
            "longctx",
            "--quick",
            "--tasks",
            "passkey",
            "niah_single_2",
            "--output_dir",
            str(tmp_path),
            "--no_progress",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["task"], r["method"]): r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert len(rows) == 4
    # Measured: every score 1.0. A broken cache answers with other digits (score 0).
    for (task, method), row in rows.items():
        assert row["score"] == 1.0, (task, method, row)
    assert rows[("passkey", "chunked:balanced@0.25")]["ratio"] < 0.75
