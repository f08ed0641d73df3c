"""Predictions of the linearized network trained with MSE, in closed form.

For the linearized model ``f_lin`` (:func:`lazykernel.linearize`) trained on
``(x_train, y_train)`` with the loss ``½ Σ_i ‖f(x_i) − y_i‖² + (λ/2)‖θ − θ0‖²``
by gradient descent with learning rate η, the change of the parameters stays
``θ − θ0 = J_trainᵀ α`` and (with ``K = Θ(x_train, x_train)``, ``r = y − f0``)

    gradient flow:         α(t) = (K + λI)⁻¹ (I − exp(−η (K + λI) t)) r
    gradient descent:      α(t) = (K + λI)⁻¹ (I − (I − η (K + λI))ᵗ) r     (t steps)
    t = ∞ (both):          α    = (K + λI)⁻¹ r                           (kernel ridge regression)

    f_train(t) = f0_train + K α(t),      f_test(t) = f0_test + Θ(x_test, x_train) α(t).

This is the mean prediction of Lee et al. (2019), "Wide Neural Networks of Any
Depth Evolve as Linear Models Under Gradient Descent", eqs. (9)-(11), as in
neural-tangents' ``predict.gradient_descent_mse``. Kernels and their shapes:

* ``[N, N]`` (and ``[M, N]`` for test rows): the same kernel for every output
  column, i.e. the full kernel is ``K ⊗ I_O``; exact for one-output models
  (``ntk(..., output="trace")`` with O = 1).
* ``[N, N, O, O]`` (``[M, N, O, O]``): the full kernel of ``ntk(..., output="full")``.

Two solvers: :func:`gradient_descent_mse` diagonalises a dense kernel (any t,
float64); :func:`gradient_descent_mse_cg` only needs kernel-vector products
(e.g. :func:`lazykernel.ntk_vp`) and solves the t = ∞ system by conjugate
gradients, so N can exceed what fits as a matrix.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

Kernel = torch.Tensor
KernelOperator = Callable[[torch.Tensor], torch.Tensor]
Times = Union[float, int, Sequence[float], torch.Tensor]

# Eigenvalues within N·ε·λ_max of zero count as zero, ε the epsilon of the dtype
# the kernel was computed in, and at least this: a float64 fit along an eigenvalue
# of 1e-13·λ_max takes coefficients 1e13 times the targets, whose round-off alone
# moves the test predictions by far more than the targets' size.
_SINGULAR_RTOL = 1e-12


def _singular_rtol(k: torch.Tensor) -> float:
    """The relative size below which eigenvalues of ``k`` are its round-off (a float32
    kernel of rank r < N has N − r eigenvalues of order 1e-7·λ_max).
    `gradient_descent_mse` and `analysis.ntk_regression` share it, so they treat the
    same kernels as singular."""
    return max(_SINGULAR_RTOL, torch.finfo(k.dtype if k.is_floating_point() else torch.float64).eps)


@dataclass
class Predictions:
    """Predictions at the requested times.

    ``train``: ``[*T, N, *out]`` and ``test``: ``[*T, M, *out]`` (None without
    test rows), with ``*T`` the shape of ``t`` (empty for a scalar t).
    """

    train: torch.Tensor
    test: Optional[torch.Tensor]


def _one_minus_power(x: torch.Tensor, steps: float) -> torch.Tensor:
    """``1 − (1 − x)^steps`` elementwise, accurate when ``x`` is tiny.

    ``1 − x`` rounds ``x`` below ε away, so the plain power loses every digit of
    ``steps·x`` there; ``−expm1(steps·log1p(−x))`` keeps them. Where ``1 − x ≤ 0``
    the logarithm does not exist and the plain power has no such cancellation.
    """
    below_one = x < 1
    stable = -torch.expm1(steps * torch.log1p(-torch.where(below_one, x, torch.zeros_like(x))))
    return torch.where(below_one, stable, 1.0 - torch.pow(1.0 - x, steps))


def _check_symmetric(k: torch.Tensor, name: str) -> None:
    """Refuse a kernel matrix that is not symmetric (eigh would read one triangle only)."""
    asym = (k - k.T).abs().max().item() if k.numel() else 0.0
    scale = k.abs().max().item() if k.numel() else 0.0
    if asym > 1e-5 * max(scale, 1e-300):
        raise ValueError(f"{name} is not symmetric (max |K - Kᵀ| = {asym:.3g}, max |K| = {scale:.3g}); "
                         "pass the train-train kernel Θ(x_train, x_train)")


def _check_number(name: str, value, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")
    return float(value)


def _as_targets(y_train: torch.Tensor, n: int, outputs: Optional[int]) -> torch.Tensor:
    if not isinstance(y_train, torch.Tensor) or not y_train.is_floating_point():
        raise ValueError("y_train must be a floating-point tensor [N] or [N, O]")
    if y_train.dim() not in (1, 2) or y_train.shape[0] != n:
        raise ValueError(f"y_train must be [N] or [N, O] with N = {n} (the kernel's size), "
                         f"got {tuple(y_train.shape)}")
    if outputs is not None and y_train.reshape(n, -1).shape[1] != outputs:
        raise ValueError(f"y_train has {y_train.reshape(n, -1).shape[1]} output(s) per example but the "
                         f"full kernel has O = {outputs}")
    return y_train


def _flatten_kernel(k: torch.Tensor, name: str, rows: Optional[int] = None, cols: Optional[int] = None
                    ) -> torch.Tensor:
    """A kernel as a float64 matrix over (example, output) pairs: ``[R·O, C·O]`` or ``[R, C]``."""
    if not isinstance(k, torch.Tensor) or not k.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [R, C] or [R, C, O, O]")
    if k.dim() == 2:
        flat = k
    elif k.dim() == 4 and k.shape[2] == k.shape[3]:
        r, c, o, _ = k.shape
        flat = k.permute(0, 2, 1, 3).reshape(r * o, c * o)
    else:
        raise ValueError(f"{name} must be [R, C] or [R, C, O, O], got {tuple(k.shape)}")
    if rows is not None and k.shape[0] != rows or cols is not None and k.shape[1] != cols:
        raise ValueError(f"{name} must have {rows if rows is not None else 'R'} rows and {cols} columns "
                         f"(examples), got {tuple(k.shape)}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return flat.to(torch.float64)


def _times(t: Times) -> torch.Tensor:
    times = torch.as_tensor(t, dtype=torch.float64)
    if bool((times < 0).any()) or bool(torch.isnan(times).any()):
        raise ValueError(f"times t must be >= 0 (math.inf allowed), got {t!r}")
    return times


def gradient_descent_mse(
    k_train_train: Kernel,
    y_train: torch.Tensor,
    *,
    learning_rate: float = 1.0,
    ridge: float = 0.0,
    discrete: bool = False,
) -> Callable[..., Predictions]:
    """Closed-form MSE training dynamics of the linearized network from a dense kernel.

    Args:
        k_train_train: ``K``: ``[N, N]`` or ``[N, N, O, O]`` (module docstring).
        y_train: ``[N]`` or ``[N, O]`` targets.
        learning_rate: η > 0. Time is measured in units where one gradient step
            of size η advances t by 1, so ``t`` steps of gradient descent and
            gradient flow for time ``t`` agree when η is small.
        ridge: λ ≥ 0, added to the diagonal of ``K`` (weight decay towards θ0).
        discrete: False: gradient flow, ``t`` any non-negative real; True:
            gradient descent with step η, ``t`` the number of steps.

    Returns:
        ``predict(t=math.inf, fx_train_0=None, fx_test_0=None, k_test_train=None)``
        → :class:`Predictions`. ``fx_*_0``: the network's outputs at θ0 (shaped
        like ``y_train`` / ``[M, *out]``; default zeros); ``k_test_train``:
        ``[M, N]`` or ``[M, N, O, O]``. Computed in float64 and returned in the
        dtype of ``y_train``.

    Raises:
        ValueError: bad shapes or numbers, a non-symmetric kernel, or a singular
            kernel (``ridge = 0``, ``t = ∞``): add a ridge.
    """
    eta = _check_number("learning_rate", learning_rate, allow_zero=False)
    lam = _check_number("ridge", ridge, allow_zero=True)
    k = _flatten_kernel(k_train_train, "k_train_train")
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"k_train_train must be square, got {tuple(k_train_train.shape)}")
    n = k_train_train.shape[0]
    outputs = k_train_train.shape[2] if k_train_train.dim() == 4 else None
    y = _as_targets(y_train, n, outputs)
    _check_symmetric(k, "k_train_train")
    eigenvalues, eigenvectors = torch.linalg.eigh((k + k.T) / 2)
    a = eigenvalues + lam
    top = max(a.abs().max().item(), 1e-300)
    rtol = _singular_rtol(k_train_train)
    if a.min().item() < -rtol * n * top - 1e-12 * lam:
        raise ValueError(f"k_train_train + ridge·I has a negative eigenvalue {a.min().item():.3g}; "
                         "a kernel must be positive semi-definite")

    def predict(t: Times = math.inf, fx_train_0: Optional[torch.Tensor] = None,
                fx_test_0: Optional[torch.Tensor] = None, k_test_train: Optional[Kernel] = None
                ) -> Predictions:
        times = _times(t)
        f0 = torch.zeros_like(y) if fx_train_0 is None else fx_train_0
        if tuple(f0.shape) != tuple(y.shape):
            raise ValueError(f"fx_train_0 must be shaped like y_train {tuple(y.shape)}, got {tuple(f0.shape)}")
        residual = _columns(y - f0, outputs).to(torch.float64)
        projected = eigenvectors.T @ residual
        flat_times = times.reshape(-1)
        alphas = []
        for time in flat_times.tolist():
            gain = _gain(a, eta, time, discrete, rtol * n * top)
            alphas.append(eigenvectors @ (gain[:, None] * projected))
        alpha = torch.stack(alphas)  # [T, N·O, C]
        train = f0.to(torch.float64) + _uncolumns_like(k @ alpha, y, outputs)
        test = None
        if k_test_train is not None:
            kt = _flatten_kernel(k_test_train, "k_test_train", cols=n)
            if (k_test_train.dim() == 4) != (outputs is not None) or \
                    (outputs is not None and k_test_train.shape[2] != outputs):
                raise ValueError("k_test_train must be of the same kind as k_train_train "
                                 "([M, N] with [N, N], [M, N, O, O] with [N, N, O, O])")
            m = k_test_train.shape[0]
            change = _uncolumns_like(kt @ alpha, y, outputs, rows=m)
            base = torch.zeros_like(change[0]) if fx_test_0 is None else fx_test_0.to(torch.float64)
            if tuple(base.shape) != tuple(change.shape[1:]):
                raise ValueError(f"fx_test_0 must be {tuple(change.shape[1:])}, got {tuple(fx_test_0.shape)}")
            test = (base + change).to(y.dtype).reshape(tuple(times.shape) + tuple(change.shape[1:]))
        elif fx_test_0 is not None:
            raise ValueError("fx_test_0 needs k_test_train")
        train = train.to(y.dtype).reshape(tuple(times.shape) + tuple(y.shape))
        return Predictions(train=train, test=test)

    return predict


def _gain(a: torch.Tensor, eta: float, time: float, discrete: bool, tiny: float) -> torch.Tensor:
    """``g_t(a)`` per eigenvalue: α = V g_t(Λ) Vᵀ r (module docstring); eigenvalues
    within ``tiny`` of zero count as zero."""
    zero = a.abs() <= tiny
    if math.isinf(time):
        if bool(zero.any()):
            raise ValueError(
                f"the kernel is singular ({int(zero.sum())} eigenvalue(s) of k_train_train + ridge·I are "
                f"within {tiny:.3g} of zero): t = inf has no unique solution. Pass ridge > 0, or a finite t.")
        if discrete and eta * a.max().item() >= 2.0:
            # |1 − η a| ≥ 1: the steps grow or oscillate along that eigenvector, no limit exists
            raise ValueError(
                f"gradient descent with learning_rate {eta:g} does not converge on this kernel: "
                f"learning_rate·(λ_max + ridge) = {eta * a.max().item():.4g} ≥ 2, so t = inf has no limit. "
                f"Use learning_rate < {2.0 / a.max().item():.4g}, discrete=False, or a finite t.")
        return 1.0 / a
    safe = torch.where(zero, torch.ones_like(a), a)
    if discrete:
        if time != int(time):
            raise ValueError(f"with discrete=True, t counts gradient steps and must be an integer, got {time}")
        gain = _one_minus_power(eta * safe, int(time)) / safe
    else:
        gain = -torch.expm1(-eta * safe * time) / safe
    # Along the null space of K + λI (λ = 0) neither the training outputs nor, for a
    # test kernel of the same network, the test outputs move: no coefficient there
    # (the minimum-norm α), so a coarse kernel's round-off is not amplified by t.
    return torch.where(zero, torch.zeros_like(a), gain)


def _columns(r: torch.Tensor, outputs: Optional[int]) -> torch.Tensor:
    """Targets as the right-hand side: ``[N, C]`` per-output columns, or ``[N·O, 1]`` for a full kernel."""
    n = r.shape[0]
    if outputs is None:
        return r.reshape(n, -1)
    return r.reshape(n * outputs, 1)


def _uncolumns_like(values: torch.Tensor, y: torch.Tensor, outputs: Optional[int],
                    rows: Optional[int] = None) -> torch.Tensor:
    """``[T, R·O or R, C]`` back to ``[T, R, *y.shape[1:]]``."""
    r = y.shape[0] if rows is None else rows
    return values.reshape((values.shape[0], r) + tuple(y.shape[1:]))


@dataclass
class CGSolution:
    """The t = ∞ solution ``α = (K + λI)⁻¹ (y − f0)`` found by conjugate gradients.

    Attributes:
        alpha: ``[N]`` or ``[N, C]`` (float64), shaped like ``y_train``.
        train: ``f0 + K α``, the train predictions at t = ∞, shaped like ``y_train``.
        iterations: CG iterations run (kernel-vector products, plus one for ``train``).
        relative_residual: ``‖(K + λI) α − r‖ / ‖r‖`` per column at the end, float64.
    """

    alpha: torch.Tensor
    train: torch.Tensor
    iterations: int
    relative_residual: torch.Tensor

    def test(self, k_test_train: Union[Kernel, KernelOperator], fx_test_0: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """Test predictions ``f0_test + Θ(x_test, x_train) α``.

        ``k_test_train``: a ``[M, N]`` matrix or a function ``v ↦ Θ(x_test, x_train) v``
        taking ``[N]``/``[N, C]`` like ``alpha`` (e.g. ``lambda v: ntk_vp(model, x_test, v, x_train)``).
        ``fx_test_0``: the network's test outputs at θ0, ``[M]``/``[M, C]`` like the predictions.
        """
        if callable(k_test_train):
            change = k_test_train(self.alpha).to(torch.float64)
        elif isinstance(k_test_train, torch.Tensor) and k_test_train.dim() == 4:
            raise ValueError(
                f"CGSolution.test takes a full [M, N, O, O] kernel flattened like the train kernel, got "
                f"{tuple(k_test_train.shape)}: pass k.permute(0, 2, 1, 3).reshape(M·O, N·O)")
        else:
            change = _flatten_kernel(k_test_train, "k_test_train", cols=self.alpha.shape[0]) @ self.alpha
        if fx_test_0 is not None:
            if tuple(fx_test_0.shape) != tuple(change.shape):
                raise ValueError(f"fx_test_0 must be {tuple(change.shape)} (shaped like the test "
                                 f"predictions), got {tuple(fx_test_0.shape)}")
            change = change + fx_test_0.to(torch.float64)
        return change.to(self.train.dtype)


def gradient_descent_mse_cg(
    k_train_train: Union[Kernel, KernelOperator],
    y_train: torch.Tensor,
    *,
    ridge: float = 0.0,
    fx_train_0: Optional[torch.Tensor] = None,
    tol: float = 1e-8,
    max_iter: Optional[int] = None,
) -> CGSolution:
    """The t = ∞ predictions of MSE training (kernel ridge regression) by conjugate gradients.

    Solves ``(K + λI) α = y − f0`` (module docstring) with the conjugate gradient
    method (Hestenes & Stiefel, 1952), one kernel-vector product per iteration,
    every column of ``y_train`` at once. Vectors and scalars are float64; the
    products are computed in the operator's own precision.

    Args:
        k_train_train: an ``[N, N]`` kernel or a function ``v ↦ K v`` taking and
            returning ``[N, C]`` that acts on each column alone, as the same
            ``[N, N]`` kernel would (e.g. ``lambda v: ntk_vp(model, x_train, v)``,
            trace mode); a kernel that mixes outputs (``output="full"``) goes in
            flattened, with ``y_train`` as ``[N·O]``;
            it must be symmetric positive semi-definite.
        y_train: ``[N]`` or ``[N, C]`` targets.
        ridge: λ ≥ 0 added to the diagonal.
        fx_train_0: the network's outputs at θ0, shaped like ``y_train``; default zeros.
        tol: stop when every column's residual ``‖(K + λI) α − r‖ ≤ tol · ‖r‖``.
        max_iter: at most this many iterations; default ``10 N``.

    Raises:
        ValueError: bad arguments. RuntimeError: no convergence in ``max_iter``
            iterations, or a direction of (numerically) zero curvature: the kernel
            is singular or not positive definite on the residual; add a ridge.
    """
    lam = _check_number("ridge", ridge, allow_zero=True)
    tol_ = _check_number("tol", tol, allow_zero=False)
    if not isinstance(y_train, torch.Tensor) or not y_train.is_floating_point() or y_train.dim() not in (1, 2):
        raise ValueError("y_train must be a floating-point tensor [N] or [N, C]")
    n = y_train.shape[0]
    if callable(k_train_train):
        operator = k_train_train
    else:
        if isinstance(k_train_train, torch.Tensor) and k_train_train.dim() == 4:
            raise ValueError(
                f"gradient_descent_mse_cg takes a full [N, N, O, O] kernel flattened, got "
                f"{tuple(k_train_train.shape)}: pass k.permute(0, 2, 1, 3).reshape(N·O, N·O) with "
                "y_train.reshape(N·O) (and fx_train_0 likewise)")
        matrix = _flatten_kernel(k_train_train, "k_train_train", rows=n, cols=n)
        if matrix.shape != (n, n):
            raise ValueError("gradient_descent_mse_cg takes an [N, N] kernel or a kernel-vector function")

        def operator(v: torch.Tensor) -> torch.Tensor:
            return matrix @ v
    if max_iter is None:
        max_iter = 10 * max(n, 1)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    f0 = torch.zeros_like(y_train) if fx_train_0 is None else fx_train_0
    if tuple(f0.shape) != tuple(y_train.shape):
        raise ValueError(f"fx_train_0 must be shaped like y_train {tuple(y_train.shape)}, got {tuple(f0.shape)}")

    precision = [torch.finfo(torch.float64).eps]

    def apply(v: torch.Tensor) -> torch.Tensor:
        out = operator(v.reshape(y_train.shape))
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            # the operator's own rounding bounds what a curvature can tell apart from zero
            precision[0] = max(precision[0], torch.finfo(out.dtype).eps)
        return out.reshape(n, -1).to(torch.float64) + lam * v

    rhs = (y_train - f0).to(torch.float64).reshape(n, -1)
    norms = rhs.norm(dim=0)
    alpha = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rr = (residual * residual).sum(0)
    done = norms == 0
    iterations = 0
    # the largest Rayleigh quotient seen, a lower bound on the largest eigenvalue of K + λI
    largest = torch.zeros_like(norms)
    while not bool((residual.norm(dim=0) <= tol_ * norms).all()):
        if iterations >= max_iter:
            raise RuntimeError(
                f"conjugate gradients did not converge in {max_iter} iterations (relative residual "
                f"{(residual.norm(dim=0) / norms.clamp_min(1e-300)).max().item():.3g} > tol {tol_:g}); "
                "raise max_iter, loosen tol, or add a ridge to improve the conditioning")
        kp = apply(direction)
        iterations += 1
        curvature = (direction * kp).sum(0)
        active = ~done
        length = (direction * direction).sum(0)
        largest = torch.maximum(largest, curvature / length.clamp_min(1e-300))
        # A Rayleigh quotient within the operator's rounding of zero, relative to the largest
        # one: a direction the kernel (numerically) does not see, which no number of further
        # iterations would resolve.
        flat = curvature <= max(n, 1) * precision[0] * largest * length
        if bool((flat[active] | (curvature[active] <= 1e-300)).any()):
            raise RuntimeError(
                "conjugate gradients met a direction of zero or negative curvature: the kernel is "
                "singular (or not positive semi-definite) on the targets; pass ridge > 0")
        step = torch.where(active, rr / torch.where(active, curvature, torch.ones_like(curvature)),
                           torch.zeros_like(rr))
        alpha += step * direction
        residual -= step * kp
        rr_new = (residual * residual).sum(0)
        done = residual.norm(dim=0) <= tol_ * norms
        beta = torch.where(rr > 0, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        direction = residual + beta * direction
        rr = rr_new
    kalpha = apply(alpha) - lam * alpha
    true_residual = (kalpha + lam * alpha - rhs).norm(dim=0) / norms.clamp_min(1e-300)
    train = (f0.to(torch.float64).reshape(n, -1) + kalpha).reshape(y_train.shape).to(y_train.dtype)
    return CGSolution(alpha=alpha.reshape(y_train.shape), train=train, iterations=iterations + 1,
                      relative_residual=true_residual)
