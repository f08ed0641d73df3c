"""Structured rules in layer configurations the other tests leave out.

Every kernel is compared with the float64 reference of explicit per-example
Jacobians (`conftest.reference_ntk`), and the plan says which parameters keep
their structured rule and which go to the generic one.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lazykernel

from conftest import assert_close_to_reference, reference_ntk


def _rule_of_each_parameter(model, x, **kwargs):
    plan = lazykernel.plan(model, x, method="structured", **kwargs)
    return {name: group.rule for group in plan.groups for name in group.params}


def _assert_exact(model, x1, x2=None, outputs=("full",), methods=("structured", "auto"), **kwargs):
    for output in outputs:
        ref = reference_ntk(model, x1, x2, output=output, params_selection=kwargs.get("params"))
        for method in methods:
            got = lazykernel.ntk(model, x1, x2, output=output, method=method, **kwargs)
            assert_close_to_reference(got, ref, torch.float64)


# -- a parameter used directly in forward ------------------------------------------------

class _ParameterInForward(nn.Module):
    """Linear layers around a parameter the forward reduces or reorders along its first axis."""

    def __init__(self, use):
        super().__init__()
        self.use = use
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.p = nn.Parameter(torch.randn(3, 4) if use == "cumulative" else torch.randn(4))

    def forward(self, x):                      # x: [N, 3, 4]
        h = torch.tanh(self.inner(x))
        if self.use == "softmax":
            h = h * torch.softmax(self.p, 0)
        elif self.use == "normalised":
            h = h * self.p / self.p.norm()
        else:
            h = h + self.p.cumsum(0)
        return self.head(h).mean(1)


@pytest.mark.parametrize("use", ["softmax", "normalised", "cumulative"])
def test_a_parameter_reduced_along_its_first_axis_leaves_the_other_layers_their_rules(use):
    # Expanded along the batch axis, such a parameter changes what the forward
    # computes; it must go to the generic rule alone, not take the layers'
    # structured rules with it.
    torch.manual_seed(0)
    model = _ParameterInForward(use).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    _assert_exact(model, x, outputs=("full", "trace"))
    rules = _rule_of_each_parameter(model, x)
    assert rules == {"p": "PerExampleJacobian", "inner.weight": "LinearRule", "inner.bias": "LinearRule",
                     "head.weight": "LinearRule", "head.bias": "LinearRule"}


# -- convolutions ----------------------------------------------------------------------------

def _conv_net(conv, shape):
    with torch.no_grad():
        features = conv(torch.zeros((1,) + shape[1:])).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(features, 3)).double()


CONVOLUTIONS = {
    "same padding, even kernel": (lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), (4, 2, 5, 6)),
    "same padding, circular, dilated": (lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(1, 2),
                                                          padding_mode="circular"), (4, 2, 5, 6)),
    "replicate padding, stride that does not divide": (
        lambda: nn.Conv2d(2, 3, 3, stride=(3, 2), padding=(2, 1), padding_mode="replicate"), (4, 2, 7, 6)),
    "kernel as large as the input": (lambda: nn.Conv2d(2, 3, (5, 6)), (4, 2, 5, 6)),
    "1x1 kernel, no bias": (lambda: nn.Conv2d(2, 3, 1, bias=False), (4, 2, 3, 3)),
    "depthwise conv1d, dilated": (lambda: nn.Conv1d(2, 4, 2, dilation=3, groups=2), (4, 2, 9)),
}


@pytest.mark.parametrize("name", list(CONVOLUTIONS))
def test_convolution_configurations_are_exact_with_their_rule(name):
    torch.manual_seed(1)
    make, shape = CONVOLUTIONS[name]
    model = _conv_net(make(), shape)
    x = torch.randn(shape, dtype=torch.float64)
    _assert_exact(model, x)
    assert {rule for rule in _rule_of_each_parameter(model, x).values()} <= {"Conv2dRule", "Conv1dRule",
                                                                            "LinearRule"}


def test_channels_last_inputs_and_weights_are_exact():
    torch.manual_seed(2)
    model = _conv_net(nn.Conv2d(2, 3, 3, stride=2, padding=1), (4, 2, 7, 6)).to(memory_format=torch.channels_last)
    x = torch.randn(4, 2, 7, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    _assert_exact(model, x, torch.randn(3, 2, 7, 6, dtype=torch.float64))


# -- embeddings ------------------------------------------------------------------------------

class _Tokens(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.embed = nn.Embedding(7, 5, **kwargs)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):                    # ids: [N, *]
        h = torch.tanh(self.embed(ids))
        return self.head(h.reshape(ids.shape[0], -1, 5).mean(1))


IDS = {
    "one token per example": torch.tensor([1, 3, 3, 0]),
    "ids [N, T1, T2] with padding": torch.tensor([[[1, 2, 0], [2, 2, 6]], [[0, 0, 0], [3, 1, 1]],
                                                  [[5, 0, 4], [4, 4, 4]], [[6, 2, 0], [1, 0, 3]]]),
    "int32 ids": torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 1, 5]], dtype=torch.int32),
}


@pytest.mark.parametrize("name", list(IDS))
def test_embedding_id_layouts_are_exact_with_the_token_rule(name):
    torch.manual_seed(3)
    model = _Tokens(padding_idx=0).double()
    ids = IDS[name]
    _assert_exact(model, ids, outputs=("full", "diagonal"))
    assert _rule_of_each_parameter(model, ids)["embed.weight"] == "EmbeddingRule"


@pytest.mark.parametrize("kwargs", [dict(max_norm=0.5), dict(sparse=True)], ids=["max_norm", "sparse"])
def test_embeddings_the_rule_does_not_describe_are_exact(kwargs):
    torch.manual_seed(4)
    model = _Tokens(**kwargs).double()
    ids = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 1, 5]])
    with torch.no_grad():
        model(ids)          # max_norm renormalises the looked-up rows in place, outside autograd
    # a plain table with those rows computes the same function and takes dense gradients
    reference = _Tokens().double()
    reference.load_state_dict(model.state_dict())
    ref = reference_ntk(reference, ids, output="full")
    for method in ("structured", "auto"):
        assert_close_to_reference(lazykernel.ntk(model, ids, output="full", method=method), ref, torch.float64)


# -- normalisation layers -------------------------------------------------------------------

def _with_statistics(model):
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-1, 1)
    return model.double().eval()


NORMS = {
    "batch norm on [N, C]": (lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)),
                             (4, 4), "BatchNorm1dRule"),
    "batch norm on [N, C, L]": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Tanh(),
                                                      nn.Flatten(), nn.Linear(20, 3)), (4, 2, 7), "BatchNorm1dRule"),
    "layer norm without bias": (lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, bias=False), nn.Tanh(),
                                                      nn.Linear(6, 3)), (4, 4), "LayerNormRule"),
    "group norm on [N, C]": (lambda: nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(3, 6), nn.Tanh(), nn.Linear(6, 3)),
                             (4, 4), "GroupNormRule"),
    "instance norm with affine parameters": (
        lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True), nn.Tanh(), nn.Flatten(),
                              nn.Linear(20, 3)), (4, 2, 7), "InstanceNorm1dRule"),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_norm_layer_configurations_are_exact(name):
    torch.manual_seed(5)
    make, shape, rule = NORMS[name]
    model = _with_statistics(make())
    x = torch.randn(shape, dtype=torch.float64)
    _assert_exact(model, x)
    assert _rule_of_each_parameter(model, x)["1.weight"] == rule


def test_batch_norm_without_tracked_statistics_is_refused_in_eval_mode():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 2)).eval()
    for method in ("structured", "auto"):
        with pytest.raises(ValueError, match="even in eval mode it normalises with batch statistics") as caught:
            lazykernel.ntk(model, torch.randn(4, 4), method=method)
        assert "model.eval()" not in str(caught.value)


# -- attention -------------------------------------------------------------------------------

class _MaskedPerExample(nn.Module):
    """Self-attention with a float mask of one [L, S] block per example and head."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):                      # x: [N, 5, 6]
        mask = torch.einsum("nl,ns->nls", x[..., 0], x[..., 1]).repeat_interleave(2, 0)
        y, _ = self.attn(x, x, x, attn_mask=mask)
        return self.head(torch.tanh(y)).mean(1)


class _Decoder(nn.Module):
    """A decoder layer: its cross-attention's queries (3 positions) and memory (4) differ in length."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(6, 2, 8, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):                      # x: [N, 7, 6]
        return self.head(self.layer(x[:, :3], x[:, 3:])).mean(1)


@pytest.mark.parametrize("model_class", [_MaskedPerExample, _Decoder])
def test_attention_configurations_are_exact_with_the_attention_rule(model_class):
    torch.manual_seed(6)
    model = model_class().double().eval()
    x = torch.randn(4, 7 if model_class is _Decoder else 5, 6, dtype=torch.float64)
    _assert_exact(model, x)
    rules = _rule_of_each_parameter(model, x)
    assert "PerExampleJacobian" not in rules.values()
    assert {rule for name, rule in rules.items() if "in_proj" in name} == {"MultiheadAttentionRule"}


# -- linear maps -----------------------------------------------------------------------------

class _Positions2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):                      # x: [N, T1, T2, 4]
        return self.head(torch.tanh(self.inner(x))).mean(dim=(1, 2))


def test_linear_on_a_grid_of_positions_is_exact_with_its_rule():
    torch.manual_seed(7)
    model = _Positions2d().double()
    x = torch.randn(4, 2, 3, 4, dtype=torch.float64)
    _assert_exact(model, x, torch.randn(2, 2, 3, 4, dtype=torch.float64), outputs=("full", "trace"))
    assert set(_rule_of_each_parameter(model, x).values()) == {"LinearRule"}


class _WeightAlsoUsedDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)) + torch.tanh(F.linear(x, self.inner.weight)))


def test_a_linear_weight_also_used_outside_the_module_goes_to_the_generic_rule():
    torch.manual_seed(8)
    model = _WeightAlsoUsedDirectly().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    _assert_exact(model, x)
    rules = _rule_of_each_parameter(model, x)
    assert rules["inner.weight"] == "PerExampleJacobian" and rules["head.weight"] == "LinearRule"


class _PaddedEncoder(nn.Module):
    """nn.TransformerEncoder (nested-tensor fast path enabled by default) under a
    key padding mask that pads the last position of some examples."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):                       # x: [N, 5, 6]
        pad = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        pad[:, -1] = x[:, -1, 0] > 0
        return self.head(self.encoder(x, src_key_padding_mask=pad)).mean(1)


@pytest.mark.parametrize("method", ["auto", "jacobian"])
def test_a_padded_transformer_encoder_is_exact(method):
    # The model is first run under no_grad, where PyTorch's fused inference path
    # makes nested tensors of a padded batch: the kernel must not depend on it.
    torch.manual_seed(0)
    model = _PaddedEncoder().double().eval()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    x[::2, -1, 0] = x[::2, -1, 0].abs()
    x[1::2, -1, 0] = -x[1::2, -1, 0].abs()
    ref = reference_ntk(model, x, output="trace")
    assert_close_to_reference(lazykernel.ntk(model, x, output="trace", method=method), ref, torch.float64)


class _LeadingSingletonParameters(nn.Module):
    """Positions ``[1, T, D]`` added to ``[N, T, D]`` and a scale ``[1, D]``, written to
    broadcast along the batch axis with their own leading axis."""

    def __init__(self):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(1, 5, 4))
        self.scale = nn.Parameter(torch.randn(1, 3))
        self.inner = nn.Linear(4, 3)

    def forward(self, x):                      # x: [N, 5, 4]
        return torch.tanh(self.inner(x + self.positions)).mean(1) * self.scale


def test_parameters_with_a_leading_singleton_axis_take_the_broadcast_rule():
    torch.manual_seed(0)
    model = _LeadingSingletonParameters().double().eval()
    x = torch.randn(5, 5, 4, dtype=torch.float64)
    rules = _rule_of_each_parameter(model, x)
    assert rules == {"positions": "BroadcastParameterRule", "scale": "BroadcastParameterRule",
                     "inner.weight": "LinearRule", "inner.bias": "LinearRule"}
    _assert_exact(model, x, outputs=("full", "trace"))
    _assert_exact(model, x[:3], x[3:], outputs=("diagonal",))


class _ScaledLinear(nn.Linear):
    """A Linear subclass with a parameter of its own that the model multiplies in."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.gain = nn.Parameter(torch.randn(d_out))


class _UsesTheGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = _ScaledLinear(4, 3)

    def forward(self, x):
        return torch.tanh(self.layer(x)) * self.layer.gain


def test_a_linear_subclass_keeps_its_rule_beside_a_parameter_of_its_own():
    torch.manual_seed(0)
    model = _UsesTheGain().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    rules = _rule_of_each_parameter(model, x)
    assert rules["layer.weight"] == rules["layer.bias"] == "LinearRule"
    assert rules["layer.gain"] != "LinearRule"
    _assert_exact(model, x, outputs=("full",))


# -- an embedding looked up once for all examples -----------------------------------------

class _SharedLookup(nn.Module):
    """Token embeddings plus position embeddings looked up once, ``pos(ids_of_positions)``,
    and broadcast along the batch (the GPT form), then a small mixing layer and a head."""

    def __init__(self, form, length=6, padding_idx=None):
        super().__init__()
        self.form, self.length = form, length
        self.tokens = nn.Embedding(11, 4)
        self.pos = nn.Embedding(length, 4, padding_idx=padding_idx)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        t = ids.shape[1]
        positions = torch.arange(t, device=ids.device)
        if self.form == "row":
            looked_up = self.pos(positions.unsqueeze(0))          # [1, T] ids
        elif self.form == "repeated":
            looked_up = self.pos(positions // 2)                   # ids that repeat
        elif self.form == "unsqueezed":
            looked_up = self.pos(positions).unsqueeze(0)           # [T, D] made [1, T, D] after the lookup
        else:
            looked_up = self.pos(positions)                        # [T] ids
        h = torch.tanh(self.mix(self.tokens(ids) + looked_up))
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("form, rule", [("plain", "EmbeddingRule"), ("row", "EmbeddingRule"),
                                        ("repeated", "EmbeddingRule"), ("unsqueezed", None)])
def test_an_embedding_looked_up_once_for_all_examples_keeps_the_token_rule(form, rule):
    torch.manual_seed(0)
    model = _SharedLookup(form).double()
    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.randint(0, 11, (5, 6), generator=gen), torch.randint(0, 11, (3, 6), generator=gen)
    rules = _rule_of_each_parameter(model, x1)
    if rule is not None:
        assert rules["pos.weight"] == rule
    # the lookup lines up with the batch only after an unsqueeze of its own: that form
    # must still be exact, by whatever rule
    _assert_exact(model, x1, x2, outputs=("trace", "full"))
    # batches of other sizes than the check's, one of them as long as the positions
    _assert_exact(model, torch.cat([x1, x1[:1]]), outputs=("full",), batch_size=2)
    _assert_exact(model, torch.randint(0, 11, (14, 6), generator=gen), outputs=("trace",), batch_size=6)


def test_a_shared_lookup_with_a_padding_row_and_as_many_positions_as_examples_is_exact():
    torch.manual_seed(0)
    model = _SharedLookup("plain", padding_idx=0).double()
    gen = torch.Generator().manual_seed(2)
    _assert_exact(model, torch.randint(0, 11, (5, 6), generator=gen), outputs=("trace", "full"))
    # the check's batch as long as the positions: the ids read as batched, which the
    # check refuses, so the table goes to the generic rule, still exact
    x = torch.randint(0, 11, (6, 6), generator=gen)
    _assert_exact(model, x, outputs=("full",))


class _OnePosition(nn.Module):
    """One position: token embeddings ``[N, 1, D]`` plus a ``[1, D]`` table, or plus a
    lookup of the one position, then a mean over the positions axis."""

    def __init__(self, lookup):
        super().__init__()
        self.lookup = lookup
        self.tokens = nn.Embedding(3, 2)
        self.table = nn.Parameter(torch.randn(1, 2))
        self.pos = nn.Embedding(1, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, ids):
        extra = self.pos(torch.arange(1, device=ids.device)) if self.lookup else self.table
        return self.head(torch.tanh(self.tokens(ids) + extra).mean(dim=1))


@pytest.mark.parametrize("lookup", [False, True], ids=["table", "lookup"])
def test_a_copy_per_example_that_broadcasts_across_the_batch_is_not_taken_for_the_examples_own(lookup):
    # Expanded to [n, D] and added to [n, 1, D], a [1, D] copy per example broadcasts to
    # [n, n, D]; the mean over that axis gives the model's own values, but each copy's
    # cotangent mixes all examples. The checked examples (x1's middle, first and last
    # rows) hold the same token, so their gradients agree either way.
    torch.manual_seed(0)
    model = _OnePosition(lookup).double()
    x1 = torch.tensor([[0], [1], [0], [2], [0]])
    x2 = torch.tensor([[1], [2], [0]])
    _assert_exact(model, x1, x2, outputs=("full",))


class _LookupOnSomeBatches(nn.Module):
    """A second lookup of the positions only for batches holding token 0: each example's
    output still depends on itself alone, but the calls differ from batch to batch."""

    def __init__(self):
        super().__init__()
        self.tokens, self.pos, self.head = nn.Embedding(11, 6), nn.Embedding(10, 6), nn.Linear(6, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.tokens(ids) + self.pos(positions)
        has_zero = (ids == 0).any(1)
        if bool(has_zero.any()):
            h = h + has_zero[:, None, None] * self.pos(positions)
        return self.head(torch.tanh(h)).mean(1)


class _SlicedLookup(nn.Module):
    """Positions looked up for the longest length and sliced to the input's."""

    def __init__(self):
        super().__init__()
        self.tokens, self.pos, self.head = nn.Embedding(11, 6), nn.Embedding(5, 6), nn.Linear(6, 3)

    def forward(self, ids):
        positions = self.pos(torch.arange(5, device=ids.device))[:ids.shape[1]]
        return self.head(torch.tanh(self.tokens(ids) + positions)).mean(1)


def test_shared_lookups_called_otherwise_than_on_the_checked_batch_are_exact():
    torch.manual_seed(0)
    model = _LookupOnSomeBatches().double()
    x = torch.randint(1, 11, (8, 5), generator=torch.Generator().manual_seed(3))
    x[5:7, 0] = 0
    # the second chunk makes a call the check did not see: the kernel is computed again
    # with per-example Jacobians, and says so
    with pytest.warns(UserWarning, match="Embedding looked up ids"):
        got = lazykernel.ntk(model, x[:4], x[4:], output="full", method="structured")
    assert_close_to_reference(got, reference_ntk(model, x[:4], x[4:], output="full"), torch.float64)


def test_a_shared_lookup_sliced_after_it_is_exact_on_batches_longer_than_the_slice():
    torch.manual_seed(0)
    model = _SlicedLookup().double()
    x = torch.randint(0, 11, (10, 5), generator=torch.Generator().manual_seed(4))
    _assert_exact(model, x, outputs=("full",))
