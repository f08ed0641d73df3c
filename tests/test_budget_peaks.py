"""Peak memory against ``memory_budget`` where the memory estimates used to be low: the
layer chain's capture of a CNN kernel computed in one chunk, the check of the structured
method on a model with functional operations between its layers or with large
parameters, and the pullback of a model whose weight is used twice.

Each peak is measured with the profiler (`conftest.peak_allocated_bytes`) over the whole
call, less the returned result, which the budget does not cover."""

import copy
import importlib

import pytest
import torch
from torch import nn

import lazykernel
from conftest import stated_least_budget
from conftest import _explicit_jacobian, assert_close_to_reference, peak_allocated_bytes, reference_ntk

ntk_module = importlib.import_module("lazykernel.ntk")

# The budget is held by estimates of what the passes allocate, not by a measurement:
# the peaks they predict hold to within 2 % (test_budget_guarantees), and a few
# allocations of PyTorch's own (the profiler's, small scalars, oneDNN's copy of a
# weight) are no part of the count. 5 % leaves room for those and still catches an
# estimate that is short by a layer's cotangents (the peaks these tests found were
# 1.2 to 35 times the budget).
_MARGIN = 1.05
_N = 8


def _tensor_bytes(result) -> int:
    parts = result.values() if isinstance(result, dict) else [result]
    return sum(t.numel() * t.element_size() for t in parts)


def _peak_beside_result(call):
    """(the result of ``call()``, the most bytes it held at once besides that result)."""
    out = {}
    peak = peak_allocated_bytes(lambda: out.update(result=call()))
    return out["result"], peak - _tensor_bytes(out["result"])


# -- a CNN kernel in one chunk: the layer chain's capture --------------------------

def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


def _conv_chain(kind: str) -> nn.Sequential:
    """Plain chains of convolutions whose cotangents the layer chain takes (10 outputs)."""
    torch.manual_seed(0)
    if kind == "one-relu":
        layers = [_conv(3, 16), _conv(16, 16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10)]
    elif kind == "average-pool":
        layers = [_conv(3, 16), _conv(16, 16), nn.AvgPool2d(2), _conv(16, 16), nn.Flatten(),
                  nn.Linear(16 * 8 * 8, 10)]
    elif kind == "batch-norm":
        norm = nn.BatchNorm2d(16)
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        layers = [_conv(3, 16), norm, _conv(16, 16), nn.Flatten(), nn.Linear(16 * 16 * 16, 10)]
    else:
        layers = [_conv(3, 16), _conv(16, 32, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10)]
    return nn.Sequential(*layers).eval()


def _one_chunk_budget(model, x, output: str, method: str) -> float:
    """The least budget with which `ntk` computes the symmetric kernel of ``x`` in one chunk."""
    call = ntk_module._setup(model, x, None, output, method, None, None, None)
    engine, n = call.engine, x.shape[0]
    cell = (call.outputs ** 2 if call.mode == "full" else 1) * call.elt
    return max(ntk_module._working_bytes(engine, n, n, n, True, cell), engine.check_bytes(),
               ntk_module._tile_bytes(engine, 1, 1, cell))


@pytest.mark.parametrize("method, output", [("auto", "trace"), ("structured", "full")])
@pytest.mark.parametrize("kind", ["one-relu", "average-pool", "batch-norm", "strided"])
def test_a_cnn_kernel_in_one_chunk_stays_within_the_budget(kind, method, output):
    # the layer chain's capture of all the examples at once holds the rules' stores, the
    # convolution backward's stand-in input, its result and oneDNN's copies: with few
    # activations between the convolutions, more than the forward the estimate counted
    # (the peaks were 1.2, 1.9, 1.5 and 1.6 times the budget)
    model = _conv_chain(kind)
    x = torch.randn(_N, 3, 16, 16)
    budget = _one_chunk_budget(model, x, output, method)
    assert lazykernel.plan(model, x, output=output, method=method, memory_budget=budget).chunks == (_N, _N)
    kernel, peak = _peak_beside_result(lambda: lazykernel.ntk(model, x, output=output, method=method,
                                                              memory_budget=budget))
    assert peak <= _MARGIN * budget, f"peak {peak} B beside the kernel, budget {budget:.0f} B"
    assert_close_to_reference(kernel, reference_ntk(model, x, output=output), torch.float32)


# -- the check of the structured method -------------------------------------------

class _Warp(nn.Module):
    """An affine sampling grid predicted from the input, then ``F.grid_sample``: the grid
    and the resampled image are computed between the layers, by functions."""

    def __init__(self, channels: int, size: int, outputs: int):
        super().__init__()
        torch.manual_seed(12)
        self.loc = nn.Linear(channels * size * size, 6)
        self.head = nn.Linear(channels * size * size, outputs)

    def forward(self, x):
        grid = nn.functional.affine_grid(self.loc(x.flatten(1)).view(-1, 2, 3), list(x.shape), align_corners=False)
        return self.head(nn.functional.grid_sample(x, grid, align_corners=False).flatten(1))


class _WideHidden(nn.Module):
    """A one-hidden-layer perceptron written as its own module: its rules are checked on
    the probe examples, along a random direction in its 264 000 parameters."""

    def __init__(self, width: int = 512, outputs: int = 3):
        super().__init__()
        torch.manual_seed(13)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, outputs)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)))


@pytest.mark.parametrize("build, shape", [
    (lambda: _Warp(1, 32, 1), (1, 32, 32)),
    (lambda: _Warp(4, 16, 10), (4, 16, 16)),
    (lambda: _WideHidden(), (512,)),
], ids=["grid-sample", "grid-sample-10-outputs", "wide-own-module"])
def test_the_structured_check_fits_in_the_least_budget_its_error_states(build, shape):
    # the grid and the resampled image are no layer's output, which was all the forward
    # counted (2.2 and 1.4 times the budget); the check's random direction and autograd's
    # gradients along it are parameter-sized, and were not counted at all (23 times)
    model = build().eval()
    torch.manual_seed(3)
    x = torch.randn(_N, *shape)
    least = stated_least_budget(lambda budget: lazykernel.ntk(model, x, memory_budget=budget))
    kernel, peak = _peak_beside_result(lambda: lazykernel.ntk(model, x, memory_budget=least))
    assert peak <= _MARGIN * least, f"peak {peak} B beside the kernel, least budget stated {least} B"
    assert_close_to_reference(kernel, reference_ntk(model, x), torch.float32)


# -- a pullback that sums the gradients of a weight used twice ---------------------

class _CalledTwice(nn.Module):
    """One ``nn.Linear`` applied twice in a row."""

    def __init__(self, width: int = 256):
        super().__init__()
        torch.manual_seed(14)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(torch.tanh(self.hidden(x)))))


class _SharedWeight(nn.Module):
    """Two ``nn.Linear`` layers holding the same weight."""

    def __init__(self, width: int = 256):
        super().__init__()
        torch.manual_seed(15)
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)
        self.second.weight = self.first.weight
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


@pytest.mark.parametrize("build", [_CalledTwice, _SharedWeight], ids=["called-twice", "shared-by-two-layers"])
def test_vjp_of_a_weight_used_twice_fits_in_the_least_budget_its_error_states(build):
    # autograd forms the weight's gradient once per use and adds them: two more copies of
    # it beside the two parameter-sized vectors counted (the peak was 1.9 times the budget)
    model = build().eval()
    torch.manual_seed(4)
    x, cotangent = torch.randn(16, 256), torch.randn(16, 3)
    least = stated_least_budget(lambda budget: lazykernel.vjp(model, x, cotangent, memory_budget=budget))
    grads, peak = _peak_beside_result(lambda: lazykernel.vjp(model, x, cotangent, memory_budget=least))
    assert peak <= _MARGIN * least, f"peak {peak} B beside the gradients, least budget stated {least} B"
    model64 = copy.deepcopy(model).double()
    names = [name for name, _ in model64.named_parameters()]
    jacobian = _explicit_jacobian(model64, x.double(), list(model64.parameters()))        # [N, O, P]
    expected = torch.einsum("io,iop->p", cotangent.double(), jacobian)
    assert list(grads) == names
    got = torch.cat([grads[name].reshape(-1) for name in names]).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
