"""Process memory readings for reports: current and peak resident set size (RSS).

On Linux these come from /proc/self/status (VmRSS, VmHWM), and the peak can be reset so a phase
is measured on its own. getrusage's ru_maxrss is not used there: Linux carries it across exec,
so a child process would report its parent's peak.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()


def peak_rss() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def training_peak() -> dict:
    """Peak memory of a training stage, for its metrics: GPU memory allocated by torch, else process RSS."""
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_bytes": peak_rss(), "peak_memory_kind": "process_rss"}


def reset_peak() -> None:
    """Start a new peak measurement from the current RSS (Linux; elsewhere the peak keeps counting)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def release() -> None:
    """Hand freed heap memory back to the OS (glibc keeps mid-sized frees otherwise; Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_models() -> None:
    """After dropping the last reference to a model: collect it and give its GPU memory back to the allocator, so
    the next model of a sample-then-train stage (rejection, gatt) fits beside nothing."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
