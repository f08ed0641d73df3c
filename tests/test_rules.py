"""Each structured rule: exact against float64 per-example Jacobians, and actually used."""

import sys

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel._model import make_adapter
from lazykernel._structured import StructuredPlan
from lazykernel.ops import token_gram_accumulate
from lazykernel.rules import attention_forward, explicit_attention

from conftest import OUTPUTS, SlicedPositions, assert_close_to_reference, reference_ntk


class TokenModel(nn.Module):
    def __init__(self, vocab=7, dim=5, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids))).mean(1)


class Attention(nn.Module):
    """MultiheadAttention in the ways models call it: self/cross, batch-first or not, masks."""

    def __init__(self, batch_first=True, cross=False, masks=False, weights=False):
        super().__init__()
        self.batch_first, self.cross, self.masks, self.weights = batch_first, cross, masks, weights
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.head = nn.Linear(6, 2)

    def forward(self, x):                     # x: [N, T, 6]
        n, t, _ = x.shape
        seq = x if self.batch_first else x.transpose(0, 1)
        kwargs = {}
        if self.masks:
            kwargs["attn_mask"] = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            # each example's own padding (as from its pad tokens): its last key where x says so
            padding = torch.zeros(n, t, dtype=torch.bool)
            padding[:, -1] = x[:, -1, 0] > 0
            kwargs["key_padding_mask"] = padding
        key, value = (2 * seq, seq.flip(-1)) if self.cross else (seq, seq)
        y, w = self.attn(seq, key, value, need_weights=self.weights, **kwargs)
        if not self.batch_first:
            y = y.transpose(0, 1)
        out = self.head(y).mean(1)
        return out + w.sum(dim=(1, 2)).unsqueeze(1) if self.weights else out


def _models():
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))
    bn[1].running_mean.uniform_(-1, 1)
    bn[1].running_var.uniform_(0.5, 2.0)
    return {
        "conv2d strided, grouped, reflect padding": (
            nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 6, 2, groups=2, dilation=2, padding=1, padding_mode="reflect"),
                          nn.Flatten(), nn.Linear(96, 3)),
            torch.randn(4, 2, 7, 7), {"Conv2dRule": 2}),
        "conv1d same padding, no bias": (
            nn.Sequential(nn.Conv1d(3, 4, 3, padding="same"), nn.Tanh(), nn.Conv1d(4, 2, 2, stride=2, bias=False),
                          nn.Flatten(), nn.Linear(8, 2)),
            torch.randn(4, 3, 9), {"Conv1dRule": 2}),
        "depthwise conv": (
            nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 2)),
            torch.randn(4, 3, 5, 5), {"Conv2dRule": 1}),
        "embedding with repeated tokens and padding": (
            TokenModel(padding_idx=0), torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 1, 5], [6, 1, 2, 4]]),
            {"EmbeddingRule": 1}),
        "layer norm over two axes": (
            nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.LayerNorm((2, 3)), nn.Flatten(),
                          nn.Linear(6, 2)),
            torch.randn(4, 4), {"LayerNormRule": 1}),
        "group norm": (
            nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(36, 2)),
            torch.randn(4, 2, 5, 5), {"GroupNormRule": 1}),
        "batch norm in eval mode": (bn, torch.randn(4, 2, 5, 5), {"BatchNorm2dRule": 1}),
        "self-attention, sequence first": (Attention(batch_first=False), torch.randn(4, 5, 6),
                                           {"MultiheadAttentionRule": 1}),
        "cross-attention with masks and weights": (Attention(cross=True, masks=True, weights=True),
                                                    torch.randn(4, 5, 6), {"MultiheadAttentionRule": 1}),
        "transformer encoder layer": (
            nn.Sequential(nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True), nn.Flatten(),
                          nn.Linear(30, 3)),
            torch.randn(4, 5, 6), {"MultiheadAttentionRule": 1, "LayerNormRule": 2, "LinearRule": 3}),
    }


MODELS = _models()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("output", OUTPUTS)
def test_rule_is_exact_and_used(name, output):
    model, x, expected_rules = MODELS[name]
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    plan = lazykernel.plan(model, x, output=output, method="structured")
    used = {}
    for group in plan.groups:
        used[group.rule] = used.get(group.rule, 0) + 1
    for rule, count in expected_rules.items():
        assert used.get(rule, 0) == count, f"{name}: expected {count} x {rule}, plan:\n{plan}"
    ref = reference_ntk(model, x, output=output)
    for method in ("structured", "auto"):
        assert_close_to_reference(lazykernel.ntk(model, x, output=output, method=method), ref, torch.float64)
    x2 = x[:2].flip(0)
    assert_close_to_reference(lazykernel.ntk(model, x, x2, output=output, method="structured"),
                              reference_ntk(model, x, x2, output=output), torch.float64)


@pytest.mark.parametrize("name", ["conv2d strided, grouped, reflect padding", "transformer encoder layer",
                                  "embedding with repeated tokens and padding"])
def test_rule_is_exact_in_float32(name):
    model, x, _ = MODELS[name]
    model = model.float().eval()
    x = x.float() if x.is_floating_point() else x
    assert_close_to_reference(lazykernel.ntk(model, x, output="full", method="structured"),
                              reference_ntk(model, x, output="full"), torch.float32)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("form", ["pairwise", "gradient"])
def test_every_form_of_a_term_gives_the_same_kernel(output, form):
    # a Linear on [N, T, d]: both forms are valid; force each through the plan
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)).double()
    x = torch.randn(5, 5, 3, dtype=torch.float64)
    adapter = make_adapter(model, None)
    plan = StructuredPlan.build(adapter)
    plan.verify(x[:3])
    plan.forms[0] = [form]
    plan.forms[1] = ["pairwise"]
    a1, g1, tokens, deferred = plan.operands(x)
    out = torch.zeros(lazykernel.ntk(model, x, output=output).shape, dtype=torch.float64)
    lazykernel.gram_hadamard_accumulate(out, a1, a1, g1, g1, output)
    for a, g in deferred:
        grad = torch.einsum("ontd,ntk->nodk", g, a).reshape(5, 1, g.shape[0], -1)
        ones = grad.new_ones(5, 1, 1)
        lazykernel.gram_hadamard_accumulate(out, [ones], [ones], [grad], [grad], output)
    assert_close_to_reference(out, reference_ntk(model, x, output=output), torch.float64)


@pytest.mark.parametrize("output", OUTPUTS)
def test_gradient_form_under_a_small_budget_stays_exact(output):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 12, 4)).double()
    x = torch.randn(6, 12, 8, dtype=torch.float64)
    plan = lazykernel.plan(model, x, output=output, memory_budget=2e5, method="structured")
    assert plan.groups[0].form == "gradient", str(plan)
    assert plan.chunks[0] < 6, str(plan)
    got = lazykernel.ntk(model, x, output=output, memory_budget=2e5, method="structured")
    assert_close_to_reference(got, reference_ntk(model, x, output=output), torch.float64)


def test_gradient_slabs_take_what_the_budget_leaves():
    ntk_module = sys.modules["lazykernel.ntk"]
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 12, 4)).double()
    x = torch.randn(6, 12, 8, dtype=torch.float64)
    call = ntk_module._setup(model, x, None, "full", "structured", None, None, None)
    engine = call.engine
    a, g = torch.zeros(6, 12, 9, dtype=torch.float64), torch.zeros(4, 6, 12, 16, dtype=torch.float64)
    per_feature = 6 * 4 * 9 * 8                       # bytes of one output feature over the chunk
    assert engine._slab_features((a, g), (a, g), True, 1e12) == (16, 6 * 4 * 16 * 9)
    slab, elements = engine._slab_features((a, g), (a, g), True, 5.5 * per_feature)
    assert (slab, elements) == (5, 6 * 4 * 5 * 9)
    assert engine._slab_features((a, g), (a, g), False, 5.5 * per_feature)[0] == 2   # both chunks' rows
    assert engine._slab_features((a, g), (a, g), True, 1.0)[0] == 1                  # never below one


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("same", [True, False])
def test_gradient_block_in_slabs_is_the_gram_of_explicit_gradients(output, same):
    from lazykernel.ntk import _gradient_block
    torch.manual_seed(4)
    f64 = torch.float64
    n1, t, o, d, k = 4, 5, 3, 7, 6
    a1, g1 = torch.randn(n1, t, k, dtype=f64), torch.randn(o, n1, t, d, dtype=f64)
    a2, g2 = (a1, g1) if same else (torch.randn(3, t, k, dtype=f64), torch.randn(o, 3, t, d, dtype=f64))
    n2 = a2.shape[0]
    grad1 = torch.einsum("ontd,ntk->nodk", g1, a1).reshape(n1, o, -1)
    grad2 = torch.einsum("ontd,ntk->nodk", g2, a2).reshape(n2, o, -1)
    expected = {"trace": torch.einsum("iop,jop->ij", grad1, grad2),
                "diagonal": torch.einsum("iop,jop->ijo", grad1, grad2),
                "full": torch.einsum("iop,jqp->ijoq", grad1, grad2)}[output]
    out = torch.ones_like(expected)      # the block adds to what is there
    space = torch.full(((n1 + n2) * o * 3 * k,), float("nan"), dtype=f64)
    _gradient_block((a1, g1), (a2, g2), same, out, output, 3, space)   # 3 does not divide D = 7
    torch.testing.assert_close(out, expected + 1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("output", OUTPUTS)
def test_token_gram_matches_one_hot_definition(output):
    torch.manual_seed(3)
    vocab, o, d = 6, 3, 4
    def rows(n):
        ids = torch.randint(0, vocab, (n, 5))
        g = torch.randn(n, 5, o, d, dtype=torch.float64)
        dense = torch.zeros(n, vocab, o, d, dtype=torch.float64)
        for i in range(n):
            for t in range(5):
                dense[i, ids[i, t]] += g[i, t]
        nz = dense.abs().sum(dim=(2, 3)) != 0
        example, token = nz.nonzero(as_tuple=True)
        return (example, token, dense[example, token]), dense
    (r1, d1), (r2, d2) = rows(4), rows(3)
    shape = {"trace": (4, 3), "diagonal": (4, 3, o), "full": (4, 3, o, o)}[output]
    out = torch.zeros(shape, dtype=torch.float64)
    token_gram_accumulate(out, r1, r2, output, max_pairs_elements=2 * o * d)  # many small batches
    full = torch.einsum("ivod,jvpd->ijop", d1, d2)
    expected = {"trace": full.diagonal(dim1=2, dim2=3).sum(-1), "diagonal": full.diagonal(dim1=2, dim2=3),
                "full": full}[output]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_explicit_attention_matches_multihead_attention(batch_first, average):
    torch.manual_seed(4)
    m = nn.MultiheadAttention(8, 4, batch_first=batch_first).double().eval()
    q, k = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 7, 8, dtype=torch.float64)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    mask = torch.rand(5, 7) < 0.3
    mask[:, 0] = False
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    kwargs = dict(attn_mask=mask, key_padding_mask=padding, average_attn_weights=average)
    expected, w_expected = m(q, k, k, **kwargs)
    got, w_got = attention_forward(m, None, q, k, k, **kwargs)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(w_got, w_expected)
    with explicit_attention(m):
        assert "forward" in m.__dict__
        torch.testing.assert_close(m(q, k, k, **kwargs)[0], expected)
    assert "forward" not in m.__dict__


def test_attention_with_bias_kv_goes_to_the_generic_rule_and_stays_exact():
    torch.manual_seed(5)
    model = Attention().double().eval()
    model.attn = nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True).double()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    rules = {g.rule for g in lazykernel.plan(model, x, method="structured").groups}
    assert "MultiheadAttentionRule" not in rules
    assert_close_to_reference(lazykernel.ntk(model, x, output="full"),
                              reference_ntk(model, x, output="full"), torch.float64)


def test_attention_dropout_in_training_mode_is_refused():
    model = nn.Sequential(nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True))
    model[0].self_attn.dropout = 0.1
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    with pytest.raises(ValueError, match="MultiheadAttention, dropout=0.1.*model.eval"):
        lazykernel.ntk(model, torch.randn(2, 5, 6))


class Extras(nn.Module):
    """Parameters used directly in forward: some line up with the batch, some cannot."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(3, 4)
        self.pos = nn.Parameter(torch.randn(5, 4))        # [T, D]: h + pos lines up per example
        self.mix = nn.Parameter(torch.randn(4, 4))        # h @ mix on [N, T, D]: batched product
        self.cls = nn.Parameter(torch.randn(1, 4))        # expanded by hand along its own first axis
        self.head = nn.Linear(4, 2)

    def forward(self, x):                                 # x: [N, 5, 3]
        h = torch.tanh(self.proj(x) + self.pos) @ self.mix
        if self.kind == "cls":
            h = torch.cat([self.cls.expand(x.shape[0], -1).unsqueeze(1), h], dim=1)
        elif self.kind == "pooled":
            # a product with a 2-D input: an expanded parameter would change the output's shape
            return self.head(h.mean(1) @ self.mix)
        return self.head(h).mean(1)


@pytest.mark.parametrize("kind, broadcast, generic", [
    ("plain", {"pos", "mix", "cls"}, set()),       # an unused parameter has a zero gradient either way
    ("cls", {"pos", "mix", "cls"}, set()),         # its leading axis of 1 becomes the batch axis
    ("pooled", {"pos", "cls"}, {"mix"}),
])
def test_parameters_used_in_forward_get_the_broadcast_rule_where_it_applies(kind, broadcast, generic):
    torch.manual_seed(6)
    model = Extras(kind).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    plan = lazykernel.plan(model, x, method="structured")
    got = {p for g in plan.groups if g.rule == "BroadcastParameterRule" for p in g.params}
    left = {p for g in plan.groups if g.rule == "PerExampleJacobian" for p in g.params}
    assert got == broadcast, str(plan)
    assert left == generic, str(plan)
    for output in OUTPUTS:
        assert_close_to_reference(lazykernel.ntk(model, x, output=output), reference_ntk(model, x, output=output),
                                  torch.float64)


@pytest.mark.parametrize("positions", [6, 4])
def test_functional_model_with_batched_products_uses_the_broadcast_rule(positions):
    # with T = 4, as many positions as probe examples, b expanded to [4, 4] also
    # broadcasts along the positions: one example fewer tells them apart
    torch.manual_seed(7)
    params = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}

    def fn(p, x):                                         # x: [N, T, 3]
        return torch.tanh(x @ p["w"] + p["b"]).sum(1)

    x = torch.randn(5, positions, 3, dtype=torch.float64)
    plan = lazykernel.plan(fn, x, params=params, method="structured")
    assert {g.rule for g in plan.groups} == {"BroadcastParameterRule"}
    assert_close_to_reference(lazykernel.ntk(fn, x, params=params, output="full"),
                              reference_ntk(fn, x, output="full", params_selection=params), torch.float64)


@pytest.mark.parametrize("layer", ["attention", "encoder"])
def test_ntvp_runs_through_attention_and_encoder_layers(layer):
    # forward-mode AD has no rule for the fused CPU attention kernels; the
    # explicit products compute the same function
    torch.manual_seed(8)
    if layer == "attention":
        model = Attention()
    else:
        model = nn.Sequential(nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True),
                              nn.Flatten(), nn.Linear(30, 3))
    model = model.double().eval()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    for output in OUTPUTS:
        assert_close_to_reference(lazykernel.ntk(model, x, output=output, method="ntvp"),
                                  reference_ntk(model, x, output=output), torch.float64)
    assert torch.backends.mha.get_fastpath_enabled()


def test_embedding_with_scale_grad_by_freq_is_refused():
    model = nn.Sequential(nn.Embedding(6, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="scale_grad_by_freq=True.*Set scale_grad_by_freq=False"):
        lazykernel.ntk(model, torch.tensor([[1, 1, 2, 3], [0, 1, 1, 1]]))


def test_ntk_inside_no_grad_gives_the_same_kernel():
    model, x, _ = MODELS["transformer encoder layer"]
    model = model.double().eval()
    x = x.double()
    expected = lazykernel.ntk(model, x, output="full")
    with torch.no_grad():
        for method in ("structured", "jacobian", "ntvp"):
            torch.testing.assert_close(lazykernel.ntk(model, x, output="full", method=method), expected,
                                       rtol=1e-10, atol=1e-12)


def test_sliced_parameter_longer_chunks_than_the_slice_fall_back_and_stay_exact():
    # pos[:T] slices the expanded copy's batch axis: fine for 3 probe examples,
    # an error for a chunk of 9 > T = 4; the rule must be dropped before any chunk
    torch.manual_seed(9)
    model = SlicedPositions().double()
    ids = torch.randint(0, 10, (9, 4))
    plan = lazykernel.plan(model, ids, method="structured")
    assert {g.rule for g in plan.groups if "pos" in g.params} == {"PerExampleJacobian"}, str(plan)
    assert_close_to_reference(lazykernel.ntk(model, ids), reference_ntk(model, ids), torch.float64)
    # chunks no longer than the slice keep the fast rule
    small = lazykernel.plan(model, ids[:4], method="structured")
    assert {g.rule for g in small.groups if "pos" in g.params} == {"BroadcastParameterRule"}, str(small)
