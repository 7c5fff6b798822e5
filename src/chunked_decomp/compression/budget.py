"""The byte budget: one formula for the bytes the chunks compressed next may store.

A layer may hold ``compression_ratio`` × the bytes its aged tokens (sinks and compressed chunks) would take in an
uncompressed cache of the reference dtype. Each compression step spends the new tokens' allowance plus the
balance left by the earlier ones: a credit where they stored less, a debt where they stored more (the exact sink
tokens are stored before any chunk, so the first chunks start in debt).
"""

from __future__ import annotations

from dataclasses import dataclass

# Share of one step's allowance that may go to paying back a debt: the debt is spread over the first few chunks
# instead of starving the first one.
MAX_REPAYMENT = 0.25


def spendable(allowance: float, balance: float) -> float:
    """Bytes a step may store: its ``allowance`` plus a credit (``balance > 0``), or minus at most
    ``MAX_REPAYMENT`` of the allowance towards a debt (``balance < 0``)."""
    return allowance + max(balance, -MAX_REPAYMENT * allowance)


@dataclass(frozen=True)
class Budget:
    """``ratio``: stored bytes ÷ bytes of the same tokens in an uncompressed cache of the reference dtype."""

    ratio: float

    def allowance(self, token_bytes: int, tokens: int) -> float:
        """Bytes ``tokens`` tokens may store, ``token_bytes`` being one token's uncompressed bytes (keys and values
        of the whole batch, reference dtype)."""
        return self.ratio * token_bytes * tokens
