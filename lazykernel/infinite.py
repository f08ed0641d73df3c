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
  ``E[φ'φ'] = (π − ϑ)/(2π)`` (the angle ϑ itself is carried from layer to layer, so
  that an input against itself, or two nearly parallel inputs, keep float64 accuracy
  where ``arccos`` of a cosine rounded near 1 would leave an error of √ε ≈ 1.5e-8);
* erf (Williams, 1997, "Computing with Infinite Networks"):
  ``E[φφ] = (2/π) arcsin(2c/√((1 + 2a)(1 + 2b)))`` and
  ``E[φ'φ'] = (4/π) / √((1 + 2a)(1 + 2b) − 4c²)``;
* identity: ``E[φφ] = c`` and ``E[φ'φ'] = 1``.

The outputs are independent: the NTK of a network with O outputs is ``Θ ⊗ I_O``, and
``lazykernel.ntk(..., output="trace")`` of a wide network approaches ``O · Θ``.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch

from lazykernel._model import check_finite

__all__ = ["ACTIVATIONS", "kernels", "nngp", "ntk"]

ACTIVATIONS = ("relu", "erf", "identity")


# Within this distance of |cos| from 1 (angles within 1.4e-3 of 0 or π) the first layer's angle
# is taken from the inputs' difference; beyond it arccos errs by at most ε/sin ϑ ≈ 1.6e-13.
_NEAR_PARALLEL = 1e-6


def _relu_first_angles(z1: torch.Tensor, z2: torch.Tensor, cross: torch.Tensor, diag1: torch.Tensor,
                       diag2: torch.Tensor) -> torch.Tensor:
    """``[N1, N2]`` angles ϑ between the first layer's Gaussians, ``cos ϑ = Σ¹(x, x')/√(Σ¹(x, x)Σ¹(x', x'))``.

    ``z1 [N1, d + 1]``, ``z2 [N2, d + 1]``: the inputs with ``Σ¹ = z·z'``. ``arccos`` of a cosine
    rounded near ±1 loses half the digits (an angle of ~1.5e-8 where it is 0, for an input
    against itself); there the angle is ``2 atan2(‖ẑ − ẑ'‖, ‖ẑ + ẑ'‖)`` of the normalised
    vectors, exact to round-off.
    """
    norm = torch.sqrt(diag1)[:, None] * torch.sqrt(diag2)[None, :]
    positive = norm > 0
    cos = torch.where(positive, cross / torch.where(positive, norm, 1.0), torch.zeros_like(cross))
    angle = torch.arccos(cos.clamp(-1.0, 1.0))
    rows, cols = torch.nonzero(positive & (cos.abs() > 1.0 - _NEAR_PARALLEL), as_tuple=True)
    if rows.numel():
        unit1 = z1 / torch.linalg.vector_norm(z1, dim=1, keepdim=True).clamp_min(torch.finfo(z1.dtype).tiny)
        unit2 = z2 / torch.linalg.vector_norm(z2, dim=1, keepdim=True).clamp_min(torch.finfo(z2.dtype).tiny)
        step = max(1, 2 ** 22 // z1.shape[1])  # bounds the [pairs, d + 1] temporaries
        for start in range(0, rows.numel(), step):
            r, c = rows[start:start + step], cols[start:start + step]
            u, v = unit1[r], unit2[c]
            angle[r, c] = 2.0 * torch.atan2(torch.linalg.vector_norm(u - v, dim=1),
                                            torch.linalg.vector_norm(u + v, dim=1))
    return angle


def _relu_layer(a: torch.Tensor, b: torch.Tensor, angle: torch.Tensor, sw2: float, sb2: float):
    """One ReLU layer of the recursion, carrying the angle ϑ rather than its cosine.

    ``a [N1, 1] = Σ^l(x, x)``, ``b [1, N2] = Σ^l(x', x')``, ``angle [N1, N2]``. Returns
    ``(Σ^{l+1}(x, x'), σ_w² E[φ'φ'], ϑ^{l+1}, Σ^{l+1}(x, x), Σ^{l+1}(x', x'))``. The new angle
    comes from ``1 − cos ϑ^{l+1}``, written as a sum of non-negative terms (the determinant
    of the new 2×2 covariance over ``√(a'b')(√(a'b') + c')``), so nearly parallel inputs keep
    their small angle instead of the √ε of an arccos near 1.
    """
    pi = math.pi
    root_a, root_b = torch.sqrt(a), torch.sqrt(b)
    n = root_a * root_b  # √(ab) without overflowing ab
    # j = sin ϑ + (π − ϑ) cos ϑ = 2π E[φφ]/√(ab); π − j written without cancellation at small ϑ
    pi_minus_j = 2.0 * pi * torch.sin(angle / 2) ** 2 + (angle * torch.cos(angle) - torch.sin(angle))
    j = pi - pi_minus_j
    cross = sw2 * n * j / (2.0 * pi) + sb2
    dphi_dphi = sw2 * (pi - angle) / (2.0 * pi)
    a_next, b_next = sw2 * a / 2.0 + sb2, sw2 * b / 2.0 + sb2  # E[φ(u)²] = Σ(x, x)/2
    r = torch.sqrt(a_next) * torch.sqrt(b_next)
    positive = r > 0
    r_safe = torch.where(positive, r, torch.ones_like(r))
    scaled = sw2 * n / r_safe
    determinant = (scaled * scaled * pi_minus_j * (pi + j) / (4.0 * pi * pi)
                   + sw2 * sb2 * (((root_a - root_b) ** 2 / 2.0 + n * pi_minus_j / pi) / r_safe) / r_safe)
    one_minus_cos = torch.where(positive, determinant / (1.0 + cross / r_safe), torch.ones_like(cross))
    angle_next = 2.0 * torch.asin(torch.sqrt((one_minus_cos / 2.0).clamp(0.0, 1.0)))
    return cross, dphi_dphi, angle_next, a_next, b_next


def _erf_expectations(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    denom = (1.0 + 2.0 * a) * (1.0 + 2.0 * b)
    phi_phi = (2.0 / math.pi) * torch.arcsin((2.0 * c / torch.sqrt(denom)).clamp(-1.0, 1.0))
    dphi_dphi = (4.0 / math.pi) / torch.sqrt((denom - 4.0 * c * c).clamp_min(1e-300))
    return phi_phi, dphi_dphi


def _identity_expectations(a, b, c):
    return c, torch.ones_like(c)


_EXPECTATIONS = {"erf": _erf_expectations, "identity": _identity_expectations}


def _hidden_layers(depth) -> int:
    """``depth`` as a Python int ≥ 1 (an integer type, not a bool or a float)."""
    try:
        value = None if isinstance(depth, bool) else operator.index(depth)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"depth must be an integer ≥ 1 (the number of hidden layers), got {depth!r}")
    return value


def _finite_number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


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
        ``Θ^{L+1}`` of the module docstring (detached from the inputs' graph).

    Raises:
        ValueError: an unknown activation, a depth that is not an integer ≥ 1, σ's that are
            not finite or out of range, inputs that are not floating-point ``[N, d]`` with
            d ≥ 1, hold NaN or Inf, differ in d or lie on different devices.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    depth = _hidden_layers(depth)
    sigma_w, sigma_b = _finite_number("sigma_w", sigma_w), _finite_number("sigma_b", sigma_b)
    if not sigma_w > 0 or not sigma_b >= 0:
        raise ValueError(f"need sigma_w > 0 and sigma_b ≥ 0, got {sigma_w} and {sigma_b}")
    x2_given = x2 is not None
    x2 = x1 if x2 is None else x2
    for name, x in (("x1", x1), ("x2", x2)):
        if not torch.is_tensor(x) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point [N, d] tensor")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"x1 and x2 must have the same d, got {x1.shape[1]} and {x2.shape[1]}")
    if x1.shape[1] == 0:
        raise ValueError("the inputs have d = 0 features ([N, 0]); the kernels need d ≥ 1")
    if x2_given and x1.device != x2.device:
        raise ValueError(f"x1 and x2 are on different devices ({x1.device}, {x2.device})")
    for name, x in (("x1", x1), ("x2", x2)):
        check_finite(name, x)
    a_ = x1.detach().to(torch.float64)
    b_ = x2.detach().to(torch.float64)
    d = a_.shape[1]
    sw2, sb2 = sigma_w ** 2, sigma_b ** 2
    cross = sw2 * (a_ @ b_.T) / d + sb2  # Σ¹(x1, x2)
    diag1 = sw2 * (a_ * a_).sum(1) / d + sb2  # Σ¹(x1, x1)
    diag2 = sw2 * (b_ * b_).sum(1) / d + sb2  # Σ¹(x2, x2)
    theta = cross.clone()
    if activation == "relu":
        def augmented(x):  # Σ¹(x, x') = z·z'
            return torch.cat([x * (sigma_w / math.sqrt(d)), torch.full_like(x[:, :1], sigma_b)], dim=1)

        angle = _relu_first_angles(augmented(a_), augmented(b_), cross, diag1, diag2)
        diag1, diag2 = diag1[:, None], diag2[None, :]
        for _ in range(depth):
            cross, dphi_dphi, angle, diag1, diag2 = _relu_layer(diag1, diag2, angle, sw2, sb2)
            theta = theta * dphi_dphi + cross
        return cross, theta
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
