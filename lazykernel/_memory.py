"""Memory budgets: the default, and how many examples a chunk may hold."""

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


def chunk_size(n_total: int, per_example_bytes: float, budget: float, what: str,
               batch_size=None) -> int:
    """Largest number of examples whose working memory fits ``budget`` bytes.

    Raises:
        ValueError: when not even one example fits, naming the bytes one needs.
    """
    if per_example_bytes > budget:
        raise ValueError(
            f"memory_budget of {format_bytes(budget)} is too small for even one example: "
            f"{what} needs about {format_bytes(per_example_bytes)} per example. "
            f"Raise memory_budget to at least {int(per_example_bytes) + 1} bytes."
        )
    size = max(1, int(budget // max(per_example_bytes, 1)))
    if batch_size is not None:
        size = min(size, batch_size)
    return max(1, min(size, n_total))
