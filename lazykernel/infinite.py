"""`lazykernel.infinite`: analytic infinite-width NNGP and NTK of fully connected networks.

For a network in NTK parameterization (``lazykernel.analysis.mlp(...,
parameterization="ntk")``) with L hidden layers, input dimension d, weight and bias
standard deviations σ_w, σ_b, the kernels of one output follow the recursion (Jacot,
Gabriel & Hongler, 2018; Lee et al., 2019, eq. 4 and appendix; Arora et al., 2019, "On
Exact Computation with an Infinitely Wide Neural Net"):

    Σ¹(x, x') = σ_w² x·x'/d + σ_b²,                    Θ¹ = Σ¹
    Σ^{l+1}   = σ_w² E[φ(u) φ(v)] + σ_b²,              (u, v) ~ N(0, Λ^l)
    Σ̇^{l+1}   = σ_w² E[φ'(u) φ'(v)]
    Θ^{l+1}   = Θ^l Σ̇^{l+1} + Σ^{l+1}

where ``Λ^l = [[Σ^l(x, x), Σ^l(x, x')], [Σ^l(x', x), Σ^l(x', x')]]``. The NNGP kernel is
``Σ^{L+1}`` and the NTK ``Θ^{L+1}``. The Gaussian expectations have closed forms:

* ReLU, the arc-cosine kernels of degree 1 and 0 (Cho & Saul, 2009): with
  ``cos ϑ = c/√(ab)``, ``E[φφ] = √(ab) (sin ϑ + (π − ϑ) cos ϑ)/(2π)`` and
  ``E[φ'φ'] = (π − ϑ)/(2π)``;
* erf (Williams, 1997, "Computing with Infinite Networks"):
  ``E[φφ] = (2/π) arcsin(2c/√((1 + 2a)(1 + 2b)))`` and
  ``E[φ'φ'] = (4/π) / √((1 + 2a)(1 + 2b) − 4c²)``;
* identity: ``E[φφ] = c`` and ``E[φ'φ'] = 1``.

The outputs are independent: the NTK of a network with O outputs is ``Θ ⊗ I_O``, and
``lazykernel.ntk(..., output="trace")`` of a wide network approaches ``O · Θ``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["ACTIVATIONS", "kernels", "nngp", "ntk"]

ACTIVATIONS = ("relu", "erf", "identity")


def _relu_expectations(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    norm = torch.sqrt(a * b)
    cos = torch.where(norm > 0, c / norm.clamp_min(1e-300), torch.zeros_like(c)).clamp(-1.0, 1.0)
    angle = torch.arccos(cos)
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(0.0))
    phi_phi = norm * (sin + (math.pi - angle) * cos) / (2.0 * math.pi)
    dphi_dphi = (math.pi - angle) / (2.0 * math.pi)
    return phi_phi, dphi_dphi


def _erf_expectations(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    denom = (1.0 + 2.0 * a) * (1.0 + 2.0 * b)
    phi_phi = (2.0 / math.pi) * torch.arcsin((2.0 * c / torch.sqrt(denom)).clamp(-1.0, 1.0))
    dphi_dphi = (4.0 / math.pi) / torch.sqrt((denom - 4.0 * c * c).clamp_min(1e-300))
    return phi_phi, dphi_dphi


def _identity_expectations(a, b, c):
    return c, torch.ones_like(c)


_EXPECTATIONS = {"relu": _relu_expectations, "erf": _erf_expectations, "identity": _identity_expectations}


def kernels(x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, depth: int = 1,
            activation: str = "relu", sigma_w: float = 1.0, sigma_b: float = 0.0
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Infinite-width NNGP and NTK of one output of an MLP in NTK parameterization.

    Args:
        x1: ``[N1, d]`` inputs; x2: ``[N2, d]`` (default ``x1``).
        depth: number of hidden layers L ≥ 1 (default 1).
        activation: ``"relu"`` (default), ``"erf"`` or ``"identity"``.
        sigma_w: σ_w > 0 (default 1); sigma_b: σ_b ≥ 0 (default 0).

    Returns:
        ``(nngp, ntk)``, both ``[N1, N2]`` float64 on the inputs' device: ``Σ^{L+1}`` and
        ``Θ^{L+1}`` of the module docstring.
    """
    if activation not in _EXPECTATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if depth < 1:
        raise ValueError(f"depth must be ≥ 1, got {depth}")
    if not sigma_w > 0 or not sigma_b >= 0:
        raise ValueError(f"need sigma_w > 0 and sigma_b ≥ 0, got {sigma_w} and {sigma_b}")
    x2_given = x2 is not None
    x2 = x1 if x2 is None else x2
    for name, x in (("x1", x1), ("x2", x2)):
        if not torch.is_tensor(x) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point [N, d] tensor")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"x1 and x2 must have the same d, got {x1.shape[1]} and {x2.shape[1]}")
    if x2_given and x1.device != x2.device:
        raise ValueError(f"x1 and x2 are on different devices ({x1.device}, {x2.device})")
    a_ = x1.detach().to(torch.float64)
    b_ = x2.detach().to(torch.float64)
    d = a_.shape[1]
    sw2, sb2 = sigma_w ** 2, sigma_b ** 2
    cross = sw2 * (a_ @ b_.T) / d + sb2  # Σ¹(x1, x2)
    diag1 = sw2 * (a_ * a_).sum(1) / d + sb2  # Σ¹(x1, x1)
    diag2 = sw2 * (b_ * b_).sum(1) / d + sb2  # Σ¹(x2, x2)
    theta = cross.clone()
    expect = _EXPECTATIONS[activation]
    for _ in range(depth):
        a, b = diag1[:, None], diag2[None, :]
        phi_phi, dphi_dphi = expect(a, b, cross)
        new_cross = sw2 * phi_phi + sb2
        theta = theta * (sw2 * dphi_dphi) + new_cross
        diag1 = sw2 * expect(diag1, diag1, diag1)[0] + sb2
        diag2 = sw2 * expect(diag2, diag2, diag2)[0] + sb2
        cross = new_cross
    return cross, theta


def nngp(x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, depth: int = 1, activation: str = "relu",
         sigma_w: float = 1.0, sigma_b: float = 0.0) -> torch.Tensor:
    """Infinite-width NNGP kernel ``[N1, N2]`` (float64) of one output; see :func:`kernels`."""
    return kernels(x1, x2, depth=depth, activation=activation, sigma_w=sigma_w, sigma_b=sigma_b)[0]


def ntk(x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, depth: int = 1, activation: str = "relu",
        sigma_w: float = 1.0, sigma_b: float = 0.0) -> torch.Tensor:
    """Infinite-width NTK ``[N1, N2]`` (float64) of one output; see :func:`kernels`."""
    return kernels(x1, x2, depth=depth, activation=activation, sigma_w=sigma_w, sigma_b=sigma_b)[1]
