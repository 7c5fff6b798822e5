"""Passkey retrieval: prompt construction and the decode protocol."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from transformers import LlamaForCausalLM

from chunked_decomp.evaluation.methods import FullCache, method_from_spec
from chunked_decomp.evaluation.passkey import (
    build_passkey_prompt,
    extract_passkey,
    greedy_decode,
    passkey_accuracy,
)
from tests.helpers.models import make_tiny_model


class CharTokenizer:
    """One token per ASCII character: enough to test prompt layout without a download."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 128 for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return make_tiny_model("llama")


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_puts_the_needle_at_the_depth(tokenizer, depth):
    prompt = build_passkey_prompt(tokenizer, length=1000, depth=depth, passkey=12345)
    assert prompt.input_ids.shape == (1000,)
    text = tokenizer.decode(prompt.input_ids.tolist())
    needle = tokenizer.decode(prompt.input_ids[prompt.needle_start : prompt.needle_end].tolist())
    assert needle == "The pass key is 12345. Remember it. 12345 is the pass key. "
    assert text.count("12345") == 2
    assert text.endswith("What is the pass key? The pass key is")
    n_filler = (prompt.filler_end - prompt.filler_start) - (prompt.needle_end - prompt.needle_start)
    assert abs(prompt.actual_depth - depth) <= 1 / n_filler
    # the filler before the needle is the requested share of all filler
    assert prompt.needle_start - prompt.filler_start == round(depth * n_filler)


def test_prompt_validates(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(tokenizer, 1000, 1.5, 12345)
    with pytest.raises(ValueError, match="too short"):
        build_passkey_prompt(tokenizer, 50, 0.5, 12345)


def test_extract_passkey():
    assert extract_passkey(" 48213. Remember") == "48213"
    assert extract_passkey("no digits") is None


def test_greedy_decode_matches_uncached_argmax(model):
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    decoded = greedy_decode(model, FullCache(), ids, max_new_tokens=5)
    sequence = ids.tolist()
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=torch.tensor([sequence])).logits[0, -1]
            sequence.append(int(logits.argmax()))
    assert decoded == sequence[40:]


@pytest.mark.parametrize("spec", ["full", "quanto4", "chunked:balanced@0.25"])
def test_passkey_protocol_runs(model, tokenizer, spec):
    method = method_from_spec(spec)
    result = passkey_accuracy(
        model,
        tokenizer,
        method,
        lengths=(300, 400),
        depths=(0.0, 0.5, 1.0),
        trials_per_cell=2,
        max_new_tokens=6,
    )
    assert result.n_trials == len(result.trials) == 12
    # The scores are what the trials say: each trial's answer is the passkey or not, and the accuracies are the
    # fractions of correct trials overall, per length and per depth.
    assert all(t["correct"] == (extract_passkey(t["output"]) == t["passkey"]) for t in result.trials)
    assert result.accuracy == sum(t["correct"] for t in result.trials) / 12
    for n in (300, 400):
        rows = [t for t in result.trials if t["length"] == n]
        assert result.by_length[n] == sum(t["correct"] for t in rows) / len(rows)
    for d in (0.0, 0.5, 1.0):
        rows = [t for t in result.trials if t["depth"] == d]
        assert result.by_depth[d] == sum(t["correct"] for t in rows) / len(rows)
    again = passkey_accuracy(
        model,
        tokenizer,
        FullCache(),
        lengths=(300, 400),
        depths=(0.0, 0.5, 1.0),
        trials_per_cell=2,
        max_new_tokens=6,
    )
    # seeded: every method sees the same passkeys
    assert [t["passkey"] for t in result.trials] == [t["passkey"] for t in again.trials]
    assert all(len(t["passkey"]) == 5 for t in result.trials)


@pytest.mark.slow
def test_real_model_finds_the_passkey_uncompressed():
    from chunked_decomp.hf.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    result = passkey_accuracy(model, tokenizer, FullCache(), lengths=(1024,), depths=(0.25, 0.75))
    assert result.accuracy == 1.0, result.trials


def test_decoding_stops_when_the_number_ends(tokenizer):
    from chunked_decomp.evaluation.passkey import _number_finished

    stop = _number_finished(tokenizer, 5)
    assert not stop(tokenizer.encode(" 1234"))
    assert not stop(tokenizer.encode(" 12345"))  # a sixth digit would make it wrong: look one further
    assert stop(tokenizer.encode(" 12345."))
    assert stop(tokenizer.encode(" 123456"))
    assert not stop(tokenizer.encode(" the"))
