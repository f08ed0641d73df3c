#!/usr/bin/env python
"""Time lazykernel.ntk_to_disk: a large trace kernel to disk, its peak memory, and 2 gloo ranks vs 1.

Workload: an MLP with input --d-in, 3 hidden ReLU layers of --width and --outputs
outputs (float32, seed 0), on N standard normal inputs; the symmetric `trace`
kernel Θ(x, x), structured method. Every measurement runs in a child process of
its own so that its peak resident memory (ru_maxrss) is its alone.

Three measurements:

1. big: ntk_to_disk with N = --n into a fresh file under --workdir; wall time,
   kernel entries per second (N² entries written) and peak RSS;
2. disk vs memory: in one child, ntk_to_disk and lazykernel.ntk on the same
   N = --n-compare with the same memory budget (so the same tiles), alternated
   --repeats times; median entries per second of each and their ratio;
3. ranks: N = --n-ranks with 1 process of --threads threads, then 2 gloo
   processes of --threads/2 threads each (the same cores); ratio of throughputs.

Also reports the FLOPs the structured method performs against the float32
GEMM rate measured in the child.

Example:
    python benchmarks/bench_disk.py --n 20000 --json benchmarks/results/cpu_disk.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch
from torch import nn


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1. (Not imported from bench_ntk, which would load
    lazykernel and the peers into every child whose peak memory is measured.)"""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def make_mlp(width: int, outputs: int, d_in: int, depth: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    layers: List[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers).eval()


def make_inputs(n: int, d_in: int) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(1))


def structured_trace_flops(model: nn.Module, examples_featurised: int, tiles: int, tile: int,
                           outputs: int) -> float:
    """FLOPs of the structured trace kernel: features of the chunks computed, then Grams of the tiles.

    Per example featurised: forward 2·P and the backward of the O output
    cotangents through every layer but the first, 2·O·d_in·d_out per layer.
    Per pair of examples in a tile (a diagonal tile computes its whole
    square): 2·((d_in + 1) + O·d_out) per layer.
    """
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    params = sum(i * o + o for i, o in sizes)
    per_example = 2.0 * params + sum(2.0 * outputs * i * o for i, o in sizes[1:])
    gram = sum(2.0 * ((i + 1) + outputs * o) for i, o in sizes)
    return per_example * examples_featurised + gram * tiles * tile * tile


def count_featurised_examples() -> List[int]:
    """Count the examples whose features the structured engine computes from now on."""
    from lazykernel.ntk import _StructuredEngine

    counter = [0]
    features = _StructuredEngine.features

    def counted(self, x):
        counter[0] += x.shape[0]
        return features(self, x)

    _StructuredEngine.features = counted
    return counter


def gemm_rate(seconds: float = 1.0) -> float:
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2.0 * 2048 ** 3 * count / (time.perf_counter() - start)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# -- the child processes -----------------------------------------------------------

def child_big(args) -> Dict[str, object]:
    import lazykernel
    from lazykernel.disk import _StorePaths

    model, x = make_mlp(args.width, args.outputs, args.d_in), make_inputs(args.n, args.d_in)
    out = os.path.join(args.workdir, "big.npy")
    rate = gemm_rate()
    featurised = count_featurised_examples()
    start = time.perf_counter()
    lazykernel.ntk_to_disk(model, x, out=out, memory_budget=args.memory_budget, if_exists="overwrite",
                           progress=not args.quiet)
    wall = time.perf_counter() - start
    rate_after = gemm_rate()
    manifest = json.load(open(_StorePaths(out).manifest))
    # the last tile of a row is narrower when the tile does not divide N: count it whole (an upper bound)
    flops = structured_trace_flops(model, featurised[0], manifest["tiles"], manifest["tile_rows"], args.outputs)
    return dict(n=args.n, wall_s=wall, entries_per_s=args.n ** 2 / wall, peak_rss_bytes=peak_rss_bytes(),
                tile=manifest["tile_rows"], tiles=manifest["tiles"], examples_featurised=featurised[0],
                flops=flops,
                gemm_flops=[rate, rate_after], fraction_of_gemm=flops / wall / ((rate + rate_after) / 2),
                file_bytes=os.path.getsize(out))


def child_compare(args) -> Dict[str, object]:
    import lazykernel

    model, x = make_mlp(args.width, args.outputs, args.d_in), make_inputs(args.n_compare, args.d_in)
    out = os.path.join(args.workdir, "compare.npy")
    disk, memory = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        lazykernel.ntk_to_disk(model, x, out=out, memory_budget=args.memory_budget, if_exists="overwrite",
                               progress=False)
        disk.append(time.perf_counter() - start)
        start = time.perf_counter()
        lazykernel.ntk(model, x, memory_budget=args.memory_budget)
        memory.append(time.perf_counter() - start)
    n2 = args.n_compare ** 2
    return dict(n=args.n_compare, disk_s=disk, memory_s=memory,
                disk_entries_per_s=n2 / statistics.median(disk),
                memory_entries_per_s=n2 / statistics.median(memory),
                disk_over_memory=statistics.median(memory) / statistics.median(disk))


def child_rank(args) -> Dict[str, object]:
    import torch.distributed as dist

    import lazykernel

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    model, x = make_mlp(args.width, args.outputs, args.d_in), make_inputs(args.n_ranks, args.d_in)
    out = os.path.join(args.workdir, f"ranks-{os.environ.get('WORLD_SIZE', '1')}.npy")
    start = time.perf_counter()
    lazykernel.ntk_to_disk(model, x, out=out, memory_budget=args.memory_budget, if_exists="overwrite",
                           batch_size=args.ranks_tile, progress=False)
    wall = time.perf_counter() - start
    if dist.is_initialized():
        dist.destroy_process_group()
    return dict(wall_s=wall, peak_rss_bytes=peak_rss_bytes())


# -- the parent ----------------------------------------------------------------------

def spawn(args, role: str, threads: int, env_extra: Dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **env_extra)
    command = [sys.executable, os.path.abspath(__file__), "--child", role] + args.forward
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE)


def collect(processes: List[subprocess.Popen]) -> List[Dict[str, object]]:
    results = []
    for p in processes:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a benchmark child failed with exit status {p.returncode}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=20000, help="N of the big run (default 20000)")
    parser.add_argument("--n-compare", type=positive_int, default=4000, help="N of disk vs in-memory (default 4000)")
    parser.add_argument("--n-ranks", type=positive_int, default=4000, help="N of 1 vs 2 gloo ranks (default 4000)")
    parser.add_argument("--ranks-tile", type=positive_int, default=500, help="tile side of the ranks run (default 500)")
    parser.add_argument("--width", type=positive_int, default=1024)
    parser.add_argument("--d-in", type=positive_int, default=784)
    parser.add_argument("--outputs", type=positive_int, default=10)
    parser.add_argument("--memory-budget", type=float, default=2 * 2 ** 30,
                        help="bytes of working memory per process (default 2 GiB)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="alternations of disk vs in-memory (default 3)")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads of the 1-process runs (default 2)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("big", "compare", "ranks"))
    parser.add_argument("--workdir", default=None, help="folder for the kernels (default: a temporary one)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar in the big run")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        run = {"big": child_big, "compare": child_compare, "rank": child_rank}[args.child]
        print(json.dumps(run(args)))
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_disk_")
    os.makedirs(workdir, exist_ok=True)
    args.forward = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if args.json and args.json in args.forward:
        args.forward.remove(args.json)
    args.forward += ["--workdir", workdir]
    import lazykernel

    report: Dict[str, object] = dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), threads=args.threads,
                     torch=torch.__version__, backend=lazykernel.backend().name, python=platform.python_version()),
        command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        workload=dict(width=args.width, d_in=args.d_in, outputs=args.outputs, hidden_layers=3, dtype="float32",
                      output="trace", method="structured", memory_budget_bytes=args.memory_budget))
    try:
        if "compare" not in args.skip:
            report["compare"] = collect([spawn(args, "compare", args.threads, {})])[0]
        if "ranks" not in args.skip:
            one = collect([spawn(args, "rank", args.threads, {})])[0]
            port = str(free_port())
            two = collect([spawn(args, "rank", max(1, args.threads // 2),
                                 dict(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port)) for r in range(2)])
            two_wall = max(r["wall_s"] for r in two)
            report["ranks"] = dict(n=args.n_ranks, tile=args.ranks_tile, one_process_s=one["wall_s"],
                                   two_processes_s=two_wall, speedup=one["wall_s"] / two_wall)
        if "big" not in args.skip:
            report["big"] = collect([spawn(args, "big", args.threads, {})])[0]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def print_table(report: Dict[str, object]) -> None:
    w = report["workload"]
    print(f"MLP {w['d_in']}-{w['width']}x3-{w['outputs']}, float32 trace kernel, structured, "
          f"memory budget {w['memory_budget_bytes'] / 2 ** 30:.2f} GiB per process")
    print("| measurement | N | result |")
    print("|---|---:|---|")
    if "big" in report:
        b = report["big"]
        print(f"| to disk | {b['n']} | {b['wall_s']:.1f} s, {b['entries_per_s']:.3g} entries/s, peak RSS "
              f"{b['peak_rss_bytes'] / 2 ** 30:.2f} GiB, tile {b['tile']} ({b['tiles']} tiles), "
              f"{100 * b['fraction_of_gemm']:.0f}% of GEMM rate |")
    if "compare" in report:
        c = report["compare"]
        print(f"| disk vs in-memory | {c['n']} | {c['disk_entries_per_s']:.3g} vs {c['memory_entries_per_s']:.3g} "
              f"entries/s (medians of {len(c['disk_s'])}): disk at {100 * c['disk_over_memory']:.0f}% |")
    if "ranks" in report:
        r = report["ranks"]
        print(f"| 2 gloo ranks vs 1 process | {r['n']} | {r['one_process_s']:.1f} s vs "
              f"{r['two_processes_s']:.1f} s: throughput ratio {r['speedup']:.2f} |")


if __name__ == "__main__":
    main()
