"""The compiled ops of lazykernel: typed wrappers, pure-PyTorch references, fake kernels.

Each op has one reference implementation here, written the plain way; it is
the definition the C++ and CUDA kernels are tested against, and the fallback
when no compiled kernel exists for a tensor's device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lazykernel import _extension

OUTPUTS = ("trace", "diagonal", "full")


def gram_hadamard_accumulate_reference(
    out: torch.Tensor,
    a1: Sequence[torch.Tensor],
    a2: Sequence[torch.Tensor],
    g1: Sequence[torch.Tensor],
    g2: Sequence[torch.Tensor],
    output: str = "trace",
    symmetric: bool = False,
) -> None:
    """Pure-PyTorch definition of :func:`gram_hadamard_accumulate` (same arguments).

    Materialises each layer's ``[N1·T, N2·T]`` Gram matrices: exact and simple,
    not memory-frugal. ``symmetric`` is a speed promise only and is ignored.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    for A, B, G, H in zip(a1, a2, g1, g2):
        n1, t, _ = A.shape
        n2 = B.shape[0]
        o = G.shape[2]
        # S[i, t, j, s] = a1[i, t] . a2[j, s]
        S = torch.einsum("itk,jsk->itjs", A, B)
        if output == "trace":
            U = torch.einsum("itod,jsod->itjs", G, H)
            out += (S * U).sum(dim=(1, 3))
        elif output == "diagonal":
            U = torch.einsum("itod,jsod->itjso", G, H)
            out += (S.unsqueeze(-1) * U).sum(dim=(1, 3))
        else:
            U = torch.einsum("itod,jspd->itjsop", G, H)
            out += (S[..., None, None] * U).sum(dim=(1, 3))
        del n1, t, n2, o


def gram_hadamard_accumulate(
    out: torch.Tensor,
    a1: Sequence[torch.Tensor],
    a2: Sequence[torch.Tensor],
    g1: Sequence[torch.Tensor],
    g2: Sequence[torch.Tensor],
    output: str = "trace",
    symmetric: bool = False,
) -> torch.Tensor:
    """Fused Hadamard-Gram accumulate: the NTK term of linear maps, summed over layers.

    For layers ``l`` with inputs ``a1[l]: [N1, T, K]``, ``a2[l]: [N2, T, K]`` and
    output cotangents ``g1[l]: [N1, T, O, D]``, ``g2[l]: [N2, T, O, D]``, adds in place::

        trace    out[i, j]       += Σ_l Σ_{t,s} (a1[i,t]·a2[j,s]) Σ_o (g1[i,t,o]·g2[j,s,o])
        diagonal out[i, j, o]    += Σ_l Σ_{t,s} (a1[i,t]·a2[j,s]) (g1[i,t,o]·g2[j,s,o])
        full     out[i, j, o, p] += Σ_l Σ_{t,s} (a1[i,t]·a2[j,s]) (g1[i,t,o]·g2[j,s,p])

    ``out`` is ``[N1, N2]``, ``[N1, N2, O]`` or ``[N1, N2, O, O]``. T, K and D may
    differ between layers; O may not. All tensors share one dtype (float32 or
    float64) and device. ``symmetric=True`` promises ``a1 is a2`` and ``g1 is g2``
    so that only half of the tiles are computed. This is the rule of
    Novak et al. (2022), "Fast Finite Width Neural Tangent Kernel", for a dense
    layer: the per-sample weight gradient is ``Σ_t g_t a_tᵀ``.

    Returns:
        ``out``, updated in place.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    a1, a2, g1, g2 = list(a1), list(a2), list(g1), list(g2)
    if _extension.has_kernel(out.device):
        torch.ops.lazykernel.gram_hadamard_accumulate_(out, a1, a2, g1, g2, output, symmetric)
    else:
        gram_hadamard_accumulate_reference(out, a1, a2, g1, g2, output, symmetric)
    return out


if _extension._LOADED:

    @torch.library.register_fake("lazykernel::gram_hadamard_accumulate_")
    def _gram_hadamard_accumulate_fake(out, a1, a2, g1, g2, output, symmetric):
        # The op mutates `out` and returns nothing: shapes need no propagation,
        # but the checks that do not need data can still be done early.
        torch._check(len(a1) == len(a2) == len(g1) == len(g2),
                     lambda: "a1, a2, g1, g2 must list the same number of layers")
        return None
