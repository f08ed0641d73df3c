"""predict and analysis.metrics on edge cases: tiny eigenvalues, divergent steps, wide or
offset representations, nearly equal kernels and inputs that must be refused."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lazykernel.analysis import metrics
from lazykernel.predict import gradient_descent_mse, gradient_descent_mse_cg


def _feature_kernels(eigenvalues, m=3, seed=0):
    """``K = Φ Φᵀ`` with the given eigenvalues and a test kernel ``Φ_test Φᵀ`` of the same
    features, so the test rows weigh each eigenvector of K by the square root of its eigenvalue."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    phi = q * torch.tensor(eigenvalues, dtype=torch.float64).sqrt()
    phi_test = torch.randn(m, n, dtype=torch.float64, generator=gen)
    k = phi @ phi.T
    return (k + k.T) / 2, phi_test @ phi.T


_SPREAD = [1.0, 1e-3, 1e-6, 1e-9, 1e-11]


def test_discrete_steps_keep_their_effect_along_tiny_eigenvalues():
    # η·λ = 1e-17 for the smallest eigenvalue: 1 − η·λ rounds to 1, yet 1000 steps
    # still move α by 1000·η along that eigenvector
    k, kt = _feature_kernels(_SPREAD)
    y = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eta, steps = 1e-6, 1000
    alpha = torch.zeros(5, dtype=torch.float64)
    for _ in range(steps):
        alpha = alpha - eta * (k @ alpha - y)
    got = gradient_descent_mse(k, y, learning_rate=eta, discrete=True)(steps, k_test_train=kt)
    torch.testing.assert_close(got.train, k @ alpha, rtol=1e-9, atol=0)
    torch.testing.assert_close(got.test, kt @ alpha, rtol=1e-9, atol=0)


def test_ntk_regression_steps_keep_their_effect_along_tiny_eigenvalues():
    k, kt = _feature_kernels(_SPREAD)
    y = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lr, steps, n = 5e-6, 1000, 5
    f, f_test = torch.zeros(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for _ in range(steps):  # gradient descent on (1/2N) Σ (f − y)², in function space
        residual = f - y
        f, f_test = f - lr / n * k @ residual, f_test - lr / n * kt @ residual
    got_train, got_test = metrics.ntk_regression(k, kt, y, lr=lr, steps=steps)
    torch.testing.assert_close(got_train, f, rtol=1e-9, atol=0)
    torch.testing.assert_close(got_test, f_test, rtol=1e-9, atol=0)


def test_discrete_infinite_time_refuses_a_learning_rate_that_diverges():
    k, _ = _feature_kernels([4.0, 1.0, 0.5])
    y = torch.ones(3, dtype=torch.float64)
    converging = gradient_descent_mse(k, y, learning_rate=0.4, discrete=True)(math.inf).train
    torch.testing.assert_close(converging, y, rtol=1e-12, atol=1e-12)
    # η·λ_max = 3: the iterates grow, there is no t = ∞ to report
    with pytest.raises(ValueError, match=r"does not converge.*learning_rate·\(λ_max \+ ridge\) = 3 ≥ 2.*< 0\.5"):
        gradient_descent_mse(k, y, learning_rate=0.75, discrete=True)(math.inf)
    # the ridge counts: η·(λ_max + λ) = 0.45·(4 + 1) ≥ 2
    with pytest.raises(ValueError, match="does not converge"):
        gradient_descent_mse(k, y, learning_rate=0.45, ridge=1.0, discrete=True)(math.inf)
    # finite steps still report the diverging iterates, and gradient flow always converges
    assert gradient_descent_mse(k, y, learning_rate=0.75, discrete=True)(60).train.abs().max() > 1e6
    gradient_descent_mse(k, y, learning_rate=0.75)(math.inf)


def test_gradient_descent_mse_refuses_scalar_targets_by_name():
    k, _ = _feature_kernels([1.0, 0.5])
    with pytest.raises(ValueError, match=r"y_train must be \[N\] or \[N, O\] with N = 2.*got \(\)"):
        gradient_descent_mse(k, torch.tensor(1.0, dtype=torch.float64))


def test_cg_says_how_to_pass_a_full_kernel():
    full = torch.eye(6, dtype=torch.float64).reshape(3, 2, 3, 2).permute(0, 2, 1, 3)
    with pytest.raises(ValueError, match=r"flattened.*permute\(0, 2, 1, 3\)\.reshape\(N·O, N·O\)"):
        gradient_descent_mse_cg(full, torch.ones(6, dtype=torch.float64))
    solution = gradient_descent_mse_cg(full.permute(0, 2, 1, 3).reshape(6, 6), torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"flattened.*reshape\(M·O, N·O\)"):
        solution.test(full[:1])
    torch.testing.assert_close(solution.test(full[:1].permute(0, 2, 1, 3).reshape(2, 6)),
                               torch.ones(2, dtype=torch.float64))


def test_kernel_distance_of_nearly_equal_kernels_keeps_its_digits_and_sign():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(8, 8, dtype=torch.float64, generator=gen)
    k0 = a @ a.T
    e = torch.randn(8, 8, dtype=torch.float64, generator=gen)
    e = e + e.T
    e = e - (e * k0).sum() / (k0 * k0).sum() * k0  # Frobenius-orthogonal to K0
    for s in (1e-3, 1e-6, 1e-9):
        k1 = k0 + s * k0.norm() / e.norm() * e
        # cos(K0, K1) = 1/√(1 + s²), so 1 − cos = s² / (√(1 + s²)(1 + √(1 + s²)))
        root = math.sqrt(1 + s * s)
        expected = s * s / (root * (1 + root))
        assert metrics.kernel_distance(k0, k1) == pytest.approx(expected, rel=1e-6)
    for scale in (1.0, 3.0, 1e-3, 7e5):
        assert 0.0 <= metrics.kernel_distance(k0, scale * k0) < 1e-30
    assert metrics.kernel_distance(k0, -k0) == pytest.approx(2.0, rel=1e-15)


class _LargestResult(TorchFunctionMode):
    """Records the largest tensor any torch function returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_tensor(out):
            self.largest = max(self.largest, out.numel())
        return out


def test_linear_cka_of_wide_features_works_in_the_space_of_the_inputs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 3000, dtype=torch.float64, generator=gen)
    y = x[:, :2000] + 0.5 * torch.randn(12, 2000, dtype=torch.float64, generator=gen)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = ((xc @ xc.T) * (yc @ yc.T)).sum() / ((xc @ xc.T).norm() * (yc @ yc.T).norm())
    with _LargestResult() as seen:
        value = metrics.linear_cka(x, y)
    assert value == pytest.approx(expected.item(), rel=1e-12)
    # nothing of the size p × p (9·10⁶ entries): no more than the inputs themselves
    assert seen.largest <= x.numel()
    # many inputs, few features: the feature form, same value as the Gram form
    tall_x = torch.randn(400, 5, dtype=torch.float64, generator=gen)
    tall_y = tall_x @ torch.randn(5, 3, dtype=torch.float64, generator=gen)
    tx, ty = tall_x - tall_x.mean(0), tall_y - tall_y.mean(0)
    gram = ((tx @ tx.T) * (ty @ ty.T)).sum() / ((tx @ tx.T).norm() * (ty @ ty.T).norm())
    assert metrics.linear_cka(tall_x, tall_y) == pytest.approx(gram.item(), rel=1e-12)


def _u_centered(k):
    n = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(0.0)
    means = k.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    k = k - means[:, None] - means[None, :]
    k.fill_diagonal_(0.0)
    return k


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
def test_debiased_cka_ignores_a_large_common_offset_of_the_features(offset):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(50, 20, dtype=torch.float64, generator=gen)
    y = x @ torch.randn(20, 30, dtype=torch.float64, generator=gen) \
        + 0.5 * torch.randn(50, 30, dtype=torch.float64, generator=gen)
    xc, yc = x - x.mean(0), y - y.mean(0)
    kx, ky = _u_centered(xc @ xc.T), _u_centered(yc @ yc.T)
    expected = ((kx * ky).sum() / ((kx * kx).sum() * (ky * ky).sum()).sqrt()).item()
    assert metrics.debiased_linear_cka(x + offset, y + offset) == pytest.approx(expected, rel=1e-9)


def _regression_problem():
    k, kt = _feature_kernels([2.0, 1.0, 0.5, 0.25])
    return k, kt, torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("where", ["k_train", "k_test_train", "y_train", "f0_train"])
@pytest.mark.parametrize("kwargs", [{}, {"time": 1.0}, {"lr": 0.1, "steps": 3}])
def test_ntk_regression_refuses_non_finite_inputs_by_name(where, kwargs):
    k, kt, y = _regression_problem()
    inputs = {"k_train": k.clone(), "k_test_train": kt.clone(), "y_train": y.clone(), "f0_train": torch.zeros_like(y)}
    inputs[where].view(-1)[1] = math.nan
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        metrics.ntk_regression(**inputs, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"time": 1.0}, {"lr": 0.1, "steps": 3}])
def test_ntk_regression_refuses_a_kernel_that_is_not_symmetric(kwargs):
    k, kt, y = _regression_problem()
    k[0, 3] += 1.0
    with pytest.raises(ValueError, match=r"k_train is not symmetric \(max \|K - Kᵀ\| = 1"):
        metrics.ntk_regression(k, kt, y, **kwargs)


@pytest.mark.parametrize("steps", [2.5, 2.0, True, math.inf])
def test_ntk_regression_refuses_steps_that_are_not_a_count(steps):
    k, kt, y = _regression_problem()
    with pytest.raises(ValueError, match="steps an integer ≥ 0"):
        metrics.ntk_regression(k, kt, y, lr=5.0, steps=steps)


def test_ntk_regression_refuses_bad_shapes_by_name():
    k, kt, y = _regression_problem()
    with pytest.raises(ValueError, match=r"y_train must be \[N, O\].*\(4, 2, 1\)"):
        metrics.ntk_regression(k, kt, y[..., None])
    with pytest.raises(ValueError, match=r"f0_train must be \[4, 2\].*\(3, 2\)"):
        metrics.ntk_regression(k, kt, y, f0_train=y[:3])
    with pytest.raises(ValueError, match=r"f0_test must be \[3, 2\].*\(3, 1\)"):
        metrics.ntk_regression(k, kt, y, f0_test=torch.zeros(3, 1, dtype=torch.float64))


def test_closed_form_and_ntk_regression_take_the_same_eigenvalues_for_round_off():
    """A float64 kernel whose smallest eigenvalue is 1e-13 of the largest: below both
    solvers' cut-off (N·max(ε, 1e-12)·λ_max). Fitting along it would take coefficients
    1e13 times the targets and blow the test predictions up by round-off; neither does."""
    k, k_test = _feature_kernels([1.0, 1e-2, 1e-13])
    y = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        gradient_descent_mse(k, y)(math.inf, k_test_train=k_test)
    _, f_test = metrics.ntk_regression(k, k_test, y)
    evals, evecs = torch.linalg.eigh(k)
    top = evecs[:, 1:]                     # the eigenvectors of 1 and 1e-2
    reference = k_test @ (top @ ((top.T @ y) / evals[1:, None]))
    torch.testing.assert_close(f_test, reference, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("metric", ["kernel_distance", "relative_kernel_change", "centered_kernel_alignment"])
def test_kernel_metrics_refuse_what_is_not_a_tensor_by_name(metric):
    kernel = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="must be a tensor, got list"):
        getattr(metrics, metric)(kernel.tolist(), kernel)
    with pytest.raises(ValueError, match="must be a tensor, got list"):
        getattr(metrics, metric)(kernel, kernel.tolist())


def test_cg_stops_at_once_on_a_direction_the_kernel_does_not_see():
    # A singular kernel and targets outside its range: the residual's part in the null
    # space never shrinks. CG must say so when it meets it, not after 10·N iterations.
    # (A rounding-level curvature of either sign used to be taken as a step when
    # positive, blowing the solution up, for 4 to 46 iterations over these seeds.)
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(60, 3, dtype=torch.float64, generator=gen)
        k = a @ a.T
        y = torch.randn(60, 2, dtype=torch.float64, generator=gen)
        calls = []

        def operator(v):
            calls.append(1)
            return k @ v

        with pytest.raises(RuntimeError, match="zero or negative curvature.*ridge"):
            gradient_descent_mse_cg(operator, y)
        assert len(calls) == 4  # the rank, then the first direction outside the range
    # in float32 the operator's own rounding is the bar
    calls.clear()
    with pytest.raises(RuntimeError, match="zero or negative curvature"):
        gradient_descent_mse_cg(lambda v: (k.float() @ v.float()), y)
    # targets in the kernel's range are solved, singular or not
    y_in_range = k @ torch.randn(60, 2, dtype=torch.float64, generator=gen)
    solution = gradient_descent_mse_cg(operator, y_in_range, tol=1e-10)
    torch.testing.assert_close(solution.train, y_in_range, rtol=1e-8, atol=1e-8 * y_in_range.abs().max().item())
    # and a ridge makes any targets solvable
    ridge = gradient_descent_mse_cg(k, y, ridge=1e-3)
    torch.testing.assert_close(ridge.alpha, torch.linalg.solve(k + 1e-3 * torch.eye(60, dtype=torch.float64), y))
