#!/usr/bin/env python
"""Time lazykernel.ntk against the torch.func tutorial's NTK methods on MLPs.

Workloads: MLPs with input 128, 3 hidden layers of a given width (ReLU) and O
outputs, on N inputs, kernel Θ(x, x) in trace or full mode. For each workload
the table gives the median wall time of every method, the FLOPs the structured
method performs, and the fraction of the machine's float32 GEMM rate (measured
in the same run) that this represents.

Peers: the two methods of the torch.func "Neural Tangent Kernels" tutorial
(Jacobian contraction, NTK-vector products), re-implemented here; each is
skipped with the memory it would need when that exceeds --peer-memory-gib.

Example:
    python benchmarks/bench_ntk.py --widths 1024 --n 256 --outputs 10 \\
        --json benchmarks/results/cpu_mlp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

import lazykernel


# -- workloads -------------------------------------------------------------------

def make_mlp(width: int, outputs: int, depth: int = 3, d_in: int = 128) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def linear_sizes(model: nn.Module):
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def structured_flops(model: nn.Module, n: int, outputs: int, output: str) -> float:
    """FLOPs of the structured method on Θ(x, x) for an MLP.

    forward 2·N·P; backward of the O output cotangents through every layer but
    the first, 2·N·O·d_in·d_out each; per layer the two Grams over the upper
    triangle of examples, N(N+1)/2 · 2·((d_in+1) + m·d_out) with m = O (trace)
    or O² (full).
    """
    sizes = linear_sizes(model)
    params = sum(i * o + o for i, o in sizes)
    m = outputs * outputs if output == "full" else outputs
    if outputs == 1:
        m = 1
    pairs = n * (n + 1) / 2
    flops = 2.0 * n * params
    flops += sum(2.0 * n * outputs * i * o for i, o in sizes[1:])
    flops += sum(2.0 * pairs * ((i + 1) + m * o) for i, o in sizes)
    return flops


# -- the torch.func tutorial's methods ---------------------------------------------

def _reduce(blocks: torch.Tensor, output: str) -> torch.Tensor:
    """[N1, N2, O, O] -> the requested mode."""
    if output == "trace":
        return blocks.diagonal(dim1=2, dim2=3).sum(-1)
    return blocks


def tutorial_jacobian_contraction(model, x1, x2, output):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(f_single), (None, 0))(params, x1)
    jac2 = vmap(jacrev(f_single), (None, 0))(params, x2)
    spec = "Naf,Maf->NM" if output == "trace" else "Naf,Mbf->NMab"
    total = 0
    for name in params:
        j1 = jac1[name].flatten(2)
        j2 = jac2[name].flatten(2)
        total = total + torch.einsum(spec, j1, j2)
    return total


def tutorial_ntk_vector_products(model, x1, x2, output):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x,))

    def f2(p):
        return f(p, x2)

    _, vjp_fn = vjp(lambda p: f(p, x1), params)

    def row(v):
        (tangent,) = vjp_fn(v)
        return jvp(f2, (params,), (tangent,))[1]

    n1 = x1.shape[0]
    o = f(params, x1[:1]).shape[-1]
    basis = torch.eye(n1 * o, dtype=x1.dtype, device=x1.device).view(n1 * o, n1, o)
    rows = vmap(row)(basis)  # [N1*O, N2, O]
    blocks = rows.view(n1, o, -1, o).permute(0, 2, 1, 3)
    return _reduce(blocks, output)


# -- timing ----------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                device: torch.device = torch.device("cpu")) -> Dict[str, object]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times}


class GemmProbe:
    """A square float32 GEMM whose rate is the yardstick for '% of GEMM'.

    The machine is shared and its speed drifts, so the GEMM is timed around
    each structured measurement and both medians come from the same minute.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.size = 8192 if device.type == "cuda" else 2048
        self.a = torch.randn(self.size, self.size, device=device)
        self.b = torch.randn(self.size, self.size, device=device)

    def run(self) -> None:
        self.a @ self.b

    def rate(self, repeats: int = 10) -> float:
        timing = median_time(self.run, repeats, warmup=3, device=self.device)
        return 2.0 * self.size ** 3 / timing["median_s"]

    def bracketed(self, fn: Callable[[], object], repeats: int) -> Dict[str, object]:
        """Median time of ``fn``, and the GEMM rate measured just before and after it.

        Interleaving a GEMM between single runs would flush the caches ``fn``
        relies on, so the GEMM runs bracket the whole series instead.
        """
        before = [median_time(self.run, 1, warmup=0, device=self.device)["median_s"] for _ in range(4)]
        timing = median_time(fn, repeats, warmup=0, device=self.device)
        after = [median_time(self.run, 1, warmup=0, device=self.device)["median_s"] for _ in range(4)]
        timing["gemm_flops"] = 2.0 * self.size ** 3 / statistics.median(before + after)
        return timing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--n", type=int, nargs="+", default=[256, 1024], help="numbers of inputs")
    parser.add_argument("--outputs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--modes", nargs="+", default=["trace", "full"], choices=["trace", "full"])
    parser.add_argument("--methods", nargs="+",
                        default=["structured", "jacobian", "ntvp", "tutorial-jacobian", "tutorial-ntvp"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-memory-gib", type=float, default=12.0,
                        help="skip a generic method whose Jacobians/tangents would need more than this")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip repeats of a method whose first run took longer than this")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    probe = GemmProbe(device)
    gemm = probe.rate()
    info = lazykernel.backend()
    print(f"lazykernel backend: {info.name}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; device {device}; float32 GEMM rate {gemm / 1e9:.0f} GFLOP/s")
    header = f"{'width':>5} {'N':>5} {'O':>3} {'mode':>5} {'method':>18} {'median s':>9} {'GFLOP':>7} {'% GEMM':>7}  note"
    print(header)
    print("-" * len(header))
    records = []
    for width in args.widths:
        for outputs in args.outputs:
            model = make_mlp(width, outputs).eval().to(device)
            params = sum(p.numel() for p in model.parameters())
            for n in args.n:
                x = torch.randn(n, 128, device=device)
                for mode in args.modes:
                    if outputs == 1 and mode == "full":
                        continue
                    flops = structured_flops(model, n, outputs, mode)
                    jac_bytes = 4.0 * 2 * n * outputs * params
                    for method in args.methods:
                        record = {"width": width, "n": n, "outputs": outputs, "mode": mode,
                                  "method": method, "params": params, "structured_flops": flops}
                        if method in ("structured", "jacobian", "ntvp"):
                            fn = (lambda m=method: lazykernel.ntk(model, x, output=mode, method=m))
                        elif method == "tutorial-jacobian":
                            fn = (lambda: tutorial_jacobian_contraction(model, x, x, mode))
                        else:
                            fn = (lambda: tutorial_ntk_vector_products(model, x, x, mode))
                        if method != "structured" and jac_bytes > args.peer_memory_gib * 2 ** 30:
                            record.update(status="skipped",
                                          note=f"Jacobians need {jac_bytes / 2**30:.0f} GiB")
                        else:
                            start = time.perf_counter()
                            try:
                                fn()
                            except (RuntimeError, ValueError) as error:  # out of memory and the like
                                record.update(status="failed", note=str(error).splitlines()[0][:80])
                            else:
                                _synchronize(device)
                                first = time.perf_counter() - start
                                repeats = 1 if first > args.max_seconds else args.repeats
                                if method == "structured":
                                    record.update(probe.bracketed(fn, repeats), status="ok", note="")
                                else:
                                    record.update(median_time(fn, repeats, warmup=0, device=device),
                                                  status="ok", note="")
                        if record["status"] == "ok":
                            rate = flops / record["median_s"]
                            yardstick = record.get("gemm_flops", gemm)
                            record["fraction_of_gemm"] = rate / yardstick
                            line = (f"{record['median_s']:9.4f} {flops / 1e9:7.1f} "
                                    f"{100 * rate / yardstick:6.0f}%  ")
                        else:
                            line = f"{'-':>9} {flops / 1e9:7.1f} {'-':>7}  {record['status']}: {record['note']}"
                        print(f"{width:5d} {n:5d} {outputs:3d} {mode:>5} {method:>18} {line}", flush=True)
                        records.append(record)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({
                "machine": {"platform": platform.platform(), "processor": platform.processor(),
                            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                            "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "gemm_float32_flops": gemm, "backend": info.name,
                            "python": sys.version.split()[0]},
                "command": " ".join(["python", "benchmarks/bench_ntk.py"] + (argv or sys.argv[1:])),
                "results": records,
            }, handle, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
