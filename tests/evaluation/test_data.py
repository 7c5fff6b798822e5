"""Tests of the evaluation text sources (offline Wikipedia and pydoc, text files, hub fallbacks)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from chunked_decomp.evaluation.data import (
    DATASETS,
    DatasetUnavailableError,
    load_texts,
    load_token_ids,
)

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in-process: one id per word of WORDS, "\\n" and "[UNK]"."""
    vocab = {"[UNK]": 0, "<eos>": 1, "\n": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")


# ---------------------------------------------------------------- names


def test_datasets_lists_offline_and_hub_names() -> None:
    assert DATASETS[:3] == ("wikipedia", "python", "pydoc")
    assert {"wikitext", "wikitext-2-raw-v1"} <= set(DATASETS)


@pytest.mark.parametrize("name", ["c4", "", "wiki pedia"])
def test_unknown_dataset_name_lists_the_allowed_ones(name: str) -> None:
    with pytest.raises(ValueError, match=r"dataset_name must be one of .*'wikipedia'.*'pydoc'"):
        load_texts(name)


@pytest.mark.parametrize("num_samples", [0, -3, 1.5, True, "2"])
def test_num_samples_must_be_positive_int(num_samples: object) -> None:
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        load_texts("pydoc", num_samples=num_samples)  # type: ignore[arg-type]


@pytest.mark.parametrize("min_chars", [-1, 2.0, None])
def test_min_chars_must_be_non_negative_int(min_chars: object) -> None:
    with pytest.raises(ValueError, match="min_chars must be an int >= 0"):
        load_texts("pydoc", min_chars=min_chars)  # type: ignore[arg-type]


# ---------------------------------------------------------------- wikipedia


def test_wikipedia_articles_are_clean_prose() -> None:
    texts = load_texts()
    assert len(texts) >= 80
    assert texts[0].startswith("Anarchism is a political philosophy")
    joined = "\n".join(texts)
    for name in ("Autism", "Aristotle", "Apollo 11", "Albert Einstein"):
        assert name in joined
    # What filter_wiki leaves behind must be gone: redirects, bold/italic quotes, headings, lists.
    for residue in ("#REDIRECT", "'''", "[[", "{{", "\n==", "\n*", "()"):
        assert residue not in joined, residue
    assert min(len(t) for t in texts) >= 500
    assert sum(len(t) for t in texts) > 2_000_000


def test_wikipedia_is_cached_and_callers_cannot_change_the_cache() -> None:
    first = load_texts("Wikipedia")
    first.clear()
    second = load_texts("wikipedia")
    assert len(second) >= 80


def test_num_samples_and_min_chars_select_in_order() -> None:
    everything = load_texts("wikipedia", min_chars=0)
    default = load_texts("wikipedia")
    assert len(everything) > len(default)
    assert load_texts("wikipedia", num_samples=3) == default[:3]
    long_only = load_texts("wikipedia", min_chars=50_000)
    assert long_only and all(len(t) >= 50_000 for t in long_only)
    assert long_only == [t for t in default if len(t) >= 50_000]


def test_too_strict_min_chars_is_an_error_that_says_so() -> None:
    with pytest.raises(ValueError, match="no sample with at least min_chars=10000000"):
        load_texts("wikipedia", min_chars=10_000_000)


# ---------------------------------------------------------------- pydoc


def test_pydoc_topics_are_prose_without_headings_or_code() -> None:
    texts = load_texts("pydoc")
    assert len(texts) >= 40
    joined = "\n".join(texts)
    assert "An assignment statement evaluates the expression list" in joined
    assert "*****" not in joined
    assert "assignment_stmt ::=" not in joined  # grammar blocks are indented code


# ---------------------------------------------------------------- text files


def test_text_file_is_split_on_blank_lines(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("first block\nstill first\r\n\r\nsecond\n   \n\n\nthird é\n".encode())
    assert load_texts(text_file=path, min_chars=0) == ["first block\nstill first", "second", "third é"]
    assert load_texts(text_file=str(path), min_chars=8) == ["first block\nstill first"]
    assert load_texts(text_file=path, min_chars=0, num_samples=2) == ["first block\nstill first", "second"]


def test_text_file_overrides_dataset_name(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("only text here", encoding="utf-8")
    assert load_texts("pydoc", text_file=path, min_chars=0) == ["only text here"]


def test_text_file_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="text_file='.*missing.txt' does not exist"):
        load_texts(text_file=tmp_path / "missing.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_texts(text_file=blank)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_texts(text_file=latin1)
    with pytest.raises(ValueError, match="non-file"):
        load_texts(text_file=tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("tiny\n\ntext", encoding="utf-8")
    with pytest.raises(ValueError, match="no sample with at least min_chars=500"):
        load_texts(text_file=short)


# ---------------------------------------------------------------- hub datasets


def test_wikitext_without_datasets_names_offline_alternatives(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DatasetUnavailableError, match="not installed") as info:
        load_texts("wikitext")
    message = str(info.value)
    for alternative in ("'wikipedia'", "'pydoc'", "text_file"):
        assert alternative in message
    assert isinstance(info.value.__cause__, ImportError)


def test_wikitext_with_unreachable_hub_is_a_clear_error(monkeypatch) -> None:
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DatasetUnavailableError, match="hub may be unreachable.*'wikipedia'") as info:
        load_texts("wikitext-2-raw-v1")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_wikitext_rows_are_grouped_into_articles(monkeypatch) -> None:
    rows = ["", " = Alpha = \n", "", " alpha text . \n", " = = Section = = \n", " more alpha . \n"]
    rows += [" = Beta = \n", " beta text . \n"]
    calls = []

    def load_dataset(path: str, name: str, split: str) -> dict[str, list[str]]:
        calls.append((path, name, split))
        return {"text": rows}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    texts = load_texts("WikiText", min_chars=0)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert texts == [
        "= Alpha = \n\n alpha text . \n = = Section = = \n more alpha .",
        "= Beta = \n beta text .",
    ]


# ---------------------------------------------------------------- token ids


def test_token_ids_join_texts_with_blank_lines_without_special_tokens() -> None:
    tok = tiny_tokenizer()
    ids = load_token_ids(tok, ["the cat sat", "a dog ran"])
    assert ids.dtype == torch.long and ids.dim() == 1
    words = {w: i + 3 for i, w in enumerate(WORDS)}
    expected = [words["the"], words["cat"], words["sat"], 2, 2, words["a"], words["dog"], words["ran"]]
    assert ids.tolist() == expected


def test_min_tokens_names_how_many_were_available() -> None:
    tok = tiny_tokenizer()
    assert load_token_ids(tok, ["the cat sat"], min_tokens=3).numel() == 3
    with pytest.raises(ValueError, match="min_tokens=4 not reached.*only 3 tokens"):
        load_token_ids(tok, ["the cat sat"], min_tokens=4)


@pytest.mark.parametrize("texts", [[], "the cat", ["the", 3], None])
def test_token_ids_reject_bad_texts(texts: object) -> None:
    with pytest.raises(ValueError, match="texts must be a non-empty list of str"):
        load_token_ids(tiny_tokenizer(), texts)  # type: ignore[arg-type]


@pytest.mark.parametrize("min_tokens", [0, -1, 2.5, True])
def test_min_tokens_must_be_positive_int(min_tokens: object) -> None:
    with pytest.raises(ValueError, match="min_tokens must be a positive int"):
        load_token_ids(tiny_tokenizer(), ["the cat"], min_tokens=min_tokens)  # type: ignore[arg-type]


def test_python_text_is_the_listed_packages_sources_without_tests() -> None:
    import json
    import os

    from chunked_decomp.evaluation.data import PYTHON_PACKAGES

    samples = load_texts("python", min_chars=0)
    json_dir = os.path.dirname(json.__file__)
    first = sorted(f for f in os.listdir(json_dir) if f.endswith(".py"))[0]
    with open(os.path.join(json_dir, first), encoding="utf-8") as fh:
        assert samples[0] == fh.read().strip()  # the first package's first file, as written
    assert PYTHON_PACKAGES[0] == "json" and len(samples) > 100
    assert not any("import unittest.mock" in s and "class Test" in s for s in samples[:5])
