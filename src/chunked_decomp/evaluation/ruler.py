"""RULER-style long-context tasks, generated offline and deterministically, for any tokenizer.

The tasks, templates, answer prefixes and scoring follow NVIDIA's RULER (Hsieh et al. 2024, "RULER: What's the
Real Context Size of Your Long-Context Language Models?", github.com/NVIDIA/RULER, ``scripts/data/synthetic``) as
lm-evaluation-harness ports them (``lm_eval/tasks/ruler``):

* ``niah_*``: needles "One of the special magic {numbers} for {key} is: {value}." hidden in a haystack; the
  eight RULER variants (single needle over a repeated sentence or an essay, with number or UUID values; several
  keys, with the haystack made of distracting needles; several values; several queries).
* ``vt``: variable tracking, one chain of four hops (``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ...) in
  repeated noise, with one solved example in front; the answer is every variable of the chain.
* ``cwe``: common-word extraction: a numbered list of words where ten appear 30 times and the others 3 times
  (6 and 1 below 4,096 tokens), with one solved example in front; the answer is the ten common words.
* ``passkey``: the passkey task of :mod:`chunked_decomp.evaluation.passkey` (Mohtashami & Jaggi 2023), scored
  the same way.

Where RULER downloads data, this module uses the offline texts: the "essay" haystack is the Wikipedia text of
:func:`chunked_decomp.evaluation.data.load_texts` (RULER: Paul Graham's essays), and the words (keys, common
words) are lower-case words of that text (RULER: the ``wonderwords`` lists). Everything else is as RULER does
it, including the size of the haystack: the largest that keeps prompt + answer budget within the context
length, found by bisection on the number of haystack units.

Scoring is RULER's ``string_match_all``: the fraction of expected answers found, case-insensitively, in the
greedy output. A sample is a pure function of (task, tokenizer, context length, index, seed).
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chunked_decomp.evaluation.passkey import Tokenizer, build_passkey_prompt

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "Haystack",
    "TaskSample",
    "default_haystack",
    "make_sample",
    "postprocess",
    "string_match_all",
]

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {type_v} afterwards.\n{context}\nWhat are all the special magic {type_v} for {query} mentioned in "
    "the provided text? The special magic {type_v} for {query} mentioned in the provided text are"
)
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above. Answer: According to "
    # "assgined" is RULER's spelling: the prompt is kept as the models were evaluated on it.
    "the chain(s) of variable assignment in the text above, {num_v} variables are assgined the value {query}, "
    "they are:"
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list? Answer: "
    "The top 10 words that appear most often in the list are:"
)
#: RULER's 40 needle depths, in percent of the haystack's sentences.
DEPTHS = tuple(round(100 * i / 39) for i in range(40))


@dataclass(frozen=True)
class Haystack:
    """The offline material: ``words``, the essay text as whitespace-separated words; ``vocabulary``, distinct
    words for keys and word lists, in a fixed shuffled order."""

    words: tuple[str, ...]
    vocabulary: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> Haystack:
        words = tuple(re.sub(r"\s+", " ", text).strip().split(" "))
        vocabulary = sorted(set(re.findall(r"(?<![\w-])[a-z]{4,10}(?![\w-])", text)))
        random.Random(42).shuffle(vocabulary)
        if len(vocabulary) < 100:
            raise ValueError(f"the haystack text has {len(vocabulary)} distinct words; the tasks need >= 100")
        return cls(words, tuple(vocabulary))


@functools.cache
def default_haystack() -> Haystack:
    """The Wikipedia text (offline) as a :class:`Haystack`."""
    from chunked_decomp.evaluation.data import load_texts

    return Haystack.from_text(" ".join(load_texts("wikipedia")))


@dataclass(frozen=True)
class TaskSample:
    """One prompt of a task: ``input_ids`` (ends with RULER's answer prefix), the ``answers`` the output must
    contain, and the greedy tokens allowed (RULER's ``tokens_to_generate``, also reserved in the length).

    ``question_start``: where the question begins in ``input_ids``; the tokens before it are the context (the
    instruction and the haystack), those from it the question and the answer prefix (kvpress's split of a
    RULER sample into ``context`` and ``question``)."""

    task: str
    context_length: int
    index: int
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int
    question_start: int


# ---- scoring ------------------------------------------------------------------------------------------------


def postprocess(text: str) -> str:
    """RULER's ``postprocess_pred``: control characters to newlines, stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the fraction of ``answers`` in ``prediction``, ignoring case."""
    if not answers:
        raise ValueError("answers must not be empty")
    text = postprocess(prediction).lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


# ---- the generators: (rng, units) -> (prompt, answers); the same rng seed gives the same needles -------------


def _value(rng: random.Random, kind: str, haystack: Haystack) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(haystack.vocabulary)}-{rng.choice(haystack.vocabulary)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass(frozen=True)
class _Niah:
    """A RULER needle-in-a-haystack variant."""

    haystack: str  # "repeat" | "essay" | "needle"
    type_k: str = "words"
    type_v: str = "numbers"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1

    def __call__(self, rng: random.Random, units: int, hay: Haystack, offset: int) -> tuple[str, list[str]]:
        keys = [_value(rng, self.type_k, hay) for _ in range(max(self.num_k, self.num_q))]
        values = [[_value(rng, self.type_v, hay) for _ in range(self.num_v)] for _ in keys]
        needles = [
            NEEDLE.format(type_v=self.type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs
        ]
        rng.shuffle(needles)
        if self.haystack == "essay":
            words = hay.words[offset : offset + units]
            sentences = re.split(r"(?<=[.!?])\s+", " ".join(words))
            cuts = sorted(len(sentences) * d // 100 for d in rng.sample(DEPTHS, len(needles)))
            pieces, last = [], 0
            for cut, needle in zip(cuts, needles):
                pieces += [" ".join(sentences[last:cut]), needle]
                last = cut
            context = " ".join(p for p in pieces + [" ".join(sentences[last:])] if p)
        else:
            if self.haystack == "repeat":
                lines = [REPEAT] * units
            else:
                lines = [
                    NEEDLE.format(
                        type_v=self.type_v,
                        key=_value(rng, self.type_k, hay),
                        value=_value(rng, self.type_v, hay),
                    )
                    for _ in range(units)
                ]
            for index, needle in zip(
                sorted(rng.sample(range(units + 1), len(needles)), reverse=True), needles
            ):
                lines.insert(index, needle)
            context = "\n".join(lines)
        asked = rng.sample(range(len(keys)), self.num_q)
        queries = [keys[i] for i in asked]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, type_v = NIAH_TEMPLATE, self.type_v
        if self.num_q * self.num_v == 1:  # RULER's singular wording
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            type_v = type_v[:-1]
        return template.format(type_v=type_v, context=context, query=query), [
            v for i in asked for v in values[i]
        ]


def _vt_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99998)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain


def _vt_prompt(rng: random.Random, noises: int, hops: int, letters: int) -> tuple[str, list[str]]:
    names, chain = _vt_chain(rng, hops, letters)
    sentences = [REPEAT + "\n"] * noises
    positions = sorted(rng.sample(range(noises + 1), len(chain)))
    for j, (position, line) in enumerate(zip(positions, chain)):
        sentences.insert(position + j, line)
    context = " ".join(sentences).replace(". \n", ".\n")
    value = chain[0].split("=")[-1].strip()
    return VT_TEMPLATE.format(context=context, query=value, num_v=hops + 1), names


def _vt(rng: random.Random, units: int, hay: Haystack, offset: int) -> tuple[str, list[str]]:
    # RULER's one solved example: three-letter names, about 500 tokens (20 noise lines).
    example, example_names = _vt_prompt(random.Random(rng.random()), 20, 4, 3)
    prompt, names = _vt_prompt(rng, units, 4, 5)
    return f"{example} {' '.join(example_names)}\n\n{prompt}", names


def _cwe_list(
    rng: random.Random, hay: Haystack, n_words: int, common: int, rare: int
) -> tuple[str, list[str]]:
    words = rng.sample(hay.vocabulary, min(n_words, len(hay.vocabulary)))
    top, others = words[:10], words[10:]
    listed = top * common + others * rare
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top


def _cwe(long: bool) -> Callable[[random.Random, int, Haystack, int], tuple[str, list[str]]]:
    def make(rng: random.Random, units: int, hay: Haystack, offset: int) -> tuple[str, list[str]]:
        example_args, args = ((40, 10, 3), (30, 3)) if long else ((20, 3, 1), (6, 1))
        example_ctx, example_top = _cwe_list(rng, hay, *example_args)
        context, top = _cwe_list(rng, hay, units + 10, *args)
        example = (
            CWE_TEMPLATE.format(context=example_ctx)
            + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_top))
        )
        return f"{example}\n{CWE_TEMPLATE.format(context=context)}", top

    return make


@dataclass(frozen=True)
class _Task:
    make: Callable[..., tuple[str, list[str]]] | None  # None: passkey, built at the token level
    max_new_tokens: int
    max_units: Callable[[Haystack, int], int]


def _by_length(hay: Haystack, length: int) -> int:
    return length


def _by_words(hay: Haystack, length: int) -> int:
    return min(2 * length, len(hay.words))  # an essay word is at least half a token


TASKS: dict[str, _Task] = {
    "niah_single_1": _Task(_Niah("repeat"), 128, _by_length),
    "niah_single_2": _Task(_Niah("essay"), 128, _by_words),
    "niah_single_3": _Task(_Niah("essay", type_v="uuids"), 128, _by_words),
    "niah_multikey_1": _Task(_Niah("essay", num_k=4), 128, _by_words),
    "niah_multikey_2": _Task(_Niah("needle"), 128, _by_length),
    "niah_multikey_3": _Task(_Niah("needle", type_k="uuids", type_v="uuids"), 128, _by_length),
    "niah_multivalue": _Task(_Niah("essay", num_v=4), 128, _by_words),
    "niah_multiquery": _Task(_Niah("essay", num_q=4), 128, _by_words),
    "vt": _Task(_vt, 30, _by_length),
    "cwe": _Task(None, 120, lambda h, n: min(n, len(h.vocabulary) - 10)),  # generator chosen by length
    "passkey": _Task(None, 16, _by_length),
}
#: The tasks a run takes unless told: one of each kind the issue names (single needle, several keys, several
#: values, variable tracking, common words, passkey).
DEFAULT_TASKS = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "cwe", "passkey")


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def make_sample(
    task: str,
    tokenizer: Tokenizer,
    context_length: int,
    index: int,
    seed: int = 0,
    haystack: Haystack | None = None,
    max_new_tokens: int | None = None,
) -> TaskSample:
    """Sample ``index`` of ``task`` at ``context_length`` tokens (prompt + ``max_new_tokens``, RULER's
    ``max_seq_length``): the largest haystack that fits. ``max_new_tokens`` defaults to RULER's budget for the
    task. The same arguments give the same sample, whatever else ran before."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    spec = TASKS[task]
    new_tokens = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    if new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {new_tokens}")
    budget = context_length - new_tokens
    sample_seed = f"{seed}:{task}:{context_length}:{index}"
    if task == "passkey":
        rng = random.Random(sample_seed)
        prompt = build_passkey_prompt(tokenizer, budget, rng.random(), rng.randint(10000, 99999))
        ids = tuple(prompt.input_ids.tolist())
        return TaskSample(task, context_length, index, ids, (prompt.passkey,), new_tokens, prompt.filler_end)
    hay = haystack or default_haystack()
    make = _cwe(context_length >= 4096) if task == "cwe" else spec.make
    offset = random.Random(sample_seed + ":offset").randrange(max(1, len(hay.words) - 2 * context_length))

    def build(units: int) -> tuple[list[int], list[str], str]:
        text, answers = make(random.Random(sample_seed), units, hay, offset)
        text = text.rstrip()
        return _encode(tokenizer, text), answers, text

    lo = 8  # enough lines for every needle and chain link
    hi = max(lo, spec.max_units(hay, context_length))
    ids, answers, _ = build(lo)
    if len(ids) > budget:
        raise ValueError(
            f"context_length {context_length} is too short for task {task!r}: its smallest prompt has "
            f"{len(ids)} tokens plus {new_tokens} to generate"
        )
    while lo < hi:  # the largest haystack within the budget (token counts grow with the units)
        mid = (lo + hi + 1) // 2
        if len(build(mid)[0]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    ids, answers, text = build(lo)
    return TaskSample(
        task,
        context_length,
        index,
        tuple(ids),
        tuple(answers),
        new_tokens,
        _question_start(tokenizer, ids, text),
    )


def _question_start(tokenizer: Tokenizer, ids: list[int], text: str) -> int:
    """The first token of the question: every template puts it after the context's last line break, and a token
    that spans the break belongs to the question."""
    context = _encode(tokenizer, text[: text.rindex("\n")])
    start = 0
    while start < min(len(context), len(ids)) and context[start] == ids[start]:
        start += 1
    return start
