"""Golden outputs (``tests/golden/record.py``): every preset on every tiny model, and the engine's variants,
give the stored bytes, ranks per chunk, logits and greedy tokens recorded before the redesign, bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import record  # noqa: E402

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
