"""Crash-safe result files: atomic writes and a resumable store of finished cells.

Every file is written to a temporary file in the same folder, flushed and ``fsync``-ed, then moved over the
target with ``os.replace`` (atomic on POSIX and Windows), and the folder is ``fsync``-ed so the rename itself
survives a power cut. A crash at any point leaves either the old file or the new one, never half of one.

:class:`ResultStore` keeps one small JSON file per finished cell of a study, named by a hash of the cell's
parameters, so a rerun skips what is done; an entry that cannot be read back (truncated, corrupt, or written
for other parameters) is ignored and the cell recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ResultStore",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "to_jsonable",
    "write_table",
]


def _fsync_dir(directory: Path) -> None:
    # Directories cannot be opened for fsync on Windows; the rename is still atomic there.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask: from /proc on Linux (thread-safe), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary). If the block raises, or ``os.replace`` fails, the temporary
    file is removed and ``path`` is left exactly as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs = {"encoding": encoding, "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as fh:
            if hasattr(os, "fchmod"):  # mkstemp makes 0o600; give the mode open() would: 0o666 & ~umask
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb", encoding=None) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """``obj`` with numpy / torch scalars and arrays, paths and dataclass-likes turned into plain JSON values.

    Non-finite floats become ``None`` (strict JSON has no NaN or Infinity).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_jsonable(to_dict())
    tolist = getattr(obj, "tolist", None)  # numpy / torch arrays and scalars
    if callable(tolist):
        return to_jsonable(tolist())
    item = getattr(obj, "item", None)
    if callable(item):
        return to_jsonable(item())
    return str(obj)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (see :func:`to_jsonable`) to ``path`` atomically."""
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def write_table(frame: Any, stem: str | Path) -> tuple[Path, Path]:
    """Write a pandas DataFrame as ``stem.csv`` and ``stem.json`` (a list of records), both atomically."""
    stem = Path(stem)
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    atomic_write_text(csv_path, frame.to_csv(index=False))
    atomic_write_json(json_path, frame.to_dict(orient="records"))
    return csv_path, json_path


def check_output_dir(path: str | Path, flag: str = "--output_dir") -> Path:
    """Create ``path`` if needed and prove it writable by creating and removing a file in it.

    Raises ``ValueError`` naming ``flag`` when it is a file, cannot be created, or is not writable — so a run
    fails before any work rather than after it.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} must be a directory, got an existing file {str(path)!r}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{flag} {str(path)!r} is not writable: {err.strerror or err}") from err
    return path


def cell_key(params: dict[str, Any]) -> str:
    """A stable 16-hex-digit key for a cell's parameters (order of the dict does not matter)."""
    canonical = json.dumps(to_jsonable(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


class ResultStore:
    """Finished cells of a study, one JSON file each under ``directory``.

    Each file holds ``{"params": ..., "result": ...}`` and is written atomically; :meth:`get` returns the
    result only when the file parses and its stored parameters equal the ones asked for.

    Example::

        store = ResultStore(output_dir / "cells" / "scaling")
        row, cached = store.get_or_compute({"ratio": 0.25, "seq_len": 512}, lambda: measure(0.25, 512))
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, params: dict[str, Any]) -> Path:
        return self.directory / f"{cell_key(params)}.json"

    def get(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result for ``params``, or ``None`` when absent, unreadable or for other parameters."""
        path = self.path(params)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("result"), dict):
            return None
        if entry.get("params") != to_jsonable(params):
            return None
        return entry["result"]

    def put(self, params: dict[str, Any], result: dict[str, Any]) -> Path:
        """Store ``result`` for ``params`` atomically."""
        return atomic_write_json(self.path(params), {"params": params, "result": result}, indent=None)

    def get_or_compute(
        self, params: dict[str, Any], compute: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        """``(result, cached)``: the stored result, or ``compute()`` stored and returned."""
        found = self.get(params)
        if found is not None:
            return found, True
        result = to_jsonable(compute())
        self.put(params, result)
        return result, False

    def __len__(self) -> int:
        return len(list(self.directory.glob("*.json"))) if self.directory.is_dir() else 0
