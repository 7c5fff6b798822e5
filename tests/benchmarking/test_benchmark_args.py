"""The benchmark scripts refuse bad values of their options before any work, naming the option (exit status 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("decode_speed.py", ["--batch", "0"], "--batch must be >= 1, got 0"),
        ("decode_speed.py", ["--set", "basis_sharing"], "--set takes KEY=VALUE, got 'basis_sharing'"),
        ("decode_speed.py", ["--set", "basis_sharing=all"], "basis_sharing must be one of"),
        ("kernel_speed.py", ["--context", "100"], "--context must be >= 512 tokens"),
        ("kernel_speed.py", ["--threads", "2", "0"], "--rounds and --threads must be >= 1, got 9 and [2, 0]"),
        ("kernel_speed.py", ["--set", "chunk_size=2"], "chunk_size must be"),
        ("bench_core.py", ["--first_window", "-5"], "--first_window must be >= 0, got -5"),
        ("bench_core.py", ["--context_len", "16"], "--context_len must be >= 64, got 16"),
        ("plot_results.py", ["--output_dir", "FILE"], "is a file, not a folder"),
        ("plot_results.py", ["--only", "speed"], "argument --only: invalid choice: 'speed'"),
    ],
)
def test_bad_option_exits_2_naming_it(script, args, message, tmp_path) -> None:
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"keep me")
    argv = [str(a_file) if a == "FILE" else a for a in args]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert a_file.read_bytes() == b"keep me"  # nothing written over
