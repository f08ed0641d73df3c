"""Model checks kept between calls (`lazykernel._checks`): reused while the model's
structure and the example shape stay the same, redone when either changes, and
never a reason for a wrong kernel."""

import gc
import weakref

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import _checks
from lazykernel._model import make_adapter
from lazykernel._structured import _PER_OUTPUT_PASS_BYTES, CheckedRules, StructuredPlan

from conftest import assert_close_to_reference, reference_ntk


@pytest.fixture
def verifications(monkeypatch):
    """How many times the structured rules were checked against autograd."""
    calls = []
    original = StructuredPlan.verify

    def counting(self, x, rows=None):
        calls.append(x.shape[0])
        return original(self, x, rows)

    monkeypatch.setattr(StructuredPlan, "verify", counting)
    return calls


class Counted(nn.Module):
    """A tanh MLP that counts its forward passes."""

    def __init__(self, d_in=5, width=7, outputs=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, width)
        self.fc2 = nn.Linear(width, outputs)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.fc2(torch.tanh(self.fc1(x)))


def _model_and_inputs(n=6):
    torch.manual_seed(0)
    return Counted().double().eval(), torch.randn(n, 5, dtype=torch.float64)


def test_a_second_call_reuses_the_checks_and_stays_exact(verifications):
    model, x = _model_and_inputs()
    first = lazykernel.ntk(model, x, output="full")
    assert len(verifications) == 1
    model.forwards = 0
    second = lazykernel.ntk(model, x, output="full")
    assert len(verifications) == 1
    # no probe, no verification: one forward, the capture of the one chunk
    assert model.forwards == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert_close_to_reference(second, reference_ntk(model, x, output="full"), torch.float64)


def test_new_parameter_values_need_no_new_check_and_give_the_new_kernel(verifications):
    model, x = _model_and_inputs()
    lazykernel.ntk(model, x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.7).add_(0.1)
    result = lazykernel.ntk(model, x)
    assert len(verifications) == 1
    assert_close_to_reference(result, reference_ntk(model, x), torch.float64)


@pytest.mark.parametrize("change", ["replace parameter", "forward hook", "freeze", "new layer", "dtype"])
def test_a_change_of_structure_checks_again(verifications, change):
    model, x = _model_and_inputs()
    lazykernel.ntk(model, x)
    if change == "replace parameter":
        model.fc1.weight = nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    elif change == "forward hook":
        model.fc1.register_forward_hook(lambda module, args, out: 2 * out)
    elif change == "freeze":
        model.fc2.bias.requires_grad_(False)
    elif change == "new layer":
        model.fc1 = nn.Sequential(nn.Linear(5, 7), nn.Tanh()).double()
    else:
        model.float()
        x = x.float()
    result = lazykernel.ntk(model, x)
    assert len(verifications) == 2
    dtype = torch.float32 if change == "dtype" else torch.float64
    assert_close_to_reference(result, reference_ntk(model, x), dtype)


def test_another_example_shape_checks_again_and_both_are_kept(verifications):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten()).double()
    for length in (8, 11, 8, 11):
        x = torch.randn(3, 2, length, dtype=torch.float64)
        assert_close_to_reference(lazykernel.ntk(model, x), reference_ntk(model, x), torch.float64)
    assert len(verifications) == 2


def test_clear_cache_checks_again(verifications):
    model, x = _model_and_inputs()
    lazykernel.ntk(model, x)
    lazykernel.clear_cache()
    lazykernel.ntk(model, x)
    assert len(verifications) == 2


def test_a_rule_that_failed_its_check_stays_demoted_when_reused(verifications):
    # the Linear is applied to a sequence-first tensor: its rule misreads the
    # batch axis, fails the check and must not come back on the second call
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return torch.tanh(self.fc(x.transpose(0, 1))).sum(0)

    torch.manual_seed(2)
    model = SequenceFirst().double()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    for _ in range(2):
        report = lazykernel.plan(model, x, method="structured")
        assert {g.rule for g in report.groups} == {"PerExampleJacobian"}, str(report)
        assert_close_to_reference(lazykernel.ntk(model, x, output="full"),
                                  reference_ntk(model, x, output="full"), torch.float64)
    assert len(verifications) == 1


def test_functional_models_are_kept_by_function_and_tensors(verifications):
    torch.manual_seed(3)

    def fn(params, x):
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, params["w"])), params["v"])

    params = {"w": torch.randn(6, 4, dtype=torch.float64), "v": torch.randn(2, 6, dtype=torch.float64)}
    x = torch.randn(5, 4, dtype=torch.float64)
    lazykernel.ntk(fn, x, params=params)
    lazykernel.ntk(fn, x, params=params)
    assert len(verifications) == 1
    other = {name: t.clone() for name, t in params.items()}
    assert_close_to_reference(lazykernel.ntk(fn, x, params=other), reference_ntk(fn, x, params_selection=other),
                              torch.float64)
    assert len(verifications) == 2


def test_the_store_does_not_keep_models_alive():
    model, x = _model_and_inputs()
    lazykernel.ntk(model, x)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_larger_batch_that_needs_the_per_output_probe_checks_again():
    model, x = _model_and_inputs()
    plan = StructuredPlan.build(make_adapter(model, None))
    plan.verify(x[:3], rows=8)
    found = CheckedRules(plan)
    # small cotangents: the probe of the batched backward did not pay, so was not run
    assert found.batched_falls_back is None
    assert found.serves(StructuredPlan.build(plan.adapter), rows=8)
    huge = int(_PER_OUTPUT_PASS_BYTES / found.cotangent_bytes_per_example) + 1
    assert not found.serves(StructuredPlan.build(plan.adapter), rows=huge)


def test_the_store_keeps_a_bounded_number_of_shapes_per_model():
    store = _checks._Store()
    owner = Counted()
    for i in range(5 * _checks._PER_MODEL):
        store.put((owner, ("shape", i)), "probe", i)
    kept = [i for i in range(5 * _checks._PER_MODEL) if store.get((owner, ("shape", i)), "probe") is not None]
    assert kept == list(range(5 * _checks._PER_MODEL - 2 * _checks._PER_MODEL, 5 * _checks._PER_MODEL))
    assert store.get(None, "probe") is None

