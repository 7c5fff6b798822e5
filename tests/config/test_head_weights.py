"""``head_weights`` given as ``"auto"`` (the weights shipped for the default model) or as a file written by the
calibration: fingerprint matching, resolution where the cache meets the model, round trips and refusals."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chunked_decomp.config import CompressionConfig
from chunked_decomp.config import head_weights as hw
from chunked_decomp.evaluation.calibration import calibrate, default_starts
from chunked_decomp.hf.cache import ChunkedSVDCache
from chunked_decomp.hf.models import cache_kwarg_name
from chunked_decomp.io import atomic_write_json
from tests.helpers.models import COMMON, build, make_tiny_model

SHIPPED = hw.shipped_head_weights_files()
# SmolLM2-135M(-Instruct): 30 Llama layers, 3 KV heads of 64 (what the shipped file must fit).
DEFAULT_GEOMETRY = {"model_type": "llama", "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64}


def default_like_config(name_or_path: str = "") -> LlamaConfig:
    """The default model's attention geometry at a tiny width (3 heads of 64, all of them KV heads)."""
    config = LlamaConfig(
        hidden_size=192,
        intermediate_size=64,
        num_hidden_layers=30,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=64,
        **COMMON,
    )
    config.name_or_path = name_or_path
    return config


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch) -> None:
    monkeypatch.setattr(hw, "_warned", set())


@pytest.fixture(scope="module")
def calibrated_file(tmp_path_factory) -> tuple:
    """A tiny Llama and a head-weight file calibrated on random tokens for it."""
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (400,), generator=torch.Generator().manual_seed(1))
    record = calibrate(model, ids, starts=(0, 200), context_len=64, continuation_len=32, names=["tiny"])
    path = atomic_write_json(tmp_path_factory.mktemp("weights") / "tiny.json", record)
    return model, path, record


# ---- the shipped file --------------------------------------------------------------------------------------


def test_one_shipped_file_fits_the_default_model() -> None:
    assert len(SHIPPED) == 1
    shipped = SHIPPED[0]
    assert {k: shipped.model[k] for k in DEFAULT_GEOMETRY} == DEFAULT_GEOMETRY
    assert len(shipped.weights) == 30 and all(len(k) == len(v) == 3 for k, v in shipped.weights)
    # Normalised per kind: the mean of (sensitivity / mean) ** 0.5 is at most 1, and the heads do differ.
    for kind in (0, 1):
        values = [w for layer in shipped.weights for w in layer[kind]]
        assert 0.5 < sum(values) / len(values) <= 1.0
        assert max(values) / min(values) > 4


def test_shipped_calibration_text_is_no_evaluation_text() -> None:
    calibration = SHIPPED[0].record["calibration"]
    assert calibration["power"] == 0.5 and calibration["source"]["dataset_name"] == "wikipedia"
    # bench_core: 8 windows from 5,000 every 10,000 (+1,536), recall filler up to 80,120; the command line
    # reads tokens below 21,000; the calibration reads none of them.
    assert min(start for start, _ in calibration["token_ranges"]) > 100_000
    assert calibration["starts"] == default_starts(calibration["num_tokens_in_text"])
    assert SHIPPED[0].record["versions"]["chunked_decomp"]


def test_default_starts_sit_at_the_end_of_the_text() -> None:
    from chunked_decomp.cli import args as cli
    from chunked_decomp.evaluation import calibration

    assert (cli.CALIBRATION_WINDOWS, cli.CALIBRATION_STRIDE) == (
        calibration.DEFAULT_NUM_WINDOWS,
        calibration.DEFAULT_STRIDE,
    )
    assert default_starts(546_260) == list(range(474_000, 544_001, 10_000))
    assert default_starts(3_000, num_windows=2, stride=100, span=1_000) == [1_000, 1_100]
    with pytest.raises(ValueError, match="need 71536 tokens"):
        default_starts(50_000)


# ---- "auto" ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "HuggingFaceTB/SmolLM2-135M-Instruct", "/cache/models/smollm2-135m/"])
def test_auto_gives_the_shipped_weights_for_the_default_fingerprint(name, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="chunked_decomp"):
        assert hw.resolve_head_weights("auto", default_like_config(name)) == SHIPPED[0].weights
    assert not caplog.records


@pytest.mark.parametrize(
    "config",
    [
        make_tiny_model("llama").config,  # another geometry
        default_like_config("someone/another-135m-model"),  # the same geometry under another name
    ],
    ids=["geometry", "name"],
)
def test_auto_falls_back_to_uniform_with_one_warning(config, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="chunked_decomp"):
        assert hw.resolve_head_weights("auto", config) is None
        assert hw.resolve_head_weights("auto", config) is None
    warnings = [r for r in caplog.records if "no calibrated head weights" in r.getMessage()]
    assert len(warnings) == 1


def test_the_cache_resolves_auto_and_the_config_keeps_it() -> None:
    config = CompressionConfig(head_weights="auto", rank_allocation="pooled")
    model = build(LlamaForCausalLM, default_like_config())
    cache = ChunkedSVDCache.from_model(model, config)
    assert cache.compression_config.head_weights == SHIPPED[0].weights
    assert all(layer.store.plan.weights.head_weights == SHIPPED[0].weights for layer in cache.layers)
    assert config.head_weights == "auto"
    assert CompressionConfig.from_dict(config.to_dict()) == config
    other = ChunkedSVDCache.from_model(make_tiny_model("llama"), config)
    assert other.compression_config.head_weights is None


def test_auto_compresses_like_explicit_weights() -> None:
    model = build(LlamaForCausalLM, default_like_config())
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    base = dict(compression_ratio=0.125, chunk_size=64, residual_length=16, rank_allocation="pooled")
    square_roots = [[[w**0.5 for w in k], [w**0.5 for w in v]] for k, v in SHIPPED[0].weights]
    out = []
    for weights, power in (("auto", 1), (SHIPPED[0].weights, 1), (None, 1), ("auto", 0.5), (square_roots, 1)):
        config = CompressionConfig(**base, head_weights=weights, head_weights_power=power)
        cache = ChunkedSVDCache.from_model(model, config)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_kwarg_name(model): cache})
        cache.compress_all()
        out.append([[c.keys.ranks + c.values.ranks for c in layer.chunks] for layer in cache.layers])
    assert out[0] == out[1]
    assert out[0] != out[2]  # the weights move rank between heads
    assert out[3] == out[4]  # head_weights_power applies to the resolved weights
    assert out[3] not in (out[0], out[2])


# ---- files -------------------------------------------------------------------------------------------------


def test_a_calibrated_file_round_trips(calibrated_file) -> None:
    model, path, record = calibrated_file
    loaded = hw.load_head_weights_file(path)
    assert loaded.weights == record["head_weights"]
    assert loaded.model["names"] == ["tiny"] and loaded.model["num_hidden_layers"] == 2
    assert record["calibration"]["token_ranges"] == [[0, 96], [200, 296]]
    config = CompressionConfig(head_weights=str(path))
    assert config.head_weights == str(path)
    assert CompressionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    cache = ChunkedSVDCache.from_model(model, config)
    assert cache.compression_config.head_weights == record["head_weights"]


def test_a_file_for_another_model_is_refused(calibrated_file) -> None:
    _, path, _ = calibrated_file
    config = CompressionConfig(head_weights=str(path))
    with pytest.raises(ValueError, match=r"head_weights file .* another model: num_hidden_layers 2"):
        ChunkedSVDCache.from_model(build(LlamaForCausalLM, default_like_config()), config)


def _write(path, content) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", r"head_weights must be None \(all 1\), 'auto' .*, a path to a JSON file"),
        ("uniform", "head_weights: no head-weight file at 'uniform'"),
        ("{tmp}/missing.json", "head_weights: no head-weight file"),
        (5, r"head_weights must be None \(all 1\), 'auto' .*, a path to a JSON file"),
        ({"auto": True}, r"head_weights must be None \(all 1\), 'auto' .*, a path to a JSON file"),
        ("AUTO", "head_weights: no head-weight file"),
        ("not json", "head_weights file .* is not valid JSON"),
        ({"format": "other"}, "head_weights file .* is not a head-weight file"),
        ({"format": hw.FORMAT, "format_version": 2}, "head_weights file .* format_version 2"),
        ({"format": hw.FORMAT, "format_version": 1, "head_weights": [[[1.0], [1.0]]]}, "no 'model'"),
        (
            {"format": hw.FORMAT, "format_version": 1, "model": {}, "head_weights": [[[1.0], [0.0]]]},
            r"head_weights file .*: head_weights\[0\] value weights must be > 0",
        ),
        (
            {
                "format": hw.FORMAT,
                "format_version": 1,
                "model": {"num_hidden_layers": 2, "num_key_value_heads": 1},
                "head_weights": [[[1.0], [1.0]]],
            },
            r"head_weights file .*1 layers x 1 heads\) do not fit",
        ),
    ],
)
def test_bad_values_raise_naming_head_weights(value, message, tmp_path) -> None:
    if isinstance(value, str) and value.startswith("{tmp}"):
        value = value.format(tmp=tmp_path)
    elif value == "not json" or (isinstance(value, dict) and "format" in value):
        value = _write(tmp_path / "weights.json", value)
    with pytest.raises(ValueError, match=message):
        CompressionConfig(head_weights=value)


def test_auto_needs_a_model() -> None:
    with pytest.raises(ValueError, match="head_weights='auto' is resolved against a model"):
        ChunkedSVDCache(CompressionConfig(head_weights="auto"), num_layers=2)
    with pytest.raises(ValueError, match="head_weights needs head_mode='per_head'"):
        CompressionConfig(head_weights=[[[1.0], [1.0]]], head_mode="joined")


def test_auto_gives_joined_heads_no_weights() -> None:
    config = CompressionConfig(head_weights="auto", head_mode="joined")
    cache = ChunkedSVDCache.from_model(build(LlamaForCausalLM, default_like_config()), config)
    assert cache.compression_config.head_weights is None and config.head_weights == "auto"


def test_a_rewritten_file_is_read_again(calibrated_file, tmp_path) -> None:
    _, path, record = calibrated_file
    copy = tmp_path / "copy.json"
    atomic_write_json(copy, record)
    assert hw.load_head_weights_file(copy).weights == record["head_weights"]
    doubled = {**record, "head_weights": [[[2 * w for w in k], v] for k, v in record["head_weights"]]}
    atomic_write_json(copy, {**doubled, "note": "rewritten"})
    assert hw.load_head_weights_file(copy).weights == doubled["head_weights"]


@pytest.mark.slow
def test_auto_matches_the_real_default_model() -> None:
    from chunked_decomp.hf.loading import load_model_and_tokenizer
    from chunked_decomp.hf.models import cache_geometry

    model, _ = load_model_and_tokenizer()
    weights = hw.resolve_head_weights("auto", model.config)
    layers, kv_heads, _ = cache_geometry(model)
    assert weights == SHIPPED[0].weights
    assert len(weights) == layers and all(len(k) == len(v) == kv_heads for k, v in weights)
