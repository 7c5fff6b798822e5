"""Optional experiment tracking with Weights & Biases (``--wandb``).

wandb is imported only when a tracker is started, so importing the command line never imports it. Without an
API key (``WANDB_API_KEY``) the run is logged offline; every file wandb writes (run folder, cache, settings)
goes under ``<output_dir>/wandb`` so that nothing lands outside the run's output folder. Sync an offline run
later with ``wandb sync <output_dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["NullTracker", "WandbTracker", "start_tracker"]

INSTALL_HINT = "pip install wandb  (or: pip install 'chunked-decomp[tracking]')"


class NullTracker:
    """Does nothing: the tracker used without ``--wandb``."""

    enabled = False
    mode = "disabled"

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Ignore ``metrics``."""

    def log_table(self, name: str, frame: Any) -> None:
        """Ignore a table."""

    def log_image(self, name: str, path: str | Path) -> None:
        """Ignore an image."""

    def summary(self, values: dict[str, Any]) -> None:
        """Ignore summary values."""

    def finish(self) -> None:
        """Nothing to close."""


class WandbTracker(NullTracker):
    """A wandb run: ``log`` scalars, ``log_table`` DataFrames, ``log_image`` PNGs, ``finish`` at the end.

    Args:
        project: wandb project name.
        config: run configuration (the command-line arguments).
        output_dir: folder of the run's results; wandb's files go to ``output_dir/wandb``.
        name: run name (wandb picks one when ``None``).
        mode: ``"online"``, ``"offline"`` or ``None`` = online when ``WANDB_API_KEY`` is set or
            ``WANDB_MODE`` says so, else offline.
    """

    enabled = True

    def __init__(
        self,
        project: str,
        config: dict[str, Any],
        output_dir: str | Path,
        name: str | None = None,
        mode: str | None = None,
    ):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                f"--wandb needs the wandb package, which is not installed: {INSTALL_HINT}"
            ) from err
        self._wandb = wandb
        root = Path(output_dir) / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        # wandb otherwise writes settings and caches under the home folder.
        for var, sub in (
            ("WANDB_DIR", ""),
            ("WANDB_CACHE_DIR", ".cache"),
            ("WANDB_CONFIG_DIR", ".config"),
            ("WANDB_DATA_DIR", ".data"),
            ("WANDB_ARTIFACT_DIR", ".artifacts"),
        ):
            os.environ.setdefault(var, str(root / sub) if sub else str(root))
        if mode is None:
            mode = os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline"
            )
        self.mode = mode
        self.run = wandb.init(project=project, config=config, name=name, dir=str(root), mode=mode)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, frame: Any) -> None:
        self.run.log({name: self._wandb.Table(dataframe=frame)})

    def log_image(self, name: str, path: str | Path) -> None:
        self.run.log({name: self._wandb.Image(str(path))})

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def start_tracker(
    enabled: bool, project: str, config: dict[str, Any], output_dir: str | Path, name: str | None = None
) -> NullTracker:
    """A :class:`WandbTracker` when ``enabled``, else a :class:`NullTracker`."""
    if not enabled:
        return NullTracker()
    return WandbTracker(project=project, config=config, output_dir=output_dir, name=name)
