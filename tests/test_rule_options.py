"""Structured rules under the less common options of the layers they claim.

Each kernel is compared with the float64 reference of explicit per-example
Jacobians (`conftest.reference_ntk`), for ``x2 = None`` and for a second set
of examples of another size.
"""

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel.rules import attention_forward

from conftest import assert_close_to_reference, reference_ntk


def _assert_exact(model, x1, x2, methods=("auto", "structured"), outputs=("trace", "full")):
    for output in outputs:
        for second in (None, x2):
            ref = reference_ntk(model, x1, second, output=output)
            for method in methods:
                got = lazykernel.ntk(model, x1, second, output=output, method=method)
                assert_close_to_reference(got, ref, torch.float64)


def _rule_of_each_parameter(model, x):
    plan = lazykernel.plan(model, x, method="structured")
    return {name: group.rule for group in plan.groups for name in group.params}


# -- attention on unbatched sequences ---------------------------------------------------------

class _AttentionPerSequence(nn.Module):
    """MultiheadAttention called on each example's own ``[T, E]`` sequence (PyTorch's unbatched form)."""

    def __init__(self, batch_first, masks):
        super().__init__()
        self.masks = masks
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4, 2)

    def forward(self, x):                      # x: [N, T, 4]
        rows = []
        for seq in x:
            kwargs = {}
            if self.masks:
                t = seq.shape[0]
                kwargs["attn_mask"] = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
                kwargs["key_padding_mask"] = torch.arange(t) == t - 1
            y, _ = self.attn(seq, seq, seq, **kwargs)
            rows.append(self.head(torch.tanh(y)).mean(0))
        return torch.stack(rows)


@pytest.mark.parametrize("batch_first, masks", [(True, False), (False, True)])
def test_attention_on_unbatched_sequences_is_exact(batch_first, masks):
    torch.manual_seed(0)
    model = _AttentionPerSequence(batch_first, masks).double().eval()
    x1, x2 = torch.randn(3, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    _assert_exact(model, x1, x2, methods=("auto", "structured", "jacobian"))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_explicit_attention_on_unbatched_sequences_matches_the_module(batch_first, average):
    torch.manual_seed(1)
    m = nn.MultiheadAttention(4, 2, batch_first=batch_first).double().eval()
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    kwargs = dict(attn_mask=torch.rand(2, 3, 5, dtype=torch.float64),
                  key_padding_mask=torch.linspace(0, -2, 5, dtype=torch.float64), average_attn_weights=average)
    expected, w_expected = m(q, k, k.flip(-1), **kwargs)
    got, w_got = attention_forward(m, None, q, k, k.flip(-1), **kwargs)
    assert got.shape == (3, 4) and w_got.shape == w_expected.shape
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(w_got, w_expected)


def test_explicit_attention_batches_per_example_padding_masks_under_vmap():
    # the generic rule's per-example Jacobians vmap the model; a boolean mask that
    # differs per example (pad tokens) must batch there, not fall back to a loop
    torch.manual_seed(4)
    m = nn.MultiheadAttention(4, 2, batch_first=True).double().eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = padding[2, 4] = True
    expected, _ = m(x, x, x, key_padding_mask=padding, attn_mask=torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))

    def one(seq, pad):
        mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
        return attention_forward(m, None, seq, seq, seq, key_padding_mask=pad, attn_mask=mask)[0]

    got = torch.func.vmap(one)(x.unsqueeze(1), padding.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, expected)


# -- attention subclasses with a forward of their own -----------------------------------------

class _ScaledAttention(nn.MultiheadAttention):
    """An attention whose own forward doubles its queries and shifts its outputs."""

    def forward(self, query, key, value, **kwargs):
        out, weights = super().forward(2 * query, key, value, **kwargs)
        return 0.5 * out + 1.0, weights


class _WithScaledAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _ScaledAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):                      # x: [N, T, 4]
        return self.head(torch.tanh(self.attn(x, x, x)[0])).mean(1)


def test_an_attention_subclass_keeps_its_own_forward():
    torch.manual_seed(2)
    model = _WithScaledAttention().double().eval()
    x1, x2 = torch.randn(3, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    _assert_exact(model, x1, x2, methods=("auto", "structured", "jacobian", "ntvp"), outputs=("full",))
    assert "MultiheadAttentionRule" not in _rule_of_each_parameter(model, x1).values()


# -- layers called with their input by keyword --------------------------------------------------

def _keyword_layer(kind):
    return {"linear": nn.Linear(4, 4), "conv": nn.Conv1d(4, 4, 2, padding=1),
            "embedding": nn.Embedding(5, 4, padding_idx=0), "layer norm": nn.LayerNorm(4),
            "group norm": nn.GroupNorm(2, 4), "batch norm": nn.BatchNorm1d(4)}[kind]


class _InputByKeyword(nn.Module):
    """A layer called as ``layer(input=...)`` on ``[N, 3, 4]`` features (channels first where it needs them)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.layer = _keyword_layer(kind)
        self.head = nn.Linear(4, 2)

    def forward(self, x):                      # x: [N, 3, 4]
        if self.kind == "embedding":
            h = x + self.layer(input=(2 * x[..., 0]).floor().clamp(0, 4).long())
        elif self.kind in ("conv", "group norm", "batch norm"):
            h = self.layer(input=x.transpose(1, 2)).transpose(1, 2)[:, :3]
        else:
            h = self.layer(input=x)
        return self.head(torch.tanh(h)).mean(1)


KEYWORD_RULES = {"linear": "LinearRule", "conv": "Conv1dRule", "embedding": "EmbeddingRule",
                 "layer norm": "LayerNormRule", "group norm": "GroupNormRule", "batch norm": "BatchNorm1dRule"}


@pytest.mark.parametrize("kind", list(KEYWORD_RULES))
def test_layers_called_with_their_input_by_keyword_keep_their_rule(kind):
    torch.manual_seed(3)
    model = _InputByKeyword(kind)
    if kind == "batch norm":
        model.layer.running_mean.uniform_(-1, 1)
        model.layer.running_var.uniform_(0.5, 2.0)
    if kind in ("layer norm", "group norm", "batch norm"):
        with torch.no_grad():
            model.layer.weight.uniform_(-1.5, 1.5)
            model.layer.bias.uniform_(-1, 1)
    model = model.double().eval()
    x1, x2 = torch.randn(4, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    _assert_exact(model, x1, x2, outputs=("full",))
    rules = _rule_of_each_parameter(model, x1)
    assert rules["layer.weight"] == KEYWORD_RULES[kind], rules
