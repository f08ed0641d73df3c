"""Memory budgets: the default on each device, and how they are reported."""

from __future__ import annotations

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
