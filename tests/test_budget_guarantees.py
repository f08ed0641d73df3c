"""The memory budget as a guarantee: the least budget an error states holds for the whole
call (the check of the method on a few examples included), a lone example's kernel asks
for one example's memory, a budget beyond float's range means no limit, and a default
budget that is too small says where it came from."""

import copy
import importlib
import re

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import _memory
from conftest import stated_least_budget
from conftest import _explicit_jacobian, assert_close_to_reference, reference_ntk
from conftest import peak_allocated_bytes as _peak_allocated_bytes

ntk_module = importlib.import_module("lazykernel.ntk")

# The cost model is an estimate: the peaks it predicts hold to within 2 % (as in
# test_memory_budgets), and allocations outside lazykernel's own count
_MARGIN = 1.02


class _MeanOverPositions(nn.Module):
    def forward(self, h):
        return h.mean(1)


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).eval()
    return model, torch.randn(8, 3, 12, 12)


def _transformer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32),
                          nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                          _MeanOverPositions(), nn.Linear(32, 3)).eval()
    return model, torch.randint(0, 50, (8, 8))


def _one_output_mlp(n=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 1)).eval()
    return model, torch.randn(n, 16)


def _tensor_bytes(result) -> int:
    parts = result.values() if isinstance(result, dict) else result if isinstance(result, tuple) else [result]
    return sum(t.numel() * t.element_size() for t in parts)


@pytest.mark.parametrize("build, method", [(_cnn, "auto"), (_transformer, "auto"), (_one_output_mlp, "ntvp")],
                         ids=["cnn", "transformer", "one-output-ntvp"])
def test_ntk_fits_in_the_least_budget_its_error_states(build, method):
    # the rules (or products) are checked on four examples before any tile: at the least
    # budget the error stated, that check alone went past it
    model, x = build()
    least = stated_least_budget(lambda budget: lazykernel.ntk(model, x, method=method, memory_budget=budget))
    result = {}
    peak = _peak_allocated_bytes(lambda: result.update(k=lazykernel.ntk(model, x, method=method,
                                                                        memory_budget=least)))
    assert peak - _tensor_bytes(result["k"]) <= _MARGIN * least
    assert_close_to_reference(result["k"], reference_ntk(model, x), torch.float32)


def test_a_lone_examples_kernel_asks_for_one_examples_memory():
    # one example's symmetric kernel holds its Jacobian once, not for two sides of a tile
    model, x = _one_output_mlp(n=1)
    engine = ntk_module._setup(model, x, None, "trace", "jacobian", None, None, None).engine
    pair = ntk_module._tile_bytes(engine, 1, 1, 4)
    budget = int(0.6 * pair)
    least = stated_least_budget(lambda b: lazykernel.ntk(model, x, method="jacobian", memory_budget=b))
    assert least <= budget
    result = {}
    peak = _peak_allocated_bytes(lambda: result.update(k=lazykernel.ntk(model, x, method="jacobian",
                                                                        memory_budget=budget)))
    assert peak - _tensor_bytes(result["k"]) <= budget
    assert result["k"].shape == (1, 1)
    assert_close_to_reference(result["k"], reference_ntk(model, x), torch.float32)


def test_a_budget_beyond_the_range_of_a_float_means_no_limit_for_ntk():
    model, x = _one_output_mlp(n=5)
    huge = 10 ** 400
    kernel = lazykernel.ntk(model, x, memory_budget=huge)
    assert_close_to_reference(kernel, reference_ntk(model, x), torch.float32)
    assert lazykernel.plan(model, x, memory_budget=huge).chunks == (5, 5)
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        lazykernel.ntk(model, x, memory_budget=-huge)


def test_a_budget_beyond_the_range_of_a_float_means_no_limit_for_the_products():
    model, x = _one_output_mlp(n=5)
    huge = 10 ** 400
    model64 = copy.deepcopy(model).double()
    params64 = list(model64.parameters())
    jacobian = _explicit_jacobian(model64, x.double(), params64)                       # [N, O, P]
    tangent = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    flat = torch.cat([t.reshape(-1) for t in tangent.values()]).double()
    _, y_dot = lazykernel.jvp(model, x, tangent, memory_budget=huge)
    torch.testing.assert_close(y_dot.double().reshape(5, 1), jacobian @ flat, rtol=1e-4, atol=1e-5)
    cotangent = torch.randn(5, 1)
    grads = lazykernel.vjp(model, x, cotangent, memory_budget=huge)
    pulled = torch.einsum("io,iop->p", cotangent.double(), jacobian)
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads.values()]).double(), pulled,
                               rtol=1e-4, atol=1e-5)
    v = torch.randn(5)
    product = lazykernel.ntk_vp(model, x, v, memory_budget=huge)
    torch.testing.assert_close(product.double(), reference_ntk(model, x) @ v.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("available, shown", [(0, "0 B"), (40_000, "39.1 KiB")])
@pytest.mark.parametrize("call", ["ntk", "jvp"])
def test_a_default_budget_too_small_says_it_comes_from_the_available_memory(monkeypatch, call, available,
                                                                            shown):
    # a container at its memory limit leaves a default budget of nothing
    monkeypatch.setattr(_memory, "_available_cpu_bytes", lambda: available)
    model, x = _one_output_mlp(n=3)
    tangent = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    with pytest.raises(ValueError) as error:
        if call == "ntk":
            lazykernel.ntk(model, x)
        else:
            lazykernel.jvp(model, x, tangent)
    message = str(error.value)
    assert message.startswith(f"the default memory_budget of {_memory.format_bytes(available / 4)} is too small")
    assert f"memory_budget was not given, and its default is a quarter of the {shown} of memory available" \
        in message
    assert re.search(r"Free memory and call again, or pass memory_budget explicitly \(at least \d+ bytes\)",
                     message)
    assert "Raise memory_budget" not in message


@pytest.mark.parametrize("op", ["jvp", "ntk_vp"])
def test_the_products_fit_in_the_least_budget_their_error_states(op):
    # the first chunk's JVP checks forward mode against reverse mode, with a random
    # parameter direction and a pulled-back gradient beside float64 copies of a weight
    model, x = _transformer()
    model64 = copy.deepcopy(model).double()
    jacobian = _explicit_jacobian(model64, x, list(model64.parameters()))              # [N, O, P]
    torch.manual_seed(1)
    tangent = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    v = torch.randn(8, 3)

    def call(budget):
        if op == "jvp":
            return lazykernel.jvp(model, x, tangent, memory_budget=budget)[1]
        return lazykernel.ntk_vp(model, x, v, output="full", memory_budget=budget)

    least = stated_least_budget(call)
    result = {}
    peak = _peak_allocated_bytes(lambda: result.update(r=call(least)))
    assert peak - _tensor_bytes(result["r"]) <= _MARGIN * least
    if op == "jvp":
        flat = torch.cat([t.reshape(-1) for t in tangent.values()]).double()
        expected = jacobian @ flat
    else:
        expected = torch.einsum("iap,jbp,jb->ia", jacobian, jacobian, v.double())
    scale = expected.abs().max()
    torch.testing.assert_close(result["r"].double(), expected, rtol=0, atol=1e-4 * scale)
