"""`CompressionConfig`: validation names the field, round trips, presets and the debug switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chunked_decomp.config import CompressionConfig, load_presets, presets_path

REPO_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "compression_configs.yaml"

# (field, bad value) -> the message must name the field.
BAD_VALUES = [
    ("compression_ratio", 0),
    ("compression_ratio", -0.25),
    ("compression_ratio", 1.01),
    ("compression_ratio", float("nan")),
    ("compression_ratio", float("inf")),
    ("compression_ratio", "0.5"),
    ("compression_ratio", True),
    ("reference_dtype", "float64"),
    ("reference_dtype", "fp16"),
    ("chunk_size", 0),
    ("chunk_size", -8),
    ("chunk_size", 3),
    ("chunk_size", 16.0),
    ("chunk_size", True),
    ("residual_length", -1),
    ("residual_length", 2.5),
    ("num_sink_tokens", -1),
    ("target_rank", 0),
    ("target_rank", -3),
    ("target_rank", 2.0),
    ("min_rank_ratio", -0.01),
    ("min_rank_ratio", 1.5),
    ("min_rank_ratio", None),
    ("head_mode", "both"),
    ("key_budget_share", 0.0),
    ("key_budget_share", 1.0),
    ("factorizer", "qr"),
    ("quantization_bits", 3),
    ("quantization_bits", 16),
    ("quantization_bits", True),
    ("basis_bits", 1),
    ("quant_group_size", 4),
    ("quant_group_size", 0),
    ("factor_dtype", "float64"),
    ("factor_dtype", None),
    ("dynamic_chunking", "yes"),
    ("use_low_rank_approximation", 1),
    ("adaptive_rank", None),
    ("compress_keys_pre_rope", "false"),
    ("use_fast_svd", 0),
    ("use_quantization", "true"),
    ("parallel_processing", 2),
    ("debug", "on"),
    ("rank_allocation", "global"),
    ("rank_allocation", None),
    ("head_weights", []),
    ("head_weights", [[1.0, 1.0]]),
    ("head_weights", [[[1.0], [1.0, 2.0]]]),
    ("head_weights", [[[1.0], [0.0]]]),
    ("head_weights", [[[1.0], [float("nan")]]]),
    ("head_weights", [[[1.0], [1.0]], [[1.0, 1.0], [1.0, 1.0]]]),
    ("head_weights", "uniform"),
    ("head_weights_power", 0),
    ("head_weights_power", -0.5),
    ("head_weights_power", float("nan")),
    ("head_weights_power", "half"),
]


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_each_bad_value_raises_value_error_naming_the_field(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        CompressionConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("compression_ratio", 1.0),
        ("compression_ratio", 1e-3),
        ("chunk_size", 4),
        ("residual_length", 0),
        ("num_sink_tokens", 0),
        ("min_rank_ratio", 0.0),
        ("min_rank_ratio", 1.0),
        ("target_rank", 1),
        ("reference_dtype", "bfloat16"),
        ("quantization_bits", 2),
        ("basis_bits", 4),
        ("quant_group_size", 8),
    ],
)
def test_boundary_values_are_accepted(field, value) -> None:
    assert getattr(CompressionConfig(**{field: value}), field) == value


def test_integer_ratio_is_stored_as_float() -> None:
    assert CompressionConfig(compression_ratio=1).compression_ratio == 1.0
    assert isinstance(CompressionConfig(compression_ratio=1).compression_ratio, float)


def test_gradient_checkpointing_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="enable_gradient_checkpointing") as err:
        CompressionConfig(enable_gradient_checkpointing=True)
    assert "inference" in str(err.value) and "gradient_checkpointing_enable" in str(err.value)


def test_inconsistent_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="use_low_rank_approximation"):
        CompressionConfig(use_low_rank_approximation=False, use_quantization=False)
    with pytest.raises(ValueError, match="target_rank"):
        CompressionConfig(use_low_rank_approximation=False, target_rank=4)
    for extra in ({"adaptive_rank": False}, {"target_rank": 4}):
        with pytest.raises(ValueError, match="rank_allocation"):
            CompressionConfig(rank_allocation="pooled", **extra)
    with pytest.raises(ValueError, match="head_weights"):
        CompressionConfig(head_weights=[[[1.0], [1.0]]], head_mode="joined")


def test_head_weights_round_trip_as_nested_lists() -> None:
    cfg = CompressionConfig(rank_allocation="pooled", head_weights=(((1, 2.5), (0.5, 1)),))
    assert cfg.head_weights == [[[1.0, 2.5], [0.5, 1.0]]]
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg


def test_resolved_factorizer() -> None:
    assert CompressionConfig().resolved_factorizer == "gram"
    assert CompressionConfig(use_fast_svd=False).resolved_factorizer == "exact"
    assert CompressionConfig(use_fast_svd=False, factorizer="randomized").resolved_factorizer == "randomized"


def test_round_trip_through_dict_and_yaml() -> None:
    cfg = CompressionConfig(
        compression_ratio=0.3,
        reference_dtype="float16",
        chunk_size=32,
        head_mode="joined",
        target_rank=5,
        quantization_bits=2,
        factorizer="randomized",
        dynamic_chunking=True,
    )
    d = cfg.to_dict()
    assert d["compression_ratio"] == 0.3 and d["head_mode"] == "joined" and d["target_rank"] == 5
    assert CompressionConfig.from_dict(d) == cfg
    assert CompressionConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    assert CompressionConfig.from_dict({}) == CompressionConfig()


def test_unknown_keys_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="compresion_ratio") as err:
        CompressionConfig.from_dict({"compresion_ratio": 0.5})
    assert "compression_ratio" in str(err.value)  # the list of known options
    with pytest.raises(ValueError, match="mapping"):
        CompressionConfig.from_dict([("compression_ratio", 0.5)])


def test_every_preset_loads_and_round_trips() -> None:
    presets = load_presets()
    assert {"conservative", "balanced", "aggressive", "small_model", "large_model"} <= set(presets)
    for name, values in presets.items():
        cfg = CompressionConfig.from_preset(name)
        for key, value in values.items():
            assert getattr(cfg, key) == value, (name, key)
        assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    assert CompressionConfig.from_preset("balanced", chunk_size=16).chunk_size == 16


def test_packaged_presets_match_the_repository_file() -> None:
    assert load_presets(REPO_PRESETS) == load_presets(presets_path())


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown preset 'turbo'") as err:
        CompressionConfig.from_preset("turbo")
    for name in ("balanced", "aggressive", "conservative"):
        assert name in str(err.value)


def test_malformed_yaml_names_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("balanced:\n  compression_ratio: [0.25\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid YAML") as err:
        CompressionConfig.from_preset("balanced", path=bad)
    assert "bad.yaml" in str(err.value)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must map preset names"):
        load_presets(bad)


def test_invalid_preset_names_the_preset_and_the_field(tmp_path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("mine:\n  compression_ratio: 2.0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="preset 'mine'.*compression_ratio"):
        load_presets(bad)


def test_missing_presets_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot read presets file"):
        load_presets(tmp_path / "absent.yaml")


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_debug_environment_variable(monkeypatch, value, expected) -> None:
    monkeypatch.setenv("CHUNKED_DECOMP_DEBUG", value)
    assert CompressionConfig().debug is expected
    assert CompressionConfig(debug=True).debug is True


def test_parse_overrides_reads_yaml_values_and_names_a_bad_item() -> None:
    from chunked_decomp.config import parse_overrides

    got = parse_overrides(
        ["rank_allocation=pooled", "key_weight=2.5", "chunk_size=128", "head_weights=[[[1, 2]]]"]
    )
    assert got == {
        "rank_allocation": "pooled",
        "key_weight": 2.5,
        "chunk_size": 128,
        "head_weights": [[[1, 2]]],
    }
    assert (
        CompressionConfig.from_preset("aggressive", **parse_overrides(["chunk_size=128"])).chunk_size == 128
    )
    for bad in ("chunk_size", "=3"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_overrides([bad])


def test_factorizer_for_device_prefers_matrix_products_on_cuda() -> None:
    assert CompressionConfig().factorizer_for("cpu") == "gram"
    assert CompressionConfig().factorizer_for("cuda") == "subspace"
    assert CompressionConfig(factorizer="gram").factorizer_for("cuda") == "gram"
    assert CompressionConfig(use_fast_svd=False).factorizer_for("cuda") == "exact"
