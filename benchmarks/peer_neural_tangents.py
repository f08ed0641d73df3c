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
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

# TensorFlow (pulled in by neural-tangents) is chatty and would grab threads
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

try:
    import jax
    import jax.numpy as jnp
    from jax import lax
    import neural_tangents as nt
except ImportError as error:  # the peer is optional
    UNAVAILABLE = f"neural-tangents peer skipped: {error} (see benchmarks/peer_neural_tangents.py --help)"
else:
    UNAVAILABLE = ""

from workloads import TokenTransformer, relative_difference

Params = Dict[str, object]
ApplyFn = Callable[[Params, object], object]


def versions() -> Dict[str, str]:
    """Versions of the peer's packages (empty when unavailable)."""
    if UNAVAILABLE:
        return {}
    return {"neural_tangents": nt.__version__, "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
            "jax_devices": ", ".join(str(d) for d in jax.devices())}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6, help="examples per workload for the check")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted max|K_nt − K_lazykernel| / max|K_lazykernel|")
    args = parser.parse_args(argv)
    if UNAVAILABLE:
        print(UNAVAILABLE)
        return 1
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
