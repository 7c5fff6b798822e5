"""What a command shows on stderr while it works: status lines and progress bars (both off with --no_progress)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

__all__ = ["log", "progress"]


def log(message: str, show: bool) -> None:
    """Print ``message`` to stderr when ``show``."""
    if show:
        print(message, file=sys.stderr, flush=True)


def progress(items: Sequence, desc: str, show: bool) -> Iterable:
    """``items`` under a tqdm bar on stderr (hidden unless ``show``)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="cell", disable=not show, file=sys.stderr)
