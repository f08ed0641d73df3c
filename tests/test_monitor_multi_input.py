"""RegimeMonitor of a model of several inputs: probe_x and heldout_x as tuples, lists or dicts."""

import copy
import math

import pytest
import torch
from torch import nn

from lazykernel import analysis
from lazykernel.analysis import metrics

from conftest import several_inputs_jacobian


class TimeConditioned(nn.Module):
    """A network of an input and a scalar time per example: model(x, t)."""

    def __init__(self, d=4, outputs=2):
        super().__init__()
        self.inp = nn.Linear(d, 7)
        self.time = nn.Linear(1, 7, bias=False)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Linear(14, outputs)

    def features(self, x, t):
        """The input of ``head``, the representation the monitor compares by default."""
        h = torch.tanh(self.inp(x) + self.time(t))
        return torch.tanh(self.conv(h.unsqueeze(1))).flatten(1)

    def forward(self, x, t):
        return self.head(self.features(x, t))


class MaskedMean(nn.Module):
    """Token embeddings averaged over the unmasked positions, then an MLP: model(ids=..., mask=...)."""

    def __init__(self, vocab=11, d=6, outputs=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, 8)
        self.head = nn.Linear(8, outputs)

    def features(self, *, ids, mask):
        h = self.embed(ids) * mask.unsqueeze(-1).to(self.embed.weight.dtype)
        h = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(h.dtype)
        return torch.tanh(self.hidden(h))

    def forward(self, *, ids, mask):
        return self.head(self.features(ids=ids, mask=mask))


def _timed(n, seed, d=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, dtype=torch.float64, generator=g),
            torch.rand(n, 1, dtype=torch.float64, generator=g))


def _tokens(n, seed, length=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.rand(n, length, generator=g) > 0.3
    mask[:, 0] = True
    return {"ids": ids, "mask": mask}


def _call(fn, inputs):
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _jacobian(model, inputs):
    """[N, O, P] per-example Jacobians of a float64 copy of ``model``."""
    return several_inputs_jacobian(copy.deepcopy(model).double(), inputs)


def _trace_ntk(model, inputs):
    j = _jacobian(model, inputs)
    return torch.einsum("iap,jap->ij", j, j)


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params.values()]).double()


def _train(model, monitor, x, y, steps, start=1, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for step in range(start, steps + 1):
        optimizer.zero_grad()
        loss = 0.5 * ((_call(model, x) - y) ** 2).sum(1).mean()
        loss.backward()
        optimizer.step()
        monitor.step(step, loss=loss.item())
    return optimizer


def _timed_case():
    torch.manual_seed(0)
    model = TimeConditioned().double()
    probe, held = _timed(6, 1), _timed(4, 2)
    y = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return model, probe, held, y


def _token_case():
    torch.manual_seed(1)
    model = MaskedMean().double()
    probe, held = _tokens(6, 4), _tokens(4, 5)
    y = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    return model, probe, held, y


@pytest.mark.parametrize("form", ["tuple", "list", "dict"])
def test_monitor_metrics_of_a_model_of_several_inputs_match_explicit_jacobians(form):
    model, probe, held, y = _token_case() if form == "dict" else _timed_case()
    if form == "list":
        probe, held = list(probe), list(held)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    k0 = _trace_ntk(model, probe)
    j0_held = _jacobian(model, held)
    with torch.no_grad():
        f0, features0 = _call(model, held), _call(model.features, probe)
    monitor = analysis.RegimeMonitor(model, probe, y, every=3, heldout_x=held)
    assert torch.allclose(monitor.f0, f0, rtol=1e-12, atol=1e-14)
    _train(model, monitor, probe, y, 6)
    last = monitor.table()[-1]
    assert [row["step"] for row in monitor.table()] == [3, 6]

    k1 = _trace_ntk(model, probe)
    assert last["relative_kernel_change"] == pytest.approx(metrics.relative_kernel_change(k0, k1), rel=1e-8)
    assert last["kernel_distance"] == pytest.approx(metrics.kernel_distance(k0, k1), rel=1e-6, abs=1e-12)
    assert last["kernel_alignment"] == pytest.approx(metrics.centered_kernel_alignment(k1, y), rel=1e-8)
    assert last["relative_kernel_change"] > 1e-3   # the kernel did move: the comparison means something
    delta = _flat(dict(model.named_parameters())) - _flat(theta0)
    f_lin = f0 + (j0_held @ delta).reshape(f0.shape)
    with torch.no_grad():
        f1, features1 = _call(model, held), _call(model.features, probe)
    assert last["linearization_gap"] == pytest.approx(metrics.linearization_gap(f1, f_lin, f0), rel=1e-7)
    assert last["parameter_movement"] == pytest.approx(float(delta.norm() / _flat(theta0).norm()), rel=1e-10)
    assert last["parameter_movement/head.weight"] == pytest.approx(
        float((model.head.weight.detach() - theta0["head.weight"]).norm() / theta0["head.weight"].norm()),
        rel=1e-10)
    layer = "head"
    assert last[f"cka/{layer}"] == pytest.approx(metrics.linear_cka(features0, features1), rel=1e-9)
    assert last[f"cka/{layer}"] < 1 - 1e-6


def test_monitor_measures_the_inputs_it_was_given_when_the_parts_change_in_place():
    # a loop that rescales its data, or puts other tensors in its list or dict, must not
    # look like kernel or output movement: nothing has trained here
    model, (x, t), (hx, ht), _ = _timed_case()
    probe, held = [x, t], [hx, ht]
    monitor = analysis.RegimeMonitor(model, probe, every=1, heldout_x=held)
    x.mul_(2.0)
    t.add_(1.0)
    hx.mul_(-1.0)
    probe[1] = torch.zeros_like(t)
    held[0] = torch.zeros_like(hx)
    row = monitor.record(0)
    assert row["relative_kernel_change"] == 0.0 and row["kernel_distance"] == 0.0
    assert row["parameter_movement"] == 0.0
    assert math.isnan(row["linearization_gap"])      # the held-out outputs have not moved
    assert row["cka/head"] == pytest.approx(1.0, rel=1e-12)

    token_model = MaskedMean().double()
    tokens = _tokens(6, 7)
    monitor = analysis.RegimeMonitor(token_model, tokens, every=1)
    tokens["ids"].random_(0, 11, generator=torch.Generator().manual_seed(8))
    tokens["mask"].fill_(True)
    tokens["extra"] = torch.zeros(6)
    row = monitor.record(0)
    assert row["relative_kernel_change"] == 0.0 and row["kernel_distance"] == 0.0
    assert math.isnan(row["linearization_gap"])
    assert row["cka/head"] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_monitor_state_of_several_inputs_carries_a_resumed_run_to_the_same_records(tmp_path, form):
    build, other_probe = (_token_case, _tokens(5, 9)) if form == "dict" else (_timed_case, _timed(5, 9))
    model, probe, held, y = build()
    whole = analysis.RegimeMonitor(model, probe, y, every=2, heldout_x=held)
    _train(model, whole, probe, y, 6)

    model, probe, held, y = build()
    first = analysis.RegimeMonitor(model, probe, y, every=2, heldout_x=held)
    optimizer = _train(model, first, probe, y, 3)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "monitor": first.state_dict()}, tmp_path / "run.pt")
    checkpoint = torch.load(tmp_path / "run.pt")
    resumed, _, _, _ = build()
    resumed.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.3, momentum=0.9)
    optimizer.load_state_dict(checkpoint["optimizer"])
    # another probe at construction: the run's own probe and held-out inputs come back with the state
    second = analysis.RegimeMonitor(resumed, other_probe, every=5)
    second.load_state_dict(checkpoint["monitor"])
    _train(resumed, second, probe, y, 6, start=4, optimizer=optimizer)

    assert [row["step"] for row in second.table()] == [2, 4, 6]
    for row, expected in zip(second.table(), whole.table()):
        assert row.keys() == expected.keys()
        for key in row:
            assert row[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-14, nan_ok=True), key
    assert second.verdict() == whole.verdict()


def test_monitor_built_under_inference_mode_measures_as_built_with_grad():
    rows = []
    for build in (torch.inference_mode, torch.enable_grad):
        model, probe, held, y = _timed_case()
        with build():
            monitor = analysis.RegimeMonitor(model, probe, y, every=1, heldout_x=held)
        _train(model, monitor, probe, y, 2)
        rows.append(monitor.table())
    assert rows[0] == rows[1]


def test_monitor_refuses_inputs_of_several_parts_that_do_not_fit():
    model, (x, t), (hx, ht), _ = _timed_case()
    with pytest.raises(ValueError, match=r"the parts of probe_x must hold the same number of examples.*"
                                         r"probe_x\[0\] has 6, probe_x\[1\] has 5"):
        analysis.RegimeMonitor(model, (x, t[:5]))
    with pytest.raises(ValueError, match=r"the parts of heldout_x must hold the same number of examples.*"
                                         r"heldout_x\[0\] has 4, heldout_x\[1\] has 3"):
        analysis.RegimeMonitor(model, (x, t), heldout_x=(hx, ht[:3]))
    with pytest.raises(ValueError, match=r"probe_x must hold P ≥ 2 examples.*got 1"):
        analysis.RegimeMonitor(model, (x[:1], t[:1]))
    with pytest.raises(ValueError, match=r"probe_y must have one row per probe example \(P = 6\), got 5"):
        analysis.RegimeMonitor(model, (x, t), torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"probe_x\[1\] must be a torch.Tensor.*got float"):
        analysis.RegimeMonitor(model, (x, 0.5))
    with pytest.raises(ValueError, match=r"probe_x is an empty tuple"):
        analysis.RegimeMonitor(model, ())
    with pytest.raises(ValueError, match=r"heldout_x must hold the same parts as probe_x: probe_x is a tuple "
                                         r"of 2 tensors, heldout_x is one tensor"):
        analysis.RegimeMonitor(model, (x, t), heldout_x=hx)
    tokens = _tokens(6, 4)
    with pytest.raises(ValueError, match=r"probe_x is a dict whose keys must be the names"):
        analysis.RegimeMonitor(MaskedMean().double(), {0: tokens["ids"], 1: tokens["mask"]})
    with pytest.raises(ValueError, match=r"heldout_x must hold the same parts as probe_x: probe_x is a dict "
                                         r"with keys \['ids', 'mask'\], heldout_x is a dict with keys \['ids'\]"):
        analysis.RegimeMonitor(MaskedMean().double(), tokens, heldout_x={"ids": tokens["ids"]})


def test_monitor_refuses_a_layer_that_receives_its_input_by_keyword():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = MaskedMean()

        def forward(self, ids, mask):
            return self.inner(ids=ids, mask=mask)

    tokens = _tokens(6, 4)
    model = Outer().double()
    with pytest.raises(ValueError, match=r"layer 'inner' receives its inputs by keyword only.*name a module "
                                         r"whose first positional input"):
        analysis.RegimeMonitor(model, (tokens["ids"], tokens["mask"]), layers=["inner"])
    # its own layers are compared as ever
    monitor = analysis.RegimeMonitor(model, (tokens["ids"], tokens["mask"]), layers=["inner.head"], every=1)
    assert monitor.record(0)["cka/inner.head"] == pytest.approx(1.0, rel=1e-12)
