"""Rules for Conv3d, RMSNorm and InstanceNorm: each against explicit float64 Jacobians.

Each model is built so that the layer under test takes its own rule (the plan
names it) and the kernel matches the reference in every output mode.
"""

import pytest
import torch
from torch import nn

import lazykernel
from conftest import assert_close_to_reference, reference_ntk

OUTPUTS = ("trace", "diagonal", "full")


def _rules_of(model, x, layer):
    """The rule name of each plan group holding one of ``layer``'s parameters."""
    names = {name for name, p in model.named_parameters() if any(p is q for q in layer.parameters())}
    return {group.rule for group in lazykernel.plan(model, x).groups if names & set(group.params)}


def _conv3d_model(**options):
    conv = nn.Conv3d(4, 6, **options)
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)), conv


@pytest.mark.parametrize("options", [
    dict(kernel_size=3),
    dict(kernel_size=(2, 3, 1), stride=(2, 1, 2), padding=(1, 0, 1), bias=False),
    dict(kernel_size=2, dilation=(1, 2, 1), groups=2, padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=3, padding=1, padding_mode="replicate", groups=2),
])
@pytest.mark.parametrize("output", OUTPUTS)
def test_conv3d_rule_matches_the_reference(options, output):
    torch.manual_seed(0)
    model, conv = _conv3d_model(**options)
    x1, x2 = torch.randn(5, 4, 5, 4, 6), torch.randn(3, 4, 5, 4, 6)
    model(x1)  # materialise the lazy head
    assert _rules_of(model, x1, conv) == {"Conv3dRule"}
    for method in ("structured", "auto"):
        got = lazykernel.ntk(model, x1, x2, output=output, method=method)
        assert_close_to_reference(got, reference_ntk(model, x1, x2, output=output), torch.float32)


@pytest.mark.parametrize("shape, eps", [(8, None), ((3, 8), 1e-3)])
@pytest.mark.parametrize("output", OUTPUTS)
def test_rmsnorm_rule_matches_the_reference(shape, eps, output):
    torch.manual_seed(1)
    norm = nn.RMSNorm(shape, eps=eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Linear(8, 8), norm, nn.GELU(), nn.Flatten(), nn.LazyLinear(2))
    x1, x2 = torch.randn(6, 3, 8), torch.randn(4, 3, 8)
    model(x1)
    assert _rules_of(model, x1, norm) == {"RMSNormRule"}
    got = lazykernel.ntk(model, x1, x2, output=output)
    assert_close_to_reference(got, reference_ntk(model, x1, x2, output=output), torch.float32)


def test_rmsnorm_of_float64_uses_its_dtypes_epsilon():
    # eps=None means torch.finfo(dtype).eps: with inputs near zero the two dtypes' eps differ a lot
    torch.manual_seed(2)
    norm = nn.RMSNorm(4).double()
    model = nn.Sequential(norm, nn.Linear(4, 1)).double()
    x = 1e-9 * torch.randn(5, 4, dtype=torch.float64)
    got = lazykernel.ntk(model, x, method="structured")
    torch.testing.assert_close(got, reference_ntk(model, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, spatial", [(nn.InstanceNorm1d, (7,)), (nn.InstanceNorm2d, (4, 5)),
                                           (nn.InstanceNorm3d, (3, 3, 4))])
@pytest.mark.parametrize("running, training", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("output", ("trace", "full"))
def test_instance_norm_rule_matches_the_reference(kind, spatial, running, training, output):
    torch.manual_seed(3)
    norm = kind(4, affine=True, track_running_stats=running)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        if running:
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(norm, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x1, x2 = torch.randn((5, 4) + spatial), torch.randn((2, 4) + spatial)
    model(x1)
    model.train(training)
    assert _rules_of(model, x1, norm) == {type(norm).__name__ + "Rule"}
    got = lazykernel.ntk(model, x1, x2, output=output)
    want = reference_ntk(model, x1, x2, output=output)
    assert_close_to_reference(got, want, torch.float32)


def test_instance_norm_in_training_mode_keeps_its_running_statistics():
    # in training mode its forward would update them: the kernel must leave the model as it was
    torch.manual_seed(4)
    norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 2, 6, 6)
    got = lazykernel.ntk(model, x, output="full")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float32)


def _transpose_model(cls, channels, **options):
    conv = cls(*channels, **options)
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double(), conv


@pytest.mark.parametrize("cls, spatial, options", [
    (nn.ConvTranspose1d, (7,), dict(kernel_size=3)),
    (nn.ConvTranspose1d, (6,), dict(kernel_size=4, stride=3, padding=2, dilation=2, output_padding=1, groups=2)),
    (nn.ConvTranspose2d, (4, 5), dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    (nn.ConvTranspose2d, (4, 3), dict(kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2), groups=2, bias=False)),
    (nn.ConvTranspose2d, (3, 3), dict(kernel_size=2, stride=3, padding=2, dilation=3, output_padding=2)),
    (nn.ConvTranspose3d, (3, 2, 3), dict(kernel_size=2, stride=(1, 2, 2), padding=(0, 1, 0))),
])
@pytest.mark.parametrize("output", OUTPUTS)
def test_transposed_convolution_rule_matches_the_reference(cls, spatial, options, output):
    torch.manual_seed(5)
    model, conv = _transpose_model(cls, (4, 6), **options)
    x1 = torch.randn((5, 4) + spatial, dtype=torch.float64)
    x2 = torch.randn((3, 4) + spatial, dtype=torch.float64)
    model(x1)
    assert _rules_of(model, x1, conv) == {cls.__name__ + "Rule"}
    want = reference_ntk(model, x1, x2, output=output)
    for method in ("structured", "auto"):
        got = lazykernel.ntk(model, x1, x2, output=output, method=method)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("select", [["0.weight"], ["0.bias"], ["0.weight", "2.bias"]])
def test_transposed_convolution_with_some_parameters_selected(select):
    torch.manual_seed(6)
    conv = nn.ConvTranspose2d(3, 4, 3, stride=2)
    model = nn.Sequential(conv, nn.GELU(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    model(x)
    got = lazykernel.ntk(model, x, output="full", params=select)
    want = reference_ntk(model, x, output="full", params_selection=select)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())
    assert _rules_of(model, x, conv) <= {"ConvTranspose2dRule"}


class _Upsampler(nn.Module):
    """One transposed convolution called twice (on two scales) and with ``output_size``."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * 7 * 7 + 2 * 9 * 9, 3)

    def forward(self, x):
        small = self.up(x, output_size=[7, 7])               # output_padding 0 by the size asked
        large = self.up(torch.tanh(small)[:, :, :5, :5], output_size=[10, 10])[:, :, :9, :9]
        return self.head(torch.cat([small.flatten(1), large.flatten(1)], 1))


def test_transposed_convolution_called_twice_with_output_size():
    torch.manual_seed(7)
    model = _Upsampler().double()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    assert _rules_of(model, x, model.up) == {"ConvTranspose2dRule"}
    got = lazykernel.ntk(model, x, output="diagonal")
    want = reference_ntk(model, x, output="diagonal")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


class _Unbatched(nn.Module):
    """Applies its transposed convolution to each example alone, ``[C, L]`` at a time."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(2, 3, 3, stride=2)
        self.head = nn.Linear(3 * 9, 2)

    def forward(self, x):
        return self.head(torch.stack([self.up(row) for row in x]).flatten(1))


def test_transposed_convolution_on_unbatched_calls_goes_to_the_generic_rule():
    torch.manual_seed(8)
    model = _Unbatched().double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert _rules_of(model, x, model.up) == {"PerExampleJacobian"}
    got = lazykernel.ntk(model, x, output="full")
    torch.testing.assert_close(got, reference_ntk(model, x, output="full"), rtol=1e-10, atol=1e-12)


class _SequenceFirst(nn.Module):
    """Token ids ``[N, T]`` through nn.TransformerEncoderLayer's default sequence-first layout."""

    def __init__(self, width=8, norm_first=False, rms=False):
        super().__init__()
        self.tokens = nn.Embedding(20, width)
        self.layer = nn.TransformerEncoderLayer(width, 2, 12, dropout=0.0, norm_first=norm_first)
        self.norm = nn.RMSNorm(width) if rms else nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, ids):
        h = self.layer(self.tokens(ids).transpose(0, 1))          # [T, N, E]
        return self.head(self.norm(h).mean(dim=0))


@pytest.mark.parametrize("norm_first, rms", [(False, False), (True, True)])
@pytest.mark.parametrize("n, length, batch_size", [(6, 5, None), (5, 5, None), (7, 3, 3)])
@pytest.mark.parametrize("output", ("trace", "full"))
def test_sequence_first_layers_take_their_rules(norm_first, rms, n, length, batch_size, output):
    # the examples sit on axis 1 of the feed-forward layers' and norms' inputs; with
    # n == T (and chunks of T examples) axis 0 has the examples' size too
    torch.manual_seed(9)
    model = _SequenceFirst(norm_first=norm_first, rms=rms).double().eval()
    ids = torch.randint(0, 20, (n, length))
    rules = {group.rule for group in lazykernel.plan(model, ids).groups}
    assert "PerExampleJacobian" not in rules and {"LinearRule", "LayerNormRule"} <= rules
    want = reference_ntk(model, ids, output=output)
    for method in ("structured", "auto"):
        got = lazykernel.ntk(model, ids, output=output, method=method, batch_size=batch_size)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


def test_sequence_first_with_as_many_positions_as_checked_examples_stays_exact():
    # on the verification examples axis 0 (T) and axis 1 (N) have the same size: the
    # first axis is tried, fails the check, and the layers go to the generic rule
    torch.manual_seed(10)
    model = _SequenceFirst().double().eval()
    ids = torch.randint(0, 20, (9, 4))
    got = lazykernel.ntk(model, ids, output="full")
    want = reference_ntk(model, ids, output="full")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


class _Flipping(nn.Module):
    """Keeps the examples first for small batches and moves them to axis 1 for large ones."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):                                          # x: [N, T, 4]
        if x.shape[0] > 4:
            return self.head(torch.tanh(self.inner(x.transpose(0, 1))).mean(0))
        return self.head(torch.tanh(self.inner(x)).mean(1))


def test_a_layer_that_moves_its_examples_axis_after_the_check_sends_the_call_to_the_jacobian():
    torch.manual_seed(11)
    model = _Flipping().double()
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="examples along axis 0"):
        got = lazykernel.ntk(model, x, method="structured")
    torch.testing.assert_close(got, reference_ntk(model, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("slopes, shape", [(1, (5,)), (6, (6,)), (6, (6, 4)), (1, (6, 4))])
@pytest.mark.parametrize("output", ("trace", "full"))
def test_prelu_rule_matches_the_reference(slopes, shape, output):
    torch.manual_seed(12)
    prelu = nn.PReLU(slopes, init=0.3)
    first = nn.Linear(3, shape[-1]) if len(shape) == 1 else nn.Conv1d(3, shape[0], 3, padding=1)
    model = nn.Sequential(first, prelu, nn.Flatten(), nn.LazyLinear(3)).double()
    x1 = torch.randn((5, 3) if len(shape) == 1 else (5, 3, shape[1]), dtype=torch.float64)
    model(x1)
    assert _rules_of(model, x1, prelu) == {"PReLURule"}
    want = reference_ntk(model, x1, output=output)
    got = lazykernel.ntk(model, x1, output=output, method="structured")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("n1, n2", [(1, 2), (2, 2), (3, 2), (2, None)])
@pytest.mark.parametrize("method", ["jacobian", "ntvp", "structured"])
def test_a_batching_rule_that_raises_on_the_check_is_not_trusted_on_other_batches(n1, n2, method):
    # torch.func's vmap of PReLU's backward with one shared slope raises when the examples
    # and the features differ in number, and broadcasts one against the other when they
    # are equal: the check's examples raise, a chunk of two examples of two features ran
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.PReLU(init=0.3), nn.Linear(2, 2, bias=False)).double()
    x1 = torch.randn(n1, 2, dtype=torch.float64)
    x2 = None if n2 is None else torch.randn(n2, 2, dtype=torch.float64)
    params = ["1.weight", "2.weight"] if method == "structured" else None
    rules = lazykernel.rules._RULES
    prelu_rule = rules.pop(nn.PReLU, None)   # the structured method's generic rule takes the slope
    try:
        got = lazykernel.ntk(model, x1, x2, output="full", method=method, params=params)
    finally:
        if prelu_rule is not None:
            rules[nn.PReLU] = prelu_rule
    want = reference_ntk(model, x1, x2, output="full", params_selection=params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


class _RoutesSmallBatches(nn.Module):
    """Moves its examples to axis 1 for batches of fewer than four, as the plan's FLOP count runs."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):                                          # x: [N, T, 4]
        if x.shape[0] < 4:
            return self.head(torch.tanh(self.inner(x.transpose(0, 1))).mean(0))
        return self.head(torch.tanh(self.inner(x)).mean(1))


def test_plan_reports_the_jacobian_method_where_a_layer_moves_its_examples():
    torch.manual_seed(14)
    model = _RoutesSmallBatches().double()
    x = torch.randn(7, 5, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="would compute the kernel with method='jacobian'"):
        report = lazykernel.plan(model, x)
    assert report.method == "jacobian" and report.flops > 0
