"""Command line: ``lazykernel doctor``, ``lazykernel ntk`` and ``lazykernel demo`` (also ``python -m lazykernel ...``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional


def _doctor(args: argparse.Namespace) -> int:
    import torch

    import lazykernel

    info = lazykernel.backend()
    print(info)
    # A tiny end-to-end check of each compiled kernel against the reference ops.
    devices = [("CPU", "cpu", info.cpu_kernels)]
    if info.cuda_devices:
        devices.append(("CUDA", "cuda", info.cuda_kernels))
    failed = False
    for label, device, compiled in devices:
        if not compiled:
            print(f"  self-check ({label} op vs reference): skipped, no compiled {label} kernels "
                  "(the reference ops run instead)")
            continue
        error = _self_check(torch.device(device))
        failed |= not error < 1e-10
        print(f"  self-check ({label} op vs reference): {'ok' if error < 1e-10 else 'MISMATCH'} "
              f"(max abs difference {error:.1e})")
    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    x = torch.randn(64, 8, generator=gen)
    start = time.perf_counter()
    kernel = lazykernel.ntk(model, x)
    elapsed = time.perf_counter() - start
    print(f"  ntk of a small MLP on 64 inputs: shape {tuple(kernel.shape)} in {elapsed * 1e3:.1f} ms")
    return 1 if failed else 0


def _self_check(device) -> float:
    """Largest difference between the compiled fused op on ``device`` and its reference, in float64."""
    import torch

    from lazykernel.ops import gram_hadamard_accumulate, gram_hadamard_accumulate_reference

    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(6, 2, 5, generator=gen, dtype=torch.float64).to(device)]
    g = [torch.randn(6, 2, 3, 4, generator=gen, dtype=torch.float64).to(device)]
    fast = torch.zeros(6, 6, 3, 3, dtype=torch.float64, device=device)
    slow = torch.zeros_like(fast)
    gram_hadamard_accumulate(fast, a, a, g, g, "full", symmetric=True)
    gram_hadamard_accumulate_reference(slow, a, a, g, g, "full")
    return (fast - slow).abs().max().item()


def _demo(args: argparse.Namespace) -> int:
    import torch

    from lazykernel.demo import run_demo

    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run_demo(args.out, widths=args.widths, steps=args.steps, alphas=args.alphas,
                       alpha_width=args.alpha_width, train_size=args.train_size, test_size=args.test_size,
                       probe_size=args.probe_size, base_lr=args.lr, seed=args.seed, device=str(device),
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
    demo.add_argument("--threads", type=_positive_int, default=1, help="CPU threads for torch (default 1)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_bytes(text: str) -> int:
    """``"8GB"``, ``"512MiB"``, ``"1e9"`` → bytes (decimal units for KB/MB/GB, binary for KiB/MiB/GiB)."""
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number):]
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a size in bytes; write e.g. 8GB, 512MiB or 1000000000") from None
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"the memory budget must be a finite size of at least one byte, "
                                         f"got {text!r}")
    return int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _check_cuda_index(device, option: str) -> None:
    import torch

    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{option}: there is no {device}; this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")


def _device(text: str):
    """``--device`` as a torch.device, refused with a clear error where it cannot be used."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device {text!r}; expected e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here (this torch build or this machine "
                         "has no GPU); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        _check_cuda_index(device, f"--device {text}")
    return device


def _load_factory(spec: str):
    """``"package.module:factory"`` → the model ``factory()`` returns."""
    import importlib
    import inspect

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute or module_name.startswith("."):
        raise ValueError(f"--model must be module:factory with an absolute module name "
                         f"(e.g. mypackage.models:make_mlp), got {spec!r}")
    if os.getcwd() not in sys.path:
        # a factory in a file next to the batch script, as `python -m` would find it
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        hint = ""
        if module_name.endswith(".py"):
            hint = (f"; name the module as an import does (e.g. {module_name[:-3].replace(os.sep, '.')}), "
                    "not its file")
        raise ValueError(f"cannot load the model factory {spec!r}: {error}{hint}") from error
    if not callable(factory):
        raise ValueError(f"--model {spec!r} names a {type(factory).__name__}, not a function; name a function "
                         "that takes no arguments and returns the nn.Module")
    try:
        inspect.signature(factory).bind()
    except TypeError as error:
        raise ValueError(f"--model {spec!r}: the factory must be callable without arguments ({error}); "
                         "wrap it in a function that takes none") from None
    except ValueError:  # no signature to read (a built-in): calling it will tell
        pass
    return factory()


def _ntk(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from lazykernel import distributed
    from lazykernel.disk import ntk_to_disk

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other; pass one of them")
    device = _device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        _check_cuda_index(device, f"--device {args.device} with LOCAL_RANK={device.index}")
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    model = _load_factory(args.model)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"the factory {args.model!r} must return an nn.Module, got {type(model).__name__}")
    model = model.to(device=device, dtype=dtype).eval()

    def load(path: str) -> torch.Tensor:
        try:
            array = np.load(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the inputs {path!r} as a .npy array: {error}") from error
        if not isinstance(array, np.ndarray):
            array.close()
            raise ValueError(f"{path!r} holds several arrays (an .npz archive); save the inputs alone "
                             "with numpy.save(path, x) as a .npy file")
        if array.dtype.fields is None and not array.dtype.isnative:
            # written on (or for) a machine of the other byte order, which torch cannot wrap
            array = array.astype(array.dtype.newbyteorder("="))
        try:
            x = torch.from_numpy(array)
        except TypeError as error:
            raise ValueError(f"the inputs in {path!r} have dtype {array.dtype}, which torch cannot hold; "
                             f"save a numeric array") from error
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)

    x1 = load(args.data)
    x2 = load(args.data2) if args.data2 else None
    created = distributed.init_from_environment(device)
    try:
        if_exists = "resume" if args.resume else "overwrite" if args.overwrite else "error"
        kernel = ntk_to_disk(model, x1, x2, out=args.out, output=args.output, method=args.method,
                             batch_size=args.batch_size, memory_budget=args.memory_budget,
                             if_exists=if_exists, progress=not args.quiet, precision=args.precision)
        if not args.quiet and distributed.rank_and_world()[0] == 0:
            print(f"wrote {args.out}: {tuple(kernel.shape)} {kernel.dtype}", file=sys.stderr)
    finally:
        if created:
            distributed.shutdown()
    return 0


def _add_ntk_command(commands) -> None:
    ntk = commands.add_parser(
        "ntk", help="compute an empirical NTK into a .npy file (resumable; torchrun for several processes)",
        description="Compute the empirical NTK of model(x) over the inputs in a .npy file, tile by tile, "
                    "into a .npy file with a manifest beside it. Under torchrun every rank computes its "
                    "share of the tiles.")
    ntk.add_argument("--model", required=True, help="module:factory, a function returning the nn.Module")
    ntk.add_argument("--data", required=True, help=".npy file of inputs x1 [N1, *in]")
    ntk.add_argument("--data2", help=".npy file of inputs x2 [N2, *in] (default: x1, symmetric kernel)")
    ntk.add_argument("--out", required=True, help="output .npy file")
    ntk.add_argument("--output", default="trace", choices=("trace", "diagonal", "full"))
    ntk.add_argument("--method", default="auto", choices=("auto", "structured", "jacobian", "ntvp"))
    ntk.add_argument("--precision", default="highest", choices=("highest", "tf32"),
                     help="tf32: TF32 tensor-core products on CUDA (see lazykernel.ntk)")
    ntk.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                     help="dtype the model and the inputs are converted to (default float32)")
    ntk.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank, from LOCAL_RANK)")
    ntk.add_argument("--memory-budget", type=_parse_bytes, default=None,
                     help="working memory per process, e.g. 8GB (default: on the CPU a quarter of the "
                          "available memory, on CUDA half the device's free memory)")
    ntk.add_argument("--batch-size", type=_positive_int, default=None, help="at most this many examples per tile side")
    ntk.add_argument("--resume", action="store_true", help="continue the store at --out if it exists")
    ntk.add_argument("--overwrite", action="store_true", help="discard the store at --out if it exists")
    ntk.add_argument("--quiet", action="store_true", help="no progress bar")
    ntk.set_defaults(run=_ntk)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lazykernel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="report the backend in use and self-check it")
    doctor.set_defaults(run=_doctor)
    _add_demo(commands)
    _add_ntk_command(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # bad arguments; a full disk or a read-only path
        print(f"lazykernel {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
