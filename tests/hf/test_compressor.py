"""`ChunkedDecomp` wiring: no weight changes, fully undoable, the right cache in forward/generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertModel, DynamicCache

from chunked_decomp import ChunkedDecomp, ChunkedSVDCache, CompressionConfig
from chunked_decomp.hf.compressor import left_padding, parameter_count
from chunked_decomp.hf.models import cache_kwarg_name, output_cache
from tests.helpers.models import make_tiny_model, random_ids

PRESETS_FILE = Path(__file__).resolve().parents[2] / "configs" / "compression_configs.yaml"
SMALL = dict(chunk_size=8, residual_length=8, num_sink_tokens=2, quant_group_size=8)


@pytest.fixture
def llama():
    return make_tiny_model("llama")


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_name", ["llama", "qwen2", "gpt2"])
def test_compress_model_changes_no_parameter_and_restore_undoes_it(model_name) -> None:
    model = make_tiny_model(model_name)
    ids = random_ids(40, seed=1)
    before = _snapshot(model)
    count = parameter_count(model)
    with torch.no_grad():
        plain_logits = model(ids).logits
    plain_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)

    cd = ChunkedDecomp(compression_ratio=0.25, **SMALL)
    assert cd.compress_model(model) is model
    assert {"forward", "generate"} <= set(model.__dict__)
    model.generate(ids, max_new_tokens=8, do_sample=False)  # compresses chunks
    assert cd.memory_report()["compressed_tokens"] > 0
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert parameter_count(model) == count

    cd.restore(model)
    assert not {"forward", "generate", "_chunked_decomp_state"} & set(model.__dict__)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert torch.equal(out.logits, plain_logits)
    assert type(output_cache(out)) is DynamicCache
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), plain_tokens)


def test_applied_context_manager_restores_even_on_error(llama) -> None:
    cd = ChunkedDecomp(**SMALL)
    ids = random_ids(12)
    with cd.applied(llama) as m, torch.no_grad():
        assert m is llama
        assert isinstance(output_cache(llama(ids, use_cache=True)), ChunkedSVDCache)
    assert "forward" not in llama.__dict__
    with torch.no_grad():
        assert type(output_cache(llama(ids, use_cache=True))) is DynamicCache
    with pytest.raises(RuntimeError, match="boom"), cd.applied(llama):
        raise RuntimeError("boom")
    assert "forward" not in llama.__dict__ and "generate" not in llama.__dict__


def test_forward_with_use_cache_builds_a_chunked_cache(llama) -> None:
    cd = ChunkedDecomp(**SMALL)
    cd.compress_model(llama)
    ids = random_ids(30, seed=2)
    with torch.no_grad():
        out = llama(input_ids=ids, use_cache=True)
        assert isinstance(cd.last_cache, ChunkedSVDCache)
        assert output_cache(out) is cd.last_cache
        assert cd.last_cache.get_seq_length() == 30
        first = cd.last_cache
        # Positional input ids work too, and each call without a cache gets a fresh one.
        llama(ids, use_cache=True)
        assert cd.last_cache is not first
        # A cache passed in is used as is, not replaced.
        mine = DynamicCache(config=llama.config)
        out = llama(input_ids=ids, **{cache_kwarg_name(llama): mine}, use_cache=True)
        assert output_cache(out) is mine
        assert cd.last_cache is not mine
        # use_cache=False builds no cache.
        cd.last_cache = None
        llama(input_ids=ids, use_cache=False)
        assert cd.last_cache is None
    cd.restore(llama)


def test_forward_output_equals_the_original_while_nothing_is_compressed(llama) -> None:
    ids = random_ids(15, seed=3)
    with torch.no_grad():
        ref = llama(ids).logits
        with ChunkedDecomp(**SMALL).applied(llama):
            assert torch.equal(llama(ids, use_cache=True).logits, ref)


def test_wrapping_twice_is_refused(llama) -> None:
    cd = ChunkedDecomp(**SMALL)
    cd.compress_model(llama)
    with pytest.raises(ValueError, match="already wired"):
        cd.compress_model(llama)
    with pytest.raises(ValueError, match="already wired"):
        ChunkedDecomp(**SMALL).compress_model(llama)
    cd.restore(llama)
    cd.compress_model(llama)  # fine again after restore
    cd.restore(llama)
    cd.restore(llama)  # restoring twice is harmless


@pytest.mark.parametrize("model_cls", ["BertModel", "BertForMaskedLM"])
def test_encoder_only_bert_is_refused_with_the_reason(model_cls) -> None:
    model = make_tiny_model("bert")
    if model_cls == "BertModel":
        model = BertModel(BertConfig(**model.config.to_diff_dict()))
    with pytest.raises(ValueError, match="encoder-only") as err:
        ChunkedDecomp().compress_model(model)
    assert "key-value cache" in str(err.value) and model_cls in str(err.value)
    assert "forward" not in model.__dict__


def test_encoder_decoder_is_refused() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(
        T5Config(
            d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64, decoder_start_token_id=0
        )
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        ChunkedDecomp().compress_model(t5)


def test_non_transformers_module_is_refused() -> None:
    with pytest.raises(ValueError, match="PreTrainedModel"):
        ChunkedDecomp().compress_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("preset", sorted(yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))))
def test_every_yaml_preset_splats_into_chunked_decomp(preset) -> None:
    options = yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))[preset]
    cd = ChunkedDecomp(**options)
    assert cd.config == CompressionConfig.from_preset(preset)
    assert ChunkedDecomp.from_preset(preset).config == cd.config
    model = make_tiny_model("llama")
    ids = random_ids(2 * options["chunk_size"] + 10, seed=4)
    with cd.applied(model):
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    report = cd.memory_report()
    assert report["compressed_tokens"] > 0
    # Presets budget against a 16-bit cache even though the tiny model runs in float32: the compressed chunks
    # hold at most ratio x their float16 bytes (1 row x 2 KV heads x (16 + 16) x 2 bytes per token). On so short
    # a sequence the whole aged ratio is higher: the 4 float32 sinks cost 2x their float16 reference bytes.
    for layer in cd.last_cache.layers:
        chunk_bytes = sum(c.nbytes for c in layer.chunks)
        assert 0 < chunk_bytes <= options["compression_ratio"] * layer.compressed_length * 2 * 32 * 2


def test_memory_report_keys_and_values(llama) -> None:
    cd = ChunkedDecomp(compression_ratio=0.25, **SMALL)
    with pytest.raises(ValueError, match="no cache yet"):
        cd.memory_report()
    with cd.applied(llama):
        llama.generate(random_ids(80, seed=5), max_new_tokens=4, do_sample=False)
    report = cd.memory_report()
    expected = {
        "seq_length",
        "stored_bytes",
        "uncompressed_bytes",
        "reference_bytes",
        "ratio",
        "reference_ratio",
        "aged_ratio",
        "compressed_tokens",
        "exact_tokens",
        "per_layer",
        "compression_seconds",
    }
    assert expected <= set(report)
    assert report["seq_length"] == 83
    assert report["stored_bytes"] == cd.last_cache.memory_stats().stored_bytes
    assert report["ratio"] == pytest.approx(report["stored_bytes"] / report["uncompressed_bytes"])
    # float32 model, 2 layers x 2 KV heads x (16 + 16) x 4 bytes per token.
    assert report["uncompressed_bytes"] == 83 * 2 * 2 * 32 * 4
    assert len(report["per_layer"]) == 2
    assert report["compression_seconds"] > 0
    assert report["ratio"] < 1


def test_config_and_options_are_exclusive() -> None:
    with pytest.raises(ValueError, match="either config"):
        ChunkedDecomp(config=CompressionConfig(), chunk_size=8)
    with pytest.raises(ValueError, match="unknown compression option"):
        ChunkedDecomp(chunk_sise=8)


def test_left_padding_helper() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    assert left_padding(mask) == [2, 0, 1]
    assert left_padding(None) == []
