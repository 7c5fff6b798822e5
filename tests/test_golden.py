"""Golden outputs (``tests/golden/record.py``): every preset on every tiny model, and the engine's variants,
give the stored bytes, ranks per chunk, logits and greedy tokens recorded before the redesign, bit for bit, or,
on another kind of CPU, those recorded there (logits to float tolerance; see ``tests/golden/record.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.golden import record

GOLDEN = json.loads(record.GOLDEN.read_text())
EXACT = ("states", "tokens", "generated", "generate_stored_bytes")


@pytest.fixture(scope="module", autouse=True)
def _backends():
    record.prepare_backends()


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden(case):
    want = GOLDEN[case]
    got = record.run_case(want["model"], want["options"])
    if all(got[key] == want[key] for key in EXACT + ("logits",)):
        return  # bit for bit the first recording
    # Else the recording on the second kind of CPU: exact counts and tokens, logits to float tolerance.
    again = want["recorded_again"]
    for key in EXACT:
        assert got[key] == again[key], f"{case}: {key} changed"
    torch.testing.assert_close(
        torch.tensor(got["logit_samples"]), torch.tensor(again["logit_samples"]), rtol=1e-4, atol=1e-4,
        msg=lambda m: f"{case}: logits changed: {m}",
    )  # fmt: skip
