"""The structured method's plan: which rule gets which parameters, and its safety net."""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lazykernel
from conftest import _explicit_jacobian, reference_ntk
from lazykernel._model import make_adapter
from lazykernel import _structured
from lazykernel._structured import StructuredPlan
from lazykernel.rules import LinearRule, Pairwise, StructuredRule, TermShape, register_rule, rule_for


def _kernel_by_explicit_jacobians(model, x, output="full"):
    """Float64 Θ(x, x) of the model's trainable parameters, from explicit Jacobians."""
    return reference_ntk(model, x, None, output)


def _plan(model, x):
    plan = StructuredPlan.build(make_adapter(model, None))
    plan.verify(x[:3])
    return plan


def _rules_by_params(plan):
    return {tuple(row["params"]): row["rule"] for row in plan.describe()}


def test_linear_layers_get_the_linear_rule():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    plan = _plan(model, torch.randn(4, 3, dtype=torch.float64))
    assert _rules_by_params(plan) == {("0.bias", "0.weight"): "LinearRule",
                                      ("2.bias", "2.weight"): "LinearRule"}
    assert plan.generic == []


class _BypassesHook(nn.Module):
    """Uses its Linear's weight through F.linear, which forward hooks never see."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x) + F.linear(x, self.lin.weight)))


def test_rule_that_disagrees_with_autograd_is_demoted_and_result_stays_exact():
    torch.manual_seed(0)
    model = _BypassesHook().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    plan = _plan(model, x)
    assert "lin.weight" in plan.generic
    assert _rules_by_params(plan)[("head.bias", "head.weight")] == "LinearRule"
    expected = _kernel_by_explicit_jacobians(model, x)
    got = lazykernel.ntk(model, x, output="full", method="structured")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class _Reordered(nn.Module):
    """Runs its first Linear on the batch in reverse order, then restores the order."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x.flip(0))).flip(0))


@pytest.mark.parametrize("n1", [1, 2])
def test_rules_are_checked_on_examples_of_x2_too_when_x1_has_few(n1):
    # the Linear rule reads the rows of a reversed batch as its own: wrong for every chunk
    # of two or more examples, which only a check on two different examples shows
    torch.manual_seed(5)
    model = _Reordered().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    report = lazykernel.plan(model, x[:n1], x, method="structured")
    assert {g.rule for g in report.groups if "fc.weight" in g.params} == {"PerExampleJacobian"}, str(report)
    got = lazykernel.ntk(model, x[:n1], x, output="full", method="structured")
    torch.testing.assert_close(got, reference_ntk(model, x[:n1], x, "full"), rtol=1e-10, atol=1e-12)


def test_rules_are_checked_when_the_outputs_sum_to_a_constant():
    # head rows w and -w: f_0 + f_1 is constant, so the gradient of the plain sum of
    # outputs is zero everywhere and could not tell a wrong rule from a right one
    torch.manual_seed(6)
    model = _Reordered().double()
    with torch.no_grad():
        model.out.weight[1] = -model.out.weight[0]
    x = torch.randn(5, 4, dtype=torch.float64)
    report = lazykernel.plan(model, x, method="structured")
    assert {g.rule for g in report.groups if "fc.weight" in g.params} == {"PerExampleJacobian"}, str(report)
    got = lazykernel.ntk(model, x, output="full", method="structured")
    torch.testing.assert_close(got, reference_ntk(model, x, output="full"), rtol=1e-10, atol=1e-12)


def test_tied_weights_go_to_the_generic_rule():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second).double()
    plan = _plan(model, torch.randn(4, 4, dtype=torch.float64))
    assert plan.generic == ["0.weight"]


def test_module_called_twice_keeps_its_rule_and_is_exact():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.sin(self.lin(x)))

    torch.manual_seed(1)
    model = Twice().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    plan = _plan(model, x)
    assert plan.generic == []
    torch.testing.assert_close(lazykernel.ntk(model, x, output="full"),
                               _kernel_by_explicit_jacobians(model, x), rtol=1e-10, atol=1e-12)


def test_positions_choose_materialised_gradients_when_cheaper_and_stay_exact():
    torch.manual_seed(3)
    # many positions, small layer: T² (K + O·D) per pair beats O·D·K only when T is small
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 40, 2)).double()
    x = torch.randn(6, 40, 2, dtype=torch.float64)
    plan = _plan(model, x)
    plan.choose_forms(6, 6, "full", budget_elements=1e9)
    assert plan.forms[0] == ["gradient"]   # T = 40 positions, K = 3, D = 3
    assert plan.forms[1] == ["pairwise"]   # T = 1
    expected = _kernel_by_explicit_jacobians(model, x)
    torch.testing.assert_close(lazykernel.ntk(model, x, output="full"), expected,
                               rtol=1e-10, atol=1e-12)


def test_register_rule_is_used_for_its_module_type():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight

    @register_rule(Scale)
    class ScaleRule(StructuredRule):
        """y = w ∘ a: a diagonal linear map, gradient g ∘ a per position."""

        def operands(self, cotangents, n, forms):
            a = self.inputs[0].reshape(n, 1, -1)
            g = cotangents[0].permute(1, 0, 2).unsqueeze(1)  # [n, 1, O, 3]
            return [Pairwise(a.new_ones(n, 1, 1), g * a.unsqueeze(2))]

        def per_example_gradients(self, terms):
            return {self.names["weight"]: terms[0].g.sum(dim=(1, 2))}

        def term_shapes(self):
            return [TermShape("linear", 1, 1, 3, ("gradient",))]

    try:
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(2, 3), Scale(), nn.Tanh(), nn.Linear(3, 2)).double()
        assert rule_for(model[1]) is ScaleRule
        x = torch.randn(5, 2, dtype=torch.float64)
        plan = _plan(model, x)
        assert _rules_by_params(plan)[("1.weight",)] == "ScaleRule"
        torch.testing.assert_close(lazykernel.ntk(model, x, output="full"),
                                   _kernel_by_explicit_jacobians(model, x), rtol=1e-10, atol=1e-12)
    finally:
        from lazykernel import rules
        rules._RULES.pop(Scale, None)
    assert rule_for(nn.Linear(1, 1)) is LinearRule


@pytest.mark.parametrize("output", ["trace", "full"])
def test_bias_only_and_weight_only_selection(output):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for chosen in (["0.bias", "2.bias"], ["0.weight"]):
        frozen = copy.deepcopy(model)
        for name, p in frozen.named_parameters():
            p.requires_grad_(name in chosen)
        expected = _kernel_by_explicit_jacobians(frozen, x, output)
        got = lazykernel.ntk(model, x, output=output, params=chosen)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chosen", [None, ["0.weight"], ["0.bias"]])
def test_linear_directional_matches_its_per_example_gradients(chosen):
    # LinearRule contracts g with V a instead of forming gradients; the base
    # class contracts per_example_gradients. Both must give the same numbers.
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    plan = StructuredPlan.build(make_adapter(model, chosen))
    rule = plan.rules[0]
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    _, per_rule = plan._capture(x)
    terms = rule.operands(per_rule[0], 5, None)
    direction = {name: torch.randn_like(dict(model.named_parameters())[name])
                 for name in rule.names.values()}
    fast = rule.directional(terms, 5, direction)
    slow = StructuredRule.directional(rule, terms, 5, direction)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


class _RadialBasis(nn.Module):
    """Distances to learnable centres (torch.cdist), whose batched backward torch 2.13's vmap gets wrong."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.centres = nn.Parameter(torch.randn(5, 4))
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.exp(-torch.cdist(self.embed(x), self.centres) ** 2))


@pytest.mark.parametrize("method", ["structured", "jacobian", "ntvp"])
def test_a_model_whose_batched_backward_pytorch_gets_wrong_is_exact(method):
    torch.manual_seed(9)
    model = _RadialBasis().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    got = lazykernel.ntk(model, x, output="full", method=method)
    torch.testing.assert_close(got, reference_ntk(model, x, output="full"), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "jacobian", "ntvp"])
def test_a_float32_model_whose_batched_backward_pytorch_gets_wrong_is_exact(method):
    # cdist has no forward-mode AD, so ntvp takes per-example Jacobians; their
    # error (~20 % of some entries) stayed within the float32 round-off bound
    # of the products check, and the kernel came out 2 % off.
    torch.manual_seed(2)
    model = _RadialBasis()
    model.embed = nn.Identity()
    model.centres = nn.Parameter(torch.randn(5, 3))
    x = torch.randn(4, 3)
    got = lazykernel.ntk(model, x, method=method)
    expected = reference_ntk(model, x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_a_wrong_batched_backward_is_found_and_replaced_by_one_per_output(monkeypatch):
    real = _structured._output_cotangents

    def wrong_when_batched(f, targets, per_output=False, examples_first=None, **options):
        got = real(f, targets, per_output, examples_first, **options)
        return got if per_output or f.shape[1] == 1 else [1.5 * g for g in got]

    monkeypatch.setattr(_structured, "_output_cotangents", wrong_when_batched)
    torch.manual_seed(10)
    # a LayerNorm: no layer chain takes the backward, autograd's batched one does
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    plan = _plan(model, x)
    assert plan.batched_is_wrong and plan.per_output_backward(1)
    got = lazykernel.ntk(model, x, output="full", method="structured")
    torch.testing.assert_close(got, reference_ntk(model, x, output="full"), rtol=1e-10, atol=1e-12)


def _scaled(result):
    """1.5 × every tensor of a vmap result (a tensor, or dicts and tuples of them)."""
    if isinstance(result, dict):
        return {name: _scaled(value) for name, value in result.items()}
    if isinstance(result, tuple):
        return tuple(_scaled(value) for value in result)
    return 1.5 * result


@pytest.mark.parametrize("method", ["structured", "jacobian", "ntvp"])
def test_wrong_per_example_jacobians_are_found_and_taken_by_backward(method, monkeypatch):
    from lazykernel import _jacobian

    real = _jacobian.vmap
    monkeypatch.setattr(_jacobian, "vmap", lambda fn, **kw: (lambda *a: _scaled(real(fn, **kw)(*a))))
    # tied weights: the generic group of the structured method
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    got = lazykernel.ntk(model, x, output="full", method=method)
    torch.testing.assert_close(got, reference_ntk(model, x, output="full"), rtol=1e-10, atol=1e-12)


class _Routed(nn.Module):
    """Each example goes through one of two experts, by the sign of its first feature."""

    def __init__(self, guarded):
        super().__init__()
        self.guarded = guarded
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        mask = x[:, 0] > 0
        h = x.new_zeros(x.shape[0], 3)
        for expert, rows in ((self.a, mask), (self.b, ~mask)):
            if rows.any() or not self.guarded:
                h = h.index_put((rows.nonzero()[:, 0],), expert(x[rows]))
        return self.out(torch.tanh(h))


def routed_inputs(probe_expert_only: bool) -> torch.Tensor:
    """8 examples; with ``probe_expert_only`` the checked ones (rows 4, 0, 7) all take expert a,
    the others b; otherwise they alternate."""
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    takes_a = torch.tensor([i in (0, 4, 7) for i in range(8)]) if probe_expert_only \
        else torch.arange(8) % 2 == 0
    x[:, 0] = torch.where(takes_a, x[:, 0].abs() + 0.1, -x[:, 0].abs() - 0.1)
    return x


@pytest.mark.parametrize("guarded", [False, True])
def test_a_model_routing_examples_the_probe_does_not_show_is_exact(guarded):
    # the checked examples all take expert a: b is never (or emptily) called there,
    # and a sees every row of the probe but a part of the batch
    torch.manual_seed(21)
    model = _Routed(guarded).double().eval()
    x = routed_inputs(probe_expert_only=True)
    with pytest.warns(UserWarning, match="method='jacobian'"):
        got = lazykernel.ntk(model, x, output="full")
    torch.testing.assert_close(got, reference_ntk(model, x, output="full"), rtol=1e-10, atol=1e-12)
    # where the probe shows both experts, the rules of the routed layers are demoted
    x = routed_inputs(probe_expert_only=False)
    got = lazykernel.ntk(model, x, output="full")
    torch.testing.assert_close(got, reference_ntk(model, x, output="full"), rtol=1e-10, atol=1e-12)


class _SortedBatch(nn.Module):
    """Applies a layer to the examples sorted by their first feature, then restores the order."""

    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        order = x[:, 0].argsort()
        h = torch.tanh(self.inner(x[order]))
        return self.out(h[order.argsort()])


@pytest.mark.parametrize("seed", range(4))
def test_a_layer_that_sees_the_batch_sorted_is_found_by_the_check(seed):
    # examples checked in an order the layer's sort keeps see no reordering
    torch.manual_seed(23)
    model = _SortedBatch().double().eval()
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rows = [0, 1, 2, 4, 8]                            # the first, the middle and the last examples
    x[rows] = x[rows][x[rows, 0].argsort()]           # in the layer's order
    assert not torch.equal(x[:, 0].argsort(), torch.arange(9))
    got = lazykernel.ntk(model, x, output="full")
    torch.testing.assert_close(got, reference_ntk(model, x, output="full"), rtol=1e-10, atol=1e-12)


# -- perceptrons whose rules hold by construction ---------------------------------------

def _exact(model, x):
    from lazykernel._chain import exact_by_construction
    return exact_by_construction(model, x)


class _SubLinear(nn.Linear):
    pass


def test_plain_perceptrons_are_exact_by_construction():
    x = torch.randn(4, 6)
    assert _exact(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)), x)
    assert _exact(nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(6, 5), nn.GELU()), nn.Dropout(0.5).eval(),
                                nn.Identity(), nn.Linear(5, 1)), x)
    # a Linear over positions: [N, T, d]
    assert _exact(nn.Sequential(nn.Linear(6, 3), nn.Tanh()), torch.randn(4, 7, 6))


@pytest.mark.parametrize("case", ["subclass", "inplace", "hook", "parametrized", "listed_twice", "unknown_leaf",
                                  "flatten_batch", "dropout_training", "container", "one_axis", "integer",
                                  "bias_is_weight", "stale_in_features", "bias_per_row", "extra_parameter"])
def test_anything_else_is_not_exact_by_construction(case):
    x = torch.randn(4, 6)
    layers = [nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)]
    if case == "subclass":
        layers[0] = _SubLinear(6, 6)
    elif case == "inplace":
        layers[1] = nn.ReLU(inplace=True)
    elif case == "hook":
        layers[1].register_forward_hook(lambda m, a, y: y * 2)
    elif case == "parametrized":
        torch.nn.utils.parametrizations.weight_norm(layers[0])
    elif case == "listed_twice":
        layers.insert(2, layers[0])
    elif case == "unknown_leaf":
        layers.insert(1, nn.LayerNorm(6))
    elif case == "flatten_batch":
        layers.insert(0, nn.Flatten(0, 1))
    elif case == "dropout_training":
        layers.insert(1, nn.Dropout(0.5))
    elif case == "one_axis":
        x = torch.randn(6)
    elif case == "integer":
        x = torch.arange(24).reshape(4, 6)
    elif case == "bias_is_weight":
        layers[0] = nn.Linear(1, 1)
        layers[0].bias = layers[0].weight
        layers[2] = nn.Linear(1, 2)
        x = torch.randn(4, 1)
    elif case == "stale_in_features":
        layers[0].in_features = 3
    elif case == "bias_per_row":
        layers[0].bias = nn.Parameter(torch.randn(4, 6))
    elif case == "extra_parameter":
        layers[0].scale = nn.Parameter(torch.ones(()))
    model = nn.Sequential(*layers)
    if case == "container":
        model = nn.ModuleList(layers)
    assert not _exact(model, x)


def test_exact_perceptrons_skip_the_probe_checks_and_stay_exact(monkeypatch):
    """The rule check and the examples-alone check run for every model but a plain perceptron."""
    ntk_module = importlib.import_module("lazykernel.ntk")
    calls = {"rules": 0, "alone": 0}
    agrees, alone = _structured._agrees_along_random_direction, ntk_module._check_independent

    def counting_agrees(*args, **kwargs):
        calls["rules"] += 1
        return agrees(*args, **kwargs)

    def counting_alone(*args, **kwargs):
        calls["alone"] += 1
        return alone(*args, **kwargs)

    monkeypatch.setattr(_structured, "_agrees_along_random_direction", counting_agrees)
    monkeypatch.setattr(ntk_module, "_check_independent", counting_alone)
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)
    plain = nn.Sequential(nn.Linear(5, 8), nn.SiLU(), nn.Flatten(), nn.Linear(8, 3)).double()
    got = lazykernel.ntk(plain, x, output="full", method="structured")
    assert calls == {"rules": 0, "alone": 0}
    assert torch.allclose(got, _kernel_by_explicit_jacobians(plain, x), rtol=1e-10, atol=1e-12)
    subclassed = nn.Sequential(_SubLinear(5, 8), nn.SiLU(), nn.Linear(8, 3)).double()
    got = lazykernel.ntk(subclassed, x, output="full", method="structured")
    assert calls["rules"] >= 1 and calls["alone"] >= 1
    assert torch.allclose(got, _kernel_by_explicit_jacobians(subclassed, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["bias_is_weight", "stale_in_features"])
def test_a_linear_whose_tensors_differ_from_its_declaration_stays_checked(case):
    """A Linear whose bias is its weight, or whose in_features is stale after surgery,
    is not what its rule assumes: the rule check must see it (exact kernel or an error)."""
    torch.manual_seed(0)
    if case == "bias_is_weight":
        first = nn.Linear(1, 1)
        first.bias = first.weight
        model, x = nn.Sequential(first, nn.Tanh(), nn.Linear(1, 3)).double(), torch.randn(6, 1, dtype=torch.float64)
    else:
        first = nn.Linear(4, 3)
        first.in_features = 2
        model, x = nn.Sequential(first, nn.Tanh(), nn.Linear(3, 2)).double(), torch.randn(6, 4, dtype=torch.float64)
    try:
        got = lazykernel.ntk(model, x, output="full", method="structured")
    except (RuntimeError, ValueError):
        return
    assert torch.allclose(got, _kernel_by_explicit_jacobians(model, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_zero_width_linear_layers_give_their_bias_term(method):
    """A Linear with no inputs (or no outputs) still has a bias (or a downstream) term."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 0), nn.Tanh(), nn.Linear(0, 2), nn.Tanh(), nn.Linear(2, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([0.3, -0.7], dtype=torch.float64))
    got = lazykernel.ntk(model, x, output="full", method=method)
    assert torch.allclose(got, _kernel_by_explicit_jacobians(model, x), rtol=1e-10, atol=1e-12)


class _NormalizedConv(nn.Module):
    """A weight-normalized Conv1d and Linear head (both spellings of weight norm)."""

    def __init__(self, style):
        super().__init__()
        conv, head = nn.Conv1d(1, 2, 3, padding=1), nn.Linear(8, 3)
        if style == "parametrization":
            self.conv = torch.nn.utils.parametrizations.weight_norm(conv)
            self.head = torch.nn.utils.parametrizations.weight_norm(head)
        else:
            self.conv = torch.nn.utils.weight_norm(conv)
            self.head = torch.nn.utils.weight_norm(head)

    def forward(self, x):
        return self.head(self.conv(x.unsqueeze(1)).flatten(1))


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm is deprecated")
@pytest.mark.parametrize("style", ["parametrization", "hook"])
@pytest.mark.parametrize("method", ["auto", "structured"])
def test_weight_norm_parameters_are_never_handed_to_the_model_expanded(style, method):
    # torch._weight_norm does not check shapes: the batch-expanded copy of the
    # broadcast-parameter rule corrupted the heap (the process aborted).
    torch.manual_seed(11)
    model = _NormalizedConv(style).double().eval()
    x = torch.randn(4, 4, dtype=torch.float64)
    got = lazykernel.ntk(model, x, output="full", method=method)
    # the old weight_norm's module cannot be deep-copied, as reference_ntk does
    jac = _explicit_jacobian(model, x, list(model.parameters()))
    torch.testing.assert_close(got, torch.einsum("iap,jbp->ijab", jac, jac), rtol=1e-10, atol=1e-12)
    taps = [rule for rule in _plan(model, x).rules if type(rule).__name__ == "BroadcastParameterRule"]
    assert taps == []
