"""``benchmarks/common.py``, the benchmark scripts' shared helpers: the ``--set`` option and its errors, the run's
metadata, the timers, loading text and writing results; and that every script takes them from there."""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import time
from pathlib import Path

import pytest
import torch
from benchmarks import common

from chunked_decomp.config import CompressionConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    p for p in (ROOT / "benchmarks").glob("*.py") if p.name not in ("common.py", "plot_results.py")
)


def parser_with_set() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    common.add_overrides_option(parser, "the preset")
    return parser


# ---- --set --------------------------------------------------------------------------------------------------
def test_set_values_are_read_as_yaml_in_order() -> None:
    parser = parser_with_set()
    args = parser.parse_args(["--set", "chunk_size=128", "--set", "head_weights=auto", "--set", "x=[1, 2]"])
    assert common.overrides_from(parser, args) == {"chunk_size": 128, "head_weights": "auto", "x": [1, 2]}
    assert common.overrides_from(parser, parser.parse_args([])) == {}
    help_text = " ".join(parser.format_help().split())
    assert (
        "--set KEY=VALUE override a config field of the preset (repeatable; VALUE read as YAML)" in help_text
    )


@pytest.mark.parametrize("item", ["chunk_size", "=4"])
def test_a_malformed_set_exits_2_naming_the_option_and_the_item(item, capsys) -> None:
    parser = parser_with_set()
    args = parser.parse_args(["--set", item])
    with pytest.raises(SystemExit) as exit_info:
        common.overrides_from(parser, args)
    assert exit_info.value.code == 2
    assert f"bench: error: --set takes KEY=VALUE, got {item!r}" in capsys.readouterr().err


def test_preset_config_applies_fields_and_refuses_a_bad_one_with_the_configs_message(capsys) -> None:
    parser = parser_with_set()
    config = common.preset_config(parser, "balanced", chunk_size=128, decode_attention="factored")
    assert config == CompressionConfig.from_preset("balanced", chunk_size=128, decode_attention="factored")
    assert config.chunk_size == 128 and config.compression_ratio == 0.25
    for fields, message in (({"chunk_size": 2}, "chunk_size must be"), ({"nonsense": 1}, "nonsense")):
        with pytest.raises(SystemExit) as exit_info:
            common.preset_config(parser, "balanced", **fields)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# ---- metadata -----------------------------------------------------------------------------------------------
def test_metadata_holds_the_fields_the_scripts_write_in_the_order_asked() -> None:
    import transformers

    # decode_speed, kernel_speed and memory_peak; soak's "machine"; compare_peers' meta.
    assert common.run_metadata("torch", "machine") == {
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    soak = common.run_metadata("platform", "cpus", "torch")
    assert list(soak) == ["platform", "cpus", "torch"]
    assert soak == {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    peers = common.run_metadata("torch", "transformers", "kvpress", "optimum_quanto", "python", "threads")
    assert list(peers) == ["torch", "transformers", "kvpress", "optimum_quanto", "python", "threads"]
    assert peers["transformers"] == transformers.__version__
    assert peers["python"] == platform.python_version()
    assert peers["kvpress"] == common.package_version("kvpress")
    assert peers["optimum_quanto"] == common.package_version("optimum-quanto")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert common.run_metadata("threads") == {"threads": 1}
    finally:
        torch.set_num_threads(before)


def test_unknown_metadata_field_and_missing_package() -> None:
    with pytest.raises(ValueError, match=r"unknown metadata field\(s\) \['gpus'\]"):
        common.run_metadata("torch", "gpus")
    assert common.package_version("no-such-distribution-here") is None
    import yaml

    assert common.package_version("pyyaml") == yaml.__version__  # a distribution named unlike its module


def test_library_info_names_the_imported_package_and_its_commit(monkeypatch) -> None:
    import chunked_decomp
    from chunked_decomp.backends import cpu_kernel

    monkeypatch.setattr(cpu_kernel, "available", lambda: False)  # no compiler run in the fast suite
    info = common.library_info()
    assert info["path"] == str(Path(chunked_decomp.__file__).resolve().parent)
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    assert info["git_dirty_src"] in (None, True, False)
    assert info["fused_kernels"] is False


# ---- timers -------------------------------------------------------------------------------------------------
def test_timed_counts_wall_and_cpu_time_of_the_block() -> None:
    with common.timed() as sleeping:
        time.sleep(0.05)
    assert sleeping.seconds >= 0.05
    assert sleeping.cpu_seconds < 0.04  # sleeping costs no CPU
    with common.timed("cpu") as busy:
        start = time.process_time()
        while time.process_time() - start < 0.03:
            pass
    assert busy.cpu_seconds >= 0.03
    assert busy.seconds > 0


def test_a_failing_block_leaves_the_timing_empty_and_cpu_needs_no_synchronisation() -> None:
    with pytest.raises(RuntimeError), common.timed() as failed:
        raise RuntimeError("boom")
    assert (failed.seconds, failed.cpu_seconds) == (0.0, 0.0)
    for device in (None, "cpu", torch.device("cpu")):
        common.synchronize(device)  # a no-op off CUDA


# ---- text and results ---------------------------------------------------------------------------------------
class WordLengths:
    """A stand-in tokenizer: one id per word, the word's length."""

    def __call__(self, text: str, **kwargs) -> dict[str, list[int]]:
        return {"input_ids": [len(w) for w in text.split()]}


def test_text_token_ids_tokenizes_the_named_text_and_checks_its_length(monkeypatch) -> None:
    import chunked_decomp.evaluation.data as data

    asked = []

    def load_texts(name, num_samples=None):
        asked.append((name, num_samples))
        return ["a bb ccc", "dddd"]

    monkeypatch.setattr(data, "load_texts", load_texts)
    ids = common.text_token_ids(WordLengths(), "pydoc", num_samples=3, min_tokens=4)
    assert ids.dtype == torch.long and ids.tolist() == [1, 2, 3, 4]
    assert asked == [("pydoc", 3)]
    assert common.text_token_ids(WordLengths()).tolist() == [1, 2, 3, 4]
    assert asked[-1] == (common.DEFAULT_TEXT, None)
    with pytest.raises(ValueError, match="min_tokens=5 not reached"):
        common.text_token_ids(WordLengths(), min_tokens=5)


def test_write_results_writes_everything_and_prints_the_rest_as_the_last_line(tmp_path, capsys) -> None:
    summary = {"benchmark": "x", "rows": [{"a": 1.5}], "raw": [1, 2, 3]}
    path = common.write_results(tmp_path / "out" / "x.json", summary, leave_out=("raw",))
    assert path == tmp_path / "out" / "x.json"
    assert json.loads(path.read_text(encoding="utf-8")) == summary
    assert path.read_text(encoding="utf-8").startswith('{\n  "benchmark"')  # indented for diffs
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"benchmark": "x", "rows": [{"a": 1.5}]}


# ---- the scripts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_takes_its_shared_pieces_from_common(script: Path) -> None:
    """Checked on the source, so the GPU scripts are covered where they cannot run: each imports names that
    `common` has, asks only for known metadata fields, and none builds ``--set`` or a device sync of its own."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    imported = [
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "common"
        for a in n.names
    ]
    assert imported, f"{script.name} does not use benchmarks/common.py"
    assert [name for name in imported if not hasattr(common, name)] == []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_metadata":
            assert all(isinstance(a, ast.Constant) and a.value in common.METADATA_FIELDS for a in node.args)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert defined.isdisjoint({"add_overrides_option", "sync", "_version", "_library_info"})
    assert "from chunked_decomp.config import add_overrides_option" not in script.read_text(encoding="utf-8")
