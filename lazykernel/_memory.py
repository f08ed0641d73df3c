"""Memory budgets: the default on each device, how they are reported, and large buffers."""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from typing import Optional, Sequence, Tuple

import torch

# Fraction of the memory that is free now that a call may use by default: it
# leaves room for the returned kernel, the caller's own tensors and allocator slack.
DEFAULT_FRACTION = 0.25
_FALLBACK_CPU_BYTES = 4 << 30


# Where Linux describes the memory cgroup a process runs in (a container's limit).
_PROC_CGROUP = "/proc/self/cgroup"
_CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 writes "no limit" as the largest page-aligned int64, v2 as "max"
_NO_CGROUP_LIMIT = 1 << 62


def _available_cpu_bytes() -> int:
    """Memory this process can still take: the machine's available memory, or less
    where a memory cgroup (a container's limit) leaves less."""
    available = _meminfo_available_bytes()
    in_cgroup = _cgroup_available_bytes()
    return available if in_cgroup is None else min(available, in_cgroup)


def _meminfo_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _FALLBACK_CPU_BYTES


def _cgroup_available_bytes() -> Optional[int]:
    """Bytes the memory cgroups of this process still allow, or None where none sets a limit.

    /proc/meminfo describes the whole machine, and a container limited to a
    part of it is killed when it goes past its limit, not the machine's. The
    cgroup (v2, or v1's memory controller) and each one above it are read;
    their usage counts the page cache, of which the inactive part is reclaimed
    before the limit is enforced, so it counts as available.
    """
    headroom = None
    for folder, limit_file, usage_file, inactive_key in _cgroup_folders(_PROC_CGROUP, _CGROUP_ROOT):
        limit = _read_int(f"{folder}/{limit_file}")
        if limit is None or limit >= _NO_CGROUP_LIMIT:
            continue
        usage = _read_int(f"{folder}/{usage_file}") or 0
        inactive = _read_stat(f"{folder}/memory.stat", inactive_key)
        free = max(0, limit - max(0, usage - inactive))
        headroom = free if headroom is None else min(headroom, free)
    return headroom


@functools.lru_cache(maxsize=4)
def _cgroup_folders(proc_cgroup: str, root: str) -> Tuple[Tuple[str, str, str, str], ...]:
    """The memory cgroups of this process that have a limit file: (folder, limit file,
    usage file, memory.stat key of the inactive page cache), found once per process.

    Inside a container the path names the cgroup on the host, and the
    container sees its own cgroup at the mount's root: every ancestor of the
    path is tried, the root included.
    """
    try:
        with open(proc_cgroup) as lines:
            entries = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return ()
    found = []
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, path = entry
        if controllers == "":
            files = (root, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            files = (f"{root}/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        mount, limit_file = files[0], files[1]
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):
            folder = "/".join([mount] + parts[:depth])
            if os.path.isfile(f"{folder}/{limit_file}"):
                found.append((folder,) + files[1:])
    return tuple(found)


def _read_int(filename: str) -> Optional[int]:
    """The integer in a cgroup file, or None where it is missing or says "max"."""
    try:
        with open(filename) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_stat(filename: str, key: str) -> int:
    """A value of a cgroup's memory.stat, 0 where it is missing."""
    try:
        with open(filename) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key and value.strip().isdigit():
                    return int(value)
    except OSError:
        pass
    return 0


def default_memory_budget(device: torch.device) -> int:
    """Bytes of working memory a call may use on ``device`` when none is given: on the
    CPU a quarter of the memory available (within the process's memory cgroup, a
    container's limit), on CUDA half the device's free memory, counting as free what
    PyTorch's caching allocator holds without a tensor in it."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # what PyTorch's caching allocator holds but no tensor uses (the working memory of
        # an earlier call) is used to the device, and free to this process
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(2 * DEFAULT_FRACTION * (free + max(0, cached)))
    return int(DEFAULT_FRACTION * _available_cpu_bytes())


def format_bytes(n: float) -> str:
    """``n`` bytes for a person to read: ``"512 B"``, ``"1.5 MiB"``. The unit is that of the
    value as shown, so that 1023.99 KiB reads ``"1.0 MiB"``, not ``"1024.0 KiB"``."""
    if not math.isfinite(n):
        return f"{n} B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        shown = f"{n:.0f}" if unit == "B" else f"{n:.1f}"
        if abs(float(shown)) < 1024 or unit == "TiB":
            return f"{shown} {unit}"
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
