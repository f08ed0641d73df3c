"""lazykernel.infinite: closed forms, Gaussian expectations, and wide empirical NTKs."""

import math

import pytest
import torch

import lazykernel
from lazykernel import infinite
from lazykernel.analysis import mlp


def test_one_hidden_layer_relu_by_hand():
    # x = e1, x' = e2 in d = 2: Σ¹ = diag(1/2, 1/2), angle π/2 off the diagonal.
    x = torch.eye(2, dtype=torch.float64)
    nngp, ntk = infinite.kernels(x, depth=1, activation="relu")
    # off-diagonal: E[φφ] = (1/2)(1 + 0)/(2π) = 1/(4π); Σ̇ = (π/2)/(2π) = 1/4; Θ = 0 · 1/4 + 1/(4π)
    # diagonal: E[φφ] = a/2 = 1/4; Σ̇ = 1/2; Θ = (1/2)(1/2) + 1/4
    expected_nngp = torch.tensor([[0.25, 1 / (4 * math.pi)], [1 / (4 * math.pi), 0.25]], dtype=torch.float64)
    expected_ntk = torch.tensor([[0.5, 1 / (4 * math.pi)], [1 / (4 * math.pi), 0.5]], dtype=torch.float64)
    torch.testing.assert_close(nngp, expected_nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ntk, expected_ntk, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_deep_linear_network(depth):
    # identity activation, σ_w = 1, σ_b = 0: Σ^l = x·x'/d at every layer, Θ = (L + 1) x·x'/d
    x = torch.randn(4, 3, dtype=torch.float64)
    nngp, ntk = infinite.kernels(x, depth=depth, activation="identity")
    torch.testing.assert_close(nngp, x @ x.T / 3)
    torch.testing.assert_close(ntk, (depth + 1) * x @ x.T / 3)


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_gaussian_expectations_against_monte_carlo(activation):
    # one hidden layer, σ_b = 0: NNGP = σ_w² E[φ(u)φ(v)], NTK = Σ¹ σ_w² E[φ'φ'] + NNGP
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.1, 0.7]], dtype=torch.float64)
    sigma_w = 1.5
    nngp, ntk = infinite.kernels(x, depth=1, activation=activation, sigma_w=sigma_w)
    cov = sigma_w ** 2 * x @ x.T / 3
    z = torch.randn(400_000, 2, dtype=torch.float64, generator=gen) @ torch.linalg.cholesky(cov).T
    if activation == "relu":
        phi, dphi = torch.relu(z), (z > 0).double()
    else:
        phi, dphi = torch.erf(z), 2 / math.sqrt(math.pi) * torch.exp(-z * z)
    mc_nngp = sigma_w ** 2 * (phi.T @ phi) / z.shape[0]
    mc_ntk = cov * sigma_w ** 2 * (dphi.T @ dphi) / z.shape[0] + mc_nngp
    # Monte Carlo standard error with 4e5 samples is ~2e-3 relative; 1.5e-2 is > 5 s.e.
    torch.testing.assert_close(nngp, mc_nngp, rtol=1.5e-2, atol=1.5e-2 * mc_nngp.abs().max().item())
    torch.testing.assert_close(ntk, mc_ntk, rtol=1.5e-2, atol=1.5e-2 * mc_ntk.abs().max().item())


@pytest.mark.parametrize("activation,depth,sigma_b", [("relu", 1, 0.0), ("relu", 2, 0.4), ("erf", 2, 0.4)])
def test_wide_network_ntk_approaches_the_analytic_one(activation, depth, sigma_b):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    exact = infinite.ntk(x, depth=depth, activation=activation, sigma_w=1.2, sigma_b=sigma_b)

    def kernels(width):
        return [lazykernel.ntk(mlp(5, width, 1, depth=depth, parameterization="ntk", activation=activation,
                                   sigma_w=1.2, sigma_b=sigma_b, seed=seed).double(), x) for seed in range(4)]

    def error(kernel):
        return ((kernel - exact).norm() / exact.norm()).item()

    narrow, wide = kernels(64), kernels(2048)
    narrow_error = sum(map(error, narrow)) / 4
    wide_error = sum(map(error, wide)) / 4
    # the fluctuations fall like width^-1/2: √32 ≈ 5.7 between the two widths
    assert wide_error < 0.1
    assert narrow_error / wide_error > 2.5
    # the seed-averaged kernel converges faster still (its bias is O(1/width))
    assert error(sum(wide) / 4) < 0.05


def test_trace_kernel_of_several_outputs_is_outputs_times_theta():
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = infinite.ntk(x)
    model = mlp(4, 4096, 3, parameterization="ntk", seed=0).double()
    assert ((lazykernel.ntk(model, x) / 3 - exact).norm() / exact.norm()).item() < 0.08


def test_infinite_refuses_bad_arguments():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="unknown activation"):
        infinite.ntk(x, activation="gelu")
    with pytest.raises(ValueError, match="depth"):
        infinite.nngp(x, depth=0)
    with pytest.raises(ValueError, match="same d"):
        infinite.ntk(x, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        infinite.ntk(torch.randn(3, 2, 2))
