"""The ``precision`` option of `ntk` and `plan`: exact float32, or TF32 tensor cores on CUDA.

``"highest"`` computes every product in the inputs' dtype. ``"tf32"`` lets
CUDA float32 matrix products and convolutions round their inputs to TF32 (10
explicit mantissa bits, float32 range and accumulation), as PyTorch's own
``torch.backends.cuda.matmul.allow_tf32`` does, for the duration of the call
only. The structured method then also forms the Gram of every single-position
linear term (``T = 1``: dense layers on vectors) as two cuBLAS GEMMs and a
Hadamard product (`gemm_gram_accumulate`), since the fused kernel has no
tensor-core path; terms over several positions keep the fused float32 kernel.
On the CPU, and for float64, ``"tf32"`` computes as ``"highest"``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence, Tuple

import torch

PRECISIONS = ("highest", "tf32")


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return precision


def uses_tf32(precision: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Does a call with this precision, device and compute dtype take TF32 products?"""
    return precision == "tf32" and device.type == "cuda" and dtype == torch.float32


def _switches() -> List[Tuple[object, str, object]]:
    """(owner, attribute, TF32 value) of PyTorch's switches for CUDA matmuls and cuDNN convolutions.

    Newer PyTorch names the precision (``fp32_precision``); older only has the
    ``allow_tf32`` booleans.
    """
    switches = []
    for owner in (torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)):
        if owner is not None and isinstance(getattr(owner, "fp32_precision", None), str):
            switches.append((owner, "fp32_precision", "tf32"))
    if len(switches) < 2:
        switches = [(torch.backends.cuda.matmul, "allow_tf32", True), (torch.backends.cudnn, "allow_tf32", True)]
    return switches


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, CUDA float32 products use TF32 if ``precision`` asks for it.

    PyTorch's switches are restored on exit, also when the block raises, so the
    caller's own code keeps the precision it chose.
    """
    if not uses_tf32(precision, device, dtype):
        yield
        return
    switches = _switches()
    saved = [getattr(owner, name) for owner, name, _ in switches]
    try:
        for owner, name, value in switches:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(switches, saved):
            setattr(owner, name, value)


def gemm_gram_accumulate(out: torch.Tensor, a1: Sequence[torch.Tensor], a2: Sequence[torch.Tensor],
                         g1: Sequence[torch.Tensor], g2: Sequence[torch.Tensor], output: str) -> torch.Tensor:
    """`gram_hadamard_accumulate` for single-position terms, by GEMMs: ``Σ_l (A Bᵀ) ∘ (G Hᵀ)``.

    Every ``a: [N, 1, K]`` and ``g: [N, 1, O, D]``. Per term: one GEMM for the
    inputs' Gram ``S`` (``[N1, N2]``), and for the cotangents one GEMM over all
    outputs (trace), one per output (diagonal) or one per output pair (full),
    each added to ``out`` multiplied by ``S``. Two ``[N1, N2]`` buffers are
    the only temporaries. Same arguments and result as the fused op.
    """
    if not a1:
        return out
    n1, n2 = out.shape[0], out.shape[1]
    s = torch.empty((n1, n2), dtype=out.dtype, device=out.device)
    u = torch.empty_like(s)
    for a, b, g, h in zip(a1, a2, g1, g2):
        if a.shape[1] != 1 or b.shape[1] != 1:
            raise ValueError(f"gemm_gram_accumulate takes single-position terms; got T = {a.shape[1]}")
        torch.mm(a[:, 0], b[:, 0].t(), out=s)
        g, h = g[:, 0], h[:, 0]                                  # [N, O, D]
        if output == "trace":
            torch.mm(g.reshape(n1, -1), h.reshape(n2, -1).t(), out=u)
            out.addcmul_(s, u)
        elif output == "diagonal":
            for o in range(g.shape[1]):
                torch.mm(g[:, o], h[:, o].t(), out=u)
                out[:, :, o].addcmul_(s, u)
        else:
            for o in range(g.shape[1]):
                for p in range(h.shape[1]):
                    torch.mm(g[:, o], h[:, p].t(), out=u)
                    out[:, :, o, p].addcmul_(s, u)
    return out
