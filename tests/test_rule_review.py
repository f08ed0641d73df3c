"""Edge cases of the Conv3d, transposed-convolution, RMSNorm, InstanceNorm and PReLU rules,
and of the search for the examples' axis of the Linear and LayerNorm/RMSNorm rules.

Every kernel is compared with explicit float64 Jacobians (`conftest.reference_ntk`);
where a rule cannot describe a call, the test asks for the generic rule and an exact
kernel.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lazykernel
from conftest import assert_close_to_reference, reference_ntk

F64 = torch.float64


def _rules_of(model, x, layer, **options):
    """The rule names of the plan groups holding one of ``layer``'s parameters."""
    names = {name for name, p in model.named_parameters() if any(p is q for q in layer.parameters())}
    return {group.rule for group in lazykernel.plan(model, x, **options).groups if names & set(group.params)}


def _assert_exact(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


# -- transposed convolutions -------------------------------------------------------------

@pytest.mark.parametrize("cls, channels, spatial, options", [
    (nn.ConvTranspose1d, (4, 6), (5,), dict(kernel_size=1)),
    # output_padding beyond the stride, allowed because it is below the dilation
    (nn.ConvTranspose1d, (4, 6), (5,), dict(kernel_size=2, stride=1, dilation=3, output_padding=2)),
    # the padding crops two of the three outputs of the first and of the last input position
    (nn.ConvTranspose1d, (4, 6), (5,), dict(kernel_size=3, stride=3, padding=6, dilation=4)),
    # one output channel per group
    (nn.ConvTranspose1d, (6, 3), (4,), dict(kernel_size=3, stride=2, groups=3)),
    # a single input position
    (nn.ConvTranspose2d, (4, 6), (1, 1), dict(kernel_size=3, stride=2)),
    # outputs no input position reaches (stride beyond the kernel): only the bias reads them
    (nn.ConvTranspose2d, (4, 6), (3, 4), dict(kernel_size=(1, 3), stride=(3, 1), output_padding=(2, 0))),
    (nn.ConvTranspose3d, (2, 4), (2, 3, 2),
     dict(kernel_size=(2, 1, 3), stride=(2, 1, 1), dilation=(1, 1, 2), padding=(1, 0, 2), groups=2)),
])
def test_transposed_convolution_edge_configurations(cls, channels, spatial, options):
    torch.manual_seed(20)
    conv = cls(*channels, **options)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    x1 = torch.randn((5, channels[0]) + spatial, dtype=F64)
    x2 = torch.randn((3, channels[0]) + spatial, dtype=F64)
    model(x1)
    assert _rules_of(model, x1, conv) == {cls.__name__ + "Rule"}
    want = reference_ntk(model, x1, x2, output="full")
    for method in ("structured", "auto"):
        _assert_exact(lazykernel.ntk(model, x1, x2, output="full", method=method), want)
    want = reference_ntk(model, x1, output="diagonal")
    _assert_exact(lazykernel.ntk(model, x1, output="diagonal", method="structured", batch_size=2), want)


def test_transposed_convolution_with_per_example_gradients_formed_block_by_block():
    # few input positions and many channels: each example's weight gradient is formed
    # from its operands in slabs (the deferred gradient form), groups included
    torch.manual_seed(21)
    conv = nn.ConvTranspose2d(16, 16, 3, stride=2, groups=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(1)).double()
    x1, x2 = torch.randn(6, 16, 3, 3, dtype=F64), torch.randn(3, 16, 3, 3, dtype=F64)
    model(x1)
    forms = {group.rule: group.form for group in lazykernel.plan(model, x1, x2).groups}
    assert "gradient" in forms["ConvTranspose2dRule"]
    _assert_exact(lazykernel.ntk(model, x1, x2), reference_ntk(model, x1, x2))
    _assert_exact(lazykernel.ntk(model, x1, batch_size=2, params=["0.weight"]),
                  reference_ntk(model, x1, params_selection=["0.weight"]))


class _UNet(nn.Module):
    """A down- and up-sampling pair with a skip connection: the transposed convolution is
    called with ``output_size`` the whole input shape, as U-Nets write it."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)
        self.act = nn.PReLU(2)
        self.head = nn.Linear(4 * 7 * 6, 3)

    def forward(self, x):
        h = self.norm(torch.tanh(self.down(x)))
        u = self.act(self.up(h, output_size=x.shape))
        return self.head(torch.cat([u, x], 1).flatten(1))


def test_unet_with_output_size_skip_connection_and_chunks():
    torch.manual_seed(22)
    model = _UNet().double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.act.weight.uniform_(-0.5, 0.5)
    x1, x2 = torch.randn(6, 2, 7, 6, dtype=F64), torch.randn(2, 2, 7, 6, dtype=F64)
    rules = {group.rule for group in lazykernel.plan(model, x1).groups}
    assert rules == {"Conv2dRule", "InstanceNorm2dRule", "ConvTranspose2dRule", "PReLURule", "LinearRule"}
    _assert_exact(lazykernel.ntk(model, x1, x2, output="full", batch_size=4),
                  reference_ntk(model, x1, x2, output="full"))


# -- memory layouts ----------------------------------------------------------------------

class _ChannelsLast(nn.Module):
    """Hands its layer the input in the channels-last memory format."""

    def __init__(self, layer, spatial):
        super().__init__()
        self.layer = layer
        self.head = nn.LazyLinear(3)
        self.format = torch.channels_last if spatial == 2 else torch.channels_last_3d

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x.contiguous(memory_format=self.format))).flatten(1))


class _StridedView(nn.Module):
    """Hands its layer a transposed, strided view of the input."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.head = nn.LazyLinear(2)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x.transpose(2, 3)[:, :, ::2])).flatten(1))


@pytest.mark.parametrize("make, spatial", [
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), (3, 4)),
    (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), (2, 3, 2)),
    (lambda: nn.Conv3d(4, 6, 2, padding=1), (2, 3, 2)),
    (lambda: nn.InstanceNorm2d(4, affine=True), (3, 4)),
    (lambda: nn.PReLU(4, init=-0.3), (3, 4)),
])
def test_rules_read_channels_last_inputs(make, spatial):
    torch.manual_seed(23)
    layer = make()
    model = _ChannelsLast(layer, len(spatial)).double()
    x1, x2 = torch.randn((5, 4) + spatial, dtype=F64), torch.randn((3, 4) + spatial, dtype=F64)
    model(x1)
    assert _rules_of(model, x1, layer) == {type(layer).__name__ + "Rule"}
    _assert_exact(lazykernel.ntk(model, x1, x2, output="full"), reference_ntk(model, x1, x2, output="full"))
    _assert_exact(lazykernel.ntk(model, x1, batch_size=2), reference_ntk(model, x1))


@pytest.mark.parametrize("make", [
    lambda: nn.ConvTranspose2d(4, 6, 3, stride=2),
    lambda: nn.InstanceNorm2d(4, affine=True),
    lambda: nn.PReLU(4, init=-0.3),
])
def test_rules_read_strided_views(make):
    torch.manual_seed(24)
    layer = make()
    model = _StridedView(layer).double()
    x = torch.randn(5, 4, 6, 5, dtype=F64)
    model(x)
    assert _rules_of(model, x, layer) == {type(layer).__name__ + "Rule"}
    _assert_exact(lazykernel.ntk(model, x, output="full"), reference_ntk(model, x, output="full"))


def test_conv3d_chain_on_channels_last_and_transposed_inputs():
    # a plain chain: its own backward feeds the convolution rules chunk by chunk
    torch.manual_seed(25)
    model = nn.Sequential(nn.Conv3d(3, 4, 2, stride=(1, 2, 1)), nn.ReLU(), nn.Conv3d(4, 4, 1, groups=2),
                          nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(6, 3, 4, 5, 3, dtype=F64).contiguous(memory_format=torch.channels_last_3d)
    model(x)
    assert "layer chain" in lazykernel.plan(model, x, output="full").capture
    _assert_exact(lazykernel.ntk(model, x, output="full"), reference_ntk(model, x, output="full"))
    _assert_exact(lazykernel.ntk(model, x, x[:3], batch_size=2), reference_ntk(model, x, x[:3]))
    view = torch.randn(6, 3, 3, 5, 4, dtype=F64).transpose(2, 4)
    _assert_exact(lazykernel.ntk(model, view, output="full"), reference_ntk(model, view, output="full"))


# -- the examples' axis of Linear, LayerNorm and RMSNorm ---------------------------------

class _TwoLayouts(nn.Module):
    """One Linear called batch-first, ``[N, T, E]``, then sequence-first, ``[T, N, E]``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = torch.tanh(self.lin(h.transpose(0, 1)))
        return self.head(h.mean(0))


@pytest.mark.parametrize("n1, n2, batch_size", [(6, None, None), (7, 2, 3), (1, None, None), (1, 5, None)])
def test_a_linear_called_in_both_layouts(n1, n2, batch_size):
    torch.manual_seed(26)
    model = _TwoLayouts().double()
    x1 = torch.randn(n1, 3, 4, dtype=F64)
    x2 = None if n2 is None else torch.randn(n2, 3, 4, dtype=F64)
    if n1 > 1:
        assert _rules_of(model, x1, model.lin) == {"LinearRule"}
    want = reference_ntk(model, x1, x2, output="full")
    for method in ("structured", "auto"):
        _assert_exact(lazykernel.ntk(model, x1, x2, output="full", method=method, batch_size=batch_size), want)


class _ExamplesOnAxis2(nn.Module):
    """A Linear, a LayerNorm and an RMSNorm over two axes, each seeing the examples on axis 2."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.norm = nn.LayerNorm((3, 5))
        self.rms = nn.RMSNorm((3, 5))
        self.head = nn.Linear(5, 2)

    def forward(self, x):                                        # [N, 2, 3, 4]
        h = torch.tanh(self.lin(x.permute(1, 2, 0, 3)))          # [2, 3, N, 5]
        h = h.permute(0, 2, 1, 3).unsqueeze(0)                   # [1, 2, N, 3, 5]
        h = self.rms(torch.tanh(self.norm(h)))
        return self.head(h.mean(dim=(0, 1, 3)))


@pytest.mark.parametrize("output", ("trace", "diagonal", "full"))
def test_examples_on_axis_two(output):
    torch.manual_seed(27)
    model = _ExamplesOnAxis2().double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
        model.rms.weight.uniform_(0.5, 1.5)
    x1, x2 = torch.randn(5, 2, 3, 4, dtype=F64), torch.randn(4, 2, 3, 4, dtype=F64)
    rules = {group.rule for group in lazykernel.plan(model, x1).groups}
    assert rules == {"LinearRule", "LayerNormRule", "RMSNormRule"}
    want = reference_ntk(model, x1, x2, output=output)
    _assert_exact(lazykernel.ntk(model, x1, x2, output=output), want)
    _assert_exact(lazykernel.ntk(model, x1, x2, output=output, batch_size=2), want)


class _SequenceFirstNorm(nn.Module):
    """A norm over ``normalized_shape = (3, 4)`` on sequence-first ``[T, N, 3, 4]``."""

    def __init__(self, kind):
        super().__init__()
        self.norm = kind((3, 4))
        self.head = nn.Linear(12, 2)

    def forward(self, x):                                        # [N, T, 3, 4]
        return self.head(torch.tanh(self.norm(x.transpose(0, 1))).mean(0).flatten(1))


@pytest.mark.parametrize("kind", (nn.LayerNorm, nn.RMSNorm))
@pytest.mark.parametrize("length", (2, 3))
def test_sequence_first_norm_over_several_axes(kind, length):
    # with T = 3 the sequence axis has the size of the normalised axis after it
    torch.manual_seed(28)
    model = _SequenceFirstNorm(kind).double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, length, 3, 4, dtype=F64)
    assert _rules_of(model, x, model.norm) == {kind.__name__ + "Rule"}
    _assert_exact(lazykernel.ntk(model, x, output="full"), reference_ntk(model, x, output="full"))
    _assert_exact(lazykernel.ntk(model, x, batch_size=3), reference_ntk(model, x))


class _TinyEncoder(nn.Module):
    """Sequence-first feed-forward block with a LayerNorm, as nn.TransformerEncoderLayer lays it out."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 8)
        self.outer = nn.Linear(8, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):                                        # [N, T, 6]
        h = x.transpose(0, 1)
        h = self.norm(h + self.outer(torch.relu(self.inner(h))))
        return self.head(h.mean(0))


@pytest.mark.parametrize("select", [["norm.bias"], ["norm.weight", "head.bias"], ["inner.bias"],
                                    ["outer.weight", "norm.bias"]])
def test_sequence_first_parameter_selections(select):
    torch.manual_seed(29)
    model = _TinyEncoder().double()
    x1, x2 = torch.randn(6, 5, 6, dtype=F64), torch.randn(3, 5, 6, dtype=F64)
    assert "PerExampleJacobian" not in {group.rule for group in lazykernel.plan(model, x1, params=select).groups}
    want = reference_ntk(model, x1, x2, output="full", params_selection=select)
    _assert_exact(lazykernel.ntk(model, x1, x2, output="full", params=select, batch_size=2), want)


# -- InstanceNorm and PReLU ----------------------------------------------------------------

class _SpatialNormModel(nn.Module):
    """``x: [N, 3]`` -> a Linear -> ``[N, 4, *spatial]`` -> the norm -> a head."""

    def __init__(self, norm, spatial):
        super().__init__()
        self.spatial = spatial
        self.inner = nn.Linear(3, 4 * math.prod(spatial))
        self.norm = norm
        self.head = nn.Linear(4 * math.prod(spatial), 3)

    def forward(self, x):
        h = self.inner(x).reshape((x.shape[0], 4) + tuple(self.spatial))
        return self.head(torch.tanh(self.norm(h)).flatten(1))


@pytest.mark.parametrize("kind, spatial, training, momentum", [
    # a single spatial position: only running statistics can normalise it
    (nn.InstanceNorm1d, (1,), False, 0.1),
    (nn.InstanceNorm2d, (1, 1), False, None),
    # cumulative averaging (momentum None) in training mode: input statistics, running ones unchanged
    (nn.InstanceNorm1d, (5,), True, None),
    (nn.InstanceNorm3d, (2, 1, 2), True, None),
    (nn.InstanceNorm3d, (2, 1, 2), False, None),
])
def test_instance_norm_with_running_statistics(kind, spatial, training, momentum):
    torch.manual_seed(30)
    norm = kind(4, affine=True, track_running_stats=True, momentum=momentum)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    model = _SpatialNormModel(norm, spatial).double()
    x1, x2 = torch.randn(5, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    model.train(training)
    assert _rules_of(model, x1, norm) == {kind.__name__ + "Rule"}
    state = copy.deepcopy(model.state_dict())
    _assert_exact(lazykernel.ntk(model, x1, x2, output="full"), reference_ntk(model, x1, x2, output="full"))
    _assert_exact(lazykernel.ntk(model, x1, output="diagonal", batch_size=2),
                  reference_ntk(model, x1, output="diagonal"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


class _PerExample(nn.Module):
    """Applies ``layer`` to each example alone (no batch axis), after a Linear to ``shape``."""

    def __init__(self, layer, shape):
        super().__init__()
        size = math.prod(shape)
        self.shape = shape
        self.inner = nn.Linear(3, size)
        self.layer = layer
        self.head = nn.Linear(size, 2)

    def forward(self, x):
        h = torch.tanh(self.inner(x)).unflatten(1, self.shape)
        return self.head(torch.stack([self.layer(row) for row in h]).flatten(1))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.InstanceNorm1d(4, affine=True), (4, 5)),
    (lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True).eval(), (4, 5)),
    # vectors of as many features as there are probe examples (4 of 6 rows)
    (lambda: nn.PReLU(1, init=0.3), (4,)),
    (lambda: nn.LayerNorm(3), (4, 3)),
])
def test_unbatched_calls_go_to_the_generic_rule(make, shape):
    torch.manual_seed(31)
    layer = make()
    model = _PerExample(layer, shape).double()
    x = torch.randn(6, 3, dtype=F64)
    assert _rules_of(model, x, layer) == {"PerExampleJacobian"}
    _assert_exact(lazykernel.ntk(model, x, output="full"), reference_ntk(model, x, output="full"))


class _ScalarPReLU(nn.Module):
    """PReLU with one slope on ``[N]``: each example a single number."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 1)
        self.act = nn.PReLU(1, init=0.3)
        self.head = nn.Linear(1, 2)

    def forward(self, x):
        return self.head(self.act(self.inner(x)[:, 0])[:, None])


def test_prelu_on_one_number_per_example():
    torch.manual_seed(32)
    model = _ScalarPReLU().double()
    x1, x2 = torch.randn(6, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    assert _rules_of(model, x1, model.act) == {"PReLURule"}
    _assert_exact(lazykernel.ntk(model, x1, x2, output="full", batch_size=4),
                  reference_ntk(model, x1, x2, output="full"))
    _assert_exact(lazykernel.ntk(model, x1, params=["act.weight"]),
                  reference_ntk(model, x1, params_selection=["act.weight"]))


# -- dtypes ----------------------------------------------------------------------------------

def test_rmsnorm_default_epsilon_in_float32():
    # eps=None is float32's epsilon (1.2e-7) here, far above mean(x²) ≈ 1e-8 of these inputs
    torch.manual_seed(33)
    norm = nn.RMSNorm(4)
    model = nn.Sequential(norm, nn.Linear(4, 2))
    x = 1e-4 * torch.randn(5, 4)
    assert _rules_of(model, x, norm) == {"RMSNormRule"}
    fixed = copy.deepcopy(model)
    fixed[0].eps = torch.finfo(torch.float32).eps
    got = lazykernel.ntk(model, x, output="full", method="structured")
    assert_close_to_reference(got, reference_ntk(fixed, x, output="full"), torch.float32)


def _half_models():
    torch.manual_seed(34)
    dense = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.PReLU(8, init=0.2), nn.Linear(8, 3))
    torch.manual_seed(35)
    decoder = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.InstanceNorm2d(4, affine=True), nn.Tanh(),
                            nn.Flatten(), nn.Linear(4 * 7 * 7, 3))
    torch.manual_seed(36)
    volume = nn.Sequential(nn.Conv3d(2, 4, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8, 3))
    return [(dense, (5, 6), {"RMSNormRule", "PReLURule"}),
            (decoder, (5, 3, 3, 3), {"ConvTranspose2dRule", "InstanceNorm2dRule"}),
            (volume, (5, 2, 3, 3, 3), {"Conv3dRule"})]


# Against the float64 copy of the model, the error is the model's own rounding through
# its forward and backward passes: a few units of 2⁻¹¹ (float16) or 2⁻⁸ (bfloat16) of the
# kernel's scale. The kernels here differed by at most 5.6e-4 and 4.0e-3 of it.
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_new_rules_in_half_precision(dtype, tolerance):
    for model, shape, expected in _half_models():
        model = model.to(dtype)
        torch.manual_seed(37)
        x = torch.randn(shape).to(dtype)
        assert expected <= {group.rule for group in lazykernel.plan(model, x).groups}
        want = reference_ntk(model, x, output="full")
        got = lazykernel.ntk(model, x, output="full", method="structured")
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=0.0, atol=tolerance * want.abs().max().item())


# -- rules the check must demote -------------------------------------------------------------

class _NormWeightReused(nn.Module):
    """A sequence-first LayerNorm whose weight the forward reads again after the norm."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):                                        # [N, T, 4]
        h = self.norm(torch.tanh(self.lin(x.transpose(0, 1))))   # [T, N, 6]
        return self.head((h * self.norm.weight).mean(0))


class _TransposedWeightReused(nn.Module):
    """A transposed convolution whose weight also feeds a functional call of its own."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(3, 2, 3, stride=2)
        self.head = nn.Linear(2 * 9, 2)

    def forward(self, x):                                        # [N, 3, 4]
        h = self.up(x) + 0.5 * F.conv_transpose1d(torch.tanh(x), self.up.weight, stride=2)
        return self.head(torch.tanh(h).flatten(1))


class _NormByKeyword(nn.Module):
    """Calls its RMSNorm with the input by keyword (``x=``), which the rule's hook does not see."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.norm = nn.RMSNorm(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(x=self.lin(x))))


@pytest.mark.parametrize("make, shape, layer", [
    (_NormWeightReused, (6, 3, 4), "norm"),
    (_TransposedWeightReused, (5, 3, 4), "up"),
    (_NormByKeyword, (5, 3), "norm"),
])
def test_rules_the_check_demotes_end_exact(make, shape, layer):
    torch.manual_seed(38)
    model = make().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x1, x2 = torch.randn(shape, dtype=F64), torch.randn((3,) + shape[1:], dtype=F64)
    assert _rules_of(model, x1, getattr(model, layer)) == {"PerExampleJacobian"}
    want = reference_ntk(model, x1, x2, output="full")
    for method in ("structured", "auto"):
        _assert_exact(lazykernel.ntk(model, x1, x2, output="full", method=method, batch_size=2), want)


# -- calls the rules misread, which the check must catch ----------------------------------------

@pytest.mark.parametrize("make, shape", [
    (lambda: nn.LayerNorm(4), (4,)),
    (lambda: nn.RMSNorm(4), (4,)),
    (lambda: nn.LayerNorm((4, 3)), (4, 3)),
    (lambda: nn.RMSNorm((4, 3)), (4, 3)),
])
def test_norm_on_unbatched_inputs_goes_to_the_generic_rule(make, shape):
    # 6 examples give 4 probe examples, as many as each call's first axis holds
    torch.manual_seed(40)
    layer = make()
    model = _PerExample(layer, shape).double()
    x = torch.randn(6, 3, dtype=F64)
    want = reference_ntk(model, x, output="full")
    _assert_exact(lazykernel.ntk(model, x, output="full"), want)
    assert _rules_of(model, x, layer) == {"PerExampleJacobian"}


class _BroadcastAlongSequence(nn.Module):
    """Each example broadcast along 4 sequence-first positions, ``[4, N, 3]``, before a Linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):                                        # [N, 3]
        h = x.unsqueeze(0).expand(4, -1, -1)
        return self.head(torch.tanh(self.lin(h)).mean(0))


def test_equal_rows_in_x1_do_not_hide_a_misread_examples_axis():
    torch.manual_seed(41)
    model = _BroadcastAlongSequence().double()
    x1 = torch.randn(1, 3, dtype=F64).expand(4, 3).clone()
    x2 = torch.randn(4, 3, dtype=F64)
    want = reference_ntk(model, x1, x2, output="full")
    _assert_exact(lazykernel.ntk(model, x1, x2, output="full"), want)
