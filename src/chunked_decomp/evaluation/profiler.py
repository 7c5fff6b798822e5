"""`MemoryProfiler`: memory over time of inference runs, and KV-cache bytes per decoding step.

Two series are recorded:

* **process memory** over wall time, sampled by a background thread every ``interval`` seconds while a
  :meth:`MemoryProfiler.profile_inference` block runs: resident set size on CPU, CUDA allocated bytes on a GPU
  (plus the allocator's exact peak of the block);
* **cache bytes per decoding step**, exact: ``cache.memory_stats().stored_bytes`` for a `ChunkedSVDCache`,
  the key/value tensors' bytes for transformers' caches. :meth:`MemoryProfiler.step_recorder` gives a
  ``StoppingCriteria`` that ``generate`` calls after every step (it never stops generation); manual decoding
  loops call :meth:`MemoryProfiler.record_cache`.

Each run is a labelled segment, so one timeline can hold "uncompressed" and "compressed@0.25" side by side.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chunked_decomp.evaluation.memory import cache_nbytes, current_rss_bytes

__all__ = ["MemoryProfiler", "Segment"]

_MB = 1024 * 1024


@dataclass
class Segment:
    """One profiled run: wall-clock bounds (seconds since the profiler was made) and its samples.

    memory: ``(t, bytes)`` samples of process memory; cache: ``(step, t, bytes)`` per decoding step.
    """

    label: str
    start: float
    end: float | None = None
    start_bytes: int = 0
    peak_bytes: int = 0
    memory: list[tuple[float, int]] = field(default_factory=list)
    cache: list[tuple[int, float, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "seconds": (self.end or self.start) - self.start,
            "start_mb": self.start_bytes / _MB,
            "peak_mb": self.peak_bytes / _MB,
            "peak_increase_mb": (self.peak_bytes - self.start_bytes) / _MB,
            "memory_samples": len(self.memory),
            "decode_steps": len(self.cache),
            "cache_mb_first_step": self.cache[0][2] / _MB if self.cache else None,
            "cache_mb_last_step": self.cache[-1][2] / _MB if self.cache else None,
            "cache_bytes_per_step": _growth(self.cache),
        }


def _growth(points: list[tuple[int, float, int]]) -> float | None:
    """Mean growth of cache bytes per decoding step, first to last (``None`` with fewer than two steps).

    For an uncompressed cache this is exactly one token's keys and values; a compressed cache grows by a token
    per step between compressions and drops when a chunk is factored, so its mean growth is smaller.
    """
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    return (points[-1][2] - points[0][2]) / (points[-1][0] - points[0][0])


def _stopping_criteria_class():
    from transformers import StoppingCriteria

    class CacheStepRecorder(StoppingCriteria):
        """Called by ``generate`` after every decoding step; records the cache's bytes and never stops."""

        def __init__(self, profiler: MemoryProfiler, cache: Any):
            self.profiler = profiler
            self.cache = cache

        def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs) -> torch.BoolTensor:
            cache = self.cache() if callable(self.cache) else self.cache
            if cache is not None:
                self.profiler.record_cache(cache)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return CacheStepRecorder


class MemoryProfiler:
    """Profile memory of inference blocks and KV-cache bytes per decoding step.

    Example::

        profiler = MemoryProfiler()
        with profiler.profile_inference("compressed@0.25"):
            model.generate(**inputs, max_new_tokens=64,
                           stopping_criteria=[profiler.step_recorder(lambda: cd.last_cache)])
        print(profiler.generate_report())
        profiler.plot_memory_timeline("memory_timeline.png")

    Args:
        interval: seconds between process-memory samples.
        device: ``"cuda"`` to sample CUDA allocated bytes; ``None`` = CUDA when available, else CPU (RSS).
    """

    def __init__(self, interval: float = 0.01, device: str | torch.device | None = None):
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.interval = interval
        self.segments: list[Segment] = []
        self._t0 = time.perf_counter()
        self._active: Segment | None = None

    # ---- sampling -----------------------------------------------------------------------------------------
    @property
    def memory_kind(self) -> str:
        return "CUDA allocated" if self.device.type == "cuda" else "process RSS"

    def _memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return current_rss_bytes()

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    @contextlib.contextmanager
    def profile_inference(self, label: str = "inference") -> Iterator[Segment]:
        """Sample memory in the background while the block runs; yields the block's :class:`Segment`.

        Cache steps recorded inside the block (:meth:`record_cache`, :meth:`step_recorder`) belong to it.
        Blocks do not nest.
        """
        if self._active is not None:
            raise RuntimeError(
                f"profile_inference({label!r}) inside profile_inference({self._active.label!r})"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        seg = Segment(label=label, start=self._now(), start_bytes=self._memory_bytes())
        seg.peak_bytes = seg.start_bytes
        seg.memory.append((seg.start, seg.start_bytes))
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                value = self._memory_bytes()
                seg.memory.append((self._now(), value))
                seg.peak_bytes = max(seg.peak_bytes, value)

        thread = threading.Thread(target=sample, daemon=True, name="chunked-decomp-memory-profiler")
        self._active = seg
        thread.start()
        try:
            yield seg
        finally:
            stop.set()
            thread.join()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                seg.peak_bytes = max(seg.peak_bytes, int(torch.cuda.max_memory_allocated(self.device)))
            end_bytes = self._memory_bytes()
            seg.end = self._now()
            seg.memory.append((seg.end, end_bytes))
            seg.peak_bytes = max(seg.peak_bytes, end_bytes)
            self.segments.append(seg)
            self._active = None

    def record_cache(self, cache: Any, step: int | None = None) -> int:
        """Record ``cache``'s exact bytes as the next decoding step of the running block; returns the bytes."""
        seg = self._active
        if seg is None:
            raise RuntimeError("record_cache must be called inside profile_inference()")
        nbytes = cache_nbytes(cache)
        seg.cache.append((len(seg.cache) if step is None else step, self._now(), nbytes))
        return nbytes

    def step_recorder(self, cache: Any | Callable[[], Any]):
        """A ``transformers.StoppingCriteria`` recording ``cache``'s bytes after each ``generate`` step.

        cache: the cache, or a callable returning it (``lambda: cd.last_cache`` for a wired model, whose cache is
        created inside ``generate``). Pass it as ``stopping_criteria=[recorder]``; it never stops generation.
        """
        return _stopping_criteria_class()(self, cache)

    @torch.no_grad()
    def profile_generate(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        label: str,
        cache: Any | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy ``model.generate`` inside :meth:`profile_inference` with a step recorder.

        For a wired model the cache is the one its ``generate`` creates; otherwise ``cache`` (default: a fresh
        ``DynamicCache``) is passed to ``generate`` so that its bytes can be read at every step.
        """
        from chunked_decomp.evaluation.wired import wired_decomp
        from chunked_decomp.hf.models import cache_kwarg_name

        decomp = wired_decomp(model)
        if decomp is not None:
            source: Any = lambda: decomp.last_cache  # noqa: E731 - read at each step
        else:
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
            generate_kwargs[cache_kwarg_name(model)] = cache
            source = cache
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        generate_kwargs.setdefault("min_new_tokens", max_new_tokens)
        with self.profile_inference(label):
            return model.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                stopping_criteria=[self.step_recorder(source)],
                **generate_kwargs,
            )

    # ---- reporting ----------------------------------------------------------------------------------------
    def generate_report(self, as_dict: bool = False) -> str | dict[str, Any]:
        """A summary of every profiled block: duration, start and peak memory, cache bytes per step.

        Returns readable text, or with ``as_dict`` a dict ``{"memory_kind", "device", "segments": [...]}``.
        """
        data = {
            "memory_kind": self.memory_kind,
            "device": str(self.device),
            "interval_s": self.interval,
            "segments": [s.to_dict() for s in self.segments],
        }
        if as_dict:
            return data
        if not self.segments:
            return "MemoryProfiler: nothing profiled yet (use `with profiler.profile_inference(label): ...`)"
        lines = [f"Memory profile ({self.memory_kind}, sampled every {self.interval * 1000:g} ms)"]
        header = (
            f"{'run':<24} {'time s':>7} {'start MB':>9} {'peak MB':>9} {'+peak MB':>9} {'steps':>6} "
            f"{'KV MB first':>11} {'KV MB last':>11}"
        )
        lines += [header, "-" * len(header)]
        for s in data["segments"]:
            first = "-" if s["cache_mb_first_step"] is None else f"{s['cache_mb_first_step']:.3f}"
            last = "-" if s["cache_mb_last_step"] is None else f"{s['cache_mb_last_step']:.3f}"
            lines.append(
                f"{s['label'][:24]:<24} {s['seconds']:>7.2f} {s['start_mb']:>9.1f} {s['peak_mb']:>9.1f} "
                f"{s['peak_increase_mb']:>9.1f} {s['decode_steps']:>6} {first:>11} {last:>11}"
            )
        return "\n".join(lines)

    def plot_memory_timeline(self, save_path: str | Path, title: str | None = None) -> Path:
        """Save a PNG: process memory over time (top, one coloured span per block) and KV-cache bytes per
        decoding step (bottom, one line per block). Written atomically; returns the path."""
        # A bare Figure renders with Agg and leaves pyplot's global backend (a notebook's, say) alone.
        import matplotlib
        from matplotlib.figure import Figure

        from chunked_decomp.io import atomic_open

        if not self.segments:
            raise ValueError("nothing to plot: profile at least one block with profile_inference()")
        fig = Figure(figsize=(9, 7), layout="constrained")
        top, bottom = fig.subplots(2, 1)
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, seg in enumerate(self.segments):
            color = colors[i % len(colors)]
            t = [p[0] for p in seg.memory]
            mb = [p[1] / _MB for p in seg.memory]
            top.plot(t, mb, color=color, lw=1.5, label=f"{seg.label} (peak {seg.peak_bytes / _MB:.0f} MB)")
            top.axvspan(seg.start, seg.end or seg.start, color=color, alpha=0.08)
            if seg.cache:
                steps = [p[0] + 1 for p in seg.cache]
                kv = [p[2] / _MB for p in seg.cache]
                bottom.plot(
                    steps,
                    kv,
                    color=color,
                    lw=1.8,
                    marker="o" if len(steps) <= 40 else None,
                    ms=3,
                    label=f"{seg.label} ({kv[-1]:.2f} MB at step {steps[-1]})",
                )
        # Weights dominate process memory; show at least 16 MB of range so that sub-MB jitter does not look
        # like growth, and print absolute MB rather than an offset.
        low, high = top.get_ylim()
        if high - low < 16:
            mid = (high + low) / 2
            top.set_ylim(mid - 8, mid + 8)
        top.ticklabel_format(axis="y", useOffset=False, style="plain")
        top.set_xlabel("wall time (s)")
        top.set_ylabel(f"{self.memory_kind} (MB)")
        top.set_title("Process memory during inference" if title is None else title)
        top.grid(alpha=0.3)
        top.legend(fontsize=8, loc="best")
        bottom.set_xlabel("decoding step (tokens generated)")
        bottom.set_ylabel("KV cache held (MB; uncompressed\nin the model's dtype)")
        bottom.set_title("KV-cache bytes after each decoding step")
        bottom.grid(alpha=0.3)
        bottom.set_ylim(bottom=0)
        if bottom.lines:
            bottom.legend(fontsize=8, loc="best")
        else:
            bottom.text(
                0.5, 0.5, "no decoding steps recorded", ha="center", va="center", transform=bottom.transAxes
            )
        path = Path(save_path)
        with atomic_open(path, "wb", encoding=None) as fh:
            fig.savefig(fh, format="png", dpi=120)
        return path
