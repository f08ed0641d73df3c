"""Command line: ``lazykernel doctor`` (also ``python -m lazykernel doctor``)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional


def _doctor(args: argparse.Namespace) -> int:
    import torch

    import lazykernel

    info = lazykernel.backend()
    print(info)
    # A tiny end-to-end check: the compiled op against its reference on the CPU.
    from lazykernel.ops import gram_hadamard_accumulate, gram_hadamard_accumulate_reference

    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(6, 2, 5, generator=gen, dtype=torch.float64)]
    g = [torch.randn(6, 2, 3, 4, generator=gen, dtype=torch.float64)]
    fast = torch.zeros(6, 6, 3, 3, dtype=torch.float64)
    slow = torch.zeros_like(fast)
    gram_hadamard_accumulate(fast, a, a, g, g, "full", symmetric=True)
    gram_hadamard_accumulate_reference(slow, a, a, g, g, "full")
    error = (fast - slow).abs().max().item()
    status = "ok" if error < 1e-10 else "MISMATCH"
    print(f"  self-check (CPU op vs reference): {status} (max abs difference {error:.1e})")
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    x = torch.randn(64, 8, generator=gen)
    start = time.perf_counter()
    kernel = lazykernel.ntk(model, x)
    elapsed = time.perf_counter() - start
    print(f"  ntk of a small MLP on 64 inputs: shape {tuple(kernel.shape)} in {elapsed * 1e3:.1f} ms")
    return 0 if status == "ok" else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lazykernel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="report the backend in use and self-check it")
    doctor.set_defaults(run=_doctor)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
