"""ComprehensiveBenchmark: recommendations from hand-made tables, and a tiny scaling grid with resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from chunked_decomp.benchmarking import ComprehensiveBenchmark, recommend_from_results
from tests.helpers.models import make_tiny_model, random_ids

# float16 keys + values of one token of the tiny models: 2 layers x 2 KV heads x 16 dims x 2 x 2 bytes
BYTES_PER_TOKEN_16BIT = 2 * 2 * 16 * 2 * 2


def table() -> pd.DataFrame:
    """Three settings over two context lengths, plus the baseline; hand-picked numbers."""
    rows = [
        # method, ratio, seq, memory reduction %, perplexity increase %, speed ratio
        ("full", 1.0, 512, 0.0, 0.0, 1.0),
        ("full", 1.0, 1024, 0.0, 0.0, 1.0),
        ("chunked", 0.5, 512, 50.0, 0.8, 0.9),
        ("chunked", 0.5, 1024, 50.0, 1.2, 0.8),
        ("chunked", 0.25, 512, 75.0, 2.0, 0.7),
        ("chunked", 0.25, 1024, 74.0, 3.5, 0.6),  # worst case of ρ=0.25: 74% and +3.5%
        ("chunked", 0.125, 512, 87.5, 9.0, 0.5),
        ("chunked", 0.125, 1024, 87.5, 12.0, 0.5),
    ]
    return pd.DataFrame(
        rows,
        columns=[
            "method",
            "compression_ratio",
            "seq_len",
            "memory_reduction_pct",
            "perplexity_increase_pct",
            "speed_ratio",
        ],
    )


@pytest.mark.parametrize(
    ("target", "max_loss", "ratio", "memory", "loss"),
    [
        (40, 5, 0.5, 50.0, 1.2),  # every compressed setting saves 40%: the least quality lost wins
        (60, 5, 0.25, 74.0, 3.5),  # only 0.25 and 0.125 reach 60%; 0.125 loses too much
        (74, 3.5, 0.25, 74.0, 3.5),  # limits are inclusive and judged on the worst cell
        (80, 15, 0.125, 87.5, 12.0),
    ],
)
def test_recommendation_picks_the_right_setting(target, max_loss, ratio, memory, loss):
    rec = ComprehensiveBenchmark().recommend_optimal_settings(target, max_loss, results=table())
    assert rec["found"] is True
    assert rec["setting"] == {"method": "chunked", "compression_ratio": ratio}
    assert rec["expected_memory_reduction"] == memory
    assert rec["expected_quality_loss"] == loss
    assert rec["cells"] == 2
    assert f"compression_ratio={ratio:g}" in rec["message"]


def test_recommendation_says_plainly_when_nothing_qualifies():
    rec = recommend_from_results(table(), target_memory_reduction=80, max_quality_loss=5)
    assert rec["found"] is False and rec["setting"] is None
    assert rec["message"].startswith(
        "No measured setting meets ≥ 80% memory reduction with ≤ 5% perplexity increase"
    )
    # the closest alternatives on each side are named
    assert "compression_ratio=0.25" in rec["message"] and "compression_ratio=0.125" in rec["message"]
    assert len(rec["candidates"]) == 3  # the baseline is never a candidate


def test_baseline_is_never_recommended():
    rec = recommend_from_results(table(), target_memory_reduction=0, max_quality_loss=0)
    assert rec["found"] is False
    only_baseline = table()[table()["method"] == "full"]
    assert recommend_from_results(only_baseline, 0, 100)["found"] is False


def test_recommendation_input_errors():
    with pytest.raises(ValueError, match="target_memory_reduction must be in"):
        recommend_from_results(table(), 100, 5)
    with pytest.raises(ValueError, match="max_quality_loss must be a number"):
        recommend_from_results(table(), 50, float("nan"))
    with pytest.raises(ValueError, match="perplexity_increase_pct"):
        recommend_from_results(table().drop(columns=["perplexity_increase_pct"]), 50, 5)
    with pytest.raises(ValueError, match="run_scaling_analysis"):
        ComprehensiveBenchmark().recommend_optimal_settings(50, 5)


# ---- the scaling grid on a tiny model ------------------------------------------------------------------------


def make_bench(out) -> ComprehensiveBenchmark:
    return ComprehensiveBenchmark(
        out,
        model=make_tiny_model("llama"),
        token_ids=random_ids(2000, seed=7)[0],
        config_overrides={"chunk_size": 16, "residual_length": 16},
        continuation_length=16,
        decode_tokens=2,
        progress=False,
    )


GRID = dict(compression_ratios=[0.5, 0.25], sequence_lengths=[64, 128], batch_sizes=[1, 2])


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    bench = make_bench(out)
    return out, bench, bench.run_scaling_analysis("tiny-llama", **GRID)


def test_grid_values(scaling):
    out, bench, df = scaling
    assert len(df) == 4 + 8 and bench.cells_computed == 12
    full = df[df["method"] == "full"]
    assert (full["achieved_ratio"] == 1.0).all() and (full["perplexity_increase_pct"] == 0).all()
    assert (full["speed_ratio"] == 1.0).all()
    expected = full["seq_len"] * full["batch_size"] * BYTES_PER_TOKEN_16BIT
    assert full["kv_bytes"].tolist() == expected.tolist()
    assert (full["kv_bytes_model_dtype"] == 2 * full["kv_bytes"]).all()
    comp = df[df["method"] == "chunked"]
    assert (comp["kv_bytes"] < comp["kv_reference_bytes"]).all()
    assert (comp["memory_reduction_pct"] == 100 * (1 - comp["achieved_ratio"])).all()
    long = comp[comp["seq_len"] == 128]
    assert long["achieved_ratio"].tolist() == pytest.approx(long["compression_ratio"].tolist(), abs=0.02)
    # batch rows are distinct windows: the batch-2 baseline scores twice the tokens
    assert full[full["batch_size"] == 2]["scored_tokens"].tolist() == [32, 32]
    assert (comp["perplexity_increase_pct"].abs() < 50).all() and comp["perplexity_increase_pct"].ne(0).any()


def test_results_files(scaling):
    out, bench, df = scaling
    csv = pd.read_csv(out / "scaling_results.csv")
    assert len(csv) == 12 and csv["kv_bytes"].tolist() == df["kv_bytes"].tolist()
    records = json.loads((out / "scaling_results.json").read_text())
    assert records[0]["method"] == "full" and len(records) == 12
    png = bench.plot_scaling()
    assert png.name == "scaling_analysis.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_finished_cells(scaling, monkeypatch):
    out, _, first = scaling
    bench = make_bench(out)
    calls = []
    real = ComprehensiveBenchmark.measure_cell
    monkeypatch.setattr(
        ComprehensiveBenchmark, "measure_cell", lambda self, *a: calls.append(a) or real(self, *a)
    )
    again = bench.run_scaling_analysis("tiny-llama", **GRID)
    assert calls == [] and bench.cells_reused == 12
    assert again["perplexity"].tolist() == first["perplexity"].tolist()
    # a corrupt cell is recomputed, a new ratio adds only its own cells
    cell = next((out / "cells" / "scaling").glob("*.json"))
    cell.write_text(cell.read_text()[:40])
    bench.run_scaling_analysis(
        "tiny-llama", compression_ratios=[0.5, 0.25, 0.125], sequence_lengths=[64, 128], batch_sizes=[1, 2]
    )
    assert len(calls) == 1 + 4


def test_not_enough_text_is_explained(tmp_path):
    bench = make_bench(tmp_path)
    bench.token_ids = random_ids(100)[0]
    with pytest.raises(ValueError, match="needs 160"):
        bench.run_scaling_analysis("tiny", [0.5], [64], [2])
    with pytest.raises(ValueError, match=r"compression ratios must be in \(0, 1\]"):
        bench.run_scaling_analysis("tiny", [1.5], [64], [1])
