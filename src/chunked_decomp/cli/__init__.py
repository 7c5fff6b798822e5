"""The ``chunked-decomp`` command line: flags become typed values here, at the edge, and go inward as such."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None, command: str | None = None, prog: str | None = None) -> int:
    """Run ``chunked-decomp`` (or one of its commands, as the scripts do); returns the exit status."""
    from chunked_decomp.cli.commands import main as run

    return run(argv, command=command, prog=prog)
