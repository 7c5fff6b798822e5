"""``benchmarks/plot_results.py``: the README's figures, redrawn from the result files that ship in the repository."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plots():
    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "benchmarks" / "plot_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_results"] = module
    spec.loader.exec_module(module)
    return module


def test_peer_points_are_the_readme_numbers(plots) -> None:
    """The quality panel's points are the comparison's rows: increases over the uncompressed run of the same file
    (README table: balanced -0.5% / +4.0%, long_context +0.4% / +5.6%, extreme +3.3% / +185%, ExpectedAttention
    at 0.0625 +11.2% / +2,067%, quanto 2-bit +210%), and passkey only from runs of the full passkey protocol."""
    series = plots.peer_points()
    ours = {p[4]: p for p in series["ChunkedDecomp presets"]}
    assert set(ours) == set(plots.PRESET_ROWS)
    assert ours["chunked:balanced@0.25"][1] == pytest.approx(-0.5, abs=0.05)
    assert ours["chunked:balanced@0.25"][2] == pytest.approx(4.0, abs=0.05)
    assert ours["chunked:long_context@0.25"][1] == pytest.approx(0.4, abs=0.05)
    assert ours["chunked:long_context@0.25"][2] == pytest.approx(5.6, abs=0.05)
    assert ours["chunked:extreme@0.0625"][1] == pytest.approx(3.3, abs=0.05)
    assert ours["chunked:extreme@0.0625"][2] == pytest.approx(185, abs=0.5)
    assert all(p[3] == 1.0 for p in ours.values())
    ea = {round(p[0], 4): p for p in series["kvpress expectedattention"]}
    assert ea[0.0625][1] == pytest.approx(11.2, abs=0.05) and ea[0.0625][2] == pytest.approx(2067, abs=1)
    assert ea[0.0625][3] == 0.0
    # The presses at 0.5-0.125 were passkey-tested at 1k tokens × 3 depths only: not on the passkey panel.
    assert ea[0.25][3] is None and ea[0.25][1] == pytest.approx(8.0, abs=0.05)
    quanto = {round(p[0], 4): p for p in series["QuantizedCache (quanto 4/2-bit)"]}
    assert quanto[0.1875][1] == pytest.approx(209.7, abs=0.1)


def test_decode_points_are_the_readme_numbers(plots) -> None:
    """The decoding figure plots the runs the README's table quotes (fast 1.26x / 1.19x at 4k on 1 / 2 threads,
    1.42x / 1.40x at 8k, 1.97x / 1.57x with a batch of 4; balanced factored 0.79x / 0.67x, rebuild 0.31x / 0.33x
    at 4k), each with its thread count and batch."""
    series = plots.decode_points()
    fast1 = {(c, b): r for c, b, r in series["fast (keys after RoPE, factored), 1 thread"]}
    fast2 = {(c, b): r for c, b, r in series["fast (keys after RoPE, factored), 2 threads"]}
    assert [round(fast1[k], 2) for k in ((4096, 1), (8192, 1), (4096, 4))] == [1.26, 1.42, 1.97]
    assert [round(fast2[k], 2) for k in ((4096, 1), (8192, 1), (4096, 4))] == [1.19, 1.40, 1.57]
    factored = series["balanced, factored (pre-RoPE keys rebuilt), 1 thread"]
    rebuild = series["balanced, rebuild (the default decoding), 2 threads"]
    assert round(dict(((c, b), r) for c, b, r in factored)[(4096, 1)], 2) == 0.79
    assert round(dict(((c, b), r) for c, b, r in rebuild)[(4096, 1)], 2) == 0.33
    assert len(series) == 6


def test_every_figure_is_written_as_a_png(plots, tmp_path) -> None:
    for name, draw in plots.FIGURES.items():
        path = draw(tmp_path)
        assert path == tmp_path / {"quality": "quality_per_byte.png", "decode": "decode_speed.png",
                                   "memory": "memory_peak.png", "gpu": "gpu_attention.png"}[name]  # fmt: skip
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_missing_input_skips_its_figure_and_a_broken_one_names_the_file(
    plots, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(plots, "RESULTS", tmp_path)
    assert plots.plot_decode(tmp_path) is None
    assert not (tmp_path / "decode_speed.png").exists()
    (tmp_path / "memory_peak.json").write_text("{not json")
    with pytest.raises(ValueError, match="memory_peak.json is not valid JSON"):
        plots.plot_memory(tmp_path)
    # The rows it reads are the ones written by the benchmark: a row set without the uncompressed run is empty.
    (tmp_path / plots.PEER_FILES[0]).write_text(json.dumps({"rows": []}))
    assert plots.peer_points() == {}
