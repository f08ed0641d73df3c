"""The layer chain (`lazykernel._chain`) on layer configurations at the edges of what it takes.

Each case goes through ``lazykernel.ntk`` and is compared with the float64
explicit-Jacobian reference. The chain is checked against autograd on a few
probe examples, but only at the rules' cotangents: what its own forward hands
the rules as their inputs must be the model's forward exactly, or be refused.
"""

import math

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import _chain
from lazykernel._chain import ChainDoesNotApply, LayerChain
from lazykernel._model import make_adapter
from lazykernel._structured import StructuredPlan

from conftest import assert_close_to_reference, reference_ntk

CHAIN = "one backward of the layer chain, batched over outputs"


def _with_head(outputs, *layers, shape):
    """``layers``, flattened, and a Linear head with ``outputs`` outputs for examples of ``shape``."""
    body = nn.Sequential(*layers, nn.Flatten())
    with torch.no_grad():
        features = body.eval()(torch.zeros((2,) + shape)).shape[1]
    return nn.Sequential(*body, nn.Linear(features, outputs))


def _zero_biases(model):
    for layer in model.modules():
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)
    return model


def _norm(norm):
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 1.5)
    return norm.eval()


def _configurations():
    """name -> (model, one example's shape, whether the chain takes it)."""
    relu = nn.ReLU(inplace=True)
    return {
        # zero biases: the zero rows of x sit on every ReLU's kink and tie every max pool
        "conv_options_at_kinks": (_zero_biases(_with_head(
            3, nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False), nn.ReLU(),
            nn.Conv2d(6, 4, (3, 1), padding=(1, 0)), relu, nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Conv2d(4, 4, 1), relu, shape=(4, 9, 9))), (4, 9, 9), True),
        "conv1d_same_depthwise": (_with_head(
            3, nn.Conv1d(3, 6, 3, padding="same", dilation=2), nn.Softplus(beta=2.0, threshold=0.5),
            nn.Conv1d(6, 6, 5, groups=6, padding="valid"), nn.GELU("tanh"), nn.MaxPool1d(2, stride=3, dilation=2),
            shape=(3, 12)), (3, 12), True),
        "padding_modes": (_with_head(
            3, nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
            nn.Conv2d(3, 3, 3, padding=2, padding_mode="circular"), nn.Tanh(),
            nn.Conv2d(3, 2, 2, padding=1, padding_mode="replicate"), shape=(2, 5, 5)), (2, 5, 5), False),
        "tiling_average_pools": (_with_head(
            4, nn.Conv2d(2, 3, 1), nn.SiLU(), nn.AvgPool2d((2, 3)), nn.Conv2d(3, 3, 1), nn.ELU(),
            nn.AdaptiveAvgPool2d((2, None)), shape=(2, 8, 6)), (2, 8, 6), True),
        "average_pools_it_refuses": (_with_head(
            3, nn.Conv2d(2, 3, 1), nn.Tanh(), nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
            nn.AvgPool2d(2, ceil_mode=True, divisor_override=3), nn.AdaptiveAvgPool2d(2), shape=(2, 9, 9)),
            (2, 9, 9), False),
        "every_activation": (nn.Sequential(*[layer for act in (
            nn.LeakyReLU(0.2), nn.GELU(), nn.GELU("tanh"), nn.ELU(0.5), nn.CELU(1.5), nn.SELU(), nn.SiLU(),
            nn.Mish(), nn.Hardtanh(-0.5, 0.5), nn.Hardsigmoid(), nn.Hardswish(), nn.Softsign(), nn.Tanhshrink(),
            nn.LogSigmoid(), nn.ReLU6(), nn.Sigmoid(), nn.Tanh(), nn.Softplus(beta=3.0, threshold=0.2))
            for layer in (nn.Linear(5, 5), act)], nn.Linear(5, 3)), (5,), True),
        "reshapes_and_identities": (nn.Sequential(
            nn.Conv2d(2, 3, 1), nn.Dropout(0.5), nn.Flatten(1, 2), nn.Linear(5, 4), nn.Sequential(
                nn.Identity(), nn.Sequential(nn.GELU(), nn.AlphaDropout(0.2))), nn.Flatten(-2, -1),
            nn.Unflatten(1, (8, 6)), nn.Linear(6, 2), nn.Flatten(), nn.Linear(16, 3)).eval(), (2, 4, 5), True),
        "last_layer_not_linear": (nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.Hardswish(), nn.Conv2d(3, 2, 2), nn.Sigmoid(), nn.MaxPool2d(2)), (2, 6, 6), True),
        "batch_norm_in_eval": (_with_head(
            3, nn.Conv2d(2, 3, 3, padding=1), _norm(nn.BatchNorm2d(3)), nn.ReLU(), nn.AvgPool2d(2),
            _norm(nn.BatchNorm2d(3, affine=False)), shape=(2, 4, 4)).eval(), (2, 4, 4), True),
        "unknown_layers": (_with_head(
            3, nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.PReLU(), nn.LPPool2d(2, 2),
            shape=(2, 4, 4)), (2, 4, 4), False),
    }


@pytest.mark.parametrize("name", list(_configurations()))
def test_configurations_match_the_reference(name):
    torch.manual_seed(0)
    model, shape, takes_chain = _configurations()[name]
    model = model.double()
    x1 = torch.randn((5,) + shape, dtype=torch.float64)
    x2 = torch.randn((4,) + shape, dtype=torch.float64)
    x1[1] = 0.0
    assert (lazykernel.plan(model, x1, x2, output="full").capture == CHAIN) is takes_chain
    got = lazykernel.ntk(model, x1, x2, output="full")
    assert_close_to_reference(got, reference_ntk(model, x1, x2, output="full"), torch.float64)


@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
def test_chunks_of_any_size_channels_last_and_every_output_mode(output, monkeypatch):
    # 1 KiB of cotangents a chunk: chunks of 2 examples and a last one of 1
    monkeypatch.setattr(_chain, "_CHUNK_BYTES_CPU", 1 << 10)
    torch.manual_seed(1)
    model = _with_head(4, nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), _norm(nn.BatchNorm2d(4)),
                       nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.GELU(), nn.AvgPool2d(2),
                       shape=(2, 4, 4)).double().eval()
    model = model.to(memory_format=torch.channels_last)
    x1 = torch.randn(5, 2, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert lazykernel.plan(model, x1, output=output).capture == CHAIN
    got = lazykernel.ntk(model, x1, output=output)
    assert got.shape == ((5, 5) if output == "trace" else (5, 5, 4) if output == "diagonal" else (5, 5, 4, 4))
    assert_close_to_reference(got, reference_ntk(model, x1, output=output), torch.float64)


def test_float32_chain_and_a_single_output():
    torch.manual_seed(2)
    layers = (nn.Conv1d(2, 4, 3), nn.ReLU(), nn.AvgPool1d(2))
    x = torch.randn(5, 2, 10)
    several = _with_head(3, *layers, shape=(2, 10))
    assert lazykernel.plan(several, x).capture == CHAIN
    assert_close_to_reference(lazykernel.ntk(several, x, output="full"),
                              reference_ntk(several, x, output="full"), torch.float32)
    # one output is one plain backward already: no chain, and [N, N] in every mode
    one = _with_head(1, *layers, shape=(2, 10))
    assert lazykernel.plan(one, x).capture != CHAIN
    for output in ("trace", "diagonal", "full"):
        got = lazykernel.ntk(one, x, output=output)
        assert got.shape == (5, 5)
        assert_close_to_reference(got, reference_ntk(one, x, output=output), torch.float32)


@pytest.mark.parametrize("pool, shape", [
    (nn.MaxPool2d(3, stride=1, padding=1), (4, 5)),
    (nn.MaxPool3d(3, stride=1, padding=1), (2, 4, 5)),
])
def test_max_pooling_of_examples_without_a_channel_axis_matches_the_reference(pool, shape):
    # PyTorch pools an input with one axis less than [N, C, *spatial] as one unbatched
    # image whose channels are the examples: still example by example, over every
    # spatial axis. The head's rule is the only one, so its cotangents (the seeds) say
    # nothing about the inputs the chain's forward records for it.
    torch.manual_seed(0)
    model = nn.Sequential(pool, nn.Flatten(), nn.Linear(math.prod(shape), 3)).double()
    x = torch.randn((6,) + shape, dtype=torch.float64)
    for output in ("full", "trace"):
        got = lazykernel.ntk(model, x, output=output)
        assert_close_to_reference(got, reference_ntk(model, x, output=output), torch.float64)
    # the chain refuses such an input rather than pool it with another rank's pooling
    plan = StructuredPlan.build(make_adapter(model, None))
    with pytest.raises(ChainDoesNotApply, match=r"MaxPool\dd on an input of \d axes"):
        LayerChain.of(model).capture(x, plan.rules)


def test_average_pooling_of_examples_without_a_channel_axis_matches_the_reference():
    # AvgPool3d on [N, D, H, W] pools D, H and W of each example (its channel). With a
    # window of 2 along D the chain's backward, which takes D as channels, spread the
    # cotangents to the wrong positions without failing. The checks, which run on x1's
    # first, middle and last rows, see nothing when those leave every ReLU off (both
    # sides' cotangents are zero there), so the chain must refuse such an input itself.
    torch.manual_seed(0)
    first = nn.Linear(4, 4)
    with torch.no_grad():
        first.bias.fill_(-0.1)
    model = nn.Sequential(first, nn.ReLU(), nn.AvgPool3d((2, 1, 2)), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.rand(6, 2, 4, 4, dtype=torch.float64) + 3.0
    x[[0, 3, 5]] = 0.0
    got = lazykernel.ntk(model, x, output="full")
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float64)
    plan = StructuredPlan.build(make_adapter(model, None))
    with pytest.raises(ChainDoesNotApply, match=r"AvgPool3d on an input of 4 axes"):
        LayerChain.of(model).capture(x, plan.rules)


def _small_cnn():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16, 3)).double()


def test_a_chain_whose_forward_feeds_a_rule_other_inputs_is_not_taken(monkeypatch):
    # A forward that is off after the pool leaves every cotangent as autograd's (the
    # head's are its seeds), so only a comparison of the rules' inputs can see it.
    model = _small_cnn()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    assert lazykernel.plan(model, x, output="full").capture == CHAIN
    forward = _chain._MaxPoolStep.forward

    def scaled(self, h, needs_backward):
        return forward(self, h, needs_backward) * 1.01

    monkeypatch.setattr(_chain._MaxPoolStep, "forward", scaled)
    assert lazykernel.plan(model, x, output="full").capture != CHAIN
    got = lazykernel.ntk(model, x, output="full")
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float64)


def test_a_chain_left_unchecked_by_all_zero_cotangents_is_not_taken():
    # zero biases and zero probe examples (x1's first, middle and last rows): every
    # cotangent before the ReLU is zero there, so nothing of the chain's backward
    # to the first convolution would be compared
    model = _zero_biases(_small_cnn())
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    assert lazykernel.plan(model, x, output="full").capture == CHAIN
    x[[0, 2, 4]] = 0.0
    assert lazykernel.plan(model, x, output="full").capture != CHAIN
    got = lazykernel.ntk(model, x, output="full")
    assert_close_to_reference(got, reference_ntk(model, x, output="full"), torch.float64)
