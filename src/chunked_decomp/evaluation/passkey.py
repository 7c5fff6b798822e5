"""Passkey retrieval with a method's cache in the path (Mohtashami & Jaggi 2023, "Landmark Attention").

A random 5-digit number is hidden at a relative depth in filler text of a given length and asked for at the
end. The prompt is prefilled through the method (so the needle sits in the compressed context), then the answer
is decoded greedily one token at a time on top of that cache, at explicit positions.

The prompt is built at the token level, so its length and the needle's depth are exact: the pieces (intro,
filler unit, needle sentence, question) are tokenised once each and concatenated.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from chunked_decomp.evaluation.methods import KVMethod, PrefilledContext, forward_with_cache

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    # No special tokens: the GGUF tokenizer on transformers 5.2 adds a stray leading token otherwise.
    return list(tokenizer.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey prompt.

    input_ids: ``(length,)`` token ids; passkey: the hidden number as text; needle_start / needle_end: token span
    of the needle sentence; filler_start / filler_end: token span of the filler around it (the needle included);
    depth: the requested relative depth in [0, 1].
    """

    input_ids: torch.Tensor
    passkey: str
    depth: float
    needle_start: int
    needle_end: int
    filler_start: int
    filler_end: int

    @property
    def actual_depth(self) -> float:
        """Filler tokens before the needle ÷ all filler tokens."""
        filler = (self.filler_end - self.filler_start) - (self.needle_end - self.needle_start)
        return (self.needle_start - self.filler_start) / filler if filler else 0.0


def build_passkey_prompt(
    tokenizer: Tokenizer,
    length: int,
    depth: float,
    passkey: str | int,
    filler: str = FILLER,
) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens with ``passkey`` after ``round(depth * n_filler)`` of its
    ``n_filler`` filler tokens (``depth`` in [0, 1]: 0 = right after the intro, 1 = right before the question).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    intro = _encode(tokenizer, INTRO)
    needle = _encode(tokenizer, NEEDLE.format(key=passkey))
    question = _encode(tokenizer, QUESTION)
    unit = _encode(tokenizer, filler)
    n_filler = length - len(intro) - len(needle) - len(question)
    if n_filler < 0 or not unit:
        raise ValueError(
            f"length {length} is too short for the passkey prompt (needs > {length - n_filler} tokens)"
        )
    filler_ids = (unit * (n_filler // len(unit) + 1))[:n_filler]
    before = round(depth * n_filler)
    ids = intro + filler_ids[:before] + needle + filler_ids[before:] + question
    needle_start = len(intro) + before
    return PasskeyPrompt(
        input_ids=torch.tensor(ids, dtype=torch.long),
        passkey=str(passkey),
        depth=depth,
        needle_start=needle_start,
        needle_end=needle_start + len(needle),
        filler_start=len(intro),
        filler_end=len(intro) + n_filler + len(needle),
    )


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module,
    method: KVMethod,
    input_ids: torch.Tensor,
    max_new_tokens: int = 8,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Greedy tokens after ``input_ids`` ``(seq_len,)``: prefill through ``method``, then
    :func:`continue_greedy`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    prefilled = method.prefill(model, input_ids.to(device).unsqueeze(0))
    return continue_greedy(model, prefilled, max_new_tokens, stop)


@torch.no_grad()
def continue_greedy(
    model: torch.nn.Module,
    prefilled: PrefilledContext,
    max_new_tokens: int = 8,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Greedy tokens on top of a prefilled context (batch 1), one per step at explicit positions, until
    ``max_new_tokens`` or ``stop(tokens so far)`` is true."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    token = prefilled.last_logits.argmax(dim=-1)  # (1,)
    out = [int(token)]
    position = prefilled.context_length
    for _ in range(max_new_tokens - 1):
        if stop is not None and stop(out):
            break
        logits = forward_with_cache(model, prefilled.cache, token.view(1, 1), position)
        token = logits[0, -1].argmax(dim=-1)
        out.append(int(token))
        position += 1
    return out


def extract_passkey(text: str) -> str | None:
    """The first run of digits in ``text``, or ``None``."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def _number_finished(tokenizer: Tokenizer, n_digits: int) -> Callable[[list[int]], bool]:
    """Stop decoding once the answer's number has ended (digits followed by a non-digit) or is already longer
    than ``n_digits`` (wrong either way): decoding on would not change what :func:`extract_passkey` reads, and
    each step costs a forward."""

    def stop(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        match = re.search(r"\d+", text)
        return match is not None and (match.end() < len(text) or len(match.group(0)) > n_digits)

    return stop


@dataclass
class PasskeyResult:
    """Passkey accuracy of one method.

    accuracy: fraction of trials whose first decoded number equals the passkey; by_length / by_depth: the same
    per prompt length and per depth; trials: one record per trial.
    """

    method: str
    accuracy: float
    by_length: dict[int, float]
    by_depth: dict[float, float]
    n_trials: int
    seconds: float
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["by_length"] = {str(k): v for k, v in self.by_length.items()}
        data["by_depth"] = {str(k): v for k, v in self.by_depth.items()}
        return data


def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    method: KVMethod,
    lengths: Sequence[int] = (1024, 2048),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials_per_cell: int = 1,
    max_new_tokens: int = 8,
    seed: int = 0,
) -> PasskeyResult:
    """Passkey retrieval accuracy of ``method`` over every (length, depth) cell, ``trials_per_cell`` random
    passkeys each. The passkeys depend only on ``seed`` and the cell, so every method sees the same prompts."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    trials = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials_per_cell):
                key = str(rng.randint(10000, 99999))
                prompt = build_passkey_prompt(tokenizer, length, depth, key)
                generated = greedy_decode(
                    model,
                    method,
                    prompt.input_ids,
                    max_new_tokens,
                    stop=_number_finished(tokenizer, len(key)),
                )
                text = tokenizer.decode(generated, skip_special_tokens=True)
                found = extract_passkey(text)
                trials.append(
                    {
                        "length": length,
                        "depth": depth,
                        "passkey": key,
                        "output": text,
                        "correct": found == key,
                    }
                )

    def mean(rows: list[dict[str, Any]]) -> float:
        return sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")

    return PasskeyResult(
        method=method.name,
        accuracy=mean(trials),
        by_length={n: mean([t for t in trials if t["length"] == n]) for n in lengths},
        by_depth={d: mean([t for t in trials if t["depth"] == d]) for d in depths},
        n_trials=len(trials),
        seconds=time.perf_counter() - t0,
        trials=trials,
    )
