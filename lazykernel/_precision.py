"""The ``precision`` option of `ntk`, `plan`, `ntk_to_disk` and the products (`jvp`, `vjp`,
`ntk_vp`): exact float32, or TF32 on CUDA.

PyTorch decides with process-wide switches whether CUDA float32 matrix
products and cuDNN convolutions may round their inputs to TF32 (10 explicit
mantissa bits, float32 range and accumulation); cuDNN's default allows it. A
call on CUDA in float32 sets both switches for its duration and restores them
after, also on error: ``"highest"`` turns TF32 off, so every product is a
float32 product, and ``"tf32"`` turns it on. With ``"tf32"`` the structured
method also forms the Gram of every single-position linear term (``T = 1``:
dense layers on vectors) as two cuBLAS GEMMs and a Hadamard product
(`gemm_gram_accumulate`), since the fused kernel has no tensor-core path;
terms over several positions keep the fused float32 kernel. Because the
switches are global, such calls hold a process-wide lock while they run: two
threads' calls take turns. On the CPU and in float64 nothing is switched and
``"tf32"`` computes as ``"highest"``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence, Tuple

import torch

PRECISIONS = ("highest", "tf32")
# held by a call while it has PyTorch's TF32 switches set its way
_SWITCHES = threading.RLock()


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return precision


def uses_tf32(precision: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Does a call with this precision, device and compute dtype take TF32 products?"""
    return precision == "tf32" and device.type == "cuda" and dtype == torch.float32


def _state() -> Tuple[bool, bool]:
    """(CUDA matmuls, cuDNN convolutions) may use TF32.

    These are PyTorch's long-standing boolean switches; setting them keeps its
    newer ``fp32_precision`` settings in step, so code that reads either kind
    inside a call still works.
    """
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set(matmul: bool, convolution: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = convolution


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, CUDA float32 products and convolutions follow ``precision``.

    The switches are restored on exit, also when the block raises, so the
    caller's own code keeps the precision it chose; the lock makes calls from
    several threads take turns rather than undo each other's switches.
    """
    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    tf32 = precision == "tf32"
    with _SWITCHES:
        saved = _state()
        try:
            _set(tf32, tf32)
            yield
        finally:
            _set(*saved)


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
