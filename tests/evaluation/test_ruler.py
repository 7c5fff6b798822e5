"""RULER-style tasks: prompts fill the context, hold their answers, are deterministic; scoring as RULER's."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import pytest

from chunked_decomp.evaluation.longctx import SOLVED, summarize
from chunked_decomp.evaluation.ruler import (
    DEFAULT_TASKS,
    TASKS,
    Haystack,
    make_sample,
    string_match_all,
)

SYLLABLES = ("ka", "lo", "mi", "nu", "pe", "ra", "su", "ti", "vo", "ze")
WORDS = [a + b + c + d for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES for d in "nr"]  # 2,000 words
TEXT = " ".join(
    f"The {WORDS[i]} of the {WORDS[-i - 1]} was seen near the river in spring." for i in range(2000)
)


class WordTokenizer:
    """One token per word, punctuation mark or whitespace run; ids assigned on first sight (deterministic)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.pieces: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = []
        for piece in re.findall(r"\w+|[^\w\s]|\s+", text):
            if piece not in self.ids:
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            out.append(self.ids[piece])
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids)


@pytest.fixture(scope="module")
def haystack() -> Haystack:
    return Haystack.from_text(TEXT)


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer()


EXPECTED_ANSWERS = {"niah_multivalue": 4, "niah_multiquery": 4, "vt": 5, "cwe": 10}


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [2048, 4096])
def test_prompt_fills_the_context_and_holds_its_answers(task, length, tokenizer, haystack):
    sample = make_sample(task, tokenizer, length, index=3, seed=1, haystack=haystack)
    budget = length - sample.max_new_tokens
    assert sample.max_new_tokens == TASKS[task].max_new_tokens
    assert len(sample.input_ids) <= budget
    assert len(sample.input_ids) >= 0.9 * budget  # the haystack grows until the next unit would not fit
    assert len(sample.answers) == EXPECTED_ANSWERS.get(task, 1)
    # kvpress's split: the context holds every answer, the question is the template's last line.
    context = tokenizer.decode(sample.input_ids[: sample.question_start])
    question = tokenizer.decode(sample.input_ids[sample.question_start :])
    for answer in sample.answers:
        assert answer in context
    asked = question.lstrip("\n")  # a token spanning the line break belongs to the question
    assert question[0] == "\n" and asked.startswith(("What ", "Question: ")) and "\n" not in asked, question
    assert len(question) < 400
    again = make_sample(task, tokenizer, length, index=3, seed=1, haystack=haystack)
    assert again == sample
    other = make_sample(task, tokenizer, length, index=4, seed=1, haystack=haystack)
    assert other.input_ids != sample.input_ids


def test_needle_sentences_follow_ruler(tokenizer, haystack):
    sample = make_sample("niah_multikey_1", tokenizer, 2048, 0, haystack=haystack)
    text = tokenizer.decode(sample.input_ids)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", text)
    assert len(needles) == 4  # four keys, one asked
    asked = dict(needles)
    query = re.search(r"The special magic number for (\S+) mentioned in the provided text is$", text).group(1)
    assert asked[query] == sample.answers[0]


def test_variable_chain_leads_to_the_value(tokenizer, haystack):
    sample = make_sample("vt", tokenizer, 2048, 0, haystack=haystack)
    text = tokenizer.decode(sample.input_ids)
    main = text.rsplit("Memorize and track", 1)[1]  # after the solved example
    value = re.search(r"assigned the value (\d+) in the text above", main).group(1)
    first, *rest = sample.answers
    assert f"VAR {first} = {value}" in main
    for before, after in zip(sample.answers, rest):
        assert f"VAR {after} = VAR {before}" in main


@pytest.mark.parametrize(("length", "common", "rare"), [(2048, 6, 1), (4096, 30, 3)])
def test_common_words_are_the_most_common(length, common, rare, tokenizer, haystack):
    sample = make_sample("cwe", tokenizer, length, 0, haystack=haystack)
    text = tokenizer.decode(sample.input_ids)
    listed = text.rsplit("Below is a numbered list of words.", 1)[1]
    counts = Counter(re.findall(r"\d+\. (\w+)", listed.split("Question:")[0]))
    assert {counts[w] for w in sample.answers} == {common}
    assert set(counts.values()) == {common, rare}


def test_string_match_all_is_rulers():
    assert string_match_all("The numbers are 123 and 789.", ["123", "456"]) == 0.5
    assert string_match_all("  ABC-def\x01 ", ["abc-DEF"]) == 1.0
    assert string_match_all("nothing", ["1"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        string_match_all("x", [])


def test_bad_input_is_refused(tokenizer, haystack):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_sample("nope", tokenizer, 4096, 0, haystack=haystack)
    with pytest.raises(ValueError, match="context_length 160 is too short for task 'cwe'"):
        make_sample("cwe", tokenizer, 160, 0, haystack=haystack)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_sample("vt", tokenizer, 4096, 0, haystack=haystack, max_new_tokens=0)
    assert set(DEFAULT_TASKS) <= set(TASKS)


def test_summary_reads_each_method_against_the_uncompressed_score_on_the_same_samples():
    def rec(task, method, index, score, ratio=1.0):
        return {"task": task, "context_length": 4096, "method": method, "index": index, "score": score,
                "ratio": ratio, "stored_bytes": 100 * ratio, "prompt_tokens": 4000, "seconds": 1.0}  # fmt: skip

    records = [
        rec("a", "full", 0, 1.0), rec("a", "full", 1, 0.5), rec("a", "full", 2, 0.0),
        rec("a", "x", 0, 1.0, 0.3), rec("a", "x", 1, 0.0, 0.3),  # sample 2 not run for x
        rec("b", "full", 0, 0.25), rec("b", "x", 0, 0.25, 0.3),
    ]  # fmt: skip
    rows = {(r["task"], r["method"]): r for r in summarize(records)}
    x = rows[("a", "x")]
    assert x["score"] == 0.5 and x["reference_score"] == 0.75 and x["score_delta"] == -0.25
    assert x["num_samples"] == 2 and x["ratio"] == pytest.approx(0.3) and x["solved_by_reference"]
    assert rows[("a", "full")]["reference_score"] == 0.5
    assert rows[("b", "x")]["solved_by_reference"] is False and SOLVED > 0.25
