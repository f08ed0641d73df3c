#!/usr/bin/env python
"""Time lazykernel's Jacobian products against torch.func, and ntk_vp against forming the kernel.

Sections (choose with --sections):

* ``op``: the fused ``linear_jvp`` kernel alone on ``[2, N, K] × [K, K]`` with
  Ẇ, b, ḃ: its FLOPs (6·N·K²), bytes moved (each operand read once, the output
  written once plus the bias fill), achieved rate against the float32 GEMM rate
  measured around it, and its time against three separate ``torch.addmm``.
* ``products``: ``lazykernel.jvp`` / ``vjp`` against ``torch.func.jvp`` / ``vjp``
  of the whole model, on MLPs (input 128, 3 hidden ReLU layers of each
  --widths, 10 outputs) and a small CNN, N = --n inputs. Reported: median
  times, ``jvp / (2 × forward)`` (the target is ≤ 1.5: a JVP of a linear layer
  is three GEMMs of the forward's size where two forwards are two), and for
  the MLP jvp its FLOPs and the fraction of the float32 GEMM rate measured in
  the same run.
* ``ntk_vp``: ``ntk_vp(model, x, v)`` against ``ntk(model, x) @ v`` on a
  one-output width-1024 MLP as N grows: median time and peak resident memory
  above the baseline of each call (a sampling thread reads /proc/self/statm;
  large allocations are returned to the system on free, so the peak is the
  call's own). Writes a PNG plot when matplotlib is installed.
* ``cg``: kernel regression (t = ∞, ridge) by conjugate gradients with
  ``ntk_vp`` on --cg-n inputs of a one-hidden-layer width-1024 MLP, run once;
  then the same CG on the first --cg-sub inputs compared with the dense eigen
  solution from ``ntk()`` of those inputs, both in float64 with the same ridge
  rule: the relative error ``‖f_cg − f_dense‖ / ‖f_dense‖`` of the train
  predictions at t = ∞ and ``‖α_cg − α‖ / ‖α‖`` against a direct solve.

Example:
    python benchmarks/bench_products.py --json benchmarks/results/cpu_products.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.func import functional_call

import lazykernel
from lazykernel.predict import gradient_descent_mse, gradient_descent_mse_cg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ntk import GemmProbe, median_time, positive_int  # noqa: E402


# -- memory ------------------------------------------------------------------------

def _return_large_blocks_to_the_system() -> None:
    """Make glibc mmap (and unmap on free) every block over 64 KiB, so RSS tracks live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_trim_threshold = -3, -1
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 64 * 1024)
    except OSError:
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak resident bytes above the level before ``fn``, sampled every millisecond."""
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return peak[0] - base


# -- workloads ---------------------------------------------------------------------

def make_mlp(width: int, outputs: int, depth: int, d_in: int) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def mlp_jvp_flops(model: nn.Module, n: int) -> float:
    """FLOPs of the structured jvp: first layer x·[W; Ẇ] (4NKD), others [x; ẋ]·W + x·Ẇ (6NKD)."""
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    return sum((4.0 if i == 0 else 6.0) * n * k * d for i, (k, d) in enumerate(sizes))


def _torch_func_jvp(model, x, tangent):
    primals = {name: p.detach() for name, p in model.named_parameters()}
    return torch.func.jvp(lambda p: functional_call(model, p, (x,)), (primals,), (tangent,))


def _torch_func_vjp(model, x, cot):
    primals = {name: p.detach() for name, p in model.named_parameters()}
    _, pull = torch.func.vjp(lambda p: functional_call(model, p, (x,)), primals)
    return pull(cot)


def bench_products(args, probe: GemmProbe) -> List[Dict[str, object]]:
    rows = []
    workloads = [(f"mlp-{w}", make_mlp(w, 10, 3, 128), torch.randn(args.n, 128)) for w in args.widths]
    workloads.append(("cnn", make_cnn(), torch.randn(args.n, 3, 32, 32)))
    for name, model, x in workloads:
        model.eval()
        tangent = {k: torch.randn_like(p) for k, p in model.named_parameters()}
        with torch.no_grad():
            cot = torch.randn_like(model(x))
        # torch.func's jvp and vjp need no autograd graph either; all run under no_grad
        # except vjp, whose pullback is the backward pass.
        cases = {
            "forward": lambda: model(x),
            "lazykernel.jvp": lambda: lazykernel.jvp(model, x, tangent),
            "torch.func.jvp": lambda: _torch_func_jvp(model, x, tangent),
            "lazykernel.vjp": lambda: lazykernel.vjp(model, x, cot),
            "torch.func.vjp": lambda: _torch_func_vjp(model, x, cot),
        }
        with torch.no_grad():
            y_lk, t_lk = cases["lazykernel.jvp"]()
            y_tf, t_tf = cases["torch.func.jvp"]()
        agreement = ((t_lk - t_tf).norm() / t_tf.norm()).item()
        times: Dict[str, List[float]] = {case: [] for case in cases}
        # interleave the cases so that the machine's drift hits all of them alike
        for _ in range(args.repeats):
            for case, fn in cases.items():
                ctx = torch.no_grad() if "vjp" not in case else torch.enable_grad()
                with ctx:
                    times[case].append(median_time(fn, 1, warmup=0)["median_s"])
        med = {case: statistics.median(ts) for case, ts in times.items()}
        row = {"workload": name, "n": args.n, "median_s": med,
               "jvp_over_two_forwards": med["lazykernel.jvp"] / (2 * med["forward"]),
               "torch_func_jvp_over_two_forwards": med["torch.func.jvp"] / (2 * med["forward"]),
               "jvp_speedup_vs_torch_func": med["torch.func.jvp"] / med["lazykernel.jvp"],
               "vjp_speedup_vs_torch_func": med["torch.func.vjp"] / med["lazykernel.vjp"],
               "relative_difference_of_tangents": agreement}
        if name.startswith("mlp"):
            with torch.no_grad():
                timing = probe.bracketed(cases["lazykernel.jvp"], args.repeats)
            flops = mlp_jvp_flops(model, args.n)
            row.update(jvp_flops=flops, jvp_gflops=flops / timing["median_s"] / 1e9,
                       gemm_gflops=timing["gemm_flops"] / 1e9,
                       fraction_of_gemm=flops / timing["median_s"] / timing["gemm_flops"])
        rows.append(row)
        print(f"{name:>9}  fwd {med['forward']*1e3:8.1f} ms  jvp {med['lazykernel.jvp']*1e3:8.1f} ms "
              f"(torch.func {med['torch.func.jvp']*1e3:8.1f})  jvp/2fwd {row['jvp_over_two_forwards']:.2f} "
              f"(torch.func {row['torch_func_jvp_over_two_forwards']:.2f})  vjp {med['lazykernel.vjp']*1e3:8.1f} ms "
              f"(torch.func {med['torch.func.vjp']*1e3:8.1f})"
              + (f"  jvp {row['jvp_gflops']:.0f} GFLOP/s = {row['fraction_of_gemm']:.0%} of GEMM "
                 f"{row['gemm_gflops']:.0f}" if "jvp_gflops" in row else ""), flush=True)
    return rows


def bench_op(args, probe: GemmProbe) -> List[Dict[str, object]]:
    rows = []
    for k in args.widths:
        n = args.n
        gen = torch.Generator().manual_seed(0)
        xs = torch.randn(2, n, k, generator=gen)
        w, w_dot = torch.randn(k, k, generator=gen), torch.randn(k, k, generator=gen)
        b, b_dot = torch.randn(k, generator=gen), torch.randn(k, generator=gen)
        fused = lambda: lazykernel.ops.linear_jvp_stacked(xs, w, w_dot, b, b_dot)  # noqa: E731

        def separate():
            y = torch.addmm(b, xs[0], w.T)
            y_dot = torch.addmm(b_dot, xs[1], w.T)
            y_dot.addmm_(xs[0], w_dot.T)
            return y, y_dot

        t_sep = statistics.median(median_time(separate, 1, warmup=1)["median_s"] for _ in range(args.repeats))
        timing = probe.bracketed(fused, args.repeats)
        flops = 6.0 * n * k * k
        elt = 4
        # compulsory traffic: xs (2NK) and x again for Ẇ (NK), W and Ẇ (2K²), b and ḃ (2K);
        # the output written by the bias fill (2NK), read and written by the first GEMM
        # (4NK), its tangent half read and written by the second (2NK)
        moved = elt * (11 * n * k + 2 * k * k + 2 * k)
        row = {"k": k, "n": n, "flops": flops, "bytes": moved, "flops_per_byte": flops / moved,
               "fused_s": timing["median_s"], "separate_addmm_s": t_sep,
               "gflops": flops / timing["median_s"] / 1e9, "gemm_gflops": timing["gemm_flops"] / 1e9,
               "fraction_of_gemm": flops / timing["median_s"] / timing["gemm_flops"]}
        rows.append(row)
        print(f"linear_jvp N {n} K=D {k}: {flops/1e9:.2f} GFLOP, {moved/2**20:.0f} MiB, "
              f"{row['flops_per_byte']:.0f} FLOP/B; fused {timing['median_s']*1e3:.1f} ms = {row['gflops']:.0f} GFLOP/s "
              f"= {row['fraction_of_gemm']:.0%} of GEMM {row['gemm_gflops']:.0f}; 3 x addmm {t_sep*1e3:.1f} ms", flush=True)
    return rows


def bench_ntk_vp(args) -> List[Dict[str, object]]:
    torch.manual_seed(0)
    model = make_mlp(1024, 1, 3, 128).eval()
    rows = []
    for n in args.ntk_vp_n:
        x = torch.randn(n, 128)
        v = torch.randn(n)
        product = lambda: lazykernel.ntk_vp(model, x, v)  # noqa: E731
        formed = lambda: lazykernel.ntk(model, x) @ v  # noqa: E731
        # ntk() differentiates internally, so it must not run under no_grad
        difference = ((product() - formed()).norm() / formed().norm()).item()
        t_vp = statistics.median(median_time(product, 1, warmup=0)["median_s"] for _ in range(args.repeats))
        t_k = statistics.median(median_time(formed, 1, warmup=0)["median_s"] for _ in range(args.repeats))
        m_vp, m_k = peak_memory(product), peak_memory(formed)
        rows.append({"n": n, "ntk_vp_s": t_vp, "ntk_matvec_s": t_k, "ntk_vp_peak_bytes": m_vp,
                     "ntk_matvec_peak_bytes": m_k, "relative_difference": difference})
        print(f"N {n:6d}  ntk_vp {t_vp*1e3:9.1f} ms {m_vp/2**20:8.1f} MiB   ntk()@v {t_k*1e3:9.1f} ms "
              f"{m_k/2**20:8.1f} MiB   rel. diff {difference:.1e}", flush=True)
    return rows


def plot_ntk_vp(rows, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib to get one)")
        return
    n = [r["n"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    ax_t.loglog(n, [r["ntk_vp_s"] for r in rows], "o-", label="ntk_vp")
    ax_t.loglog(n, [r["ntk_matvec_s"] for r in rows], "s-", label="ntk() @ v")
    ax_t.set_xlabel("N"), ax_t.set_ylabel("seconds"), ax_t.legend()
    ax_m.loglog(n, [max(r["ntk_vp_peak_bytes"], 1) / 2**20 for r in rows], "o-", label="ntk_vp")
    ax_m.loglog(n, [max(r["ntk_matvec_peak_bytes"], 1) / 2**20 for r in rows], "s-", label="ntk() @ v")
    ax_m.set_xlabel("N"), ax_m.set_ylabel("peak MiB above baseline"), ax_m.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def bench_cg(args) -> Dict[str, object]:
    torch.manual_seed(0)
    d_in = 16
    model = nn.Sequential(nn.Linear(d_in, 1024), nn.Tanh(), nn.Linear(1024, 1)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.cg_n, d_in, generator=gen)
    # a smooth target plus noise, so the ridge matters
    y = torch.sin(x[:, 0]) + 0.5 * torch.cos(2 * x[:, 1]) + 0.1 * torch.randn(args.cg_n, generator=gen)
    with torch.no_grad():
        f0 = model(x)[:, 0]
    # ridge = --cg-ridge · N · (mean kernel diagonal, estimated on 256 inputs): the
    # penalty of a loss averaged over examples, which keeps the conditioning (and
    # the CG iteration count) about constant as N grows, since λ_max(K) ∝ N.
    mean_diag = lazykernel.ntk(model, x[:256]).diagonal().mean().item()

    def ridge_for(n: int) -> float:
        return args.cg_ridge * n * mean_diag

    ridge = ridge_for(args.cg_n)
    result: Dict[str, object] = {"n": args.cg_n, "width": 1024, "d_in": d_in, "ridge": ridge,
                                 "ridge_per_example_over_mean_diagonal": args.cg_ridge, "tol": args.cg_tol}
    dense_bytes = args.cg_n ** 2 * 8
    print(f"CG on N = {args.cg_n}: the dense float64 kernel would take {dense_bytes / 2**30:.1f} GiB", flush=True)
    start = time.perf_counter()
    holder = {}

    def solve():
        holder["s"] = gradient_descent_mse_cg(lambda v: lazykernel.ntk_vp(model, x, v), y, ridge=ridge,
                                              fx_train_0=f0, tol=args.cg_tol, max_iter=args.cg_max_iter)

    peak = peak_memory(solve)
    solution = holder["s"]
    elapsed = time.perf_counter() - start
    train_rmse = ((solution.train - y).pow(2).mean().sqrt()).item()
    result.update(seconds=elapsed, iterations=solution.iterations, peak_bytes=peak,
                  dense_kernel_float64_bytes=dense_bytes,
                  relative_residual=solution.relative_residual.max().item(), train_rmse=train_rmse)
    print(f"  {solution.iterations} iterations, {elapsed:.1f} s, peak {peak / 2**20:.0f} MiB above baseline, "
          f"relative residual {result['relative_residual']:.1e}", flush=True)

    # The check: the same pipeline on a subsample against the dense eigen solution, float64.
    sub = args.cg_sub
    model64 = nn.Sequential(*[m for m in model]).double()
    xs, ys = x[:sub].double(), y[:sub].double()
    with torch.no_grad():
        f0s = model64(xs)[:, 0]
    ridge_sub = ridge_for(sub)
    cg = gradient_descent_mse_cg(lambda v: lazykernel.ntk_vp(model64, xs, v), ys, ridge=ridge_sub, fx_train_0=f0s,
                                 tol=args.cg_tol, max_iter=args.cg_max_iter)
    k = lazykernel.ntk(model64, xs)
    dense = gradient_descent_mse(k, ys, ridge=ridge_sub)(math.inf, fx_train_0=f0s)
    alpha_dense = torch.linalg.solve(k + ridge_sub * torch.eye(sub, dtype=torch.float64), ys - f0s)
    rel_pred = ((cg.train - dense.train).norm() / dense.train.norm()).item()
    rel_alpha = ((cg.alpha - alpha_dense).norm() / alpha_dense.norm()).item()
    result.update(subsample=sub, subsample_ridge=ridge_sub, subsample_iterations=cg.iterations,
                  subsample_relative_error_predictions=rel_pred, subsample_relative_error_alpha=rel_alpha)
    print(f"  subsample N = {sub} (float64): CG vs dense eigen: relative error of train predictions "
          f"{rel_pred:.1e}, of alpha {rel_alpha:.1e} ({cg.iterations} iterations)", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["op", "products", "ntk_vp", "cg"],
                        choices=["op", "products", "ntk_vp", "cg"])
    parser.add_argument("--widths", type=positive_int, nargs="+", default=[1024, 4096])
    parser.add_argument("--n", type=positive_int, default=256, help="inputs for the products section")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--ntk-vp-n", type=positive_int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--cg-n", type=positive_int, default=50_000)
    parser.add_argument("--cg-sub", type=positive_int, default=2000)
    parser.add_argument("--cg-ridge", type=float, default=1e-4,
                        help="ridge per example, as a fraction of the mean kernel diagonal (ridge = this · N · mean diag)")
    parser.add_argument("--cg-tol", type=float, default=1e-6)
    parser.add_argument("--cg-max-iter", type=positive_int, default=2000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default="benchmarks/results/ntk_vp_scaling.png")
    args = parser.parse_args(argv)
    if "cg" in args.sections and args.cg_sub > args.cg_n:
        parser.error(f"--cg-sub {args.cg_sub} is larger than --cg-n {args.cg_n}: the dense check "
                     "solves the first --cg-sub of the --cg-n inputs; lower --cg-sub or raise --cg-n")
    _return_large_blocks_to_the_system()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {"torch": torch.__version__, "backend": lazykernel.backend().name, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "argv": sys.argv[1:]}
    print(f"torch {info['torch']}, backend {info['backend']}, {info['threads']} threads")
    results: Dict[str, object] = {"info": info}
    probe = GemmProbe(torch.device("cpu"))
    if "op" in args.sections:
        results["op"] = bench_op(args, probe)
    if "products" in args.sections:
        results["products"] = bench_products(args, probe)
    if "ntk_vp" in args.sections:
        results["ntk_vp"] = bench_ntk_vp(args)
        plot_ntk_vp(results["ntk_vp"], args.plot)
    if "cg" in args.sections:
        results["cg"] = bench_cg(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
