"""Regime metrics: how far a network has moved from its linearization at initialization.

Each function is the reference definition of one metric (DESIGN.md, "Regime
metrics"); the monitor and the sweep only call these.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Mapping, Optional, Tuple

import torch

from lazykernel.predict import _check_symmetric, _one_minus_power, _singular_rtol

__all__ = [
    "kernel_distance",
    "relative_kernel_change",
    "centered_kernel_alignment",
    "linear_cka",
    "debiased_linear_cka",
    "parameter_movement",
    "linearization_gap",
    "ntk_regression",
    "prediction_agreement",
]


def _as_kernel_matrix(k: torch.Tensor, name: str) -> torch.Tensor:
    """A kernel of any output mode, as a float64 matrix (full ``[N, N, O, O]`` → ``[NO, NO]``)."""
    _check_tensors(**{name: k})
    k = k.detach().to(torch.float64)
    if k.dim() == 2:
        return k
    if k.dim() == 3:  # diagonal mode [N, N, O]: the outputs are independent kernels
        return k.permute(2, 0, 1).reshape(-1, k.shape[1])
    if k.dim() == 4:
        n1, n2, o1, o2 = k.shape
        return k.permute(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)
    raise ValueError(f"{name} must have 2, 3 or 4 dimensions (an ntk() result), got shape {tuple(k.shape)}")


def _check_tensors(**named) -> None:
    """Refuse, by name, an argument that is not a tensor."""
    for name, value in named.items():
        if not torch.is_tensor(value):
            raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")


def _check_same_shape(k0: torch.Tensor, k1: torch.Tensor) -> None:
    _check_tensors(k0=k0, k1=k1)
    if k0.shape != k1.shape:
        raise ValueError(f"the two kernels must have the same shape, got {tuple(k0.shape)} and {tuple(k1.shape)}")


def _nonzero_norm(value: float, what: str) -> float:
    if not value > 0.0 or not math.isfinite(value):
        raise ValueError(f"{what} has norm {value}; the metric needs a finite, non-zero norm")
    return value


def kernel_distance(k0: torch.Tensor, k1: torch.Tensor) -> float:
    """Kernel distance ``1 − ⟨K0, K1⟩_F / (‖K0‖_F ‖K1‖_F)`` (Fort et al., 2020, "Deep learning
    versus kernel learning: an empirical study of loss landscape geometry and the time
    evolution of the Neural Tangent Kernel").

    Args:
        k0, k1: kernels of the same shape, any ``ntk()`` output mode (``[N, N]``,
            ``[N, N, O]`` or ``[N, N, O, O]``).

    Returns:
        A float in [0, 2]; 0 when the kernels are proportional. Scale-invariant.
    """
    _check_same_shape(k0, k1)
    a, b = _as_kernel_matrix(k0, "k0"), _as_kernel_matrix(k1, "k1")
    na = _nonzero_norm(torch.linalg.norm(a).item(), "k0")
    nb = _nonzero_norm(torch.linalg.norm(b).item(), "k1")
    # 1 − cos(a, b) = ½‖a/‖a‖ − b/‖b‖‖²: the same number without the cancellation of
    # 1 − cos, so a lazy network's tiny distance keeps its digits and is never negative
    return 0.5 * torch.linalg.norm(a / na - b / nb).item() ** 2


def relative_kernel_change(k0: torch.Tensor, k1: torch.Tensor) -> float:
    """Relative kernel change ``‖K1 − K0‖_F / ‖K0‖_F`` (Lee et al., 2019, "Wide Neural
    Networks of Any Depth Evolve as Linear Models Under Gradient Descent", Fig. 1
    uses this quantity; under NTK parameterization it is bounded by a multiple of
    ``width^(-1/2)``, and can fall faster in a given run).

    Args:
        k0: kernel at initialization, k1: kernel later; same shape, any output mode.
    """
    _check_same_shape(k0, k1)
    a, b = _as_kernel_matrix(k0, "k0"), _as_kernel_matrix(k1, "k1")
    if not math.isfinite(torch.linalg.norm(b).item()):
        raise ValueError("k1 contains NaN or Inf values; the metric needs finite kernels")
    return torch.linalg.norm(b - a).item() / _nonzero_norm(torch.linalg.norm(a).item(), "k0")


def _center(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``H = I − 11ᵀ/N``, without forming H."""
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def centered_kernel_alignment(k: torch.Tensor, y: torch.Tensor) -> float:
    """Centered kernel–target alignment ``⟨Kc, Yc⟩_F / (‖Kc‖_F ‖Yc‖_F)`` with ``Kc = HKH``,
    ``Y = y yᵀ`` (Cortes, Mohri & Rostamizadeh, 2012, "Algorithms for Learning Kernels
    Based on Centered Alignment").

    Args:
        k: ``[N, N]`` kernel (use ``output="trace"``).
        y: ``[N]`` targets or ``[N, C]`` (e.g. one-hot) targets.

    Returns:
        A float in [−1, 1]; higher means the kernel's geometry matches the labels.
    """
    _check_tensors(k=k, y=y)
    if k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"k must be a square [N, N] kernel, got shape {tuple(k.shape)}")
    y = y.detach().to(torch.float64)
    if y.dim() == 1:
        y = y[:, None]
    if y.dim() != 2 or y.shape[0] != k.shape[0]:
        raise ValueError(f"y must be [N] or [N, C] with N = {k.shape[0]}, got shape {tuple(y.shape)}")
    kc = _center(k.detach().to(torch.float64))
    yc = _center(y @ y.T)
    nk = _nonzero_norm(torch.linalg.norm(kc).item(), "the centered kernel")
    ny = _nonzero_norm(torch.linalg.norm(yc).item(), "the centered target kernel")
    return (kc * yc).sum().item() / (nk * ny)


def _representation(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(f"{name} must be a [N, ...] tensor of representations")
    return x.detach().to(torch.float64).reshape(x.shape[0], -1)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment between two representations of the same N inputs
    (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited"):
    ``‖Ycᵀ Xc‖_F² / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F)`` with column-centered ``Xc, Yc``.

    Args:
        x: ``[N, *p]`` and y: ``[N, *q]`` (trailing axes are flattened).

    Returns:
        A float in [0, 1]; 1 when the representations agree up to rotation and scale.
    """
    a, b = _representation(x, "x"), _representation(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must describe the same inputs, got {a.shape[0]} and {b.shape[0]} rows")
    a = a - a.mean(dim=0, keepdim=True)
    b = b - b.mean(dim=0, keepdim=True)
    if a.shape[0] < max(a.shape[1], b.shape[1]):
        # wide features: the same three norms from the [N, N] Grams, since
        # ‖Ycᵀ Xc‖_F² = ⟨Xc Xcᵀ, Yc Ycᵀ⟩_F and ‖Xcᵀ Xc‖_F = ‖Xc Xcᵀ‖_F; a [p, p]
        # matrix of a convolution's flattened features would not fit in memory
        ka, kb = a @ a.T, b @ b.T
        cross = (ka * kb).sum().item()
    else:
        ka, kb = a.T @ a, b.T @ b
        cross = torch.linalg.norm(b.T @ a).item() ** 2
    na = _nonzero_norm(torch.linalg.norm(ka).item(), "x (centered)")
    nb = _nonzero_norm(torch.linalg.norm(kb).item(), "y (centered)")
    return cross / (na * nb)


def _unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """Unbiased HSIC estimator (Song et al., 2012, "Feature Selection via Dependence
    Maximization", eq. 5) of two ``[N, N]`` Gram matrices."""
    n = k.shape[0]
    k = k.clone()
    l = l.clone()
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    ones_k = k.sum(dim=0)
    ones_l = l.sum(dim=0)
    value = ((k * l).sum() + ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2))
             - 2.0 * (ones_k @ ones_l) / (n - 2))
    return value.item() / (n * (n - 3))


def debiased_linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Debiased linear CKA: linear CKA with the unbiased HSIC estimator in place of the
    biased one, which removes the upward bias of CKA when N is small against the feature
    dimension (Nguyen, Raghu & Kornblith, 2021, "Do Wide and Deep Networks Learn the
    Same Things?", building on Kornblith et al., 2019).

    Args:
        x: ``[N, *p]`` and y: ``[N, *q]``, N ≥ 4.

    Returns:
        A float, about 1 for identical representations; may be slightly negative.
    """
    a, b = _representation(x, "x"), _representation(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must describe the same inputs, got {a.shape[0]} and {b.shape[0]} rows")
    if a.shape[0] < 4:
        raise ValueError(f"debiased CKA needs at least 4 inputs, got {a.shape[0]}")
    # The unbiased HSIC does not change when a feature is shifted by a constant, but its
    # terms cancel: features with a large common offset (post-ReLU activations) would
    # lose every digit to it in the uncentered Grams
    a = a - a.mean(dim=0, keepdim=True)
    b = b - b.mean(dim=0, keepdim=True)
    k, l = a @ a.T, b @ b.T
    hkk = _unbiased_hsic(k, k)
    hll = _unbiased_hsic(l, l)
    if not (hkk > 0 and hll > 0):
        raise ValueError("a representation has no variation across the inputs; CKA is undefined")
    return _unbiased_hsic(k, l) / math.sqrt(hkk * hll)


def parameter_movement(initial: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]
                       ) -> Tuple[float, Dict[str, float]]:
    """Relative parameter movement ``‖θ − θ0‖ / ‖θ0‖``, overall and per tensor (the
    quantity lazy training keeps small: Chizat, Oyallon & Bach, 2019, "On Lazy Training
    in Differentiable Programming").

    Args:
        initial: name → θ0 tensor; current: name → θ tensor, same names and shapes.

    Returns:
        ``(overall, per_tensor)``: the overall ratio over all tensors together, and a
        dict name → ratio for each tensor (``inf`` for a tensor initialised at zero
        that has moved, 0 if it has not).
    """
    if set(initial) != set(current):
        raise ValueError(f"initial and current must name the same parameters, got {sorted(initial)} "
                         f"and {sorted(current)}")
    if not initial:
        raise ValueError("no parameters given")
    per_tensor: Dict[str, float] = {}
    moved_sq = 0.0
    init_sq = 0.0
    for name, theta0 in initial.items():
        theta = current[name]
        if theta.shape != theta0.shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(theta.shape)}, was {tuple(theta0.shape)}")
        d = torch.linalg.norm((theta.detach() - theta0.detach()).to(torch.float64)).item()
        n0 = torch.linalg.norm(theta0.detach().to(torch.float64)).item()
        moved_sq += d * d
        init_sq += n0 * n0
        per_tensor[name] = d / n0 if n0 > 0 else (0.0 if d == 0 else math.inf)
    overall = math.sqrt(moved_sq) / _nonzero_norm(math.sqrt(init_sq), "θ0")
    return overall, per_tensor


def linearization_gap(f: torch.Tensor, f_lin: torch.Tensor, f0: torch.Tensor) -> float:
    """Linearization gap ``‖f(θ) − f_lin(θ)‖ / ‖f(θ) − f(θ0)‖`` where
    ``f_lin(θ) = f(θ0) + J(θ0)(θ − θ0)`` (Lee et al., 2019): the share of the change in
    the outputs that the first-order Taylor model misses. 0 for a linear model.

    Args:
        f, f_lin, f0: outputs ``[N, *out]`` of the network, its linearization and the
            network at initialization, on the same (held-out) inputs.

    Returns:
        A float ≥ 0; ``nan`` if the outputs have not moved at all.
    """
    if f.shape != f_lin.shape or f.shape != f0.shape:
        raise ValueError(f"f, f_lin and f0 must have the same shape, got {tuple(f.shape)}, "
                         f"{tuple(f_lin.shape)}, {tuple(f0.shape)}")
    f, f_lin, f0 = (t.detach().to(torch.float64) for t in (f, f_lin, f0))
    moved = torch.linalg.norm(f - f0).item()
    if moved == 0.0:
        return math.nan
    return torch.linalg.norm(f - f_lin).item() / moved


def ntk_regression(k_train: torch.Tensor, k_test_train: torch.Tensor, y_train: torch.Tensor,
                   f0_train: Optional[torch.Tensor] = None, f0_test: Optional[torch.Tensor] = None,
                   time: Optional[float] = None, *, lr: Optional[float] = None,
                   steps: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the linearized network after gradient flow on the MSE loss
    ``L = (1/2N) Σ_i ‖f(x_i) − y_i‖²`` (Jacot et al., 2018; Lee et al., 2019, eqs. 9–10).

    With ``Θ = k_train`` and ``t = learning rate × steps``, the training outputs follow
    ``f_t = y + e^{−tΘ/N} (f_0 − y)`` and a test input
    ``f_t(x*) = f_0(x*) + Θ(x*, X) Θ^{−1} (I − e^{−tΘ/N}) (y − f_0)``; computed in float64
    from the eigendecomposition of Θ. ``time=None`` is the limit ``t → ∞``,
    ``f_∞(x*) = f_0(x*) + Θ(x*, X) Θ^{−1} (y − f_0)``, computed with a least-squares solve
    (``Θ^{−1}`` is the pseudo-inverse: eigenvalues within ``N·ε·λ_max`` of zero, ε of the
    kernel's dtype and at least 1e-12, count as zero, so a float32 kernel of rank below N
    is not fitted to its round-off; `predict.gradient_descent_mse` takes the same cut-off).

    With ``lr`` and ``steps`` instead of ``time``, the same formulas for ``steps`` steps of
    full-batch gradient descent on the linearized network, exact for any step size:
    ``e^{−tΘ/N}`` becomes ``(I − lr Θ/N)^steps``.

    Args:
        k_train: ``[N, N]`` (one kernel shared by all O outputs, e.g. the trace kernel
            divided by O) or ``[N, N, O, O]`` (``output="full"``).
        k_test_train: ``[M, N]`` or ``[M, N, O, O]``, in the same mode.
        y_train: ``[N, O]`` targets (``[N]`` for O = 1).
        f0_train, f0_test: ``[N, O]``, ``[M, O]`` outputs at initialization; default 0.
        time: ``learning rate × steps`` (≥ 0) of gradient flow; ``None`` or ``math.inf``
            (and no ``lr``) for infinite time.
        lr, steps: learning rate and number of steps (an integer ≥ 0) of discrete
            gradient descent (both or neither; not with ``time``).

    Returns:
        ``(f_train, f_test)``: ``[N, O]`` and ``[M, O]`` float64 predictions.

    Raises:
        ValueError: bad shapes or numbers, NaN or Inf in any input, or a ``k_train``
            that is not symmetric.
    """
    given = {"k_train": k_train, "k_test_train": k_test_train, "y_train": y_train, "f0_train": f0_train,
             "f0_test": f0_test}
    given = {name: value for name, value in given.items() if value is not None or not name.startswith("f0")}
    _check_tensors(**given)
    for name, value in given.items():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or Inf values; the predictions need finite inputs")
    if y_train.dim() not in (1, 2):
        raise ValueError(f"y_train must be [N, O] (or [N] for O = 1), got shape {tuple(y_train.shape)}")
    device = k_train.device
    # eigenvalues below N·ε·λ_max (ε of the kernel's own dtype, at least 1e-12) are its round-off
    eps = _singular_rtol(k_train)
    y = y_train.detach().to(device=device, dtype=torch.float64)
    squeeze = y.dim() == 1
    if squeeze:
        y = y[:, None]
    n, o = y.shape
    m = k_test_train.shape[0]
    for name, value, rows in (("f0_train", f0_train, n), ("f0_test", f0_test, m)):
        if value is not None and value.numel() != rows * o:
            raise ValueError(f"{name} must be [{rows}, {o}] like the predictions, got shape {tuple(value.shape)}")
    f0_train = (torch.zeros_like(y) if f0_train is None
                else f0_train.detach().to(device=device, dtype=torch.float64).reshape(n, o))
    f0_test = (torch.zeros(m, o, dtype=torch.float64, device=device) if f0_test is None
               else f0_test.detach().to(device=device, dtype=torch.float64).reshape(m, o))
    if k_train.dim() == 2:
        if tuple(k_train.shape) != (n, n) or tuple(k_test_train.shape) != (m, n):
            raise ValueError(f"kernels must be [N, N] and [M, N] with N = {n}, got {tuple(k_train.shape)} "
                             f"and {tuple(k_test_train.shape)}")
        kt = k_train.detach().to(torch.float64)
        ks = k_test_train.detach().to(torch.float64)
        residual = y - f0_train  # [N, O], each output column its own regression
    elif k_train.dim() == 4:
        if tuple(k_train.shape) != (n, n, o, o) or tuple(k_test_train.shape) != (m, n, o, o):
            raise ValueError(f"full kernels must be [N, N, O, O] and [M, N, O, O] with N = {n}, O = {o}, got "
                             f"{tuple(k_train.shape)} and {tuple(k_test_train.shape)}")
        kt = _as_kernel_matrix(k_train, "k_train")
        ks = _as_kernel_matrix(k_test_train, "k_test_train")
        residual = (y - f0_train).reshape(n * o, 1)
    else:
        raise ValueError(f"k_train must be [N, N] or [N, N, O, O], got shape {tuple(k_train.shape)}")
    if (lr is None) != (steps is None):
        raise ValueError("give both lr and steps (gradient descent) or neither")
    if lr is not None and time is not None:
        raise ValueError("give either time (gradient flow) or lr and steps (gradient descent), not both")
    if lr is not None and (not lr > 0 or isinstance(steps, bool) or not isinstance(steps, numbers.Integral)
                           or steps < 0):
        raise ValueError(f"need lr > 0 and steps an integer ≥ 0 (time=None for t → ∞), got {lr!r} and {steps!r}")
    _check_symmetric(kt, "k_train")
    if time is not None and not time >= 0:
        raise ValueError(f"time must be ≥ 0 (math.inf or None for t → ∞), got {time}")
    if time is not None and math.isinf(time):
        time = None
    if time is None and lr is None:
        # the least-squares solve tolerates a singular Θ (duplicate inputs)
        coef = _least_squares(kt, residual, eps)
        fit_train = kt @ coef
    else:
        evals, evecs = torch.linalg.eigh(kt)
        # Along Θ's null space (and its round-off) neither the training outputs nor,
        # for a test kernel of the same network, the test outputs move: those
        # directions get no coefficient, the minimum-norm choice.
        null = evals <= n * eps * evals.abs().max().clamp_min(1e-300)
        evals = torch.where(null, torch.zeros_like(evals), evals)
        if time is not None:
            decay = -torch.expm1(-time * evals / n)  # 1 − e^{−tλ/N}, accurate for small tλ
        else:
            decay = _one_minus_power(lr * evals / n, int(steps))
        safe = torch.where(null, torch.zeros_like(evals), decay / evals.where(~null, torch.ones_like(evals)))
        projected = evecs.T @ residual
        coef = evecs @ (safe[:, None] * projected)
        fit_train = evecs @ (decay[:, None] * projected)
    f_train = f0_train + fit_train.reshape(n, o)
    f_test = f0_test + (ks @ coef).reshape(m, o)
    if squeeze:
        return f_train[:, 0], f_test[:, 0]
    return f_train, f_test


def prediction_agreement(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
    """How closely two predictors agree on the same inputs (e.g. the trained network and
    NTK kernel regression).

    Args:
        a, b: ``[M, O]`` outputs (O ≥ 2 for the class agreement).

    Returns:
        ``{"relative_difference": ‖a − b‖_F / ‖b‖_F, "class_agreement": share of rows whose
        argmax agrees}`` (class agreement only when O ≥ 2).
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    result = {"relative_difference": torch.linalg.norm(a - b).item()
              / _nonzero_norm(torch.linalg.norm(b).item(), "b")}
    if a.dim() == 2 and a.shape[1] >= 2:
        result["class_agreement"] = (a.argmax(1) == b.argmax(1)).double().mean().item()
    return result


def _least_squares(kernel: torch.Tensor, rhs: torch.Tensor, eps: float) -> torch.Tensor:
    """The minimum-norm least-squares solution of ``kernel · c = rhs`` for a symmetric PSD kernel.

    Singular values below ``N·eps·σ_max`` count as zero: ``eps`` is the machine
    epsilon of the dtype the kernel was computed in (it is solved in float64).
    On the CPU LAPACK's SVD-based ``gelsd``; elsewhere (CUDA has no ``gelsd``)
    the pseudo-inverse from the eigendecomposition with the same cut-off.
    """
    if kernel.device.type == "cpu":
        return torch.linalg.lstsq(kernel, rhs, rcond=kernel.shape[0] * eps, driver="gelsd").solution
    return _pseudo_inverse_solve(kernel, rhs, eps)


def _pseudo_inverse_solve(kernel: torch.Tensor, rhs: torch.Tensor, eps: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(kernel)
    cutoff = kernel.shape[0] * eps * evals.abs().max().clamp_min(1e-300)
    inverse = torch.where(evals.abs() > cutoff, 1.0 / evals.where(evals.abs() > cutoff, torch.ones_like(evals)),
                          torch.zeros_like(evals))
    return evecs @ (inverse[:, None] * (evecs.T @ rhs))
