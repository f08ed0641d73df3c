"""The structured plan's checks against autograd, and the generic per-example Jacobians:
models that a check on a few probe examples could take for something they are not."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lazykernel
from conftest import assert_close_to_reference, reference_ntk
from lazykernel._jacobian import forward_mode_works
from lazykernel._model import make_adapter
from lazykernel._structured import StructuredPlan, _close, jacobians_agree


def _rule_of(plan_report, param):
    return {group.rule for group in plan_report.groups if param in group.params}


# -- parameters used outside their layer's call ---------------------------------------------

class _SecondPassOnLargeInputs(nn.Module):
    """Examples with a feature beyond 2 take a second pass through the first layer's weight,
    selected by ``torch.where``: on the other examples that use has no derivative."""

    def __init__(self):
        super().__init__()
        self.first, self.norm, self.out = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.first(x)
        large = x.abs().amax(1, keepdim=True) > 2
        h = h + torch.where(large, F.linear(x, self.first.weight), torch.zeros_like(h))
        return self.out(torch.tanh(self.norm(h)))


def test_a_weight_used_outside_its_layer_only_on_examples_the_probe_lacks_goes_to_the_generic_rule():
    # the probe examples (rows 4, 0, 8) are all small: there the second use adds nothing
    # to any gradient, so no comparison of values can see it; the rows 1, 3, 6 take it
    torch.manual_seed(0)
    model = _SecondPassOnLargeInputs().double()
    x = torch.randn(9, 4, dtype=torch.float64).clamp(-1.9, 1.9)
    x[[1, 3, 6], 0] = 3.0
    report = lazykernel.plan(model, x, method="structured")
    assert _rule_of(report, "first.weight") == {"PerExampleJacobian"}, str(report)
    assert _rule_of(report, "out.weight") == {"LinearRule"}, str(report)
    got = lazykernel.ntk(model, x, output="full", method="structured")
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float64)


class _SecondPassInABranch(_SecondPassOnLargeInputs):
    """As `_SecondPassOnLargeInputs`, with the second pass in a Python branch that only batches
    holding a large example take."""

    def forward(self, x):
        h = self.first(x)
        large = x.abs().amax(1) > 2
        if large.any():
            h = h.index_add(0, large.nonzero()[:, 0], F.linear(x[large], self.first.weight))
        return self.out(torch.tanh(self.norm(h)))


def test_a_weight_used_outside_its_layer_in_a_branch_the_probe_skips_sends_the_call_to_jacobian():
    # no check on the probe examples can see a branch they do not take: the kernel was
    # 35 % off; the chunk that takes it now shows the use
    torch.manual_seed(0)
    model = _SecondPassInABranch().double()
    x = torch.randn(9, 4, dtype=torch.float64).clamp(-1.9, 1.9)
    x[[1, 3, 6], 0] = 3.0
    with pytest.warns(UserWarning, match=r"Linear \(first.bias, first.weight\) were used outside its call.*"
                                         r"method='jacobian'"):
        got = lazykernel.ntk(model, x, output="full", method="structured")
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float64)


class _PaddingRowAsMaskToken(nn.Module):
    """Token ids ``[N, T]``; the positions of id 0 read the padding row itself, as a learned mask
    token, outside the lookup (which gives that row no gradient)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4, padding_idx=0)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.embed.weight[0].normal_()

    def forward(self, ids):
        h = torch.where((ids == 0).unsqueeze(-1), self.embed.weight[0], self.embed(ids))
        return self.head(torch.tanh(h)).mean(1)


def test_the_padding_row_of_an_embedding_used_outside_the_lookup_counts():
    torch.manual_seed(1)
    model = _PaddingRowAsMaskToken().double()
    ids = torch.randint(1, 10, (6, 5))
    ids[:, 1] = 0
    report = lazykernel.plan(model, ids, method="structured")
    assert _rule_of(report, "embed.weight") == {"PerExampleJacobian"}, str(report)
    got = lazykernel.ntk(model, ids, output="full", method="structured")
    assert_close_to_reference(got, reference_ntk(model, ids, output="full"), torch.float64)


# -- an error that the sum over rules and outputs dilutes ----------------------------------

class _ImageWithSortedScore(nn.Module):
    """``1 + P`` outputs: a score from a layer that sees the batch sorted by the first feature
    (the order restored afterwards), then P pixels that share a brightness term."""

    def __init__(self, pixels):
        super().__init__()
        self.trunk, self.score = nn.Linear(6, 16), nn.Linear(16, 1)
        self.pixels, self.brightness = nn.Linear(16, pixels), nn.Linear(16, 1)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        order = x[:, 0].argsort()
        score = self.score(h[order])[order.argsort()]
        return torch.cat([score, self.pixels(h) + self.brightness(h)], 1)


def _kernel_of_first_output(model, x):
    """Float64 ``Θ_00`` ``[N, N]`` from explicit per-example gradients of output 0."""
    double = copy.deepcopy(model).double()
    params = list(double.parameters())
    with torch.enable_grad():
        first = double(x.double())[:, 0]
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(first[i], params, retain_graph=True)])
                for i in range(x.shape[0])]
    jac = torch.stack(rows)
    return jac @ jac.T


@pytest.mark.parametrize("seed", range(3))
def test_a_wrong_rule_of_one_output_among_many_that_move_together_is_found(seed):
    # the score's rule reads the sorted rows as the examples' own; in the probe's sum over
    # all rules and 513 outputs its error was below a thousandth of the whole
    torch.manual_seed(seed)
    model = _ImageWithSortedScore(512)
    x = torch.randn(6, 6)
    report = lazykernel.plan(model, x, method="structured")
    assert _rule_of(report, "score.weight") == {"PerExampleJacobian"}, str(report)
    got = lazykernel.ntk(model, x, output="diagonal", method="structured")
    assert got.shape == (6, 6, 513)
    expected = _kernel_of_first_output(model, x)
    torch.testing.assert_close(got[..., 0].double(), expected, rtol=0,
                               atol=1e-4 * expected.abs().max().item())


class _ScoreFromSortedTrunk(nn.Module):
    """``1 + P`` outputs: the trunk is applied twice, the second time to the batch sorted by the
    first feature (the order restored afterwards) for the score alone; P pixels that share a
    brightness read the first call."""

    def __init__(self, pixels):
        super().__init__()
        self.trunk, self.score = nn.Linear(6, 16), nn.Linear(16, 1)
        self.pixels, self.brightness = nn.Linear(16, pixels), nn.Linear(16, 1)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        order = x[:, 0].argsort()
        sorted_h = torch.tanh(self.trunk(x[order]))[order.argsort()]
        return torch.cat([self.score(sorted_h), self.pixels(h) + self.brightness(h)], 1)


@pytest.mark.parametrize("seed", range(3))
def test_an_error_of_one_rule_on_one_output_among_many_that_move_together_is_found(seed):
    # the trunk's rule is wrong for the score only; weighted all of one sign, the 512
    # pixels' share of its check added up to hide that (the score's kernel 10-20 % off)
    torch.manual_seed(seed)
    model = _ScoreFromSortedTrunk(512)
    x = torch.randn(6, 6)
    report = lazykernel.plan(model, x, method="structured")
    assert _rule_of(report, "trunk.weight") == {"PerExampleJacobian"}, str(report)
    got = lazykernel.ntk(model, x, output="diagonal", method="structured")
    expected = _kernel_of_first_output(model, x)
    torch.testing.assert_close(got[..., 0].double(), expected, rtol=0,
                               atol=1e-4 * expected.abs().max().item())


# -- the per-example Jacobians of parameters demoted by the check ------------------------

class _DistancesToWeightRows(nn.Module):
    """Distances (``torch.cdist``, whose per-example Jacobians torch's vmap gets wrong for a
    few centres) to the rows of a Linear's weight, which is also applied as a layer."""

    def __init__(self):
        super().__init__()
        self.embed, self.proto, self.head = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(10, 2)

    def forward(self, x):
        h = self.embed(x)
        near = torch.exp(-torch.cdist(h, self.proto.weight) ** 2)
        return self.head(torch.cat([torch.tanh(self.proto(h)), near], 1))


def test_parameters_the_check_demotes_get_per_example_jacobians_that_are_checked_too():
    # nothing is in the generic group until the check demotes proto: its Jacobians then
    # came from vmap unchecked, 9 % off
    torch.manual_seed(9)
    model = _DistancesToWeightRows().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    plan = StructuredPlan.build(make_adapter(model, None))
    plan.verify(x[:4], rows=6)
    assert plan.generic == ["proto.weight", "proto.bias"] and plan.generic_by_loop
    got = lazykernel.ntk(model, x, output="full", method="structured")
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float64)


# -- comparisons at the edges of a dtype's range -----------------------------------------

@pytest.mark.parametrize("dtype, magnitude", [
    (torch.float32, 1e20), (torch.float32, 1e-25), (torch.float16, 1e4), (torch.bfloat16, 1e30),
    (torch.float64, 1e160), (torch.float64, 1e-170), (torch.float32, 1.0),
])
def test_closeness_is_judged_at_any_scale(dtype, magnitude):
    # norms that overflowed to inf or underflowed to 0 let any two tensors pass
    want = (torch.linspace(-1, 1, 1000, dtype=torch.float64) * magnitude).to(dtype)
    assert not _close(2 * want, want, 1e-4)
    assert not _close(torch.zeros_like(want), want, 1e-4)
    assert _close(want, want.clone(), 1e-4)
    nearly = want * (1 + 1e-10) if dtype == torch.float64 else (want.double() * (1 + 1e-5)).to(dtype)
    assert _close(nearly, want, 1e-9 if dtype == torch.float64 else 1e-4)


def test_closeness_refuses_values_that_are_not_finite():
    want = torch.ones(4)
    assert not _close(torch.tensor([1.0, float("nan"), 1.0, 1.0]), want, 1e-4)
    assert not _close(torch.tensor([1.0, float("inf"), 1.0, 1.0]), want, 1e-4)
    assert _close(torch.zeros(0), torch.zeros(0), 1e-4) and _close(torch.zeros(3), torch.zeros(3), 1e-4)


# -- forward mode in half precision ---------------------------------------------------------

class _AddsFrozenCopy(nn.Module):
    """Adds to its first weight a copy taken under ``torch.no_grad``: reverse mode sees one use of
    the weight, forward mode two."""

    def __init__(self, width):
        super().__init__()
        self.first, self.out = nn.Linear(8, width), nn.Linear(width, 3)

    def forward(self, x):
        with torch.no_grad():
            frozen = self.first.weight.clone()
        return self.out(torch.tanh(F.linear(x, self.first.weight + frozen, self.first.bias)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_mode_that_differs_from_reverse_mode_is_found_in_half_precision(dtype):
    # the difference was 7e-4 of the products' Cauchy-Schwarz bound, within the 1e-2 allowed
    torch.manual_seed(0)
    for width in (16, 128):
        model = _AddsFrozenCopy(width).to(dtype)
        x = torch.randn(4, 8).to(dtype)
        adapter = make_adapter(model, None)
        assert not forward_mode_works(adapter, adapter.detached_params(), x)
        assert adapter.forward_mode_agrees is False


def test_ntvp_of_a_half_precision_model_with_a_frozen_copy_follows_reverse_mode():
    # the kernel was 20 % off: the products took the frozen copy's forward-mode term
    torch.manual_seed(0)
    model = _AddsFrozenCopy(16).half()
    x = torch.randn(6, 8).half()
    got = lazykernel.ntk(model, x, output="full", method="ntvp")
    expected = reference_ntk(model, x, output="full")
    assert got.dtype == torch.float16 and got.shape == (6, 6, 3, 3)
    assert float((got.double() - expected).abs().max() / expected.abs().max()) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_that_agree_keep_forward_mode(dtype):
    # round-off alone must not send these to the slower reverse-mode products
    torch.manual_seed(2)
    deep = nn.Sequential(*[layer for _ in range(8) for layer in (nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU())],
                         nn.Linear(64, 4))
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 5)).eval()
    for model, x in ((deep, torch.randn(4, 64)), (cnn, torch.randn(4, 3, 6, 6))):
        model, x = model.to(dtype), x.to(dtype)
        adapter = make_adapter(model, None)
        assert forward_mode_works(adapter, adapter.detached_params(), x)


# -- the rule check in half precision -------------------------------------------------------

class _SmallTransformer(nn.Module):
    """Token ids ``[N, 6]``: embedding with padding, learned positions, two encoder layers, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 6, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids) + self.pos).mean(1))


def _relative_error(got, expected):
    return float((got.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_models_keep_their_rules_within_their_round_off(dtype, bound):
    # bfloat16 round-off moves a rule's check by up to 1.5 % of its value, beyond the 1e-3
    # the check allowed: every parameter of this transformer went to the generic rule
    torch.manual_seed(3)
    model = _SmallTransformer().eval().to(dtype)
    ids = torch.randint(0, 20, (5, 6))
    report = lazykernel.plan(model, ids, method="structured")
    assert "PerExampleJacobian" not in {group.rule for group in report.groups}, str(report)
    got = lazykernel.ntk(model, ids, output="full", method="structured")
    assert got.dtype == dtype and got.shape == (5, 5, 3, 3)
    assert _relative_error(got, reference_ntk(model, ids, output="full")) < bound


class _ReversedInner(nn.Module):
    """A residual layer applied to the batch in reverse order, the order restored afterwards."""

    def __init__(self, width):
        super().__init__()
        self.first, self.norm = nn.Linear(8, width), nn.LayerNorm(width)
        self.inner, self.out = nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.first(x)))
        return self.out(h + torch.tanh(self.inner(h.flip(0))).flip(0))


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float32, 1e-5)])
def test_a_layer_that_reads_another_examples_rows_is_found_in_every_dtype(dtype, bound):
    # the round-off half precision is allowed must not cover a rule ~10 % wrong
    torch.manual_seed(0)
    model = _ReversedInner(256).to(dtype)
    x = torch.randn(7, 8).to(dtype)
    report = lazykernel.plan(model, x, method="structured")
    assert _rule_of(report, "inner.weight") == {"PerExampleJacobian"}, str(report)
    assert _rule_of(report, "out.weight") == {"LinearRule"}, str(report)
    got = lazykernel.ntk(model, x, output="full", method="structured")
    assert _relative_error(got, reference_ntk(model, x, output="full")) < bound


# -- the check of torch.func's per-example Jacobians --------------------------------------

class _TiedLanguageModel(nn.Module):
    """Token ids ``[N, T]``, an Embedding with padding whose table is also the output layer's weight."""

    def __init__(self, vocab=12):
        super().__init__()
        self.embed, self.mix = nn.Embedding(vocab, 8, padding_idx=0), nn.Linear(8, 8)
        self.out = nn.Linear(8, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.embed(ids))).mean(1))


def test_jacobians_of_an_embedding_with_padding_keep_torch_func():
    # forward mode reads the padding row, which reverse mode (the Jacobians, the kernel)
    # gives no gradient: the check took every tied embedding, and any model with padding
    # under method="jacobian", for one that vmap gets wrong, and looped over its outputs
    torch.manual_seed(0)
    model = _TiedLanguageModel().double()
    ids = torch.randint(0, 12, (4, 5))
    ids[:, 0] = 0
    adapter = make_adapter(model, None)
    assert jacobians_agree(adapter, list(adapter.params), ids)
    plan = StructuredPlan.build(adapter)
    plan.verify(ids)
    assert plan.generic == ["embed.weight"] and not plan.generic_by_loop
    for method in ("structured", "jacobian"):
        got = lazykernel.ntk(model, ids, output="full", method=method)
        assert_close_to_reference(got, reference_ntk(model, ids, output="full"), torch.float64)


def test_jacobians_that_vmap_gets_wrong_are_still_found():
    # the reverse-mode reference must still tell torch.cdist's wrong per-example Jacobians
    torch.manual_seed(9)
    model = _DistancesToWeightRows().double()
    adapter = make_adapter(model, None)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert not jacobians_agree(adapter, ["proto.weight"], x)
    assert jacobians_agree(adapter, ["proto.bias", "head.weight"], x)
