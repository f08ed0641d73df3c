"""RegimeMonitor, the parameterizations and width_sweep in real training loops: what is
measured, the learning rates across widths, and the errors for bad arguments and
diverged runs."""

import math

import pytest
import torch
from torch import nn

from lazykernel import analysis


def _mse(model, x, y):
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()


# -- RegimeMonitor ------------------------------------------------------------------------

def test_monitor_measures_the_inputs_it_was_given_when_the_data_change_in_place():
    # a loop that rescales or augments its data tensor in place must not look like
    # kernel movement: nothing has trained here
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(16, 3, dtype=torch.float64, generator=gen)
    model = analysis.mlp(3, 16, 2, seed=0).double()
    monitor = analysis.RegimeMonitor(model, data[:8], every=1, heldout_x=data[8:])
    data.mul_(2.0)
    row = monitor.record(0)
    assert row["relative_kernel_change"] == 0.0
    assert row["kernel_distance"] == 0.0
    assert row["parameter_movement"] == 0.0
    assert math.isnan(row["linearization_gap"])  # the outputs have not moved
    assert monitor.verdict().label == "lazy"


def test_monitor_aligns_integer_class_labels_by_class(ref_ntk):
    # three classes as labels 0, 1, 2: the target kernel must say "same class or not",
    # as with one-hot targets, not multiply the label values
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 4, dtype=torch.float64, generator=gen)
    labels = torch.tensor([0, 0, 2, 0, 1, 0, 1, 1, 1, 0, 2, 1])
    model = analysis.mlp(4, 16, 3, seed=0).double()
    row = analysis.RegimeMonitor(model, x, labels, every=1).record(0)
    k = ref_ntk(model, x)
    y = nn.functional.one_hot(labels, 3).double()
    h = torch.eye(12, dtype=torch.float64) - 1.0 / 12
    kc, yc = h @ k @ h, h @ (y @ y.T) @ h
    expected = ((kc * yc).sum() / (kc.norm() * yc.norm())).item()
    assert row["kernel_alignment"] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="integer class labels, which must be ≥ 0"):
        analysis.RegimeMonitor(model, x, labels - 1)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_monitor_built_and_read_under_a_grad_mode_leaves_the_training_state_alone(context):
    # the probe copies made under inference_mode must still serve the NTK afterwards
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(8, 3, dtype=torch.float64, generator=gen), torch.randn(8, 2, dtype=torch.float64, generator=gen)
    rows = []
    for build in (context, torch.enable_grad):
        model = analysis.mlp(3, 16, 2, seed=0).double()
        model[0][1].weight.requires_grad_(False)
        with build():
            monitor = analysis.RegimeMonitor(model, x, y, every=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        _mse(model, x, y).backward()
        opt.step()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        momentum = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
        with build():
            rows.append(monitor.record(1))
        assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
        assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
        assert all(torch.equal(v["momentum_buffer"], momentum[k]) for k, v in opt.state_dict()["state"].items())
        assert [p.requires_grad for p in model.parameters()] == [False, True]
    assert rows[0] == rows[1]


def test_monitor_refuses_a_kernel_over_other_parameters_than_at_the_start():
    # freezing a layer mid-training would drop its part of the NTK: K1 would cover fewer
    # parameters than K0 and read as a large kernel change
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    monitor = analysis.RegimeMonitor(model, x, every=1)
    assert monitor.record(0)["relative_kernel_change"] == 0.0
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no longer trainable: \['0.weight'\]; newly trainable: \[\]"):
        monitor.record(1)
    model[0].weight.requires_grad_(True)
    assert monitor.record(2)["relative_kernel_change"] == 0.0
    # a selection that names the parameters that stay trainable is measured as before
    named = analysis.RegimeMonitor(model, x, every=1, params=["2.weight", "2.bias"])
    model[0].weight.requires_grad_(False)
    assert named.record(0)["relative_kernel_change"] == 0.0
    assert [row["step"] for row in monitor.table()] == [0, 2]


def _train(model, monitor, x, y, steps, start=1, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(start, steps + 1):
        optimizer.zero_grad()
        loss = _mse(model, x, y)
        loss.backward()
        optimizer.step()
        monitor.step(step, loss=loss.item())
    return optimizer


def _monitored_net():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def test_monitor_state_carries_a_checkpointed_run_to_the_records_of_an_uninterrupted_one(tmp_path):
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(12, 3, dtype=torch.float64, generator=gen), torch.randn(12, 2, dtype=torch.float64,
                                                                               generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model = _monitored_net()
    whole = analysis.RegimeMonitor(model, x[:6], labels, every=2, heldout_x=x[6:])
    _train(model, whole, x, y, 10)

    # the same run, checkpointed after step 5 and resumed in a fresh model, optimizer and monitor
    model = _monitored_net()
    first = analysis.RegimeMonitor(model, x[:6], labels, every=2, heldout_x=x[6:])
    optimizer = _train(model, first, x, y, 5)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "monitor": first.state_dict()}, tmp_path / "run.pt")
    checkpoint = torch.load(tmp_path / "run.pt")
    resumed = _monitored_net()
    with torch.no_grad():
        resumed[0].weight.add_(1.0)  # a fresh model that is not at the run's θ0
    resumed.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.5, momentum=0.9)
    optimizer.load_state_dict(checkpoint["optimizer"])
    # another probe at construction: the run's own probe comes back with the state
    second = analysis.RegimeMonitor(resumed, x[6:], every=5)
    second.load_state_dict(checkpoint["monitor"])
    _train(resumed, second, x, y, 10, start=6, optimizer=optimizer)

    assert [row["step"] for row in second.table()] == [2, 4, 6, 8, 10]
    for row, expected in zip(second.table(), whole.table()):
        assert row.keys() == expected.keys()
        for key in row:
            assert row[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-14, nan_ok=True), key
    assert second.verdict() == whole.verdict()


def test_monitor_state_of_another_model_or_setting_is_refused():
    x = torch.randn(6, 3, dtype=torch.float64)
    state = analysis.RegimeMonitor(_monitored_net(), x).state_dict()
    wider = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    with pytest.raises(ValueError, match=r"other shapes than the model's parameters \['0.weight'"):
        analysis.RegimeMonitor(wider, x).load_state_dict(state)
    with pytest.raises(ValueError, match=r"other parameters \(only in the state: \['0.weight', '0.bias'\]"):
        analysis.RegimeMonitor(_monitored_net(), x, params=["2.weight", "2.bias"]).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with layers=.*ntk_output='trace'.*ntk_output='full'"):
        analysis.RegimeMonitor(_monitored_net(), x, ntk_output="full").load_state_dict(state)
    with pytest.raises(ValueError, match="saved for a torch.float64 model and this model's parameters are "
                                         "torch.float32"):
        analysis.RegimeMonitor(_monitored_net().float(), x.float()).load_state_dict(state)
    with pytest.raises(ValueError, match="not a RegimeMonitor.state_dict"):
        analysis.RegimeMonitor(_monitored_net(), x).load_state_dict(_monitored_net().state_dict())


def test_monitor_says_training_diverged_when_the_parameters_are_not_finite():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.1), nn.Linear(4, 1)).train()
    x = torch.randn(6, 3)
    monitor = analysis.RegimeMonitor(model, x, every=1)
    monitor.record(1)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"training diverged by step 2: parameter '0.weight' holds NaN"):
        monitor.record(2)
    assert [row["step"] for row in monitor.table()] == [1]
    assert model.training and model[2].training


def test_monitor_says_training_diverged_when_the_kernel_overflows():
    # parameters and outputs are finite float32 numbers, the kernel (~1e50) is not
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(6, 3)
    monitor = analysis.RegimeMonitor(model, x, every=1)
    with torch.no_grad():
        model[2].weight.mul_(1e25)
    with pytest.warns(UserWarning, match="overflow"):
        with pytest.raises(RuntimeError, match="training diverged by step 3: the NTK of the probe inputs"):
            monitor.step(3)
    assert monitor.table() == []


# -- parameterizations --------------------------------------------------------------------

def test_standard_parameterization_learning_rate_keeps_gradient_descent_stable_at_every_width(ref_ntk):
    # gradient descent on L = (1/2N)Σ‖f − y‖² is stable while lr·λ_max(Θ)/N < 2; the
    # standard parameterization's NTK grows like the width, so its learning rate must
    # fall like 1/width for the same dynamics at every width
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(10, 4, dtype=torch.float64, generator=gen)

    def step_size(width):
        model = analysis.mlp(4, width, 1, parameterization="standard", seed=0).double()
        largest = torch.linalg.eigvalsh(ref_ntk(model, x))[-1].item()
        return analysis.learning_rate("standard", 1.0, width) * largest / 10

    ratio = step_size(1024) / step_size(16)
    assert 0.5 < ratio < 2.0


def test_width_sweep_in_standard_parameterization_trains_at_every_width():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 4, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    result = analysis.width_sweep(x[:24], y[:24], x[24:], y[24:], widths=(16, 128, 1024),
                                  parameterization="standard", steps=20, probe_size=6, base_lrs=(0.05,),
                                  kernel_regression=False, dtype=torch.float64)
    losses = [row["train_loss"] for row in result.rows]
    assert [row["lr"] for row in result.rows] == pytest.approx([0.05 / 16, 0.05 / 128, 0.05 / 1024])
    assert max(losses) < 1.5 * min(losses)


@pytest.mark.parametrize("call, message", [
    (lambda: analysis.cnn(1, 4, 2, sigma_b=-0.5), "sigma_b ≥ 0"),
    (lambda: analysis.cnn(1, 4, 2, sigma_w=0.0), "sigma_w > 0"),
    (lambda: analysis.cnn(0, 4, 2), "in_channels and out_features must be ≥ 1"),
    (lambda: analysis.mlp(3, 4, 2, sigma_w=float("nan")), "finite sigma_w > 0"),
    (lambda: analysis.mlp(3, 4, 2, sigma_b=float("inf")), "finite sigma_b ≥ 0"),
    (lambda: analysis.learning_rate("ntk", float("nan"), 64), "finite base_lr > 0"),
    (lambda: analysis.AlphaScaled(nn.Linear(2, 1), 2.0).learning_rate(float("nan")), "finite number > 0"),
])
def test_parameterization_helpers_refuse_bad_scales(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- width_sweep --------------------------------------------------------------------------

def _labelled_data():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    return x[:12], y[:12], x[12:], y[12:]


@pytest.mark.parametrize("change, message", [
    (dict(widths=(8, 0)), r"widths must be integers ≥ 1, got \[0\]"),
    (dict(widths=(8, -4)), r"widths must be integers ≥ 1, got \[-4\]"),
    (dict(widths=(8, 16.5)), r"widths must be integers ≥ 1, got \[16.5\]"),
    (dict(widths=8), "widths must be a sequence of integers"),
    (dict(steps=2.5), "steps must be an integer ≥ 1, got 2.5"),
    (dict(steps=True), "steps must be an integer ≥ 1, got True"),
    (dict(alphas=(None, 0.0)), r"alphas must be finite numbers > 0 .*got \[0.0\]"),
    (dict(alphas=(None, -1.0)), r"alphas must be finite numbers > 0 .*got \[-1.0\]"),
    (dict(base_lrs=(1.0, -1.0)), r"base_lrs must be finite numbers > 0, got \[-1.0\]"),
    (dict(base_lrs=(float("nan"),)), r"base_lrs must be finite numbers > 0, got \[nan\]"),
    (dict(base_lrs=(float("inf"),)), r"base_lrs must be finite numbers > 0, got \[inf\]"),
])
def test_width_sweep_checks_every_argument_before_any_run_trains(change, message):
    done = []
    kwargs = dict(widths=(8, 16), steps=2, probe_size=4, kernel_regression=False,
                  progress=lambda *args: done.append(args))
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        analysis.width_sweep(*_labelled_data(), **kwargs)
    assert done == []


@pytest.mark.parametrize("base_lr, steps", [(1e4, 2), (1e6, 3)])
def test_width_sweep_reports_a_run_that_diverged_on_its_last_steps(base_lr, steps):
    # the loss before each step was finite; the network after the last step (or after a
    # recorded step) was not: a row with train_loss inf and a verdict, or a ValueError
    # about a kernel norm, came out instead
    with pytest.raises(RuntimeError, match=r"training diverged at width 8, alpha None, lr .* lower base_lrs"):
        analysis.width_sweep(*_labelled_data(), widths=(8,), steps=steps, every=1, probe_size=4,
                             base_lrs=(base_lr,), kernel_regression=False)


def _assert_same_rows(rows, expected_rows):
    assert len(rows) == len(expected_rows)
    for row, expected in zip(rows, expected_rows):
        assert row.keys() == expected.keys()
        for key, value in row.items():
            if isinstance(value, float):
                assert value == pytest.approx(expected[key], rel=1e-12, abs=1e-15, nan_ok=True), key
            else:
                assert value == expected[key], key


def test_width_sweep_resumes_from_its_checkpoint_to_the_rows_of_an_uninterrupted_sweep(tmp_path):
    data = _labelled_data()
    kwargs = dict(widths=(8, 16, 24), alphas=(None, 4.0), steps=4, probe_size=4, dtype=torch.float64)
    whole = analysis.width_sweep(*data, **kwargs)

    path = str(tmp_path / "sweep.json")

    def stop_after_three(done, total, description):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analysis.width_sweep(*data, **kwargs, checkpoint=path, progress=stop_after_three)
    reported = []
    resumed = analysis.width_sweep(*data, **kwargs, checkpoint=path,
                                   progress=lambda *args: reported.append(args))
    assert [args[0] for args in reported] == [1, 2, 3, 4, 5, 6]
    assert all("(from" in args[2] for args in reported[:3]) and not any("(from" in a[2] for a in reported[3:])
    assert len(resumed.rows) == len(whole.rows) == 6
    _assert_same_rows(resumed.rows, whole.rows)
    assert len(resumed.histories) == len(whole.histories)
    for history, expected in zip(resumed.histories, whole.histories):
        _assert_same_rows(history, expected)
    # a finished sweep trains nothing more
    again = analysis.width_sweep(*data, **kwargs, checkpoint=path, progress=lambda *a: None)
    assert again.rows == resumed.rows


def test_width_sweep_checkpoints_numpy_settings(tmp_path):
    # numpy scalars as α or steps must reach the JSON checkpoint as plain numbers
    import numpy as np

    data = _labelled_data()
    path = str(tmp_path / "sweep.json")
    kwargs = dict(widths=(np.int64(8),), alphas=(None, np.float32(2.0)), base_lrs=(np.float64(0.5),),
                  steps=np.int64(2), probe_size=4, kernel_regression=False, checkpoint=path)
    first = analysis.width_sweep(*data, **kwargs)
    assert [row["alpha"] for row in first.rows] == [None, 2.0]
    assert analysis.width_sweep(*data, **kwargs).rows == first.rows


def test_width_sweep_refuses_the_checkpoint_of_another_sweep(tmp_path):
    data = _labelled_data()
    path = str(tmp_path / "sweep.json")
    analysis.width_sweep(*data, widths=(8,), steps=2, probe_size=4, kernel_regression=False, checkpoint=path)
    with pytest.raises(ValueError, match=r"another sweep: steps \(checkpoint 2, this call 3\) differ"):
        analysis.width_sweep(*data, widths=(8,), steps=3, probe_size=4, kernel_regression=False, checkpoint=path)
    changed = list(data)
    changed[0] = changed[0] + 1.0
    with pytest.raises(ValueError, match=r"another sweep: the data \(train_x"):
        analysis.width_sweep(*changed, widths=(8,), steps=2, probe_size=4, kernel_regression=False,
                             checkpoint=path)
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="cannot be read as a width_sweep checkpoint"):
        analysis.width_sweep(*data, widths=(8,), steps=2, probe_size=4, checkpoint=str(tmp_path / "other.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.width_sweep(*data, widths=(8,), steps=2, probe_size=4, checkpoint=str(tmp_path / "no" / "s.json"))
