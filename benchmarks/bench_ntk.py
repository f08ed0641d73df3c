#!/usr/bin/env python
"""Time lazykernel.ntk against the torch.func tutorial's NTK methods and neural-tangents.

Suites (--suite, several allowed):
  mlp          MLPs with input 128, 3 hidden layers of a given width (ReLU) and O
               outputs, on N inputs, kernel Θ(x, x) in trace or full mode.
  cnn          a CNN on 3×32×32 (conv 3→32→32, 3×3, ReLU, linear to 10; N = 128)
               and the 5-layer Myrtle CNN at width 128 (Shankar et al., 2020;
               N = 32 by default, --myrtle-n).
  transformer  token ids [N, 32], vocab 1000, embeddings d = 256 plus learned
               positions, 2 nn.TransformerEncoderLayer (4 heads, ff 1024, no
               dropout, eval mode), mean over positions, linear to 10; N = 256.
  all          all of the above.
The models are in benchmarks/workloads.py.

For each workload the table gives the median wall time of every method and the
fraction of the machine's float32 GEMM rate (a square GEMM timed just before
and after the lazykernel series) that lazykernel reaches. For the MLPs the
FLOPs are counted analytically (`structured_flops`); for the CNN and
transformer workloads they are `lazykernel.plan(...).flops`, the cost model of
the algorithm lazykernel chooses, whose table (`str(plan)`) is printed too.

Peers: the two methods of the torch.func "Neural Tangent Kernels" tutorial
(Jacobian contraction, NTK-vector products), re-implemented here; each is
skipped, with the memory it would need, when that exceeds --peer-memory-gib.
For the MLPs also `plain-structured`: the structured rule written in plain
PyTorch, two Grams and a Hadamard product per layer (`plain_structured_ntk`).
On CUDA, `structured-tf32` and `plain-structured-tf32` run the same with TF32
tensor-core products (lazykernel's precision="tf32"); their error against the
float32 structured kernel is reported, and their '% GEMM' is of the TF32 rate.
neural-tangents' structured derivatives (benchmarks/peer_neural_tangents.py)
run when JAX and neural-tangents are installed, i.e. in the separate
environment its docstring sets up, in a worker process of their own (JAX never
runs in this one); they are timed alternately with lazykernel, run for run,
after jit compilation. Every peer's kernel is compared with lazykernel's (max |difference|
over max |lazykernel|).

Examples:
    python benchmarks/bench_ntk.py --widths 1024 --n 256 --outputs 10 \\
        --json benchmarks/results/cpu_mlp.json
    PYTHONPATH=$PWD .venv-nt/bin/python benchmarks/bench_ntk.py --suite cnn transformer \\
        --json benchmarks/results/cpu_cnn_transformer.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

import lazykernel
from lazykernel.cli import _positive_int
from workloads import BUILDERS, FAMILIES, Workload, build, make_mlp, relative_difference

try:
    import peer_neural_tangents
except ImportError as error:  # jax or neural-tangents missing: the peer is optional
    NEURAL_TANGENTS_MISSING = f"neural-tangents peer skipped: {error}"
else:
    NEURAL_TANGENTS_MISSING = peer_neural_tangents.UNAVAILABLE


# -- MLP FLOP count ------------------------------------------------------------------

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


# -- a plain-PyTorch structured baseline --------------------------------------------

def plain_structured_ntk(model: nn.Sequential, x: torch.Tensor, output: str) -> torch.Tensor:
    """Θ(x, x) of an MLP the plain way: per layer two Grams and their Hadamard product.

    Hooks record each Linear's input ``A_l: [N, K]`` and output; one backward
    batched over the O one-hot output cotangents gives ``G_l: [O, N, D]``. Then
    per layer ``(A_l A_lᵀ + 1) ∘ (G_l G_lᵀ)`` (the 1 is the bias), with an
    ``[O, N, N]`` (trace) or ``[O·N, O·N]`` and ``[N, N, O, O]`` (full) Gram
    and product as temporaries: what lazykernel's fused op avoids.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs, outputs = [], []

    def hook(module, args, out):
        inputs.append(args[0].detach())
        outputs.append(out)

    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        with torch.enable_grad():
            f = model(x)
    finally:
        for handle in handles:
            handle.remove()
    n, o = f.shape
    basis = torch.eye(o, dtype=f.dtype, device=f.device).unsqueeze(1).expand(o, n, o)
    grads = torch.autograd.grad(f, outputs, grad_outputs=basis, is_grads_batched=True)
    shape = (n, n) if output == "trace" else (n, n, o, o)
    kernel = torch.zeros(shape, dtype=f.dtype, device=f.device)
    for a, g in zip(inputs, grads):
        s = a @ a.T + 1.0                                               # [N, N]
        if output == "trace":
            kernel += s * torch.bmm(g, g.transpose(1, 2)).sum(0)        # Σ_o G_o G_oᵀ: [O, N, N]
        else:
            u = g.reshape(o * n, -1) @ g.reshape(o * n, -1).T           # [O·N, O·N]
            kernel += s[:, :, None, None] * u.view(o, n, o, n).permute(1, 3, 0, 2)
    return kernel


def plain_structured_bytes(n: int, outputs: int, output: str) -> float:
    """float32 bytes of the baseline's largest temporaries: the ``[O·N, O·N]`` Gram and the product."""
    if output == "full":
        cells = (outputs * n) ** 2 + n * n * outputs * outputs
    else:
        cells = outputs * n * n + 2 * n * n
    return 4.0 * cells


# -- the torch.func tutorial's methods ---------------------------------------------

def _reduce(blocks: torch.Tensor, output: str) -> torch.Tensor:
    """[N1, N2, O, O] -> the requested mode: trace [N1, N2], diagonal [N1, N2, O] or full."""
    if output == "trace":
        return blocks.diagonal(dim1=2, dim2=3).sum(-1)
    if output == "diagonal":
        return blocks.diagonal(dim1=2, dim2=3)
    return blocks


# einsum of the per-example Jacobians [N, O, P] of x1 (N) and x2 (M), per output mode
_CONTRACTION = {"trace": "Naf,Maf->NM", "diagonal": "Naf,Maf->NMa", "full": "Naf,Mbf->NMab"}


def tutorial_jacobian_contraction(model, x1, x2, output):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(f_single), (None, 0))(params, x1)
    jac2 = vmap(jacrev(f_single), (None, 0))(params, x2)
    spec = _CONTRACTION[output]
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

def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> Optional[int]:
    """Peak bytes allocated on a CUDA device since `_reset_peak` (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


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


@contextlib.contextmanager
def tf32_products(enabled: bool = True):
    """CUDA float32 matmuls and convolutions on TF32 tensor cores inside the block, or (with
    ``enabled=False``) in full float32 whatever the defaults, as lazykernel's ``precision``
    does; PyTorch's own switches, restored after. The baseline and the GEMM yardstick run
    under it, so each is compared with lazykernel at the same precision."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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

    def rate(self, repeats: int = 10, tf32: bool = False) -> float:
        with tf32_products(tf32):
            timing = median_time(self.run, repeats, warmup=3, device=self.device)
        return 2.0 * self.size ** 3 / timing["median_s"]

    def bracketed(self, fn: Callable[[], object], repeats: int) -> Dict[str, object]:
        """Median time of ``fn``, and the GEMM rate measured just before and after it.

        Interleaving a GEMM between single runs would flush the caches ``fn``
        relies on, so the GEMM runs bracket the whole series instead.
        """
        before = self.samples()
        timing = median_time(fn, repeats, warmup=0, device=self.device)
        timing["gemm_flops"] = self.rate_of(before + self.samples())
        return timing

    def samples(self, count: int = 4) -> List[float]:
        """Seconds of ``count`` single GEMMs."""
        return [median_time(self.run, 1, warmup=0, device=self.device)["median_s"] for _ in range(count)]

    def rate_of(self, seconds: List[float]) -> float:
        """FLOP/s of the median of GEMM timings from `samples`."""
        return 2.0 * self.size ** 3 / statistics.median(seconds)


# -- the MLP suite -----------------------------------------------------------------

MLP_METHODS = ("structured", "structured-tf32", "plain-structured", "plain-structured-tf32", "jacobian", "ntvp",
               "tutorial-jacobian", "tutorial-ntvp")


def run_mlp_suite(args, device: torch.device, probe: GemmProbe, gemm: float,
                  gemm_tf32: Optional[float] = None, records: Optional[List[dict]] = None,
                  save: Callable[[], None] = lambda: None) -> List[dict]:
    """Every MLP size and method. A ``-tf32`` method runs with TF32 products (lazykernel's
    ``precision="tf32"``; PyTorch's switches for the baseline), is compared with the float32
    structured kernel of the same size, and its '% GEMM' is of the TF32 GEMM rate.

    Each record is appended to ``records`` (a new list by default) and ``save`` is called
    after it, so that a run stopped part-way (a time limit) keeps what it measured."""
    header = (f"{'width':>5} {'N':>5} {'O':>3} {'mode':>5} {'method':>21} {'median s':>9} "
              f"{'GFLOP':>7} {'% GEMM':>7}  note")
    print(header)
    print("-" * len(header))
    records = [] if records is None else records
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
                    exact = None      # the float32 structured kernel, for the TF32 methods' error
                    for method in args.methods:
                        record = {"suite": "mlp", "width": width, "n": n, "outputs": outputs, "mode": mode,
                                  "method": method, "params": params, "structured_flops": flops}
                        need = jac_bytes
                        tf32 = method.endswith("-tf32")
                        if method in ("structured", "jacobian", "ntvp"):
                            fn = (lambda m=method: lazykernel.ntk(model, x, output=mode, method=m))
                        elif method == "structured-tf32":
                            fn = (lambda: lazykernel.ntk(model, x, output=mode, precision="tf32"))
                        elif method.startswith("plain-structured"):
                            def fn(tf32=tf32):
                                with tf32_products(tf32):
                                    return plain_structured_ntk(model, x, mode)
                            need = plain_structured_bytes(n, outputs, mode)
                        elif method == "tutorial-jacobian":
                            fn = (lambda: tutorial_jacobian_contraction(model, x, x, mode))
                        else:
                            fn = (lambda: tutorial_ntk_vector_products(model, x, x, mode))
                        result_bytes = 4.0 * n * n * (outputs * outputs if mode == "full" else 1)
                        if result_bytes > args.max_result_gib * 2 ** 30:
                            record.update(status="skipped",
                                          note=f"the kernel itself is {result_bytes / 2**30:.1f} GiB "
                                               f"(> --max-result-gib {args.max_result_gib:g})")
                        elif not method.startswith("structured") and need > args.peer_memory_gib * 2 ** 30:
                            what = "temporaries" if method.startswith("plain-structured") else "Jacobians"
                            record.update(status="skipped", note=f"{what} need {need / 2**30:.0f} GiB "
                                                                  f"(> --peer-memory-gib {args.peer_memory_gib:g})")
                        else:
                            _reset_peak(device)
                            start = time.perf_counter()
                            try:
                                kernel = fn()
                            except (RuntimeError, ValueError) as error:  # out of memory and the like
                                record.update(status="failed", note=str(error).splitlines()[0][:80])
                            else:
                                _synchronize(device)
                                first = time.perf_counter() - start
                                peak = _peak_bytes(device)
                                if peak is not None:
                                    record["peak_bytes"] = peak
                                if method == "structured":
                                    exact = kernel
                                elif tf32 and exact is not None:
                                    record["max_rel_diff_vs_float32"] = relative_difference(kernel, exact)
                                del kernel
                                repeats = 1 if first > args.max_seconds else args.repeats
                                if method == "structured":
                                    record.update(probe.bracketed(fn, repeats), status="ok", note="")
                                else:
                                    record.update(median_time(fn, repeats, warmup=0, device=device),
                                                  status="ok", note="")
                                if "max_rel_diff_vs_float32" in record:
                                    record["note"] = (f"max rel. diff. vs float32 "
                                                      f"{record['max_rel_diff_vs_float32']:.1e}")
                        if record["status"] == "ok":
                            rate = flops / record["median_s"]
                            yardstick = record.get("gemm_flops", gemm)
                            if tf32 and gemm_tf32 is not None:
                                yardstick = gemm_tf32
                                record["yardstick"] = "tf32 GEMM"
                            record["fraction_of_gemm"] = rate / yardstick
                            line = (f"{record['median_s']:9.4f} {flops / 1e9:7.1f} "
                                    f"{100 * rate / yardstick:6.0f}%  {record['note']}")
                        else:
                            line = f"{'-':>9} {flops / 1e9:7.1f} {'-':>7}  {record['status']}: {record['note']}"
                        print(f"{width:5d} {n:5d} {outputs:3d} {mode:>5} {method:>21} {line}", flush=True)
                        records.append(record)
                        save()
    return records


# -- the CNN and transformer suites ------------------------------------------------

LAZYKERNEL_METHODS = ("auto", "structured", "jacobian", "ntvp")
PEER_METHODS = ("tutorial-jacobian", "tutorial-ntvp", "neural-tangents")


def activation_elements(model: nn.Module, x: torch.Tensor) -> int:
    """Elements of every leaf module's output for one example: what a backward pass keeps."""
    seen = [0]

    def count(module, inputs, out):
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                seen[0] += t.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return seen[0]


def tutorial_bytes(method: str, n: int, outputs: int, params: int, activations: int) -> float:
    """float32 bytes a tutorial method holds at once on Θ(x, x) with N examples.

    Jacobian contraction: the per-example Jacobians of x1 and of x2 (the tutorial
    computes both), and the O-fold batched backward's activations. NTK-vector
    products: for each of the N·O rows at once, a parameter-sized cotangent and
    tangent and a JVP through all N examples (about 3 activation copies).
    """
    if method == "tutorial-jacobian":
        return 4.0 * (2 * n * outputs * params + 2 * n * outputs * activations)
    return 4.0 * n * outputs * (2 * params + 3 * n * activations)


def profile_top_ops(fn: Callable[[], object], limit: int = 10) -> List[dict]:
    """The operators of one run of ``fn`` with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:limit]]


def _plan_record(plan) -> dict:
    return {"method": plan.method, "flops": plan.flops, "peak_bytes": plan.peak_bytes,
            "chunks": list(getattr(plan, "chunks", ())),
            "groups": [{"rule": g.rule, "params": list(g.params), "form": g.form, "flops": g.flops,
                        "peak_bytes": g.peak_bytes} for g in plan.groups],
            "text": str(plan)}


def _repeats(first_s: float, args) -> int:
    """As many repeats as fit in --max-seconds (at least 1, at most --repeats)."""
    return max(1, min(args.repeats, int(args.max_seconds // max(first_s, 1e-9))))


def _time_lazykernel(workload: Workload, mode: str, method: str, args, probe: GemmProbe,
                     record: dict, plans: Dict[str, dict]) -> Optional[torch.Tensor]:
    model, x = workload.model, workload.x
    device = x.device
    plan_fn = getattr(lazykernel, "plan", None)
    plan = None if plan_fn is None else plan_fn(model, x, output=mode, method=method)
    if plan is None:
        record["note"] = "lazykernel.plan is missing: no FLOP count"
    else:
        print(plan)
        plans[f"{workload.name}/{mode}/{method}"] = _plan_record(plan)
        record.update(plan_method=plan.method, plan_flops=plan.flops, plan_peak_bytes=plan.peak_bytes)
    fn = (lambda: lazykernel.ntk(model, x, output=mode, method=method))
    # The first run warms up; when it alone fills --max-seconds it is the one
    # sample, and the GEMM yardstick brackets it.
    before = probe.samples()
    _reset_peak(device)
    start = time.perf_counter()
    kernel = fn()
    _synchronize(device)
    first = time.perf_counter() - start
    peak = _peak_bytes(device)
    if peak is not None:
        record["peak_bytes"] = peak
    if first >= args.max_seconds:
        timing = {"median_s": first, "times_s": [first]}
    else:
        timing = median_time(fn, _repeats(first, args), warmup=0, device=device)
    timing["gemm_flops"] = probe.rate_of(before + probe.samples())
    record.update(timing, status="ok", first_s=first)
    record.setdefault("note", "")
    if plan is not None:
        record["fraction_of_gemm"] = plan.flops / record["median_s"] / record["gemm_flops"]
    if args.profile and first < args.max_seconds:
        record["profile"] = profile_top_ops(fn)
        print("  most self CPU time: " + "; ".join(
            f"{e['op']} {100 * e['share']:.0f}%" for e in record["profile"][:6]))
    return kernel


def _time_tutorial(workload: Workload, mode: str, method: str, args, record: dict,
                   reference: Optional[torch.Tensor]) -> None:
    model, x = workload.model, workload.x
    need = tutorial_bytes(method, workload.n, record["outputs"], record["params"],
                          activation_elements(model, x))
    record["estimated_bytes"] = need
    if need > args.peer_memory_gib * 2 ** 30:
        what = "Jacobians" if method == "tutorial-jacobian" else "tangents and JVPs"
        record.update(status="skipped", note=f"{what} need {need / 2**30:.0f} GiB "
                                              f"(> --peer-memory-gib {args.peer_memory_gib:g})")
        return
    fn = (lambda: tutorial_jacobian_contraction(model, x, x, mode) if method == "tutorial-jacobian"
          else tutorial_ntk_vector_products(model, x, x, mode))
    start = time.perf_counter()
    try:
        kernel = fn()
        _synchronize(x.device)
    except (RuntimeError, ValueError) as error:  # out of memory, an op vmap cannot batch
        record.update(status="failed", note=str(error).splitlines()[0][:100])
        return
    first = time.perf_counter() - start
    if first >= args.max_seconds:
        record.update(median_s=first, times_s=[first])
    else:
        record.update(median_time(fn, _repeats(first, args), warmup=0, device=x.device))
    record.update(status="ok", note="", first_s=first)
    if reference is not None:
        record["max_rel_diff"] = relative_difference(kernel, reference)


def _time_neural_tangents(workload: Workload, mode: str, args, probe: GemmProbe, record: dict,
                          reference: Optional[torch.Tensor], ours_record: Optional[dict]) -> None:
    """neural-tangents and lazykernel alternately, run for run, so both see the same machine.

    neural-tangents runs in a worker process (`peer_neural_tangents.NeuralTangentsProcess`)
    and its time is measured there, around its compiled call alone.

    When --max-seconds had room for only one timed lazykernel run
    (``ours_record`` has a single sample), lazykernel is not run again: its series from just before is
    the comparison, and the GEMM rates measured around both series give the
    ratio corrected for the machine's load (``speedup_gemm_normalised``).
    """
    if NEURAL_TANGENTS_MISSING:
        record.update(status="skipped", note=NEURAL_TANGENTS_MISSING)
        return
    if workload.x.device.type != "cpu":
        record.update(status="skipped", note="the neural-tangents peer runs on the CPU only (CPU JAX)")
        return
    if mode not in ("trace", "full"):
        record.update(status="skipped", note=f"no {mode} mode in this comparison")
        return
    model, x = workload.model, workload.x
    ours = (lambda: lazykernel.ntk(model, x, output=mode))
    alongside = not (ours_record and ours_record.get("status") == "ok" and len(ours_record["times_s"]) == 1)
    theirs_s, ours_s = [], []
    try:
        with peer_neural_tangents.NeuralTangentsProcess(model, x, mode) as peer:
            record["compile_s"] = peer.compile_s
            before = probe.samples()
            # pairs of runs while they fit in --max-seconds: at least one, at most --repeats
            started = time.perf_counter()
            while not theirs_s or (len(theirs_s) < args.repeats
                                   and time.perf_counter() - started < args.max_seconds):
                theirs_s.append(peer.run())
                if alongside:
                    start = time.perf_counter()
                    ours()
                    ours_s.append(time.perf_counter() - start)
            record["gemm_flops"] = probe.rate_of(before + probe.samples())
            kernel = peer.kernel()
        if len(theirs_s) >= 3:  # the first pair warmed up the allocators; drop it when others remain
            theirs_s, ours_s = theirs_s[1:], ours_s[1:]
    except Exception as error:  # XLA out of memory or a failed compilation: report, go on
        record.update(status="failed", note=f"{type(error).__name__}: {str(error).splitlines()[0][:100]}")
        return
    if not alongside:
        ours_s = list(ours_record["times_s"])
    record.update(status="ok", note="" if alongside else "lazykernel time from its own series just before",
                  median_s=statistics.median(theirs_s), times_s=theirs_s, lazykernel_alongside=alongside,
                  lazykernel_times_s=ours_s, lazykernel_median_s=statistics.median(ours_s))
    record["speedup"] = record["median_s"] / record["lazykernel_median_s"]
    if ours_record and ours_record.get("gemm_flops"):
        record["speedup_gemm_normalised"] = (record["speedup"] * record["gemm_flops"]
                                             / ours_record["gemm_flops"])
    if reference is not None:
        record["max_rel_diff"] = relative_difference(kernel, reference)


def run_model_suites(args, families: List[str], probe: GemmProbe, plans: Dict[str, dict],
                     records: List[dict], save: Callable[[], None],
                     device: torch.device = torch.device("cpu")) -> None:
    """Time every chosen workload, appending to ``records`` and calling ``save`` after each."""
    sizes = {"cnn-3x32x32": args.cnn_n, "myrtle5-w128": args.myrtle_n, "transformer-2x256": args.transformer_n}
    if "neural-tangents" in args.model_methods and NEURAL_TANGENTS_MISSING:
        print(NEURAL_TANGENTS_MISSING)
    header = (f"{'workload':>18} {'N':>4} {'mode':>5} {'method':>17} {'median s':>9} {'GFLOP':>8} "
              f"{'% GEMM':>7}  note")
    for family in families:
        for name in FAMILIES[family]:
            if args.workloads and name not in args.workloads:
                continue
            workload = build(name, sizes[name])
            workload.model.to(device)
            workload.x = workload.x.to(device)
            with torch.no_grad():
                outputs = int(workload.model(workload.x[:1]).shape[-1])
            params = sum(p.numel() for p in workload.model.parameters())
            print(f"\n== {name}: {workload.description}; N = {workload.n}, O = {outputs}, "
                  f"{params:,} parameters")
            print(header)
            for mode in args.model_modes:
                reference, ours_record = None, None
                for method in args.model_methods:
                    record = {"suite": family, "workload": name, "description": workload.description,
                              "n": workload.n, "outputs": outputs, "mode": mode, "method": method,
                              "params": params}
                    if method in LAZYKERNEL_METHODS:
                        kernel = _time_lazykernel(workload, mode, method, args, probe, record, plans)
                        if reference is None:
                            reference, ours_record = kernel, record
                    elif method == "neural-tangents":
                        _time_neural_tangents(workload, mode, args, probe, record, reference, ours_record)
                    else:
                        _time_tutorial(workload, mode, method, args, record, reference)
                    records.append(record)
                    print(_model_line(record), flush=True)
                    save()


def _model_line(record: dict) -> str:
    flops = record.get("plan_flops")
    gflop = f"{flops / 1e9:8.1f}" if flops is not None else f"{'-':>8}"
    if record["status"] != "ok":
        return (f"{record['workload']:>18} {record['n']:4d} {record['mode']:>5} {record['method']:>17} "
                f"{'-':>9} {gflop} {'-':>7}  {record['status']}: {record['note']}")
    share = record.get("fraction_of_gemm")
    share = f"{100 * share:6.0f}%" if share is not None else f"{'-':>7}"
    notes = []
    if "plan_method" in record:
        notes.append(f"plan: {record['plan_method']}")
    if "max_rel_diff" in record:
        notes.append(f"max rel. diff. vs lazykernel {record['max_rel_diff']:.1e}")
    if "speedup" in record:
        where = "alongside" if record["lazykernel_alongside"] else "just before"
        notes.append(f"lazykernel {record['lazykernel_median_s']:.3f} s {where}; "
                     f"neural-tangents takes {record['speedup']:.2f}x its time "
                     f"({record.get('speedup_gemm_normalised', float('nan')):.2f}x at equal GEMM rate); "
                     f"NT compile {record['compile_s']:.1f} s")
    return (f"{record['workload']:>18} {record['n']:4d} {record['mode']:>5} {record['method']:>17} "
            f"{record['median_s']:9.4f} {gflop} {share}  " + "; ".join(notes))


# -- driver --------------------------------------------------------------------------

# an argparse type: an integer ≥ 1 (sizes, repeats), as the CLI takes them
positive_int = _positive_int


def checked_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    """``--device`` as a torch.device, or a usage error saying why it cannot be used here."""
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device: unknown device {text!r}; use cpu or cuda (cuda:K for the K-th GPU)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {text}: the benchmarks run on cpu or cuda only")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
            parser.error(f"--device {text}: no CUDA device is visible to torch {torch.__version__} "
                         f"(built with {built}); run on a GPU machine or with --device cpu")
        if device.index is not None and device.index >= count:
            parser.error(f"--device {text}: torch sees {count} CUDA device(s), numbered from 0")
    return device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", default=["mlp"], choices=["mlp", "cnn", "transformer", "all"],
                        help="workload families (default: mlp)")
    mlp = parser.add_argument_group("mlp suite")
    mlp.add_argument("--widths", type=positive_int, nargs="+", default=[256, 1024, 4096])
    mlp.add_argument("--n", type=positive_int, nargs="+", default=[256, 1024], help="numbers of inputs")
    mlp.add_argument("--outputs", type=positive_int, nargs="+", default=[1, 10])
    mlp.add_argument("--modes", nargs="+", default=["trace", "full"], choices=["trace", "full"])
    mlp.add_argument("--methods", nargs="+",
                     default=["structured", "plain-structured", "jacobian", "ntvp", "tutorial-jacobian",
                              "tutorial-ntvp"],
                     choices=list(MLP_METHODS),
                     help="a -tf32 method only differs from its float32 twin on CUDA; list "
                          "'structured' first to have the TF32 results compared with it")
    models = parser.add_argument_group("cnn and transformer suites")
    models.add_argument("--cnn-n", type=positive_int, default=128, help="inputs of the small CNN")
    models.add_argument("--myrtle-n", type=positive_int, default=32, help="inputs of the Myrtle-5 CNN")
    models.add_argument("--transformer-n", type=positive_int, default=256, help="inputs of the transformer")
    models.add_argument("--workloads", nargs="+", default=None, choices=sorted(BUILDERS),
                        help="only these workloads of the chosen suites")
    models.add_argument("--model-modes", nargs="+", default=["trace"], choices=["trace", "diagonal", "full"])
    models.add_argument("--model-methods", nargs="+", default=["auto", "tutorial-jacobian", "tutorial-ntvp",
                                                               "neural-tangents"],
                        choices=list(LAZYKERNEL_METHODS + PEER_METHODS),
                        help="lazykernel methods and peers; the first lazykernel method is the "
                             "reference the peers are compared with")
    models.add_argument("--profile", action="store_true",
                        help="profile one more lazykernel run per workload (when one run takes less "
                             "than --max-seconds) and list the costliest operators")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--max-result-gib", type=float, default=16.0,
                        help="mlp: skip a size whose float32 kernel alone would exceed this")
    parser.add_argument("--peer-memory-gib", type=float, default=12.0,
                        help="skip a generic method whose Jacobians/tangents would need more than this")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="mlp: skip repeats of a method whose first run took longer than this; "
                             "cnn/transformer: time budget per method, as many repeats as fit")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    suites = ["mlp", "cnn", "transformer"] if "all" in args.suite else list(dict.fromkeys(args.suite))

    device = checked_device(parser, args.device)
    torch.manual_seed(0)
    probe = GemmProbe(device)
    gemm = probe.rate()
    gemm_tf32 = probe.rate(tf32=True) if device.type == "cuda" else None
    info = lazykernel.backend()
    print(f"lazykernel backend: {info.name}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; device {device}; float32 GEMM rate {gemm / 1e9:.0f} GFLOP/s"
          + (f"; TF32 GEMM rate {gemm_tf32 / 1e9:.0f} GFLOP/s" if gemm_tf32 else ""))
    peer_versions = {} if NEURAL_TANGENTS_MISSING else peer_neural_tangents.versions()
    if peer_versions:
        print("neural-tangents peer:", ", ".join(f"{k} {v}" for k, v in peer_versions.items()))
    records: List[dict] = []
    plans: Dict[str, dict] = {}
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gemm_float32_flops": gemm, "gemm_tf32_flops": gemm_tf32, "backend": info.name,
               "python": sys.version.split()[0], "peer": peer_versions}
    command = " ".join(["python", "benchmarks/bench_ntk.py"] + (argv or sys.argv[1:]))

    def save(final: bool) -> None:
        """Write what has been measured so far, so that an interrupted run keeps it."""
        if not args.json:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        # a whole file or none: a run stopped while writing keeps the previous version
        with open(args.json + ".tmp", "w") as handle:
            json.dump({"machine": machine, "command": command, "complete": final,
                       "results": records, "plans": plans}, handle, indent=1)
        os.replace(args.json + ".tmp", args.json)
        if final:
            print(f"wrote {args.json}")

    if "mlp" in suites:
        run_mlp_suite(args, device, probe, gemm, gemm_tf32, records, lambda: save(False))
    families = [s for s in suites if s != "mlp"]
    if families:
        run_model_suites(args, families, probe, plans, records, lambda: save(False), device)
    save(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
