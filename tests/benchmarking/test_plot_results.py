"""``benchmarks/plot_results.py`` and the docs' figures: the plots are drawn from the result files that ship in the
repository, and the tables of ``docs/results.md`` and the README quote those same files."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
RESULTS_MD = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def plots():
    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "benchmarks" / "plot_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_results"] = module
    spec.loader.exec_module(module)
    return module


def table(path: Path, header: str) -> list[list[str]]:
    """The body rows (cells, stripped) of the markdown table in ``path`` whose header row starts with ``header``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert len(starts) == 1, f"{path.name}: {len(starts)} tables start with {header!r}"
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def figure(text: str) -> tuple[float, float]:
    """A figure as the docs write it (``+3,697%``, ``-0.5%``, ``1.26×``, ``0.250``) and half a unit of its last
    digit: the largest difference its rounding allows."""
    t = text.replace(",", "").replace("%", "").replace("×", "").replace("*", "").strip()
    decimals = len(t.split(".")[1]) if "." in t else 0
    return float(t), 0.5 * 10.0**-decimals + 1e-9


def assert_quotes(text: str, value: float | None, what: str) -> None:
    assert value is not None, f"{what}: the docs write {text!r}, the result file has no value"
    written, tolerance = figure(text)
    assert abs(written - value) <= tolerance, (
        f"{what}: the docs write {text!r}, the result file gives {value:.4f}"
    )


def in_brackets(cell: str) -> str:
    """``"11.67 (1.26×)"`` → ``"1.26×"``."""
    match = re.search(r"\(([^)]*×)\)", cell)
    assert match, f"no ratio in brackets in {cell!r}"
    return match.group(1)


# Rows of the peers table in docs/results.md and the method each one quotes.
PEER_LABELS = {
    "`balanced`": "chunked:balanced@0.25",
    "`long_context`": "chunked:long_context@0.25",
    "`fast`": "chunked:fast@0.25",
    "`aggressive`": "chunked:aggressive@0.125",
    "`extreme`": "chunked:extreme@0.0625",
    "QuantizedCache quanto 4-bit": "quanto4",
    "QuantizedCache quanto 2-bit": "quanto2",
}


def test_peer_points_are_the_numbers_of_docs_results(plots) -> None:
    """The quality panel's points are the comparison's rows (increases over the uncompressed run of the same file),
    and docs/results.md's peers tables quote exactly them; passkey only from runs of the full passkey protocol."""
    series = plots.peer_points()
    points = {p[4]: p for pts in series.values() for p in pts}
    ours = {p[4] for p in series["ChunkedDecomp presets"]}
    assert ours == set(plots.PRESET_ROWS)

    rows = table(RESULTS_MD, "| method | ρ16 | continuation ppl |")
    labels = [row[0] for row in rows]
    assert labels == ["uncompressed", *PEER_LABELS]
    for label, rho, cont, recall, passkey in rows[1:]:
        point = points[PEER_LABELS[label]]
        for text, value, what in ((rho, point[0], "ρ16"), (cont, point[1], "continuation"),
                                  (recall, point[2], "recall"), (passkey, point[3], "passkey")):  # fmt: skip
            assert_quotes(text, value, f"{label} {what}")

    presses = {"Knorm": "knorm", "SnapKV": "snapkv", "StreamingLLM": "streamingllm",
               "ExpectedAttention": "expectedattention", "TOVA": "tova"}  # fmt: skip
    budgets = ("0.5", "0.25", "0.125", "0.0625")
    rows = table(RESULTS_MD, "| press | 0.5 |")
    assert [row[0] for row in rows] == list(presses)
    for name, *cells in rows:
        for budget, cell in zip(budgets, cells, strict=True):
            cont, recall = cell.split(" / ")
            point = points[f"kvpress:{presses[name]}@{budget}"]
            assert_quotes(cont, point[1], f"{name} @{budget} continuation")
            assert_quotes(recall, point[2], f"{name} @{budget} recall")
            # The presses at 0.5-0.125 were passkey-tested at 1k tokens × 3 depths only: not on the passkey panel.
            assert (point[3] is None) == (budget != "0.0625")


def test_decode_points_are_the_numbers_of_docs_results(plots) -> None:
    """The decoding figure plots the runs docs/results.md's table quotes, each with its thread count and batch."""
    series = plots.decode_points()
    assert len(series) == 6
    columns = {
        4: "fast (keys after RoPE, factored)",
        5: "balanced, rebuild (the default decoding)",
        6: "balanced, factored (pre-RoPE keys rebuilt)",
    }
    rows = table(RESULTS_MD, "| context | batch | threads | `DynamicCache` |")
    quoted = set()
    for row in rows:
        context, batch, threads = (int(c.replace(",", "")) for c in row[:3])
        for col, label in columns.items():
            if not row[col]:
                continue
            name = f"{label}, {threads} thread{'s' * (threads > 1)}"
            ratio = {(c, b): r for c, b, r in series[name]}.get((context, batch))
            assert_quotes(in_brackets(row[col]), ratio, f"{name} at {context} tokens, batch {batch}")
            quoted.add((name, context, batch))
    plotted = {(name, c, b) for name, pts in series.items() for c, b, _ in pts}
    assert plotted == quoted, f"plotted but not in the table: {sorted(plotted - quoted)}"


def _quality(preset: str) -> dict:
    return json.loads((RESULTS / "quality" / f"{preset}.json").read_text())["rows"][0]


def test_the_presets_tables_quote_the_result_files() -> None:
    """docs/results.md's presets table and the README's headline per preset are the figures of
    benchmarks/results/quality/ and decode_speed/; an empty cell is a figure that was not measured."""
    for preset, rho, _, _, cont, recall, *_ in table(RESULTS_MD, "| preset | ρ16 | stored ÷ 16-bit |"):
        row = _quality(preset.strip("`"))
        assert_quotes(rho, row["budget_16bit"], f"{preset} budget")
        first, pooled, worst = cont.split(" / ")
        assert_quotes(first, row["perplexity_increase_pct"], f"{preset} first window")
        assert_quotes(pooled, row["pooled_perplexity_increase_pct"], f"{preset} pooled")
        assert_quotes(worst, row["worst_perplexity_increase_pct"], f"{preset} worst window")
        if recall:
            value, windows = recall.split(" (")
            assert_quotes(value, row["mean_recall_increase_pct"], f"{preset} recall")
            assert int(windows.rstrip(")")) == len(row["recall_window_starts"])

    def decode(name: str, mode: str) -> float:
        data = json.loads((RESULTS / "decode_speed" / f"{name}_4k_t1.json").read_text())
        return data["rows"][0][f"{mode}_speed_ratio"]

    # balanced: "auto" (factored) on SmolLM2 / Qwen, then rebuilding on both.
    auto = [decode(f"auto_{m}", mode) for mode in ("factored", "rebuild") for m in ("smollm2", "qwen")]
    speeds = {"`balanced`": auto, "`fast`": [decode("fast", "factored_post_rope")]}
    measured = set()
    for preset, _, rho, smol, qwen, ruler, speed in table(README, "| preset | what it is for |"):
        if ruler:
            for text, study in zip(ruler.split(" / "), ("smollm2_4k", "qwen_4k")):
                assert_quotes(text, _ruler_delta(study, preset.strip("`")), f"README {preset} RULER {study}")
        name = preset.strip("`")
        rows = [_across(study).get(name) for study in ("smollm2_wikipedia", "qwen_python")]
        if rows[0] is None:
            assert not (smol or qwen or speed), (
                f"README quotes figures for {preset}, which has no result file"
            )
            continue
        measured.add(name)
        assert_quotes(rho, rows[0]["budget"], f"README {preset} budget")
        for cell, row, model in zip((smol, qwen), rows, ("SmolLM2", "Qwen")):
            cont, recall = cell.split(" / ")
            assert_quotes(cont, row["continuation_pooled_pct"], f"README {preset} {model} continuation")
            assert_quotes(recall, row["recall_mean_pct"], f"README {preset} {model} recall")
        written = re.findall(r"[0-9.]+×", speed)
        assert len(written) == len(speeds.get(preset, [])), f"README {preset} decoding: {speed!r}"
        for text, value in zip(written, speeds.get(preset, [])):
            assert_quotes(text, value, f"README {preset} decoding")
    assert measured == {"conservative", "balanced", "long_context", "fast", "aggressive", "extreme"}


def _ruler_delta(study: str, preset: str) -> float:
    """Mean score of ``preset`` over the tasks the uncompressed cache solves, minus the uncompressed mean."""
    rows = json.loads((RESULTS / "longctx" / study / "summary.json").read_text())
    mine = [r for r in rows if r["method"].startswith(f"chunked:{preset}@") and r["solved_by_reference"]]
    assert mine, f"no {preset} rows in longctx/{study}"
    return sum(r["score_delta"] for r in mine) / len(mine)


ACROSS = ("smollm2_wikipedia", "smollm2_wikipedia_no_head_file", "qwen_wikipedia", "qwen_python")


def _across(study: str) -> dict[str, dict]:
    data = json.loads((RESULTS / "across_models" / f"{study}.json").read_text())
    return {row["preset"]: row for row in data["rows"]}


def test_the_across_models_table_quotes_its_files() -> None:
    """docs/results.md's table of the presets on both models: each cell "pooled / worst / recall" is its file's."""
    studies = [_across(study) for study in ACROSS]
    rows = table(RESULTS_MD, "| preset | ρ16 | SmolLM2-135M, Wikipedia |")
    assert {row[0].strip("`") for row in rows} == set(studies[0])
    for preset, rho, *cells in rows:
        name = preset.strip("`")
        assert_quotes(rho, max(study[name]["rho16"] for study in studies), f"{preset} ρ16")
        for cell, study, label in zip(cells, studies, ACROSS):
            pooled, worst, recall = cell.split(" / ")
            assert_quotes(pooled, study[name]["continuation_pooled_pct"], f"{preset} {label} pooled")
            assert_quotes(worst, study[name]["continuation_worst_pct"], f"{preset} {label} worst")
            assert_quotes(recall, study[name]["recall_mean_pct"], f"{preset} {label} recall")


def test_every_figure_is_written_as_a_png(plots, tmp_path) -> None:
    for name, draw in plots.FIGURES.items():
        path = draw(tmp_path)
        assert path == tmp_path / {"quality": "quality_per_byte.png", "decode": "decode_speed.png",
                                   "memory": "memory_peak.png", "gpu": "gpu_attention.png"}[name]  # fmt: skip
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_each_figure_goes_to_its_study_folder(plots, tmp_path, monkeypatch) -> None:
    """The command line writes each figure next to the results it plots, under ``--output_dir``; the docs link
    the figures at those places."""
    monkeypatch.setattr(sys, "argv", ["plot_results.py", "--output_dir", str(tmp_path)])
    plots.main()
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    assert written == sorted(f"{plots.FOLDERS[name]}/{png}" for name, png in
                             [("quality", "quality_per_byte.png"), ("decode", "decode_speed.png"),
                              ("memory", "memory_peak.png"), ("gpu", "gpu_attention.png")])  # fmt: skip
    docs = RESULTS_MD.read_text(encoding="utf-8")
    for png in written:
        assert f"(../benchmarks/results/{png})" in docs, f"docs/results.md does not show {png}"


def test_a_missing_input_skips_its_figure_and_a_broken_one_names_the_file(
    plots, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(plots, "RESULTS", tmp_path)
    assert plots.plot_decode(tmp_path) is None
    assert not (tmp_path / "decode_speed.png").exists()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory_peak.json").write_text("{not json")
    with pytest.raises(ValueError, match="memory_peak.json is not valid JSON"):
        plots.plot_memory(tmp_path)
    # The rows it reads are the ones written by the benchmark: a row set without the uncompressed run is empty.
    first = tmp_path / next(iter(plots.PEER_FILES))
    first.parent.mkdir(parents=True)
    first.write_text(json.dumps({"rows": []}))
    assert plots.peer_points() == {}


def test_the_qwen_peers_table_quotes_its_file() -> None:
    """docs/results.md's comparison on Qwen2.5-Coder-0.5B: each row is its method's row of the result file."""
    path = RESULTS / "peers" / "compare_peers_qwen_python-transformers5.25.0.json"
    by_method = {row["method"]: row for row in json.loads(path.read_text())["rows"]}
    labels = {"uncompressed": "full", **PEER_LABELS}
    rows = table(RESULTS_MD, "| method, Qwen code | ρ16 |")
    assert [labels[row[0]] for row in rows] == ["full", "chunked:balanced@0.25", "chunked:aggressive@0.125",
                                                 "quanto4", "quanto2"]  # fmt: skip
    for label, rho, cont, recall in rows:
        row = by_method[labels[label]]
        assert_quotes(rho, row["rho"], f"Qwen {label} ρ16")
        if label == "uncompressed":
            assert_quotes(cont, row["continuation_ppl"], "Qwen uncompressed continuation")
            assert_quotes(recall, row["recall_ppl"], "Qwen uncompressed recall")
        else:
            assert_quotes(cont, row["continuation_increase_pct"], f"Qwen {label} continuation")
            assert_quotes(recall, row["recall_increase_pct"], f"Qwen {label} recall")
