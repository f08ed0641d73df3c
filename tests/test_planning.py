"""lazykernel.plan: the rules and forms ntk uses, and the cost model's numbers."""

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import products
from lazykernel._model import make_adapter


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_plan_of_an_mlp_counts_the_structured_flops():
    model = _mlp()
    x1, x2 = torch.randn(10, 6), torch.randn(7, 6)
    plan = lazykernel.plan(model, x1, x2, output="trace", method="structured")
    assert plan.method == "structured" and plan.output == "trace"
    assert plan.shape == (10, 7) and plan.chunks == (10, 7)
    assert [g.rule for g in plan.groups] == ["LinearRule", "LinearRule"]
    assert plan.groups[0].params == ["0.bias", "0.weight"]
    assert [g.form for g in plan.groups] == ["pairwise", "pairwise"]
    # T = 1: 2·(K + m·D) per pair with the bias folded into K, m = O = 3
    pairs = 10 * 7
    assert plan.groups[0].flops == pytest.approx(2 * pairs * (7 + 3 * 8))
    assert plan.groups[1].flops == pytest.approx(2 * pairs * (9 + 3 * 3))
    # forward: 2·(6·8 + 8·3) FLOPs per example; the operands need it and at most,
    # per output, the backward product of the last layer (2·3·8; the first layer's
    # input needs no gradient). The layer chain takes that product once for all
    # examples, as the one-hot seeds are the same for every example.
    assert plan.forward_flops == pytest.approx(2 * (6 * 8 + 8 * 3))
    assert plan.capture == "one backward of the layer chain, batched over outputs"
    assert (10 + 7) * plan.forward_flops < plan.operand_flops <= (10 + 7) * (plan.forward_flops + 3 * 2 * 3 * 8)
    assert plan.flops == pytest.approx(plan.operand_flops + sum(g.flops for g in plan.groups))
    assert plan.result_bytes == 10 * 7 * 4
    assert plan.peak_bytes > plan.result_bytes
    text = str(plan)
    assert "LinearRule" in text and "pairwise" in text and "GFLOP" in text


def test_full_output_costs_o_squared_and_symmetric_calls_count_half_the_pairs():
    model = _mlp()
    x = torch.randn(8, 6)
    plan = lazykernel.plan(model, x, output="full", method="structured")
    assert plan.shape == (8, 8, 3, 3)
    pairs = 8 * 9 / 2
    assert plan.groups[1].flops == pytest.approx(2 * pairs * (9 + 9 * 3))


def test_positions_choose_the_cheaper_form_and_plan_says_so():
    torch.manual_seed(1)
    # T = 40 positions of a 2 -> 3 map: T²(K + O·D) per pair is far more than O·D·K
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(120, 2))
    plan = lazykernel.plan(model, torch.randn(6, 40, 2), output="full", method="structured")
    assert [g.form for g in plan.groups] == ["gradient", "pairwise"]


def test_chunks_shrink_under_a_small_budget_and_operands_are_recomputed():
    model = _mlp()
    x = torch.randn(64, 6)
    roomy = lazykernel.plan(model, x, method="structured")
    tight = lazykernel.plan(model, x, method="structured", memory_budget=20_000)
    assert roomy.chunks == (64, 64)
    assert tight.chunks[0] < 64
    assert tight.operand_flops > roomy.operand_flops
    assert tight.peak_bytes - tight.result_bytes <= 20_000


def test_a_functional_models_activations_count_as_a_modules_do():
    # without layers to hook, the chunks were planned from the size of x alone
    torch.manual_seed(17)
    net = nn.Sequential(nn.Linear(4, 2048), nn.Tanh(), nn.Linear(2048, 1))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fn(p, x):
        return torch.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]

    x = torch.randn(256, 4)
    budget = 4 * 3 * sum(p.numel() for p in params.values()) + 64 * 4 * 2048 * 4
    module = products._chunk_size(make_adapter(net, None), x, None, budget, vectors=1)
    functional = products._chunk_size(make_adapter(fn, params), x, None, budget, vectors=1)
    assert module < 256 and module / 2 <= functional <= module
    for method in ("jacobian", "ntvp", "structured"):
        assert lazykernel.plan(fn, x, params=params, method=method, memory_budget=4e6).chunks[0] < 256


@pytest.mark.parametrize("method", ["jacobian", "ntvp"])
def test_plan_of_the_generic_methods(method):
    model = _mlp()
    plan = lazykernel.plan(model, torch.randn(5, 6), output="diagonal", method=method)
    assert plan.method == method
    assert plan.shape == (5, 5, 3)
    assert len(plan.groups) == 1 and plan.groups[0].params == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert plan.groups[0].flops > 0


def test_plan_checks_arguments_like_ntk():
    with pytest.raises(ValueError, match="unknown output"):
        lazykernel.plan(_mlp(), torch.randn(3, 6), output="mean")
    with pytest.raises(ValueError, match="memory_budget of"):
        lazykernel.plan(_mlp(), torch.randn(3, 6), memory_budget=10)


def test_plan_of_empty_inputs():
    plan = lazykernel.plan(_mlp(), torch.randn(0, 6))
    assert plan.shape == (0, 0) and plan.groups == [] and plan.flops == 0


def test_plan_of_a_parametrized_layer_counts_its_products():
    # weight_norm's parametrization made the FLOP counter's per-module backward hooks
    # fail inside autograd.grad; the count must match the same model without it
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    normed = nn.Sequential(weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    report = lazykernel.plan(normed, x)
    assert report.forward_flops == lazykernel.plan(plain, x).forward_flops == 2 * (3 * 4 + 4 * 2)
    assert report.flops > 0 and report.peak_bytes > 0
