"""linearize: f_lin(θ0) = f(θ0), first-order agreement, and training it matches predict's closed form."""

import copy

import pytest
import torch
from torch import nn

import lazykernel
from conftest import reference_ntk


def _mlp(seed=0, out=2, act=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), act(), nn.Linear(16, out)).double()


def _shift(model, direction, h):
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p += h * direction[n]
    return moved


def test_linearized_model_equals_network_at_theta0():
    model = _mlp()
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lin = lazykernel.linearize(model)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), model(x), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(lin.f0(x), model(x), rtol=1e-13, atol=1e-13)
    assert sorted(lin.theta()) == sorted(n for n, _ in model.named_parameters())
    assert sum(p.numel() for p in lin.parameters()) == sum(p.numel() for p in model.parameters())


def test_linearized_model_is_first_order_exact():
    model = _mlp(act=nn.Tanh)  # smooth, so the remainder is second order for every h
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    direction = {n: torch.randn(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()}
    lin = lazykernel.linearize(model)
    gaps = []
    for h in (2e-3, 1e-3):
        with torch.no_grad():
            for n, p in lin.theta().items():
                p.copy_(lin.theta0()[n] + h * direction[n])
            lin_out = lin(x)
            net_out = _shift(model, direction, h)(x)
            # f_lin is linear in θ: its change is exactly h·J·direction.
            _, jd = lazykernel.jvp(model, x, direction)
            torch.testing.assert_close(lin_out - model(x), h * jd, rtol=1e-10, atol=1e-12)
        gaps.append((lin_out - net_out).abs().max().item())
    # second-order remainder: halving h divides the gap by about 4
    assert 3.0 < gaps[0] / gaps[1] < 5.0, gaps


def test_original_model_changes_do_not_move_theta0():
    model = _mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    lin = lazykernel.linearize(model)
    with torch.no_grad():
        before = lin(x)
        for p in model.parameters():
            p.add_(1.0)
        torch.testing.assert_close(lin(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_training_the_linearized_model_matches_the_closed_form(ridge):
    model = _mlp()
    gen = torch.Generator().manual_seed(4)
    x_train = torch.randn(8, 3, dtype=torch.float64, generator=gen)
    y_train = torch.randn(8, 2, dtype=torch.float64, generator=gen)
    x_test = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    lin = lazykernel.linearize(model)
    k_train = reference_ntk(model, x_train, output="full")
    k_test = reference_ntk(model, x_test, x_train, output="full")
    eta, steps = 0.5 / torch.linalg.eigvalsh(k_train.permute(0, 2, 1, 3).reshape(16, 16)).max().item(), 40
    optimizer = torch.optim.SGD(lin.parameters(), lr=eta)
    theta0 = lin.theta0()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.5 * ((lin(x_train) - y_train) ** 2).sum()
        # weight decay towards θ0, the regulariser that `ridge` stands for
        loss = loss + 0.5 * ridge * sum(((p - theta0[n]) ** 2).sum() for n, p in lin.theta().items())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        f0_train, f0_test = model(x_train), model(x_test)
        predict = lazykernel.predict.gradient_descent_mse(k_train, y_train, learning_rate=eta, ridge=ridge,
                                                          discrete=True)
        closed = predict(steps, fx_train_0=f0_train, fx_test_0=f0_test, k_test_train=k_test)
        torch.testing.assert_close(lin(x_train), closed.train, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(lin(x_test), closed.test, rtol=1e-9, atol=1e-10)
        # and training did move the predictions, so the comparison has teeth
        assert (closed.train - f0_train).abs().max() > 1e-2


def test_linearize_a_functional_model():
    model = _mlp()
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    fn = lambda p, inp: torch.func.functional_call(model, p, (inp,))  # noqa: E731
    lin = lazykernel.linearize(fn, params=values)
    x = torch.randn(3, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), model(x), rtol=1e-13, atol=1e-13)
    out = lin(x).sum()
    out.backward()
    assert all(p.grad is not None for p in lin.parameters())


def test_linearize_refuses_training_mode_dropout():
    with pytest.raises(ValueError, match="eval"):
        lazykernel.linearize(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))


class _ClashingNames(nn.Module):
    """Parameter names that the ``.`` → ``__`` spelling maps onto each other or onto the
    module's own attributes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.a = nn.Linear(3, 3, bias=False)
        self.a__weight = nn.Parameter(torch.randn(3, 3))
        self.theta = nn.Parameter(torch.randn(3))
        self.training_scale = nn.Parameter(torch.randn(()))

    def forward(self, x):
        return torch.tanh(self.a(x) @ self.a__weight + self.theta) * self.training_scale


def test_linearized_parameters_keep_one_tensor_per_network_parameter():
    model = _ClashingNames().double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    lin = lazykernel.linearize(model)
    theta = lin.theta()
    assert sorted(theta) == sorted(n for n, _ in model.named_parameters())
    assert len({id(v) for v in theta.values()}) == 4 == len(list(lin.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(lin(x), model(x), rtol=1e-13, atol=1e-13)
    # moving one parameter moves the linear model by that parameter's Jacobian alone
    direction = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theta["a.weight"] += 1e-3 * direction
        moved = lin(x)
    primals = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.zeros_like(p) for n, p in primals.items()}
    tangents["a.weight"] = 1e-3 * direction
    _, expected = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x,)), (primals,), (tangents,))
    torch.testing.assert_close(moved - model(x).detach(), expected, rtol=1e-10, atol=1e-13)
    assert callable(lin.theta) and isinstance(lin.training, bool)
