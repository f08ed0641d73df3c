"""ntk on fixed architectures people study, against the float64 reference, and the rules it uses.

Each model is small and deterministic (seeded). For every model the kernel of
the structured and auto methods is compared with the explicit-Jacobian
reference in every output mode, in float32 and float64, and the Jacobian method
once; then `lazykernel.plan` must show that the layers with a structured rule
were given that rule, so that a rule silently demoted to the generic
per-example Jacobian (still exact, much slower) fails a test.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import lazykernel
from conftest import OUTPUTS, assert_close_to_reference, reference_ntk


def _randomise_norms(model: nn.Module) -> None:
    """Eval-mode norms with affine values and running statistics far from the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.copy_(1 + 0.5 * torch.randn_like(m.weight))
                if m.bias is not None:
                    m.bias.copy_(0.5 * torch.randn_like(m.bias))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))


# -- the models ------------------------------------------------------------------------

class ResNetBlock(nn.Module):
    """Stem conv, then conv-BN-ReLU-conv-BN plus the identity, ReLU, global pool, linear head."""

    def __init__(self, channels: int = 4, outputs: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, outputs)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h)))))
        h = torch.relu(h + y)
        return self.head(h.mean(dim=(2, 3)))


class TokenTransformer(nn.Module):
    """Embedding + learned positions, a 2-layer encoder, mean over positions, linear head."""

    def __init__(self, vocab: int = 11, width: int = 8, length: int = 5, outputs: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(0.3 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, outputs)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.positions)
        return self.head(h.mean(1))


class PositionwiseMLP(nn.Module):
    """Linear layers applied at every position of [N, T, d], then a head on the flattened sequence."""

    def __init__(self, length: int = 4, width: int = 3, outputs: int = 2):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, 5), nn.Tanh(), nn.Linear(5, 4), nn.GELU())
        self.head = nn.Linear(length * 4, outputs)

    def forward(self, x):
        return self.head(self.inner(x).flatten(1))


class SelfAttentionSequenceFirst(nn.Module):
    """Embedding, then sequence-first self-attention masked at padding tokens and/or causally.

    Token id 0 is padding: its keys are masked by ``key_padding_mask``. With
    ``causal``, a boolean ``attn_mask`` also hides later positions (position 0
    is never padding, so no query loses every key).
    """

    def __init__(self, vocab: int = 6, width: int = 6, heads: int = 2, outputs: int = 2,
                 padding: bool = True, causal: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=False)
        self.head = nn.Linear(width, outputs)
        self.padding, self.causal = padding, causal

    def forward(self, tokens):
        h = self.embed(tokens).transpose(0, 1)  # [T, N, E]
        length = tokens.shape[1]
        key_padding_mask = (tokens == 0) if self.padding else None
        attn_mask = None
        if self.causal:
            attn_mask = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
        h = self.attention(h, h, h, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                           need_weights=False)[0]
        return self.head(h.transpose(0, 1).mean(1))


def _resnet_block():
    return ResNetBlock(), torch.randn(4, 2, 6, 6), torch.randn(3, 2, 6, 6)


def _transformer():
    gen = torch.Generator().manual_seed(7)
    return (TokenTransformer(), torch.randint(0, 11, (4, 5), generator=gen),
            torch.randint(0, 11, (3, 5), generator=gen))


def _positionwise():
    return PositionwiseMLP(), torch.randn(4, 4, 3), torch.randn(3, 4, 3)


def _conv1d():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 2, stride=2),
                          nn.GELU(), nn.Flatten(), nn.Linear(3 * 4, 3))
    return model, torch.randn(4, 2, 8), torch.randn(3, 2, 8)


def _grouped_conv():
    # a depthwise 3x3 (groups = channels) and a grouped 1x1 with two output channels per group
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Tanh(),
                          nn.Conv2d(4, 6, 1, groups=2), nn.SiLU(), nn.Flatten(), nn.Linear(6 * 25, 2))
    return model, torch.randn(4, 4, 5, 5), torch.randn(3, 4, 5, 5)


def _dilated_strided_conv():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2), nn.Tanh(),
                          nn.Conv2d(3, 4, (2, 3), stride=(1, 2), dilation=(2, 1), bias=False), nn.Tanh(),
                          nn.Flatten(), nn.LazyLinear(3))
    x1, x2 = torch.randn(4, 2, 7, 7), torch.randn(3, 2, 7, 7)
    model(x1)  # materialise the lazy head
    return model, x1, x2


def _embedding_repeated_tokens():
    # ids repeat within one example (and across examples): the gradient rows of a
    # repeated id add up before the Gram is taken
    model = nn.Sequential(nn.Embedding(50, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 3))
    x1 = torch.tensor([[1, 1, 3, 1, 7], [2, 2, 2, 2, 2], [1, 3, 3, 0, 9], [40, 7, 40, 7, 1]])
    x2 = torch.tensor([[3, 3, 1, 1, 1], [9, 0, 9, 0, 49], [2, 5, 2, 5, 2]])
    return model, x1, x2


def _attention_key_padding():
    x1 = torch.tensor([[1, 2, 3, 0, 0], [4, 4, 5, 1, 0], [2, 3, 1, 5, 4], [5, 0, 0, 0, 0]])
    x2 = torch.tensor([[3, 1, 0, 0, 0], [1, 2, 3, 4, 5], [2, 2, 2, 0, 0]])
    return SelfAttentionSequenceFirst(padding=True, causal=False), x1, x2


def _attention_padding_and_causal():
    _, x1, x2 = _attention_key_padding()
    return SelfAttentionSequenceFirst(padding=True, causal=True), x1, x2


def _layernorm_last_two_dims():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm((5, 4)), nn.Tanh(), nn.Flatten(),
                          nn.Linear(20, 2))
    return model, torch.randn(4, 5, 3), torch.randn(3, 5, 3)


def _groupnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 16, 3))
    return model, torch.randn(4, 1, 6, 6), torch.randn(3, 1, 6, 6)


MODELS = {
    "resnet_block": _resnet_block,
    "transformer_on_tokens": _transformer,
    "linear_on_positions": _positionwise,
    "conv1d": _conv1d,
    "grouped_depthwise_conv": _grouped_conv,
    "dilated_strided_conv": _dilated_strided_conv,
    "embedding_repeated_tokens": _embedding_repeated_tokens,
    "attention_key_padding_mask": _attention_key_padding,
    "attention_padding_and_causal_mask": _attention_padding_and_causal,
    "layernorm_last_two_dims": _layernorm_last_two_dims,
    "groupnorm": _groupnorm,
}

# The rule each parameter of a layer with a structured rule must get (names from
# model.named_parameters()). Parameters not listed (bare nn.Parameters used
# outside any layer) may go to any group.
EXPECTED_RULES = {
    "resnet_block": {"stem.weight": "Conv2dRule", "stem.bias": "Conv2dRule",
                     "conv1.weight": "Conv2dRule", "conv2.weight": "Conv2dRule",
                     "bn1.weight": "BatchNorm2dRule", "bn1.bias": "BatchNorm2dRule",
                     "bn2.weight": "BatchNorm2dRule", "bn2.bias": "BatchNorm2dRule",
                     "head.weight": "LinearRule", "head.bias": "LinearRule"},
    "linear_on_positions": {name: "LinearRule" for name in
                            ("inner.0.weight", "inner.0.bias", "inner.2.weight", "inner.2.bias",
                             "head.weight", "head.bias")},
    "conv1d": {"0.weight": "Conv1dRule", "0.bias": "Conv1dRule", "2.weight": "Conv1dRule",
               "2.bias": "Conv1dRule", "5.weight": "LinearRule", "5.bias": "LinearRule"},
    "grouped_depthwise_conv": {"0.weight": "Conv2dRule", "0.bias": "Conv2dRule",
                               "2.weight": "Conv2dRule", "2.bias": "Conv2dRule",
                               "5.weight": "LinearRule", "5.bias": "LinearRule"},
    "dilated_strided_conv": {"0.weight": "Conv2dRule", "0.bias": "Conv2dRule", "2.weight": "Conv2dRule",
                             "5.weight": "LinearRule", "5.bias": "LinearRule"},
    "embedding_repeated_tokens": {"0.weight": "EmbeddingRule", "3.weight": "LinearRule",
                                  "3.bias": "LinearRule"},
    "layernorm_last_two_dims": {"0.weight": "LinearRule", "0.bias": "LinearRule",
                                "1.weight": "LayerNormRule", "1.bias": "LayerNormRule",
                                "4.weight": "LinearRule", "4.bias": "LinearRule"},
    "groupnorm": {"0.weight": "Conv2dRule", "0.bias": "Conv2dRule", "1.weight": "GroupNormRule",
                  "1.bias": "GroupNormRule", "4.weight": "LinearRule", "4.bias": "LinearRule"},
}
_ATTENTION = {"embed.weight": "EmbeddingRule", "attention.in_proj_weight": "MultiheadAttentionRule",
              "attention.in_proj_bias": "MultiheadAttentionRule",
              "attention.out_proj.weight": "MultiheadAttentionRule",
              "attention.out_proj.bias": "MultiheadAttentionRule",
              "head.weight": "LinearRule", "head.bias": "LinearRule"}
EXPECTED_RULES["attention_key_padding_mask"] = _ATTENTION
EXPECTED_RULES["attention_padding_and_causal_mask"] = _ATTENTION
_ENCODER_LAYER = {"self_attn.in_proj_weight": "MultiheadAttentionRule",
                  "self_attn.in_proj_bias": "MultiheadAttentionRule",
                  "self_attn.out_proj.weight": "MultiheadAttentionRule",
                  "self_attn.out_proj.bias": "MultiheadAttentionRule",
                  "linear1.weight": "LinearRule", "linear1.bias": "LinearRule",
                  "linear2.weight": "LinearRule", "linear2.bias": "LinearRule",
                  "norm1.weight": "LayerNormRule", "norm1.bias": "LayerNormRule",
                  "norm2.weight": "LayerNormRule", "norm2.bias": "LayerNormRule"}
EXPECTED_RULES["transformer_on_tokens"] = {
    "embed.weight": "EmbeddingRule", "head.weight": "LinearRule", "head.bias": "LinearRule",
    **{f"encoder.layers.{i}.{name}": rule for i in range(2) for name, rule in _ENCODER_LAYER.items()},
}


@functools.lru_cache(maxsize=None)
def _case(name: str):
    """(float32 model in eval mode, x1, x2), the same every call."""
    torch.manual_seed(sum(map(ord, name)))
    model, x1, x2 = MODELS[name]()
    _randomise_norms(model)
    return model.float().eval(), x1, x2


def _model_in(name: str, dtype: torch.dtype):
    model, x1, x2 = _case(name)
    model = copy.deepcopy(model).to(dtype)
    if x1.is_floating_point():
        x1, x2 = x1.to(dtype), x2.to(dtype)
    return model, x1, x2


@functools.lru_cache(maxsize=None)
def _full_reference(name: str, symmetric: bool) -> torch.Tensor:
    # float32 parameters are exact in float64, so one reference serves both dtypes
    model, x1, x2 = _model_in(name, torch.float64)
    return reference_ntk(model, x1, None if symmetric else x2, output="full")


def _reference(name: str, output: str, symmetric: bool) -> torch.Tensor:
    """The reference in ``output`` mode, read off the full one (every model here has O > 1)."""
    full = _full_reference(name, symmetric)
    if output == "full":
        return full
    diagonal = torch.diagonal(full, dim1=-2, dim2=-1)
    return diagonal if output == "diagonal" else diagonal.sum(-1)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("float32", "float64"))
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", ("structured", "auto"))
@pytest.mark.parametrize("name", list(MODELS))
def test_structured_and_auto_match_the_reference(name, method, output, dtype):
    model, x1, x2 = _model_in(name, dtype)
    result = lazykernel.ntk(model, x1, x2, output=output, method=method)
    assert_close_to_reference(result, _reference(name, output, False), dtype)


@pytest.mark.parametrize("name", list(MODELS))
def test_symmetric_kernel_and_jacobian_method_match_the_reference(name):
    model, x1, _ = _model_in(name, torch.float64)
    ref = _reference(name, "full", True)
    for method in ("jacobian", "auto"):
        result = lazykernel.ntk(model, x1, output="full", method=method)
        assert_close_to_reference(result, ref, torch.float64)


def _rules_by_parameter(plan) -> dict:
    found = {}
    for group in plan.groups:
        for param in group.params:
            assert param not in found, f"{param} is in two groups of the plan:\n{plan}"
            found[param] = group.rule
    return found


@pytest.mark.parametrize("method", ("structured", "auto"))
@pytest.mark.parametrize("name", list(MODELS))
def test_plan_gives_each_layer_its_structured_rule(name, method):
    model, x1, x2 = _model_in(name, torch.float32)
    plan = lazykernel.plan(model, x1, x2, output="full", method=method)
    rules = _rules_by_parameter(plan)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(rules) == sorted(names), f"plan covers {sorted(rules)}, model has {sorted(names)}"
    expected = EXPECTED_RULES[name]
    wrong = {n: (rules[n], rule) for n, rule in expected.items() if rules[n] != rule}
    assert not wrong, f"(got, expected) rules: {wrong}\n{plan}"
    for group in plan.groups:
        assert group.flops > 0 and group.peak_bytes > 0, str(plan)
    assert plan.flops >= sum(g.flops for g in plan.groups)
    assert plan.peak_bytes > plan.result_bytes == 4 * 4 * 3 * plan.shape[-1] ** 2


def test_transformer_plan_leaves_nothing_but_the_positions_to_the_generic_rule():
    model, x1, x2 = _model_in("transformer_on_tokens", torch.float32)
    plan = lazykernel.plan(model, x1, x2, method="auto")
    generic = [p for g in plan.groups if g.rule == "PerExampleJacobian" for p in g.params]
    assert set(generic) <= {"positions"}, str(plan)
    text = str(plan)
    for rule in ("EmbeddingRule", "MultiheadAttentionRule", "LinearRule", "LayerNormRule"):
        assert rule in text


def test_embedding_with_a_large_vocabulary_uses_sparse_token_rows():
    # a dense per-example gradient would be 50 x 4 per output; the distinct ids
    # of two examples give at most 5 x 5 row pairs
    model, x1, x2 = _model_in("embedding_repeated_tokens", torch.float32)
    plan = lazykernel.plan(model, x1, x2, output="full", method="auto")
    (embedding,) = [g for g in plan.groups if g.rule == "EmbeddingRule"]
    assert embedding.form == "tokens", str(plan)
