"""`MemoryTracker`: peak memory of a block of code, and the exact bytes of a KV cache.

On a GPU the peak is CUDA's allocator peak (``torch.cuda.max_memory_allocated``) over the block. On CPU it is
the peak resident set size of the process during the block, sampled by a background thread (``/proc/self/status``
VmRSS, or psutil when present) every ``interval`` seconds. On Linux the kernel's own high-water mark
(``VmHWM``) is reset at the start of the block (``/proc/self/clear_refs``) and read at its end, so a spike
between two samples is still counted; where the reset is not allowed, short spikes between samples can be missed.
The mark is per process: a tracker started inside another one resets it, so for the time before that the outer
tracker has only its own samples (its peak can be low then, never high).

Resident memory counts file-backed pages too: transformers memory-maps safetensors weights, so the first forward
pass of a freshly loaded model pages in the weights (RSS grows by about their size) and a tracker
around it reports that as a peak. Run one short forward first when you measure the cache
(``benchmarks/memory_peak.py`` does). glibc also keeps freed blocks resident; ``MALLOC_MMAP_THRESHOLD_=131072``
returns large ones to the system, so that RSS follows the memory in use.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch

_MB = 1024 * 1024


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """Resident set size of this process in bytes (0 where it cannot be read)."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # noqa: BLE001 - best effort on exotic platforms
        return 0


def cache_nbytes(cache: Any) -> int:
    """Exact bytes held by a KV cache: `ChunkedSVDCache` counts factors and scales; others their tensors."""
    stats = getattr(cache, "memory_stats", None)
    if callable(stats):
        return int(stats().stored_bytes)
    total = 0
    for layer in getattr(cache, "layers", []):
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor) and name in ("keys", "values"):
                total += value.numel() * value.element_size()
    return total


class MemoryTracker:
    """Context manager measuring peak memory in MB.

    Example::

        with MemoryTracker(cache=lambda: cd.last_cache) as mt:
            model.generate(**inputs, max_new_tokens=32)
        mt.get_peak_memory(), mt.kv_cache_bytes

    Args:
        device: ``"cuda"``/``torch.device`` to read the CUDA peak; ``None`` = CUDA if available else CPU.
        interval: seconds between RSS samples on CPU.
        cache: a cache, or a callable returning one at exit, whose exact bytes go in ``kv_cache_bytes``.
    """

    def __init__(self, device: str | torch.device | None = None, interval: float = 0.005, cache: Any = None):
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.interval = interval
        self._cache = cache
        self.peak_bytes = 0
        self.start_bytes = 0
        self.kv_cache_bytes: int | None = None
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryTracker:
        self.samples = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self._hwm_reset = _reset_hwm()
            self.start_bytes = current_rss_bytes()
            self._hwm_start = _status_kb("VmHWM")
            self.peak_bytes = self.start_bytes
            self._stop.clear()
            self._t0 = time.perf_counter()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss_bytes()
            self.samples.append((time.perf_counter() - self._t0, rss))
            self.peak_bytes = max(self.peak_bytes, rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            rss = current_rss_bytes()
            self.peak_bytes = max(self.peak_bytes, rss)
            hwm = _status_kb("VmHWM")
            if hwm is not None and self._hwm_start is not None and (self._hwm_reset or hwm > self._hwm_start):
                self.peak_bytes = max(self.peak_bytes, hwm * 1024)
        cache = self._cache() if callable(self._cache) else self._cache
        if cache is not None:
            self.kv_cache_bytes = cache_nbytes(cache)

    def get_peak_memory(self) -> float:
        """Peak memory during the block, in MB (CUDA allocated on GPU, process RSS on CPU)."""
        return self.peak_bytes / _MB

    def get_peak_increase(self) -> float:
        """Peak minus the memory in use when the block started, in MB."""
        return (self.peak_bytes - self.start_bytes) / _MB
