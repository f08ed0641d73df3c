"""Command line: ``lazykernel doctor`` and ``lazykernel demo`` (also ``python -m lazykernel ...``)."""

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


def _demo(args: argparse.Namespace) -> int:
    import torch

    from lazykernel.demo import run_demo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run_demo(args.out, widths=args.widths, steps=args.steps, alphas=args.alphas,
                       alpha_width=args.alpha_width, train_size=args.train_size, test_size=args.test_size,
                       probe_size=args.probe_size, base_lr=args.lr, seed=args.seed, device=args.device,
                       progress=not args.no_progress)
    for key, entry in results["slopes"].items():
        print(f"  slope of {key}: {entry['slope']:.3f} ± {entry['stderr']:.3f}")
    print(f"  report: {args.out}/report.md ({results['seconds']:.1f} s)")
    return 0


def _add_demo(commands) -> None:
    from lazykernel.demo import DEFAULT_ALPHAS, DEFAULT_WIDTHS

    demo = commands.add_parser("demo", help="width/μP/α sweeps on the digits data, with a report folder")
    demo.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS), help="hidden widths")
    demo.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="α values")
    demo.add_argument("--steps", type=int, default=200, help="gradient-descent steps per run")
    demo.add_argument("--alpha-width", type=int, default=256, help="width of the α sweep")
    demo.add_argument("--lr", type=float, default=1.0, help="base learning rate (before μP and α scaling)")
    demo.add_argument("--train-size", type=int, default=256, help="training digits")
    demo.add_argument("--test-size", type=int, default=256, help="test digits")
    demo.add_argument("--probe-size", type=int, default=64, help="probe inputs of the metrics")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split and initializations")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    demo.add_argument("--out", default="lazykernel-demo", help="report folder")
    # One thread by default: the matrices are small, and on a shared machine a thread
    # team that waits for a descheduled member runs many times slower than one thread.
    demo.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lazykernel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="report the backend in use and self-check it")
    doctor.set_defaults(run=_doctor)
    _add_demo(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
