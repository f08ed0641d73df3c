"""The layer chain's own backward (`lazykernel._chain`) against autograd.

Every layer type the chain takes must give autograd's cotangents at every
rule's output, for one-hot and summed seeds, in chunks of any size; anything
else must be refused (the plan then keeps autograd), and a chain that goes
wrong must be caught by the plan's check before it is used.
"""

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import _chain, _structured
from lazykernel._chain import LayerChain
from lazykernel._model import make_adapter
from lazykernel._structured import StructuredPlan, check_weights

from conftest import OUTPUTS, assert_close_to_reference, reference_ntk


def _models():
    """Sequential models covering every step type, with the input shape each takes."""
    torch.manual_seed(0)
    bn2 = nn.BatchNorm2d(4)
    bn1 = nn.BatchNorm1d(6, affine=False)
    for norm in (bn2, bn1):
        with torch.no_grad():
            norm.running_mean.copy_(0.3 * torch.randn_like(norm.running_mean))
            norm.running_var.copy_(0.5 + torch.rand_like(norm.running_var))
            if norm.weight is not None:
                norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
    return {
        "conv2d": (nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.MaxPool2d(3, stride=1, padding=1),
            nn.Conv2d(4, 4, 3, padding="same"), bn2, nn.GELU(), nn.Dropout(0.3),
            nn.Conv2d(4, 6, 2, stride=2, dilation=1, groups=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Identity(), nn.Linear(6, 5)), (2, 8, 8)),
        "conv1d": (nn.Sequential(
            nn.Conv1d(3, 6, 3, dilation=2, padding="valid"), nn.SiLU(), nn.MaxPool1d(3, stride=1, ceil_mode=True),
            nn.AvgPool1d(2),
            bn1, nn.Sequential(nn.Conv1d(6, 4, 1), nn.Softplus()),
            nn.Linear(2, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(12, 4), nn.Sigmoid()), (3, 10)),
        # Conv3d has no rule of its own (its parameters would be taps): frozen here
        "conv3d": (nn.Sequential(
            nn.Conv3d(1, 3, 2, stride=(1, 2, 1)).requires_grad_(False), nn.ELU(),
            nn.MaxPool3d((1, 1, 2), stride=1, dilation=(1, 1, 2)),
            nn.AdaptiveAvgPool3d((1, 2, 1)), nn.Flatten(), nn.Unflatten(1, (3, 2)), nn.Linear(2, 4),
            nn.Hardswish(), nn.Flatten(), nn.Linear(12, 3)), (1, 3, 5, 4)),
    }


def _autograd_cotangents(plan, x, summed):
    """The plan's own autograd capture (its chain is not set before `verify`)."""
    assert plan.chain is None
    f, per_rule = plan._capture(x, summed=summed)
    return f, [c[0] for c in per_rule]


@pytest.mark.parametrize("name", ["conv2d", "conv1d", "conv3d"])
@pytest.mark.parametrize("summed", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])
def test_chain_cotangents_equal_autograd(name, summed, chunk_bytes, monkeypatch):
    # one example per chunk (a ragged last chunk too with 5 examples), or all at once
    monkeypatch.setattr(_chain, "_CHUNK_BYTES_CPU", chunk_bytes)
    model, shape = _models()[name]
    model = model.double().eval()
    x = torch.randn((5,) + shape, dtype=torch.float64)
    plan = StructuredPlan.build(make_adapter(model, None))
    f_ref, expected = _autograd_cotangents(plan, x, summed)
    for rule in plan.rules:
        rule.clear()
    chain = LayerChain.of(model)
    assert chain is not None
    # the summed capture weights the outputs as the checks do
    weights = check_weights(f_ref.shape[1], f_ref).squeeze(1) if summed else None
    f, got = chain.capture(x, plan.rules, weights)
    torch.testing.assert_close(f, f_ref, rtol=1e-13, atol=1e-13)
    assert len(got) == len(expected) == len(plan.rules)
    outputs = 1 if summed else f.shape[1]
    for rule, want, have in zip(plan.rules, expected, got):
        assert len(have) == 1
        assert have[0].shape == want.shape == (outputs,) + tuple(rule.outputs[0].shape)
        torch.testing.assert_close(have[0], want, rtol=1e-12, atol=1e-12)
        # what the rule reads from the forward: the layer's input and output
        assert rule.inputs[0].shape[0] == 5 and rule.outputs[0].shape[0] == 5
    # stored examples-first, seen through a transpose
    assert all(have[0].transpose(0, 1).is_contiguous() for have in got)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("name", ["conv2d", "conv1d"])
def test_ntk_through_the_chain_matches_the_reference(name, output):
    model, shape = _models()[name]
    model = model.double().eval()
    x1, x2 = torch.randn((4,) + shape, dtype=torch.float64), torch.randn((3,) + shape, dtype=torch.float64)
    assert lazykernel.plan(model, x1, x2, output=output).capture == \
        "one backward of the layer chain, batched over outputs"
    got = lazykernel.ntk(model, x1, x2, output=output, method="structured")
    assert_close_to_reference(got, reference_ntk(model, x1, x2, output=output), torch.float64)


def test_float32_chain_matches_the_reference():
    model, shape = _models()["conv2d"]
    # an input that requires grad is only read, as by autograd's capture
    x = torch.randn((6,) + shape, requires_grad=True)
    got = lazykernel.ntk(model.eval(), x, output="full")
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float32)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


class _MyReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) * 2


def _cnn(*middle):
    return nn.Sequential(nn.Conv2d(1, 2, 3), *middle, nn.Flatten(), nn.Linear(8, 3))


def test_the_chain_refuses_what_it_does_not_describe():
    assert LayerChain.of(_cnn(nn.ReLU())) is not None
    # a model with a forward of its own, or a layer of a subclassed or unknown type
    assert LayerChain.of(_Net()) is None
    assert LayerChain.of(_cnn(_MyReLU())) is None
    assert LayerChain.of(_cnn(nn.MaxPool2d(1, return_indices=True))) is None
    assert LayerChain.of(_cnn(nn.LPPool2d(2, 1))) is None
    assert LayerChain.of(_cnn(nn.PReLU())) is None
    assert LayerChain.of(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))) is None
    # "same" padding with an even kernel pads one side more
    assert LayerChain.of(nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"))) is None
    # a layer with parameters used twice
    shared = nn.Linear(3, 3)
    assert LayerChain.of(nn.Sequential(shared, nn.Tanh(), shared)) is None
    # a stateless layer used twice is fine
    act = nn.Tanh()
    assert LayerChain.of(nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act)) is not None
    # hooks of any kind, on a layer or on every module, and a forward set on an instance
    model = _cnn(nn.ReLU())
    handle = model[1].register_forward_hook(lambda m, a, y: y * 2)
    assert LayerChain.of(model) is None
    handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
    try:
        assert LayerChain.of(model) is None
    finally:
        handle.remove()
    model[1].forward = lambda x: x * 3
    assert LayerChain.of(model) is None


def _verified_plan(model, x):
    plan = StructuredPlan.build(make_adapter(model, None))
    plan.verify(x)
    return plan


def test_the_plan_takes_the_chain_only_with_several_outputs():
    torch.manual_seed(1)
    x = torch.randn(4, 1, 4, 4)
    assert _verified_plan(_cnn(nn.ReLU()), x).chain is not None
    # one output is one plain backward already
    one = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 1))
    assert _verified_plan(one, x).chain is None
    # a perceptron too: its cotangents come out in the layout the Gram op reads
    mlp = nn.Sequential(nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    assert _verified_plan(mlp, x.flatten(1).double()).chain is not None
    for output in ("trace", "full"):
        got = lazykernel.ntk(mlp, x.flatten(1).double(), output=output)
        assert_close_to_reference(got, reference_ntk(mlp, x.flatten(1), output=output), torch.float64)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(3, stride=2), nn.AvgPool2d(2, padding=1),
                                  nn.AvgPool2d(4), nn.AdaptiveAvgPool2d(4)])
def test_pools_the_chain_does_not_cover_leave_autograd_in_charge(pool):
    # windows that overlap, are padded, or do not tile the 6×6 input exactly
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Tanh(), pool, nn.Flatten()).double()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        outputs = model(x).shape[1]
    model.append(nn.Linear(outputs, 3).double())
    assert LayerChain.of(model) is not None
    assert _verified_plan(model, x).chain is None
    got = lazykernel.ntk(model, x, output="full")
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float64)


@pytest.mark.parametrize("head", ["random", "constant_sum"])
def test_a_chain_that_disagrees_with_autograd_is_not_used(head, monkeypatch):
    # an activation whose derivative the chain forgets: the check must notice, also where
    # the outputs sum to a constant, so that the plain sum's cotangents are all zero and
    # only weighted outputs (`check_weights`) show the error
    monkeypatch.setattr(_chain._ElementwiseStep, "backward", lambda self, g, rows, out: g)
    torch.manual_seed(3)
    model = _cnn(nn.Tanh()).double()
    if head == "constant_sum":
        with torch.no_grad():
            first = model[-1].weight[0].clone()
            model[-1].weight.copy_(torch.stack([-first, -first, 2 * first]))
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    assert _verified_plan(model, x).chain is None
    got = lazykernel.ntk(model, x, output="full")
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float64)


def test_a_chain_that_fails_is_not_used(monkeypatch):
    def broken(self, g, rows, out):
        raise RuntimeError("no backward here")

    monkeypatch.setattr(_chain._ConvStep, "backward", broken)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.Flatten(),
                          nn.Linear(8, 3)).double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    assert _verified_plan(model, x).chain is None
    got = lazykernel.ntk(model, x)
    assert_close_to_reference(got, reference_ntk(model, x), torch.float64)


def test_the_chain_keeps_nothing_after_a_capture():
    model, shape = _models()["conv2d"]
    model = model.eval()
    chain = LayerChain.of(model)
    plan = StructuredPlan.build(make_adapter(model, None))
    chain.capture(torch.randn((3,) + shape), plan.rules)
    for step in chain.steps:
        assert getattr(step, "derivative", None) is None
        assert getattr(step, "_common", None) is None
        assert getattr(step, "_spread_matrix", None) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["conv2d", "conv1d"])
def test_chain_on_cuda_matches_the_reference(name):
    model, shape = _models()[name]
    model = model.double().eval()
    x = torch.randn((7,) + shape, dtype=torch.float64)
    cuda_model = _models()[name][0].double().eval()
    cuda_model.load_state_dict(model.state_dict())
    cuda_model = cuda_model.cuda()
    report = lazykernel.plan(cuda_model, x.cuda(), output="full")
    assert report.capture == "one backward of the layer chain, batched over outputs"
    got = lazykernel.ntk(cuda_model, x.cuda(), output="full")
    assert got.device.type == "cuda"
    assert_close_to_reference(got.cpu(), reference_ntk(model, x, output="full"), torch.float64)
