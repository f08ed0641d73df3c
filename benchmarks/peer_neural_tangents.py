#!/usr/bin/env python
"""neural-tangents as a peer of lazykernel: the same models, the same weights, in JAX.

Each benchmark workload (benchmarks/workloads.py) is rebuilt as a plain JAX
function ``apply(params, x)`` whose parameters are copied from the PyTorch
model, and its empirical NTK is computed with
``nt.empirical_ntk_fn(apply, trace_axes=…, vmap_axes=0,
implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES)`` (Novak,
Sohl-Dickstein & Schoenholz, 2022, "Fast Finite Width Neural Tangent Kernel"),
jit-compiled and warmed up before it is timed. bench_ntk.py uses this module
when it can import it and says so when it cannot.

neural-tangents' trace mode (``trace_axes=(-1,)``) is the mean over outputs;
lazykernel's is the sum, so `ntk` multiplies by O before returning.

JAX must stay out of lazykernel's own environment, so the peer lives in a
separate virtual environment that reuses the extension built in the checkout
(same torch, same Python). neural-tangents 0.6.5 (the latest) needs a JAX
from its own time: with 0.4.23 every workload agrees with lazykernel; 0.4.25
aborts in XLA's CPU compiler ("could not append a binary post-op") on the
transformer's structured derivatives, and 0.4.30 fails inside neural-tangents
("module 'jax.interpreters.ad' has no attribute 'source_info_util'"). It
imports ``jax.experimental.jax2tf``, hence needs TensorFlow:

    python3 -m venv .venv-nt
    .venv-nt/bin/pip install "jax==0.4.23" "jaxlib==0.4.23" "tensorflow==2.17.1" \\
        "neural-tangents==0.6.5" "torch==2.13.0" "numpy<2"
    # in the checkout, after `pip install --no-build-isolation -e .` in the main venv:
    PYTHONPATH=$PWD .venv-nt/bin/python benchmarks/peer_neural_tangents.py   # agreement check
    PYTHONPATH=$PWD .venv-nt/bin/python benchmarks/bench_ntk.py --suite cnn transformer

Run as a script, this module checks on a few examples of every workload that
neural-tangents and lazykernel give the same kernel.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import math
import os
import pickle
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

# TensorFlow (pulled in by neural-tangents) is chatty and would grab threads
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# JAX is imported by `_load_jax`, in the process that computes neural-tangents'
# kernels only. Once a process has run an XLA computation, lazykernel's runs
# in it take many more page faults (about 20x on Myrtle-5) and 30-40 % longer,
# so bench_ntk.py keeps JAX out of its own process and drives the peer in a
# worker process (`NeuralTangentsProcess`).
jax = jnp = lax = nt = None
_MISSING = [name for name in ("jax", "jaxlib", "neural_tangents") if importlib.util.find_spec(name) is None]
UNAVAILABLE = (f"neural-tangents peer skipped: no module {', '.join(_MISSING)} "
               f"(see benchmarks/peer_neural_tangents.py --help)" if _MISSING else "")


def _load_jax() -> None:
    """Import JAX and neural-tangents into this process (once)."""
    global jax, jnp, lax, nt
    if nt is not None:
        return
    if UNAVAILABLE:
        raise ImportError(UNAVAILABLE)
    import jax as jax_module
    import jax.numpy as jnp_module
    from jax import lax as lax_module
    import neural_tangents as nt_module
    jax, jnp, lax, nt = jax_module, jnp_module, lax_module, nt_module

from workloads import TokenTransformer, relative_difference

Params = Dict[str, object]
ApplyFn = Callable[[Params, object], object]


def versions() -> Dict[str, str]:
    """Versions of the peer's packages, read without importing them (empty when unavailable)."""
    if UNAVAILABLE:
        return {}
    return {name: importlib.metadata.version(name) for name in ("neural-tangents", "jax", "jaxlib")}


# -- PyTorch model -> JAX function with the same weights ----------------------------

def _array(t: torch.Tensor):
    return jnp.asarray(t.detach().cpu().numpy())


def _sequential_to_jax(model: nn.Sequential) -> Tuple[ApplyFn, Params]:
    """Conv2d / ReLU / AvgPool2d / AdaptiveAvgPool2d(1) / Flatten / Linear stacks.

    Images run channels-last (NHWC, kernels HWIO), the layout XLA's CPU
    convolutions prefer; Flatten goes back to channels-first first so that the
    next Linear sees PyTorch's feature order and can take its weight unchanged.
    Linear weights are stored transposed (``[in, out]``) so the product is a plain
    ``x @ w`` for neural-tangents' structured rules.
    """
    params: Params = {}
    steps: List[Callable] = []
    for index, module in enumerate(model):
        key = str(index)
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(f"layer {index}: only numeric zero padding is translated")
            params[key + ".w"] = _array(module.weight.permute(2, 3, 1, 0))
            if module.bias is not None:
                params[key + ".b"] = _array(module.bias)
            steps.append(_conv_step(key, module))
        elif isinstance(module, nn.ReLU):
            steps.append(lambda p, x: jnp.maximum(x, 0))
        elif isinstance(module, nn.AvgPool2d):
            steps.append(_pool_step(module))
        elif isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            steps.append(lambda p, x: jnp.mean(x, axis=(1, 2), keepdims=True))
        elif isinstance(module, nn.Flatten):
            steps.append(lambda p, x: jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
                         if x.ndim == 4 else x.reshape(x.shape[0], -1))
        elif isinstance(module, nn.Linear):
            params[key + ".w"] = _array(module.weight.T)
            if module.bias is not None:
                params[key + ".b"] = _array(module.bias)
            steps.append(_linear_step(key))
        else:
            raise ValueError(f"layer {index}: no JAX translation for {type(module).__name__}")

    def apply(p, x):
        for step in steps:
            x = step(p, x)
        return x

    return apply, params


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _conv_step(key: str, module: nn.Conv2d) -> Callable:
    stride, dilation = _pair(module.stride), _pair(module.dilation)
    padding = [(p, p) for p in _pair(module.padding)]
    groups, has_bias = module.groups, module.bias is not None

    def step(p, x):
        y = lax.conv_general_dilated(x, p[key + ".w"], window_strides=stride, padding=padding,
                                     rhs_dilation=dilation, feature_group_count=groups,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + p[key + ".b"] if has_bias else y
    return step


def _pool_step(module: nn.AvgPool2d) -> Callable:
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    if _pair(module.padding) != (0, 0) or module.ceil_mode:
        raise ValueError("only unpadded, floor-mode AvgPool2d is translated")

    def step(p, x):
        summed = lax.reduce_window(x, 0.0, lax.add, (1,) + kernel + (1,), (1,) + stride + (1,), "VALID")
        return summed / (kernel[0] * kernel[1])
    return step


def _linear_step(key: str) -> Callable:
    def step(p, x):
        y = x @ p[key + ".w"]
        return y + p[key + ".b"] if key + ".b" in p else y
    return step


def _layer_norm(x, weight, bias, eps: float):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * weight + bias


def _transformer_to_jax(model: TokenTransformer) -> Tuple[ApplyFn, Params]:
    """`TokenTransformer` with post-norm, ReLU ``nn.TransformerEncoderLayer`` blocks.

    The attention's packed input projection is split into its query, key and
    value parts; the NTK is a sum over parameters, so the split changes nothing.
    Token embeddings are a product with one-hot rows (2·T·vocab·d FLOPs per
    example, small next to the layers).
    """
    params: Params = {"tokens": _array(model.tokens.weight), "positions": _array(model.positions),
                      "head.w": _array(model.head.weight.T), "head.b": _array(model.head.bias)}
    shapes = []
    for i, layer in enumerate(model.layers):
        relu = layer.activation is torch.nn.functional.relu or isinstance(layer.activation, nn.ReLU)
        if layer.norm_first or not relu:
            raise ValueError("only post-norm ReLU encoder layers are translated")
        attn = layer.self_attn
        d = attn.embed_dim
        w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
        for j, part in enumerate("qkv"):
            params[f"{i}.{part}.w"] = _array(w_in[j * d:(j + 1) * d].T)
            params[f"{i}.{part}.b"] = _array(b_in[j * d:(j + 1) * d])
        params[f"{i}.o.w"] = _array(attn.out_proj.weight.T)
        params[f"{i}.o.b"] = _array(attn.out_proj.bias)
        params[f"{i}.ff1.w"] = _array(layer.linear1.weight.T)
        params[f"{i}.ff1.b"] = _array(layer.linear1.bias)
        params[f"{i}.ff2.w"] = _array(layer.linear2.weight.T)
        params[f"{i}.ff2.b"] = _array(layer.linear2.bias)
        for name, norm in (("norm1", layer.norm1), ("norm2", layer.norm2)):
            params[f"{i}.{name}.w"] = _array(norm.weight)
            params[f"{i}.{name}.b"] = _array(norm.bias)
        shapes.append((attn.num_heads, d // attn.num_heads, layer.norm1.eps, layer.norm2.eps))

    def apply(p, ids):
        # a one-hot product rather than a gather: neural-tangents has no structured
        # rule for gather and would form a dense [N, T, d, vocab, d] Jacobian
        one_hot = jax.nn.one_hot(ids, p["tokens"].shape[0], dtype=p["tokens"].dtype)
        h = one_hot @ p["tokens"] + p["positions"][: ids.shape[1]]
        n, t, d = h.shape
        for i, (heads, head_dim, eps1, eps2) in enumerate(shapes):
            def split(part):
                return (h @ p[f"{i}.{part}.w"] + p[f"{i}.{part}.b"]).reshape(n, t, heads, head_dim)
            q, k, v = split("q"), split("k"), split("v")
            scores = jnp.einsum("nthd,nshd->nhts", q, k) / math.sqrt(head_dim)
            mixed = jnp.einsum("nhts,nshd->nthd", jax.nn.softmax(scores, axis=-1), v).reshape(n, t, d)
            h = _layer_norm(h + mixed @ p[f"{i}.o.w"] + p[f"{i}.o.b"],
                            p[f"{i}.norm1.w"], p[f"{i}.norm1.b"], eps1)
            hidden = jnp.maximum(h @ p[f"{i}.ff1.w"] + p[f"{i}.ff1.b"], 0)
            h = _layer_norm(h + hidden @ p[f"{i}.ff2.w"] + p[f"{i}.ff2.b"],
                            p[f"{i}.norm2.w"], p[f"{i}.norm2.b"], eps2)
        return jnp.mean(h, axis=1) @ p["head.w"] + p["head.b"]

    return apply, params


def to_jax(model: nn.Module) -> Tuple[ApplyFn, Params]:
    """``(apply, params)`` computing the same function as ``model`` with its weights."""
    if UNAVAILABLE:
        raise RuntimeError(UNAVAILABLE)
    if isinstance(model, nn.Sequential):
        return _sequential_to_jax(model)
    if isinstance(model, TokenTransformer):
        return _transformer_to_jax(model)
    raise ValueError(f"no JAX translation for {type(model).__name__}")


def to_jax_input(x: torch.Tensor):
    """Images ``[N, C, H, W]`` become channels-last; token ids stay as they are."""
    array = x.detach().cpu().numpy()
    if array.ndim == 4:
        array = np.ascontiguousarray(array.transpose(0, 2, 3, 1))
    return jnp.asarray(array)


# -- the kernel ----------------------------------------------------------------------

class NeuralTangentsNTK:
    """neural-tangents' structured-derivatives empirical NTK of one model on one batch.

    ``compile()`` traces and compiles the kernel function ahead of time (no
    kernel is computed); ``run()`` computes the kernel; ``__call__()`` returns
    it as a torch tensor in lazykernel's convention: ``[N, N]`` (sum over
    outputs) for ``"trace"``, ``[N, N, O, O]`` for ``"full"``.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, output: str):
        if output not in ("trace", "full"):
            raise ValueError(f"output must be 'trace' or 'full', got {output!r}")
        _load_jax()
        apply, self.params = to_jax(model)
        self.x = to_jax_input(x)
        self.output = output
        with torch.no_grad():
            self.outputs = int(model(x[:1]).shape[-1])
        kernel_fn = nt.empirical_ntk_fn(
            apply, trace_axes=(-1,) if output == "trace" else (), vmap_axes=0,
            implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES)
        self._jitted = jax.jit(lambda x, p: kernel_fn(x, None, p))
        self._compiled = None
        self.compile_s: Optional[float] = None

    def compile(self) -> float:
        """Seconds to trace and compile the kernel function."""
        start = time.perf_counter()
        self._compiled = self._jitted.lower(self.x, self.params).compile()
        self.compile_s = time.perf_counter() - start
        return self.compile_s

    def run(self):
        """The kernel as a JAX array, computed to completion."""
        if self._compiled is None:
            self.compile()
        return self._compiled(self.x, self.params).block_until_ready()

    def as_torch(self, kernel) -> torch.Tensor:
        """A kernel from `run` in lazykernel's convention (trace: sum, not mean)."""
        kernel = torch.from_numpy(np.array(kernel))
        return kernel * self.outputs if self.output == "trace" else kernel

    def __call__(self) -> torch.Tensor:
        return self.as_torch(self.run())


# -- the peer in its own process ---------------------------------------------------

def _serve() -> None:
    """Worker loop of `NeuralTangentsProcess`: requests come pickled on stdin, replies go on stdout.

    Anything JAX, TensorFlow or XLA print goes to stderr: file descriptor 1
    is pointed there, and replies use a private copy of the original stdout.
    """
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    peer, kernel = None, None
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:  # the parent went away
            return
        try:
            if request[0] == "load":
                peer = NeuralTangentsNTK(*request[1:])
                reply = peer.compile()
            elif request[0] == "run":
                start = time.perf_counter()
                kernel = peer.run()
                reply = time.perf_counter() - start
            elif request[0] == "kernel":
                reply = peer.as_torch(kernel)
            else:  # "stop"
                reply = None
        except Exception as error:  # reported to the parent, which raises it there
            pickle.dump(("error", f"{type(error).__name__}: {error}"), replies)
        else:
            pickle.dump(("ok", reply), replies)
        replies.flush()
        if request[0] == "stop":
            return


class NeuralTangentsProcess:
    """`NeuralTangentsNTK` in a worker process, so that JAX never runs beside lazykernel.

    The model and batch are sent to the worker, which converts them to JAX
    and compiles the kernel function (`compile_s`); `run()` has the worker
    compute the kernel once and returns the seconds it took there;
    `kernel()` returns the last kernel in lazykernel's convention. Use it as
    a context manager, or call `close()`.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, output: str):
        if UNAVAILABLE:
            raise ImportError(UNAVAILABLE)
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self._process = subprocess.Popen(
            [sys.executable, "-c", "import peer_neural_tangents; peer_neural_tangents._serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            self.compile_s = self._ask("load", copy.deepcopy(model).cpu(), x.cpu(), output)
        except BaseException:
            self.close()
            raise

    def _ask(self, *request):
        try:
            pickle.dump(request, self._process.stdin)
            self._process.stdin.flush()
            status, reply = pickle.load(self._process.stdout)
        except (EOFError, BrokenPipeError) as error:
            code = self._process.wait(timeout=30)
            raise RuntimeError(f"the neural-tangents worker exited (status {code}); its errors are above") from error
        if status != "ok":
            raise RuntimeError(f"neural-tangents worker: {reply}")
        return reply

    def run(self) -> float:
        """Seconds the worker took to compute the kernel once."""
        return self._ask("run")

    def kernel(self) -> torch.Tensor:
        """The kernel of the last `run`: ``[N, N]`` (sum over outputs) or ``[N, N, O, O]``."""
        return self._ask("kernel")

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._ask("stop")
            except (RuntimeError, OSError):
                pass
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            stream.close()

    def __enter__(self) -> "NeuralTangentsProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6, help="examples per workload for the check")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted max|K_nt − K_lazykernel| / max|K_lazykernel|")
    args = parser.parse_args(argv)
    if UNAVAILABLE:
        print(UNAVAILABLE)
        return 1
    _load_jax()
    import lazykernel
    from workloads import BUILDERS, build

    print("versions:", versions())
    failures = 0
    for name in BUILDERS:
        workload = build(name, args.n)
        for output in ("trace", "full"):
            peer = NeuralTangentsNTK(workload.model, workload.x, output)
            peer.compile()
            theirs = peer()
            ours = lazykernel.ntk(workload.model, workload.x, output=output)
            error = relative_difference(theirs, ours)
            verdict = "ok" if error <= args.tolerance else "MISMATCH"
            failures += verdict != "ok"
            print(f"{name:>20} {output:>5} N={args.n}: max rel. difference {error:.2e}  {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
