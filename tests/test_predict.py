"""predict: dense eigen path and CG path against float64 linear algebra written directly."""

import math

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel.predict import gradient_descent_mse, gradient_descent_mse_cg
from conftest import low_rank_float32_problem


def _spd(n, seed=0, rank=None):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or n + 3, dtype=torch.float64, generator=gen)
    return a @ a.T / a.shape[1]


def _targets(n, o, seed=1):
    return torch.randn(n, o, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ridge", [0.0, 0.2])
def test_dense_predictions_match_matrix_functions(ridge):
    k = _spd(10)
    kt = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y, f0, f0t = _targets(10, 3), _targets(10, 3, 5), _targets(4, 3, 6)
    eta = 0.7
    predict = gradient_descent_mse(k, y, learning_rate=eta, ridge=ridge)
    a = k + ridge * torch.eye(10, dtype=torch.float64)
    for t in (0.0, 0.5, 3.0, math.inf):
        if math.isinf(t):
            alpha = torch.linalg.solve(a, y - f0)
        else:
            alpha = torch.linalg.solve(a, (torch.eye(10, dtype=torch.float64) - torch.matrix_exp(-eta * t * a)) @ (y - f0))
        got = predict(t, fx_train_0=f0, fx_test_0=f0t, k_test_train=kt)
        torch.testing.assert_close(got.train, f0 + k @ alpha, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got.test, f0t + kt @ alpha, rtol=1e-9, atol=1e-10)


def test_discrete_steps_match_repeated_gradient_steps():
    k = _spd(6)
    y = _targets(6, 1)[:, 0]
    eta = 0.3
    f = torch.zeros(6, dtype=torch.float64)
    for _ in range(25):
        f = f - eta * k @ (f - y)
    got = gradient_descent_mse(k, y, learning_rate=eta, discrete=True)(25).train
    torch.testing.assert_close(got, f, rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match="integer"):
        gradient_descent_mse(k, y, discrete=True)(2.5)


def test_several_times_at_once_and_full_kernel_equals_kron():
    k = _spd(5)
    y = _targets(5, 2)
    kt = _spd(7)[:3, :5]
    times = torch.tensor([0.0, 1.0, math.inf])
    a = gradient_descent_mse(k, y)(times, k_test_train=kt)
    assert a.train.shape == (3, 5, 2) and a.test.shape == (3, 3, 2)
    torch.testing.assert_close(a.train[0], torch.zeros(5, 2, dtype=torch.float64))
    torch.testing.assert_close(a.train[2], y, rtol=1e-9, atol=1e-9)  # interpolation at t = ∞
    eye = torch.eye(2, dtype=torch.float64)
    full = torch.einsum("ij,ab->ijab", k, eye)
    full_test = torch.einsum("ij,ab->ijab", kt, eye)
    b = gradient_descent_mse(full, y)(times, k_test_train=full_test)
    torch.testing.assert_close(a.train, b.train, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(a.test, b.test, rtol=1e-9, atol=1e-10)


def test_float32_kernel_is_solved_in_float64_and_returned_in_y_dtype():
    k = _spd(8).float()
    y = _targets(8, 1)[:, 0].float()
    got = gradient_descent_mse(k, y)(math.inf).train
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, y, rtol=1e-4, atol=1e-4)


def test_singular_kernel_without_ridge_is_refused_with_advice():
    k = _spd(6, rank=2)
    y = _targets(6, 1)
    with pytest.raises(ValueError, match="singular.*ridge"):
        gradient_descent_mse(k, y)(math.inf)
    finite = gradient_descent_mse(k, y)(2.0).train  # finite t is well defined
    assert torch.isfinite(finite).all()
    gradient_descent_mse(k, y, ridge=1e-3)(math.inf)
    with pytest.raises(RuntimeError, match="ridge"):
        gradient_descent_mse_cg(k, y[:, 0], tol=1e-12)


@pytest.mark.parametrize("bad, message", [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(ridge=-1.0), "ridge"),
    (dict(y=torch.zeros(5)), "N = 6"),
    (dict(k=torch.ones(6, 5, dtype=torch.float64)), "square"),
    (dict(k=torch.triu(torch.ones(6, 6, dtype=torch.float64))), "not symmetric"),
    (dict(k=-torch.eye(6, dtype=torch.float64)), "positive semi-definite"),
])
def test_dense_errors(bad, message):
    k = bad.get("k", _spd(6))
    y = bad.get("y", _targets(6, 1))
    kwargs = {key: v for key, v in bad.items() if key not in ("k", "y")}
    with pytest.raises(ValueError, match=message):
        gradient_descent_mse(k, y, **kwargs)


def test_dense_predict_errors():
    predict = gradient_descent_mse(_spd(4), _targets(4, 1))
    with pytest.raises(ValueError, match=">= 0"):
        predict(-1.0)
    with pytest.raises(ValueError, match="fx_train_0"):
        predict(1.0, fx_train_0=torch.zeros(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs k_test_train"):
        predict(1.0, fx_test_0=torch.zeros(3, 1, dtype=torch.float64))


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_cg_agrees_with_dense_eigen_path(ridge):
    k = _spd(30, seed=3)
    y, f0 = _targets(30, 2), _targets(30, 2, seed=4)
    kt = torch.randn(6, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    dense = gradient_descent_mse(k, y, ridge=ridge)(math.inf, fx_train_0=f0, k_test_train=kt)
    cg = gradient_descent_mse_cg(lambda v: k @ v, y, ridge=ridge, fx_train_0=f0, tol=1e-12)
    torch.testing.assert_close(cg.train, dense.train, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(cg.test(kt), dense.test, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(cg.test(lambda v: kt @ v), dense.test, rtol=1e-8, atol=1e-9)
    assert cg.iterations < 100 and (cg.relative_residual < 1e-10).all()
    by_matrix = gradient_descent_mse_cg(k, y, ridge=ridge, fx_train_0=f0, tol=1e-12)
    torch.testing.assert_close(by_matrix.alpha, cg.alpha, rtol=1e-9, atol=1e-9)


def test_cg_with_ntk_vp_operator_matches_dense_ntk():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1)).double()
    gen = torch.Generator().manual_seed(6)
    x, xt = torch.randn(20, 4, dtype=torch.float64, generator=gen), torch.randn(5, 4, dtype=torch.float64, generator=gen)
    y = torch.randn(20, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        f0, f0t = model(x)[:, 0], model(xt)[:, 0]
    ridge = 1e-2
    dense = gradient_descent_mse(lazykernel.ntk(model, x), y, ridge=ridge)(
        math.inf, fx_train_0=f0, fx_test_0=f0t, k_test_train=lazykernel.ntk(model, xt, x))
    cg = gradient_descent_mse_cg(lambda v: lazykernel.ntk_vp(model, x, v), y, ridge=ridge, fx_train_0=f0,
                                 tol=1e-11)
    torch.testing.assert_close(cg.train, dense.train, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(cg.test(lambda v: lazykernel.ntk_vp(model, xt, v, x), f0t), dense.test,
                               rtol=1e-8, atol=1e-8)


def test_cg_errors():
    k = _spd(10)
    y = _targets(10, 1)[:, 0]
    with pytest.raises(RuntimeError, match="did not converge in 1 iterations"):
        gradient_descent_mse_cg(k, y, max_iter=1, tol=1e-12)
    with pytest.raises(ValueError, match="max_iter"):
        gradient_descent_mse_cg(k, y, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        gradient_descent_mse_cg(k, y, tol=0)
    with pytest.raises(ValueError, match="y_train"):
        gradient_descent_mse_cg(k, torch.zeros(10, 2, 2))
    with pytest.raises(ValueError, match="fx_train_0"):
        gradient_descent_mse_cg(k, y, fx_train_0=torch.zeros(3))


def test_float32_kernel_of_low_rank_is_not_refused_and_its_round_off_is_not_fitted():
    """nn.Linear(3, 1) on 20 examples: a float32 NTK of rank 4, whose 16 zero eigenvalues
    come out as ±5e-7. Any t works; t = ∞ is refused as singular, as for float64."""
    model, x, y, xt, f0, f0t = low_rank_float32_problem()
    k, kt = lazykernel.ntk(model, x), lazykernel.ntk(model, xt, x)
    k64, kt64 = lazykernel.ntk(model.double(), x.double()), lazykernel.ntk(model, xt.double(), x.double())
    predict32 = gradient_descent_mse(k, y, learning_rate=0.05)
    predict64 = gradient_descent_mse(k64, y.double(), learning_rate=0.05)
    for t in (50.0, 1e9):
        got = predict32(t, fx_train_0=f0, fx_test_0=f0t, k_test_train=kt).test
        want = predict64(t, fx_train_0=f0.double(), fx_test_0=f0t.double(), k_test_train=kt64).test
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="singular"):
        predict32(math.inf)


def test_cg_test_predictions_check_the_shape_of_the_initial_outputs():
    k = _spd(5)
    solution = gradient_descent_mse_cg(k, _targets(5, 1)[:, 0])
    kt = torch.randn(3, 5, dtype=torch.float64)
    assert solution.test(kt, torch.zeros(3, dtype=torch.float64)).shape == (3,)
    with pytest.raises(ValueError, match="fx_test_0 must be"):
        solution.test(kt, torch.zeros(3, 1, dtype=torch.float64))
