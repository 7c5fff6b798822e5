"""Spies on model loading for the tests."""

from __future__ import annotations

from transformers import AutoModelForCausalLM


def spy_from_pretrained(monkeypatch) -> list[dict]:
    """Records the keyword arguments of every ``AutoModelForCausalLM.from_pretrained`` call (still loading)."""
    seen: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    return seen
