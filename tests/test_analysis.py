"""lazykernel.analysis: metrics on hand-computed cases, the monitor, parameterizations, sweeps."""

import csv
import json
import math

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import analysis
from lazykernel.analysis import metrics
from conftest import low_rank_float32_problem


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


# -- metrics -------------------------------------------------------------------------

def test_kernel_distance_hand_cases():
    eye = torch.eye(2, dtype=torch.float64)
    assert metrics.kernel_distance(eye, 3 * eye) == pytest.approx(0.0, abs=1e-15)
    assert metrics.kernel_distance(eye, _t([[0, 1], [1, 0]])) == pytest.approx(1.0)
    # <I, 11ᵀ> = 2, ‖I‖ = √2, ‖11ᵀ‖ = 2
    assert metrics.kernel_distance(eye, torch.ones(2, 2, dtype=torch.float64)) == pytest.approx(1 - 1 / math.sqrt(2))


def test_relative_kernel_change_hand_cases_and_output_modes():
    eye = torch.eye(3, dtype=torch.float64)
    assert metrics.relative_kernel_change(eye, 2 * eye) == pytest.approx(1.0)
    assert metrics.relative_kernel_change(eye, eye) == 0.0
    k0 = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k1 = k0 + 0.1 * torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = (k1 - k0).norm().item() / k0.norm().item()
    assert metrics.relative_kernel_change(k0, k1) == pytest.approx(expected)


def test_kernel_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        metrics.kernel_distance(torch.eye(2), torch.eye(3))
    with pytest.raises(ValueError, match="non-zero norm"):
        metrics.relative_kernel_change(torch.zeros(2, 2), torch.eye(2))


def test_centered_alignment_hand_cases():
    y = _t([1, -1, 1, -1])
    assert metrics.centered_kernel_alignment(torch.outer(y, y), y) == pytest.approx(1.0)
    # Kc = H (eigenvalues 1, 1, 1, 0: ‖H‖ = √3); <H, yyᵀ> = yᵀy = 4; ‖yyᵀ‖ = 4
    assert metrics.centered_kernel_alignment(torch.eye(4, dtype=torch.float64), y) == pytest.approx(1 / math.sqrt(3))
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1])).double()
    assert metrics.centered_kernel_alignment(torch.outer(y, y), onehot) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[N\] or \[N, C\]"):
        metrics.centered_kernel_alignment(torch.eye(4), _t([1, 2, 3]))


def test_linear_cka_hand_cases():
    x = _t([[1], [-1], [0], [0]])
    assert metrics.linear_cka(x, _t([[0], [0], [1], [-1]])) == pytest.approx(0.0, abs=1e-15)
    # Yᵀ X = [2, 0]; ‖XᵀX‖ = 2; ‖YᵀY‖ = ‖2I‖ = 2√2
    y = _t([[1, 0], [-1, 0], [0, 1], [0, -1]])
    assert metrics.linear_cka(x, y) == pytest.approx(1 / math.sqrt(2))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(10, 5, dtype=torch.float64, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=gen))
    assert metrics.linear_cka(a, 3 * a @ rotation + 1.0) == pytest.approx(1.0)


def _u_centered(k):
    """U-centering (Székely & Rizzo, 2014): an independent route to the unbiased HSIC."""
    n = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(0)
    u = k - k.sum(0, keepdim=True) / (n - 2) - k.sum(1, keepdim=True) / (n - 2) + k.sum() / ((n - 1) * (n - 2))
    u.fill_diagonal_(0)
    return u


def test_debiased_cka_matches_u_centering_and_removes_the_bias():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 500, dtype=torch.float64, generator=gen)
    y = torch.randn(20, 500, dtype=torch.float64, generator=gen)
    kx, ky = _u_centered(x @ x.T), _u_centered(y @ y.T)
    expected = (kx * ky).sum() / ((kx * kx).sum() * (ky * ky).sum()).sqrt()
    assert metrics.debiased_linear_cka(x, y) == pytest.approx(expected.item(), rel=1e-10)
    # independent representations: the biased estimator is far from 0, the debiased one is not
    assert metrics.linear_cka(x, y) > 0.8
    assert abs(metrics.debiased_linear_cka(x, y)) < 0.1
    assert metrics.debiased_linear_cka(x, x) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 4"):
        metrics.debiased_linear_cka(x[:3], y[:3])


def test_parameter_movement_hand_case():
    initial = {"a": _t([3, 4]), "b": _t([0, 12])}
    current = {"a": _t([6, 8]), "b": _t([0, 12])}
    overall, per_tensor = metrics.parameter_movement(initial, current)
    assert overall == pytest.approx(5 / 13)
    assert per_tensor == {"a": pytest.approx(1.0), "b": 0.0}
    with pytest.raises(ValueError, match="same parameters"):
        metrics.parameter_movement(initial, {"a": _t([1, 2])})


def test_linearization_gap_hand_case():
    assert metrics.linearization_gap(_t([2.0, 0]), _t([1.5, 0]), _t([1.0, 0])) == pytest.approx(0.5)
    assert math.isnan(metrics.linearization_gap(_t([1.0]), _t([1.0]), _t([1.0])))


def _kernel_problem(n=6, m=3, o=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n + m, 4, dtype=torch.float64, generator=gen)
    k = features @ features.T
    y = torch.randn(n, o, dtype=torch.float64, generator=gen)
    f0 = torch.randn(n + m, o, dtype=torch.float64, generator=gen)
    return k[:n, :n], k[n:, :n], y, f0[:n], f0[n:]


def test_ntk_regression_flow_matches_matrix_exponential():
    k, ks, y, f0, f0s = _kernel_problem()
    n, t = k.shape[0], 3.0
    f_train, f_test = metrics.ntk_regression(k, ks, y, f0, f0s, time=t)
    decay = torch.linalg.matrix_exp(-t * k / n)
    assert torch.allclose(f_train, y + decay @ (f0 - y), atol=1e-10)
    # rank-4 Θ: Θ^{-1}(I − e^{−tΘ/N}) through the pseudo-inverse on its range
    fit = torch.linalg.pinv(k) @ (torch.eye(n, dtype=torch.float64) - decay) @ (y - f0)
    assert torch.allclose(f_test, f0s + ks @ fit, atol=1e-8)


def test_the_pseudo_inverse_solve_off_the_cpu_matches_gelsd_on_a_singular_kernel():
    # CUDA has no gelsd: t = ∞ takes the pseudo-inverse from the eigendecomposition there
    k, _, y, f0, _ = _kernel_problem()                          # rank-4 Θ
    rhs = (y - f0).reshape(k.shape[0], -1)
    want = torch.linalg.lstsq(k, rhs, driver="gelsd").solution
    torch.testing.assert_close(metrics._pseudo_inverse_solve(k, rhs, torch.finfo(torch.float64).eps), want, rtol=1e-8, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ntk_regression_at_infinite_time_on_cuda_matches_the_cpu():
    problem = _kernel_problem()
    on_cpu = metrics.ntk_regression(*problem)
    on_cuda = metrics.ntk_regression(*(t.cuda() for t in problem))
    for got, want in zip(on_cuda, on_cpu):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-8, atol=1e-9)


def test_ntk_regression_is_gradient_descent_on_a_linear_model():
    gen = torch.Generator().manual_seed(0)
    x, xs = torch.randn(8, 5, dtype=torch.float64, generator=gen), torch.randn(3, 5, dtype=torch.float64,
                                                                                  generator=gen)
    y = torch.randn(8, 2, dtype=torch.float64, generator=gen)
    model = nn.Linear(5, 2, bias=False).double()
    with torch.no_grad():
        f0, f0s = model(x), model(xs)
    k = lazykernel.ntk(model, x) / 2  # the trace over 2 identical output kernels
    ks = lazykernel.ntk(model, xs, x) / 2
    full, full_s = lazykernel.ntk(model, x, output="full"), lazykernel.ntk(model, xs, x, output="full")
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(25):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
        opt.step()
    with torch.no_grad():
        trained, trained_s = model(x), model(xs)
    for kernel, kernel_s in ((k, ks), (full, full_s)):
        f_train, f_test = metrics.ntk_regression(kernel, kernel_s, y, f0, f0s, lr=0.3, steps=25)
        assert torch.allclose(f_train, trained, atol=1e-10)
        assert torch.allclose(f_test, trained_s, atol=1e-10)


def test_ntk_regression_infinite_time_interpolates():
    k, ks, y, f0, f0s = _kernel_problem(n=4, m=2)
    k = k + torch.eye(4, dtype=torch.float64)  # full rank
    f_train, f_test = metrics.ntk_regression(k, ks, y, f0, f0s)
    assert torch.allclose(f_train, y, atol=1e-10)
    assert torch.allclose(f_test, f0s + ks @ torch.linalg.solve(k, y - f0), atol=1e-10)
    with pytest.raises(ValueError, match="both lr and steps"):
        metrics.ntk_regression(k, ks, y, lr=0.1)
    with pytest.raises(ValueError, match="not both"):
        metrics.ntk_regression(k, ks, y, time=1.0, lr=0.1, steps=2)


def test_prediction_agreement():
    a = _t([[1, 0], [0, 1], [1, 0]])
    b = _t([[2, 0], [1, 0], [1, 0]])
    result = metrics.prediction_agreement(a, b)
    assert result["class_agreement"] == pytest.approx(2 / 3)
    assert result["relative_difference"] == pytest.approx(math.sqrt(3) / math.sqrt(6))


# -- monitor -------------------------------------------------------------------------

def _train(model, x, y, lr, steps, monitor=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(step, loss=loss.item())


def test_monitor_of_a_linear_model_is_lazy():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, dtype=torch.float64, generator=gen), torch.randn(16, 3, dtype=torch.float64, generator=gen)
    model = nn.Linear(4, 3).double()
    with analysis.RegimeMonitor(model, x, y, every=5) as monitor:
        _train(model, x, y, 0.2, 12, monitor)
    table = monitor.table()
    assert [row["step"] for row in table] == [5, 10, 12]
    for row in table:
        assert row["relative_kernel_change"] == pytest.approx(0.0, abs=1e-12)
        assert row["linearization_gap"] == pytest.approx(0.0, abs=1e-10)
        assert row["parameter_movement"] > 0.01
    assert "loss" in table[0] and "loss" not in table[-1]  # the exit record has no loss
    verdict = monitor.verdict()
    assert verdict.label == "lazy"
    assert verdict.thresholds == {"lazy_below": 0.1, "feature_learning_above": 0.3}


def test_monitor_metrics_match_direct_computation(tmp_path):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, dtype=torch.float64, generator=gen), torch.randn(12, 2, dtype=torch.float64, generator=gen)
    held = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    model = analysis.mlp(3, 24, 2, parameterization="mup", seed=0).double()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    k0 = lazykernel.ntk(model, x)
    with torch.no_grad():
        f0, hidden0 = model(held), model[:2](x)
    monitor = analysis.RegimeMonitor(model, x, y, every=10, heldout_x=held)
    _train(model, x, y, analysis.learning_rate("mup", 0.5, 24), 30, monitor)
    last = monitor.table()[-1]
    assert last["step"] == 30
    k1 = lazykernel.ntk(model, x)
    assert last["relative_kernel_change"] == pytest.approx(metrics.relative_kernel_change(k0, k1), rel=1e-9)
    assert last["kernel_distance"] == pytest.approx(metrics.kernel_distance(k0, k1), rel=1e-9, abs=1e-14)
    assert last["kernel_alignment"] == pytest.approx(metrics.centered_kernel_alignment(k1, y), rel=1e-9)
    # f_lin from an explicit Jacobian at θ0, not the monitor's JVP
    names = list(theta0)

    def f(*values):
        return torch.func.functional_call(model, dict(zip(names, values)), (held,))

    jac = torch.autograd.functional.jacobian(f, tuple(theta0[n] for n in names))
    delta = [p.detach() - theta0[n] for n, p in model.named_parameters()]
    f_lin = f0 + sum((j * d).reshape(*f0.shape, -1).sum(-1) for j, d in zip(jac, delta))
    with torch.no_grad():
        f1, hidden1 = model(held), model[:2](x)
    assert last["linearization_gap"] == pytest.approx(metrics.linearization_gap(f1, f_lin, f0), rel=1e-8)
    # the default representation is the input of the last linear layer: the ReLU features
    assert last["cka/2.1"] == pytest.approx(metrics.linear_cka(hidden0, hidden1), rel=1e-9)
    overall, per_tensor = metrics.parameter_movement(theta0, dict(model.named_parameters()))
    assert last["parameter_movement"] == pytest.approx(overall)
    assert last["parameter_movement/0.1.weight"] == pytest.approx(per_tensor["0.1.weight"])
    # a narrow μP network trained hard learns features
    assert monitor.verdict().label == "feature-learning"

    monitor.save_csv(str(tmp_path / "m.csv"))
    monitor.save_json(str(tmp_path / "m.json"))
    with open(tmp_path / "m.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    assert float(rows[-1]["relative_kernel_change"]) == pytest.approx(last["relative_kernel_change"])
    with open(tmp_path / "m.json") as handle:
        payload = json.load(handle)
    assert payload["verdict"]["label"] == "feature-learning"
    assert payload["records"][-1]["step"] == 30


def test_monitor_of_some_parameters_linearizes_from_theta0_of_all():
    # all parameters train; the monitor follows the read-out only: f_lin moves the
    # read-out from θ0 with the others left at θ0, so their movement shows in the gap
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 3, dtype=torch.float64, generator=gen), torch.randn(10, 2, dtype=torch.float64, generator=gen)
    model = analysis.mlp(3, 16, 2, parameterization="mup", seed=1).double()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        f0 = model(x)
    readout = [n for n in theta0 if n.startswith("2.")]
    with analysis.RegimeMonitor(model, x, params=readout, every=4) as monitor:
        _train(model, x, y, analysis.learning_rate("mup", 0.5, 16), 6, monitor)
    names = list(theta0)

    def f(*values):
        return torch.func.functional_call(model, dict(zip(names, values)), (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(theta0[n] for n in names))
    delta = [(p.detach() - theta0[n]) if n in readout else torch.zeros_like(p)
             for n, p in model.named_parameters()]
    f_lin = f0 + sum((j * d).reshape(*f0.shape, -1).sum(-1) for j, d in zip(jac, delta))
    with torch.no_grad():
        f1 = model(x)
    last = monitor.table()[-1]
    assert last["linearization_gap"] == pytest.approx(metrics.linearization_gap(f1, f_lin, f0), rel=1e-8)
    assert [row["step"] for row in monitor.table()] == [4, 6]
    # the record made on leaving carries the caller's last step number, not the count of calls
    with analysis.RegimeMonitor(model, x, every=100) as monitor:
        for step in (100, 200, 250):
            monitor.step(step)
    assert [row["step"] for row in monitor.table()] == [100, 200, 250]


def test_monitor_leaves_a_layer_listed_twice_with_its_parameters():
    torch.manual_seed(3)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    monitor = analysis.RegimeMonitor(model, x, every=1)
    _train(model, x, torch.zeros(6, 2, dtype=torch.float64), 0.1, 2, monitor)
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())


def test_monitor_measures_in_eval_mode_and_restores_training_mode():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    model.train()
    x = torch.randn(6, 3, dtype=torch.float64)
    monitor = analysis.RegimeMonitor(model, x, every=1)
    _train(model, x, torch.zeros(6, 1, dtype=torch.float64), 0.1, 2, monitor)
    assert model.training
    assert len(monitor.table()) == 2


def test_monitor_refuses_bad_arguments():
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="every"):
        analysis.RegimeMonitor(model, x, every=0)
    with pytest.raises(ValueError, match="not a module"):
        analysis.RegimeMonitor(model, x, layers=["nope"])
    with pytest.raises(ValueError, match="probe_y"):
        analysis.RegimeMonitor(model, x, torch.zeros(3))
    with pytest.raises(RuntimeError, match="no record"):
        analysis.RegimeMonitor(model, x).verdict()
    with pytest.raises(ValueError, match=r"unknown parameter name\(s\) \['weigth'\]"):
        analysis.RegimeMonitor(model, x, params="weigth")
    # one class only: found at construction, not at the first record of the training loop
    with pytest.raises(ValueError, match="probe_y cannot give a kernel alignment.*targets equal"):
        analysis.RegimeMonitor(model, x, torch.ones(4))


def test_monitor_restores_the_mode_of_every_module():
    # a BatchNorm frozen in eval mode inside a training network must stay frozen
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)).double().train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    x = torch.randn(6, 3, dtype=torch.float64)
    monitor = analysis.RegimeMonitor(model, x, every=1)
    assert [m.training for m in model.modules()] == modes
    _train(model, x, torch.zeros(6, 1, dtype=torch.float64), 0.1, 2, monitor)
    assert [m.training for m in model.modules()] == modes and len(monitor.table()) == 2
    frozen = model[1].running_mean.clone()
    model(x)
    assert torch.equal(model[1].running_mean, frozen)


def test_monitor_linearizes_the_function_at_theta0_with_its_buffers():
    # BatchNorm's running statistics move during training: f_lin must be the
    # linearization of f(·; θ0) with the statistics of θ0, so that f_lin(θ0) = f0
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double().train()
    x = torch.randn(10, 3, dtype=torch.float64)
    held = torch.randn(4, 3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        f0 = model(held)
    model.train()
    monitor = analysis.RegimeMonitor(model, x, every=1, heldout_x=held)
    _train(model, x + 3.0, torch.zeros(10, 1, dtype=torch.float64), 0.0, 1, monitor)  # stats move, θ does not
    model.eval()
    with torch.no_grad():
        f1 = model(held)
    assert not torch.allclose(f1, f0)
    last = monitor.table()[-1]
    assert last["parameter_movement"] == 0.0
    # f_lin = f0 when θ = θ0: the whole change comes from the statistics
    assert last["linearization_gap"] == pytest.approx(metrics.linearization_gap(f1, f0, f0), rel=1e-12)
    assert last["linearization_gap"] == pytest.approx(1.0)


# -- parameterizations ---------------------------------------------------------------

def test_ntk_parameterization_is_the_standard_network_with_rescaled_weights():
    model = analysis.mlp(5, 7, 3, depth=2, parameterization="ntk", sigma_w=1.4, sigma_b=0.3, seed=0).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    h = x
    for i, (layer, fan_in) in enumerate(zip(linears, (5, 7, 7))):
        h = h @ (1.4 * layer.weight / math.sqrt(fan_in)).T + 0.3 * layer.bias
        if i < 2:
            h = torch.relu(h)
    assert torch.allclose(model(x), h, atol=1e-12)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.inner(x))


def _tied():
    shared = nn.Linear(16, 16)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(16, 2))


def _weights_shared():
    first, second = nn.Linear(16, 16), nn.Linear(16, 16)
    second.weight = first.weight
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), first, nn.ReLU(), second, nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.parametrize("build, message", [
    (lambda: nn.Sequential(nn.Linear(5, 16), _Block(), nn.Linear(16, 2)), r"module '1.inner' \(Linear\) also has"),
    (lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 2)), r"module '0' \(Conv1d\)"),
    (lambda: nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.Linear(16, 2)), r"'1' \(LayerNorm\)"),
    (_tied, "listed more than once"),
    (_weights_shared, "share a parameter"),
    (lambda: nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(5, 16)), nn.ReLU(),
                           nn.Linear(16, 2)), r"\(ParametrizationList\) also has parameters"),
    (lambda: nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(5, 16)), nn.ReLU(), nn.Linear(16, 2)),
     "computes its weight"),
])
@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm is deprecated")
@pytest.mark.parametrize("parameterization", ["ntk", "mup"])
def test_reparameterize_refuses_what_it_would_rewrite_wrongly(build, message, parameterization):
    # each of these came out with the wrong multipliers (or a changed function) and no error
    with pytest.raises(ValueError, match=message):
        analysis.reparameterize(build(), parameterization)


@pytest.mark.parametrize("parameterization", ["ntk", "mup", "standard"])
def test_reparameterize_keeps_the_function(parameterization):
    torch.manual_seed(0)
    standard = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    new = analysis.reparameterize(standard, parameterization, sigma_w=1.3, sigma_b=0.5)
    x = torch.randn(6, 5, dtype=torch.float64)
    assert torch.allclose(new(x), standard(x), atol=1e-12)
    if parameterization == "mup":
        scales = [m.factor for m in new.modules() if isinstance(m, analysis.Scale)]
        # output layer: σ_w/n split as (σ_w/n)/(σ_b/√n) · W and σ_b/√n outside (the bias's own)
        assert scales[-1] == pytest.approx(0.5 / 4)
        assert scales[-2] * scales[-1] == pytest.approx(1.3 / 16)
        assert scales[2] * scales[3] == pytest.approx(1.3 / 4)  # hidden: σ_w/√n


def test_reparameterize_cnn_keeps_the_function_and_ntk_matches_reference(ref_ntk):
    torch.manual_seed(0)
    standard = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3)).double()
    new = analysis.reparameterize(standard, "ntk")
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    assert torch.allclose(new(x), standard(x), atol=1e-12)
    net = analysis.cnn(2, 4, 3, depth=2, parameterization="mup", sigma_b=0.5, seed=0).double()
    assert net(x).shape == (3, 3)
    torch.testing.assert_close(lazykernel.ntk(net, x), ref_ntk(net, x), rtol=1e-9, atol=1e-12)


def _hidden_update(parameterization, width, seed):
    """Relative change of the hidden pre-activations after one GD step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 10, dtype=torch.float64, generator=gen)
    y = torch.randn(8, 1, dtype=torch.float64, generator=gen)
    model = analysis.mlp(10, width, 1, parameterization=parameterization, seed=seed).double()
    with torch.no_grad():
        before = model[0](x)
    _train(model, x, y, analysis.learning_rate(parameterization, 0.5, width), 1)
    with torch.no_grad():
        return ((model[0](x) - before).norm() / before.norm()).item()


def test_mup_updates_features_at_every_width_and_ntk_does_not():
    def mean_update(p, w):
        return sum(_hidden_update(p, w, s) for s in range(3)) / 3

    ntk_ratio = mean_update("ntk", 128) / mean_update("ntk", 2048)
    mup_ratio = mean_update("mup", 128) / mean_update("mup", 2048)
    assert 2.5 < ntk_ratio < 6.5  # √16 = 4: the features freeze as width grows
    assert 0.7 < mup_ratio < 1.4  # width-independent feature updates (Yang & Hu, 2021)


def test_parameterization_scalings():
    model = analysis.mlp(10, 64, 3, depth=2, parameterization="mup")
    scales = [m.factor for m in model.modules() if isinstance(m, analysis.Scale)]
    assert scales == pytest.approx([1 / math.sqrt(10), 1 / 8, 1 / 64])
    assert analysis.learning_rate("mup", 0.1, 512) == pytest.approx(51.2)
    assert analysis.learning_rate("ntk", 0.1, 512) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown parameterization"):
        analysis.mlp(3, 4, 1, parameterization="sp")


def test_alpha_scaled_model(ref_ntk):
    torch.manual_seed(0)
    inner = analysis.mlp(3, 16, 2, parameterization="ntk", seed=0).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    k_inner = ref_ntk(inner, x)
    scaled = analysis.AlphaScaled(inner, 4.0)
    assert torch.equal(scaled(x), torch.zeros(5, 2, dtype=torch.float64))
    assert [n for n, _ in scaled.named_parameters()] == ["model." + n for n, _ in inner.named_parameters()]
    torch.testing.assert_close(lazykernel.ntk(scaled, x), 16.0 * k_inner, rtol=1e-9, atol=1e-12)
    assert scaled.learning_rate(0.8) == pytest.approx(0.05)
    with torch.no_grad():
        inner[0][1].weight.add_(0.01)
        expected = 4.0 * (inner(x) - analysis.mlp(3, 16, 2, parameterization="ntk", seed=0).double()(x))
    assert torch.allclose(scaled(x), expected, atol=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        analysis.AlphaScaled(inner, 0.0)


def test_alpha_scaled_model_follows_the_mode_and_dtype_of_the_wrapper():
    # wrapped in training mode (the nn.Module default), then switched and converted
    torch.manual_seed(1)
    inner = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    with torch.no_grad():
        inner[1].running_mean.uniform_(-1, 1)
        inner[1].running_var.uniform_(0.5, 2.0)
    scaled = analysis.AlphaScaled(inner, 4.0).eval()
    x = torch.randn(6, 3)
    assert torch.equal(scaled(x), torch.zeros(6, 2))
    scaled = scaled.double()
    assert torch.equal(scaled(x.double()), torch.zeros(6, 2, dtype=torch.float64))
    # in training mode f(θ0) normalises as f does, without moving θ0's statistics
    before = scaled.buffer0_1_running_mean.clone()
    scaled.train()(x.double())
    assert torch.equal(scaled.buffer0_1_running_mean, before)


# -- sweeps ----------------------------------------------------------------------------

def test_fit_power_law_exact():
    widths = [16, 64, 256, 1024]
    slope, stderr = analysis.fit_power_law(widths, [3 * w ** -0.5 for w in widths])
    assert slope == pytest.approx(-0.5)
    assert stderr == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 3"):
        analysis.fit_power_law([1, 2], [1, 2])
    with pytest.raises(ValueError, match="two distinct x values"):
        analysis.fit_power_law([64, 64, 64], [1, 2, 3])
    with pytest.raises(ValueError, match="positive, finite"):
        analysis.fit_power_law([1, 2, 3], [1, math.inf, 2])


@pytest.mark.parametrize("change, message", [
    (dict(probe_size=-5), "probe_size must be an integer ≥ 2"),
    (dict(every=0), "every must be an integer ≥ 1"),
    (dict(base_lrs=()), "at least one value"),
    (dict(train_y="float"), r"train_y must be \[N\] integer class labels, got \(12,\) torch.float32"),
    (dict(train_y="short"), "train_y has 6 labels for 12 inputs"),
    (dict(train_y="negative"), "class indices ≥ 0"),
])
def test_width_sweep_refuses_bad_arguments_by_name(change, message):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    labels = {"float": y[:12].float(), "short": y[:6], "negative": torch.where(y[:12] == 0, -1, y[:12])}
    kwargs = dict(widths=(8, 16, 32), steps=2, kernel_regression=False)
    kwargs.update({k: v for k, v in change.items() if k != "train_y"})
    train_y = labels[change["train_y"]] if "train_y" in change else y[:12]
    with pytest.raises(ValueError, match=message):
        analysis.width_sweep(x[:12], train_y, x[12:], y[12:], **kwargs)


def test_width_sweep_takes_labels_of_any_integer_dtype():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    kwargs = dict(widths=(8, 16, 32), steps=2, probe_size=4, kernel_regression=False)
    wide = analysis.width_sweep(x[:12], y[:12], x[12:], y[12:], **kwargs)
    narrow = analysis.width_sweep(x[:12], y[:12].int(), x[12:], y[12:].to(torch.uint8), **kwargs)
    assert [r["train_loss"] for r in narrow.rows] == [r["train_loss"] for r in wide.rows]


def test_width_sweep_rows_and_fits():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=gen), torch.randint(0, 3, (48,), generator=gen)
    result = analysis.width_sweep(x[:32], y[:32], x[32:], y[32:], widths=(8, 16, 32), alphas=(None, 10.0),
                                  steps=6, every=3, probe_size=8, parameterization="ntk")
    assert len(result.rows) == 6 and len(result.histories) == 6
    assert [r["width"] for r in result.rows] == [8, 8, 16, 16, 32, 32]
    for row, history in zip(result.rows, result.histories):
        assert [h["step"] for h in history] == [3, 6]
        assert row["verdict"] in ("lazy", "mixed", "feature-learning")
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["kernel_class_agreement"] <= 1.0
        assert row["relative_kernel_change"] > 0
    plain = [r for r in result.rows if r["alpha"] is None]
    scaled = [r for r in result.rows if r["alpha"] == 10.0]
    # the α-scaled model, at lr/α², moves its parameters ~α times less
    assert all(s["parameter_movement"] < p["parameter_movement"] / 3 for s, p in zip(scaled, plain))
    slope, stderr = result.fit("parameter_movement", alpha=None)
    assert math.isfinite(slope) and stderr >= 0


def _low_rank_float32_problem():
    """A float32 NTK of rank 4 on 20 examples (nn.Linear(3, 1)), and the float64 least-squares
    fit that gradient flow from θ0 converges to: [x, 1] w = y − f0."""
    model, x, y, xt, f0, f0t = low_rank_float32_problem()
    k, kt = lazykernel.ntk(model, x), lazykernel.ntk(model, xt, x)
    assert k.dtype == torch.float32
    a = torch.cat([x, torch.ones(20, 1)], 1).double()
    at = torch.cat([xt, torch.ones(4, 1)], 1).double()
    w = torch.linalg.lstsq(a, (y - f0).double()[:, None]).solution[:, 0]
    return k, kt, y, f0, f0t, f0.double() + a @ w, f0t.double() + at @ w


@pytest.mark.parametrize("time", [None, math.inf, 1e9])
def test_ntk_regression_does_not_fit_the_round_off_of_a_float32_kernel(time):
    # its 16 zero eigenvalues come out of float32 as ±5e-7: inverting them fitted noise
    k, kt, y, f0, f0t, want_train, want_test = _low_rank_float32_problem()
    f_train, f_test = metrics.ntk_regression(k, kt, y, f0, f0t, time=time)
    torch.testing.assert_close(f_test, want_test, rtol=0, atol=1e-4)
    torch.testing.assert_close(f_train, want_train, rtol=0, atol=1e-4)


def test_ntk_regression_at_infinite_time_equals_the_limit_on_a_singular_kernel():
    k = _t([[1, 1, 0], [1, 1, 0], [0, 0, 2]])               # two identical examples
    ks, y = _t([[1, 1, 1]]), _t([2, 2, 5])
    limit = metrics.ntk_regression(k, ks, y)
    for time in (math.inf, 1e12):
        got = metrics.ntk_regression(k, ks, y, time=time)
        for a, b in zip(got, limit):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    torch.testing.assert_close(limit[1], _t([4.5]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="time must be"):
        metrics.ntk_regression(k, ks, y, time=float("nan"))


def test_relative_kernel_change_refuses_a_non_finite_kernel():
    k0 = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.relative_kernel_change(k0, torch.full((3, 3), float("nan"), dtype=torch.float64))


def test_mup_output_bias_learns_at_the_same_rate_at_every_width():
    """μP trains every bias by O(1) per step (Yang et al., 2022): the output bias too."""
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(32, 4, generator=gen), torch.randn(32, 2, generator=gen) + 3.0

    def bias_change(width):
        model = analysis.mlp(4, width, 2, parameterization="mup", sigma_b=1.0, seed=0).double()
        scale, bias = model[-1][2].factor, model[-1][1].bias
        start = bias.detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=analysis.learning_rate("mup", 0.05, width))
        for _ in range(10):
            opt.zero_grad()
            (0.5 * ((model(x.double()) - y.double()) ** 2).sum(1).mean()).backward()
            opt.step()
        return float((scale * (bias - start)).norm())

    small, large = bias_change(64), bias_change(1024)
    assert small > 0.1
    assert 0.5 < large / small < 2.0
