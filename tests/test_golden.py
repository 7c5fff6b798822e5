"""Golden outputs (``tests/golden/record.py``): every preset on every tiny model, and the engine's variants,
give the stored bytes, ranks per chunk, logits and greedy tokens recorded before the redesign, bit for bit."""

from __future__ import annotations

import json

import pytest

from tests.golden import record

GOLDEN = json.loads(record.GOLDEN.read_text())


@pytest.fixture(scope="module", autouse=True)
def _backends():
    record.prepare_backends()


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden(case):
    want = GOLDEN[case]
    got = record.run_case(want["model"], want["options"])
    for key in ("states", "tokens", "generated", "generate_stored_bytes", "logits"):
        assert got[key] == want[key], f"{case}: {key} changed"
