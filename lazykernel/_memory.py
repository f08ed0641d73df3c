"""Memory budgets: the default on each device, how they are reported, and large buffers."""

from __future__ import annotations

import ctypes
import sys
from typing import Optional, Sequence

import torch

# Fraction of the memory that is free now that a call may use by default: it
# leaves room for the returned kernel, the caller's own tensors and allocator slack.
DEFAULT_FRACTION = 0.25
_FALLBACK_CPU_BYTES = 4 << 30


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _FALLBACK_CPU_BYTES


def default_memory_budget(device: torch.device) -> int:
    """Bytes of working memory a call may use on ``device`` when none is given."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(2 * DEFAULT_FRACTION * free)
    return int(DEFAULT_FRACTION * _available_cpu_bytes())


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# Buffers this large come straight from mmap, and every call touches them fresh:
# at 4 KiB a page, the page faults cost more than the arithmetic that fills them.
_HUGE_PAGE = 2 << 20
_LARGE_BUFFER_BYTES = 32 << 20
_MADV_HUGEPAGE = 14
_libc: Optional[ctypes.CDLL] = None
_madvise_works = sys.platform.startswith("linux")


def _advise_huge_pages(address: int, length: int) -> None:
    """Ask Linux to back the 2 MiB-aligned interior of a fresh mapping with huge pages.

    Only a hint: where transparent huge pages are off, or the call fails, the
    pages stay small and nothing else changes.
    """
    global _libc, _madvise_works
    start = (address + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    end = (address + length) // _HUGE_PAGE * _HUGE_PAGE
    if end <= start:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.madvise.restype = ctypes.c_int
        if _libc.madvise(start, end - start, _MADV_HUGEPAGE) != 0:
            # a kernel without transparent huge pages: stop asking
            _madvise_works = False
    except (OSError, AttributeError):
        _madvise_works = False


def empty_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for a working buffer the caller fills at once.

    On Linux CPUs a buffer of 32 MiB or more asks for transparent huge pages
    before its first touch, which makes filling it about three times faster
    where the kernel grants them on request (``madvise`` mode).
    """
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if _madvise_works and out.device.type == "cpu" and nbytes >= _LARGE_BUFFER_BYTES:
        _advise_huge_pages(out.data_ptr(), nbytes)
    return out
