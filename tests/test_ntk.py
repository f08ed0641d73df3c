"""lazykernel.ntk() against an explicit float64 per-(example, output) Jacobian reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lazykernel
from conftest import DTYPES, METHODS, OUTPUTS, assert_close_to_reference, reference_ntk

N1, N2 = 5, 3


# --------------------------------------------------------------------------- zoo


def _randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


class Squeeze(nn.Module):
    """[N, 1] -> [N]: a model whose output has shape [N] (O = 1)."""

    def forward(self, x):
        return x.squeeze(-1)


class SharedTwice(nn.Module):
    """One Linear used twice in the same forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = torch.tanh(self.lin(h))
        return self.head(h)


class Tied(nn.Module):
    """Two Linear modules sharing one weight (distinct biases)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = torch.tanh(self.second(h))
        return self.head(h)


class CustomElementwise(nn.Module):
    """Parameters in a hand-written elementwise formula (no known layer rule)."""

    def __init__(self, width):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-1.0, 1.0, width))
        self.b = nn.Parameter(torch.linspace(0.5, -0.3, width))

    def forward(self, x):
        return x * torch.sigmoid(self.a) + self.b * x.pow(2)


class EmbedPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 2)

    def forward(self, ids):
        return self.lin(self.emb(ids).mean(1))


class SequenceFirst(nn.Module):
    """[N, T, d] transposed to [T, N, d] before the Linear (a seq-first layout inside)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(3 * 5, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1)
        return self.head(h.reshape(x.shape[0], -1))


class FoldedBatch(nn.Module):
    """[N, T, d] reshaped to [N*T, d] for the Linear, then back."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(3 * 5, 2)

    def forward(self, x):
        n, t, d = x.shape
        h = torch.tanh(self.lin(x.reshape(n * t, d))).reshape(n, t, -1)
        return self.head(h.reshape(n, -1))


class PerExampleLoop(nn.Module):
    """The Linear is called on one example (shape [d]) at a time."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.stack([torch.tanh(self.lin(x[i])) for i in range(x.shape[0])]))


class EmbeddingTiedToOutput(nn.Module):
    """Language-model style: the embedding matrix is also the output projection."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids).mean(1)))
        return h @ self.emb.weight.T


class LinearWeightReusedFunctionally(nn.Module):
    """A Linear's weight used once through the module and once through F.linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = torch.tanh(nn.functional.linear(h, self.lin.weight))
        return self.head(h)


def _mlp(act, bias, n_out):
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
    return nn.Sequential(nn.Linear(3, 8, bias=bias), acts[act](), nn.Linear(8, n_out, bias=bias))


def _case(model, x_shape, params=None, n1=N1, n2=N2, seed=0):
    return dict(
        model=model,
        x1=_randn(n1, *x_shape, seed=seed + 101),
        x2=_randn(n2, *x_shape, seed=seed + 202),
        params=params,
    )


def _zoo_mlp(act, bias, n_out):
    def build():
        return _case(_mlp(act, bias, n_out), (3,))

    return build


def _zoo_scalar_output():
    return _case(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1), Squeeze()), (3,))


def _zoo_seq_linear():
    # Linear over the last axis of [N, T, d].
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 2))
    return _case(model, (3, 4))


def _zoo_two_position_axes():
    # Linear over the last axis of [N, T1, T2, d].
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 5, 2))
    return _case(model, (2, 3, 4))


def _zoo_wide_linear_short_sequence():
    # Few positions and a wide layer: a different cost regime than the one above.
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 16, 3))
    return _case(model, (2, 4))


def _zoo_wide_cnn_few_positions():
    model = nn.Sequential(nn.Conv2d(2, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2 * 2, 2))
    return _case(model, (2, 4, 4))


def _zoo_shared_twice():
    return _case(SharedTwice(), (4,))


def _zoo_tied():
    return _case(Tied(), (4,))


def _zoo_cnn():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    return _case(model, (2, 6, 6))


def _zoo_custom_param():
    model = nn.Sequential(nn.Linear(3, 4), CustomElementwise(4), nn.Linear(4, 2))
    return _case(model, (3,))


def _zoo_embedding():
    g = torch.Generator().manual_seed(7)
    return dict(
        model=EmbedPool(),
        x1=torch.randint(0, 10, (N1, 4), generator=g),
        x2=torch.randint(0, 10, (N2, 4), generator=g),
        params=None,
    )


def _zoo_embedding_tied_to_output():
    g = torch.Generator().manual_seed(8)
    return dict(
        model=EmbeddingTiedToOutput(),
        x1=torch.randint(0, 6, (N1, 3), generator=g),
        x2=torch.randint(0, 6, (N2, 3), generator=g),
        params=None,
    )


def _zoo_frozen_layer():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    return _case(model, (3,))


def _zoo_params_by_names():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    return _case(model, (3,), params=["2.weight", "0.bias"])


def _zoo_params_by_tuple_with_frozen_name():
    # 0.weight is named but frozen: it must not count.
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    return _case(model, (3,), params=("0.weight", "2.weight"))


def _zoo_params_by_predicate():
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2))
    return _case(model, (3,), params=lambda name, p: name.endswith("weight"))


def _zoo_output_2x2():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Unflatten(1, (2, 2)))
    return _case(model, (3,))


def _zoo_batchnorm_dropout_eval():
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].running_mean.copy_(_randn(8, seed=11).float() * 0.3)
        model[1].running_var.copy_(_randn(8, seed=12).float().abs() + 0.5)
        model[1].weight.copy_(1.0 + 0.2 * _randn(8, seed=13).float())
        model[1].bias.copy_(0.1 * _randn(8, seed=14).float())
    model.eval()
    return _case(model, (3,))


def _zoo_dropout_p0_train():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.0), nn.Linear(8, 3))
    model.train()
    return _case(model, (3,))


def _zoo_inplace_relu():
    return _case(nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)), (3,))


ZOO = {f"mlp_{a}_{'bias' if b else 'nobias'}_O{o}": _zoo_mlp(a, b, o)
       for a in ("relu", "tanh", "gelu") for b in (True, False) for o in (1, 3)}
ZOO.update(
    scalar_output_shape_N=_zoo_scalar_output,
    linear_on_sequence_NTd=_zoo_seq_linear,
    linear_on_two_position_axes=_zoo_two_position_axes,
    wide_linear_on_short_sequence=_zoo_wide_linear_short_sequence,
    linear_on_sequence_first_layout=lambda: _case(SequenceFirst(), (3, 4)),
    linear_on_folded_batch_positions=lambda: _case(FoldedBatch(), (3, 4)),
    linear_called_per_example_in_loop=lambda: _case(PerExampleLoop(), (3,)),
    inplace_relu_after_linear=_zoo_inplace_relu,
    shared_linear_used_twice=_zoo_shared_twice,
    tied_weights=_zoo_tied,
    linear_weight_reused_via_functional=lambda: _case(LinearWeightReusedFunctionally(), (3,)),
    embedding_tied_to_output_projection=_zoo_embedding_tied_to_output,
    small_cnn=_zoo_cnn,
    wide_cnn_few_positions=_zoo_wide_cnn_few_positions,
    custom_elementwise_parameters=_zoo_custom_param,
    embedding_on_token_ids=_zoo_embedding,
    frozen_layer=_zoo_frozen_layer,
    params_by_names=_zoo_params_by_names,
    params_by_tuple_with_frozen_name=_zoo_params_by_tuple_with_frozen_name,
    params_by_predicate=_zoo_params_by_predicate,
    output_shape_N_2_2=_zoo_output_2x2,
    batchnorm_dropout_in_eval=_zoo_batchnorm_dropout_eval,
    dropout_p0_in_train_mode=_zoo_dropout_p0_train,
)


def _build(name, dtype):
    torch.manual_seed(1234)
    case = ZOO[name]()
    training = case["model"].training
    case["model"] = case["model"].to(dtype)
    case["model"].train(training)
    for key in ("x1", "x2"):
        if case[key].is_floating_point():
            case[key] = case[key].to(dtype)
    return case


_REF_CACHE = {}


def _reference(name, dtype, case, output):
    key = (name, dtype, output)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = reference_ntk(case["model"], case["x1"], case["x2"], output, case["params"])
    return _REF_CACHE[key]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_matches_float64_explicit_jacobian_reference(name, method, output, dtype):
    case = _build(name, dtype)
    result = lazykernel.ntk(
        case["model"], case["x1"], case["x2"], output=output, method=method, params=case["params"]
    )
    assert_close_to_reference(result, _reference(name, dtype, case, output), dtype)


# ------------------------------------------------------------------ functional


def _hand_two_layer(params, x):
    h = torch.tanh(x @ params["w1"].T + params["b1"])
    return h @ params["w2"].T


def _functional_cases(dtype):
    g = torch.Generator().manual_seed(3)
    # Plain tensors with requires_grad=False: every floating entry still counts.
    hand = {
        "w1": torch.randn(6, 3, generator=g, dtype=torch.float64).to(dtype),
        "b1": torch.randn(6, generator=g, dtype=torch.float64).to(dtype),
        "w2": torch.randn(2, 6, generator=g, dtype=torch.float64).to(dtype),
    }
    torch.manual_seed(5)
    mlp = nn.Sequential(nn.Linear(3, 7), nn.GELU(), nn.Linear(7, 3))

    def call_mlp(params, x):
        return torch.func.functional_call(mlp, params, (x,))

    mlp_params = {k: v.detach().to(dtype) for k, v in mlp.named_parameters()}
    return {"hand_two_layer": (_hand_two_layer, hand), "functional_call_mlp": (call_mlp, mlp_params)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["hand_two_layer", "functional_call_mlp"])
def test_functional_model_with_params_dict_matches_reference(which, method, output, dtype):
    fn, pdict = _functional_cases(dtype)[which]
    x1 = _randn(N1, 3, seed=21).to(dtype)
    x2 = _randn(N2, 3, seed=22).to(dtype)
    result = lazykernel.ntk(fn, x1, x2, output=output, method=method, params=pdict)
    ref = reference_ntk(fn, x1, x2, output, pdict)
    assert_close_to_reference(result, ref, dtype)


def _warp(params, x):
    """A sampling grid from the input (F.grid_sample: no forward-mode AD), then a linear head."""
    theta = (x.flatten(1) @ params["loc"].T).view(-1, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    sampled = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    return sampled.flatten(1) @ params["head"].T


@pytest.mark.parametrize("method", METHODS)
def test_functional_model_with_an_op_without_forward_mode_and_detached_params(method):
    # the rule check's reverse-mode fallback differentiated the caller's tensors,
    # which need not require grad
    g = torch.Generator().manual_seed(6)
    pdict = {"loc": 0.3 * torch.randn(6, 16, generator=g, dtype=torch.float64),
             "head": torch.randn(2, 16, generator=g, dtype=torch.float64)}
    x = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    result = lazykernel.ntk(_warp, x, output="full", method=method, params=pdict)
    assert_close_to_reference(result, reference_ntk(_warp, x, None, "full", pdict), torch.float64)
    assert lazykernel.plan(_warp, x, output="full", method=method, params=pdict).method in METHODS


@pytest.mark.parametrize("method", METHODS)
def test_functional_params_dict_integer_entry_is_not_trainable(method):
    g = torch.Generator().manual_seed(4)
    pdict = {
        "w1": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "w2": torch.randn(2, 5, generator=g, dtype=torch.float64),
        "shift": torch.tensor(2),  # integer: used, but not a trainable parameter
    }

    def fn(p, x):
        return torch.tanh(x @ p["w1"].T + p["shift"]) @ p["w2"].T

    x1 = _randn(N1, 3, seed=23)
    x2 = _randn(N2, 3, seed=24)
    result = lazykernel.ntk(fn, x1, x2, output="full", method=method, params=pdict)
    assert_close_to_reference(result, reference_ntk(fn, x1, x2, "full", pdict), torch.float64)


# ----------------------------------------------------------- closed form check


@pytest.mark.parametrize("method", METHODS)
def test_linear_model_equals_closed_form_xdotx_plus_one(method):
    # f(x) = W x + b  =>  Θ(x, x')_ab = (x . x' + 1) δ_ab, independent of the reference.
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x1 = _randn(N1, 3, seed=31)
    x2 = _randn(N2, 3, seed=32)
    gram = x1 @ x2.T + 1.0
    expected_full = gram[:, :, None, None] * torch.eye(2, dtype=torch.float64)
    full = lazykernel.ntk(model, x1, x2, output="full", method=method)
    trace = lazykernel.ntk(model, x1, x2, output="trace", method=method)
    diag = lazykernel.ntk(model, x1, x2, output="diagonal", method=method)
    torch.testing.assert_close(full, expected_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(trace, 2 * gram, rtol=1e-12, atol=1e-12)  # sum over O=2, not a mean
    torch.testing.assert_close(diag, gram[:, :, None].expand(N1, N2, 2), rtol=1e-12, atol=1e-12)


def test_reference_itself_matches_closed_form_for_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x1 = _randn(N1, 3, seed=33).float()
    x2 = _randn(N2, 3, seed=34).float()
    gram = x1.double() @ x2.double().T + 1.0
    torch.testing.assert_close(reference_ntk(model, x1, x2, "trace", None), 2 * gram)


# ------------------------------------------------------------- x2 and shapes


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", METHODS)
def test_x2_none_equals_explicit_x2_equal_x1(method, output):
    case = _build("mlp_tanh_bias_O3", torch.float64)
    implicit = lazykernel.ntk(case["model"], case["x1"], output=output, method=method)
    explicit = lazykernel.ntk(case["model"], case["x1"], case["x1"], output=output, method=method)
    assert implicit.shape[:2] == (N1, N1)
    torch.testing.assert_close(implicit, explicit, rtol=1e-12, atol=1e-12 * explicit.abs().max().item())
    ref = reference_ntk(case["model"], case["x1"], None, output, None)
    assert_close_to_reference(implicit, ref, torch.float64)
    # an x2 equal to x1 takes the symmetric path; one differing in its last
    # example takes the general one, whose other columns are the same kernel
    x2 = case["x1"].clone()
    x2[-1] += 1.0
    general = lazykernel.ntk(case["model"], case["x1"], x2, output=output, method=method)
    torch.testing.assert_close(general[:, :-1], implicit[:, :-1], rtol=1e-10,
                               atol=1e-12 * implicit.abs().max().item())
    assert_close_to_reference(general, reference_ntk(case["model"], case["x1"], x2, output, None), torch.float64)


def test_x2_with_the_same_values_as_x1_is_computed_as_a_symmetric_kernel():
    case = _build("mlp_tanh_bias_O3", torch.float64)
    model, x = case["model"], case["x1"]
    symmetric = lazykernel.plan(model, x).flops
    for x2 in (x, x.clone(), x.t().contiguous().t()):
        assert lazykernel.plan(model, x, x2).flops == symmetric
        assert torch.equal(lazykernel.ntk(model, x, x2), lazykernel.ntk(model, x))
    # the same values in another dtype, a different sign of zero, or one more
    # example are other inputs: both sides are formed and every pair computed
    signed = x.clone()
    signed[0, 0] = 0.0
    negative = signed.clone()
    negative[0, 0] = -0.0
    assert lazykernel.plan(model, signed, negative).flops > lazykernel.plan(model, signed).flops
    longer = torch.cat([x, x[:1]])
    assert lazykernel.plan(model, x, longer).flops > symmetric
    ids = torch.randint(0, 7, (5, 4), generator=torch.Generator().manual_seed(0))
    tokens = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    assert lazykernel.plan(tokens, ids, ids.clone()).flops == lazykernel.plan(tokens, ids).flops


EXPECTED_SHAPES = {
    ("trace", 3): (N1, N2),
    ("full", 3): (N1, N2, 3, 3),
    ("diagonal", 3): (N1, N2, 3),
    ("trace", 1): (N1, N2),
    ("full", 1): (N1, N2),
    ("diagonal", 1): (N1, N2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", METHODS)
def test_returned_shape_dtype_and_device_per_mode(method, output, n_out, dtype):
    case = _build(f"mlp_relu_bias_O{n_out}", dtype)
    result = lazykernel.ntk(case["model"], case["x1"], case["x2"], output=output, method=method)
    assert isinstance(result, torch.Tensor)
    assert tuple(result.shape) == EXPECTED_SHAPES[(output, n_out)]
    assert result.dtype == dtype
    assert result.device == next(case["model"].parameters()).device


def test_output_of_shape_N_2_2_is_flattened_to_four_outputs():
    case = _build("output_shape_N_2_2", torch.float64)
    full = lazykernel.ntk(case["model"], case["x1"], case["x2"], output="full")
    diag = lazykernel.ntk(case["model"], case["x1"], case["x2"], output="diagonal")
    assert tuple(full.shape) == (N1, N2, 4, 4)
    assert tuple(diag.shape) == (N1, N2, 4)


# ------------------------------------------------------------- chunking


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", METHODS)
def test_batch_size_does_not_change_result(method, output, batch_size):
    case = _build("small_cnn", torch.float64)
    default = lazykernel.ntk(case["model"], case["x1"], case["x2"], output=output, method=method)
    chunked = lazykernel.ntk(
        case["model"], case["x1"], case["x2"], output=output, method=method, batch_size=batch_size
    )
    scale = default.abs().max().item()
    torch.testing.assert_close(chunked, default, rtol=1e-10, atol=1e-12 * scale)
    assert_close_to_reference(chunked, _reference("small_cnn", torch.float64, case, output), torch.float64)
    # x2=None (x with itself) chunked, too
    sym = lazykernel.ntk(case["model"], case["x1"], output=output, method=method, batch_size=batch_size)
    assert_close_to_reference(sym, reference_ntk(case["model"], case["x1"], None, output, None), torch.float64)


def _budget_mlp():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
    return model.double(), _randn(12, 4, seed=41), _randn(7, 4, seed=42)


def _budget_sequence():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 12, 2))
    return model.double(), _randn(12, 3, 4, seed=43), _randn(7, 3, 4, seed=44)


def _budget_cnn():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 2))
    return model.double(), _randn(12, 2, 5, 5, seed=45), _randn(7, 2, 5, 5, seed=46)


@pytest.mark.parametrize("build", [_budget_mlp, _budget_sequence, _budget_cnn], ids=["mlp", "sequence", "cnn"])
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", METHODS)
def test_small_memory_budget_forcing_chunks_does_not_change_result(method, output, build):
    model, x1, x2 = build()
    default = lazykernel.ntk(model, x1, x2, output=output, method=method)
    scale = default.abs().max().item()
    # The smallest power-of-two budget the library accepts (smaller ones must be
    # refused with a memory_budget ValueError), then a few larger ones: none may
    # change the numbers.
    smallest = None
    for k in range(4, 34):
        try:
            result = lazykernel.ntk(model, x1, x2, output=output, method=method, memory_budget=2 ** k)
        except ValueError as error:
            assert "memory_budget" in str(error).lower()
            continue
        smallest = k
        torch.testing.assert_close(result, default, rtol=1e-10, atol=1e-12 * scale)
        break
    assert smallest is not None, "no memory_budget up to 8 GiB was accepted"
    for k in (smallest + 1, smallest + 2, smallest + 4, smallest + 6):
        result = lazykernel.ntk(model, x1, x2, output=output, method=method, memory_budget=2 ** k)
        torch.testing.assert_close(result, default, rtol=1e-10, atol=1e-12 * scale)
    # and x2=None with a small budget (symmetric tiling) equals the reference too
    sym = lazykernel.ntk(model, x1, output=output, method=method, memory_budget=2 ** (smallest + 1))
    assert_close_to_reference(sym, reference_ntk(model, x1, None, output, None), torch.float64)
    assert_close_to_reference(default, reference_ntk(model, x1, x2, output, None), torch.float64)


@pytest.mark.parametrize("x2_none", [True, False], ids=["x2_none", "x2_is_x1"])
@pytest.mark.parametrize("method", METHODS)
def test_sequence_first_layout_with_batch_equal_to_positions_is_not_mixed_up(method, x2_none):
    # N == T: a rule that reads the Linear's [T, N, d] input as [N, T, d] would
    # assign positions to the wrong examples without any shape error.
    torch.manual_seed(3)
    model = SequenceFirst().double()
    x = _randn(3, 3, 4, seed=51)
    x2 = None if x2_none else x
    result = lazykernel.ntk(model, x, x2, output="full", method=method)
    assert_close_to_reference(result, reference_ntk(model, x, None, "full", None), torch.float64)


# ------------------------------------------------------------- kernel properties


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp_gelu_bias_O3", "small_cnn", "output_shape_N_2_2"])
def test_full_kernel_of_x_with_itself_is_symmetric(name, method):
    case = _build(name, torch.float64)
    full = lazykernel.ntk(case["model"], case["x1"], output="full", method=method)
    n, _, o, _ = full.shape
    assert o > 1
    swapped = full.permute(1, 0, 3, 2)  # Θ_ij,op = Θ_ji,po
    torch.testing.assert_close(full, swapped, rtol=1e-10, atol=1e-12 * full.abs().max().item())
    # and the [N*O, N*O] matrix is positive semi-definite
    flat = full.permute(0, 2, 1, 3).reshape(n * o, n * o)
    eig = torch.linalg.eigvalsh((flat + flat.T) / 2)
    assert eig.min().item() >= -1e-6 * eig.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp_relu_bias_O3", "tied_weights", "embedding_on_token_ids"])
def test_trace_kernel_of_x_with_itself_is_positive_semidefinite(name, method, dtype):
    case = _build(name, dtype)
    k = lazykernel.ntk(case["model"], case["x1"], output="trace", method=method).double()
    assert k.shape == (N1, N1)
    torch.testing.assert_close(k, k.T, rtol=1e-5, atol=1e-6 * k.abs().max().item())
    eig = torch.linalg.eigvalsh((k + k.T) / 2)
    assert eig.max().item() > 0
    assert eig.min().item() >= -1e-6 * eig.abs().max().item()


# ------------------------------------------------------------- side effects


@pytest.mark.parametrize("method", METHODS)
def test_ntk_leaves_model_parameters_flags_grads_and_mode_unchanged(method):
    case = _build("params_by_tuple_with_frozen_name", torch.float64)
    model = case["model"]
    model.train()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    lazykernel.ntk(model, case["x1"], case["x2"], output="full", method=method, params=case["params"])
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n][0]), f"{n} was modified"
        assert p.requires_grad == before[n][1], f"{n}.requires_grad changed"
        assert p.grad is None, f"{n}.grad was populated"
    assert model.training, "ntk() switched the model out of training mode"
    assert all(m.training for m in model.modules())


# ------------------------------------------------------------- random MLPs


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 12),
    depth=st.integers(1, 3),
    n_out=st.integers(1, 4),
    n1=st.integers(1, 4),
    n2=st.integers(1, 4),
    method=st.sampled_from(METHODS),
    output=st.sampled_from(OUTPUTS),
    seed=st.integers(0, 2 ** 16),
)
def test_random_mlps_match_reference(width, depth, n_out, n1, n2, method, output, seed):
    torch.manual_seed(seed)
    layers, d = [], 3
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, n_out))
    model = nn.Sequential(*layers).double()
    x1 = _randn(n1, 3, seed=seed + 1)
    x2 = _randn(n2, 3, seed=seed + 2)
    result = lazykernel.ntk(model, x1, x2, output=output, method=method)
    assert_close_to_reference(result, reference_ntk(model, x1, x2, output, None), torch.float64)


def test_progress_reports_tiles_on_stderr_and_leaves_result_unchanged(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    quiet = lazykernel.ntk(model, x, batch_size=2)
    capsys.readouterr()
    loud = lazykernel.ntk(model, x, batch_size=2, progress=True)
    err = capsys.readouterr().err
    torch.testing.assert_close(loud, quiet, rtol=0, atol=0)
    # 3 chunks of 2 examples, upper triangle of chunk pairs: 6 tiles
    assert "6/6" in err


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("inside", [True, False])
def test_inference_mode_and_inference_tensors_are_accepted(method, inside):
    # the structured capture differentiates the model: it turns inference mode off for
    # itself and copies inputs created under it, which autograd cannot save
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    expected = reference_ntk(model, x, output="full")
    with torch.inference_mode():
        x_inference = x.clone()
        if inside:
            got = lazykernel.ntk(model, x_inference, output="full", method=method)
            capture = lazykernel.plan(model, x_inference).capture
    if not inside:
        got = lazykernel.ntk(model, x_inference, output="full", method=method)
        capture = lazykernel.plan(model, x_inference).capture
    assert_close_to_reference(got, expected, torch.float64)
    assert capture == "one backward of the layer chain, batched over outputs"


class _SquareWithoutJvp(torch.autograd.Function):
    """x², with a backward but no forward-mode rule: the rule check falls back to reverse mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquaredHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_SquareWithoutJvp.apply(self.a(x)))


@pytest.mark.parametrize("inside", [True, False])
def test_inference_mode_with_an_op_without_forward_mode_ad(inside):
    torch.manual_seed(8)
    model = _SquaredHidden().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    expected = reference_ntk(model, x, output="full")
    with torch.inference_mode():
        x_inference = x.clone()
        if inside:
            got = lazykernel.ntk(model, x_inference, output="full", method="structured")
    if not inside:
        got = lazykernel.ntk(model, x_inference, output="full", method="structured")
    assert_close_to_reference(got, expected, torch.float64)


@pytest.mark.parametrize("output", ["trace", "full"])
def test_ntvp_with_an_op_without_forward_mode_ad(output):
    # no JVP through the model: the products take x2's per-example Jacobians from reverse mode
    torch.manual_seed(11)
    model = _SquaredHidden().double()
    x1 = torch.randn(5, 3, dtype=torch.float64)
    x2 = torch.randn(4, 3, dtype=torch.float64)
    got = lazykernel.ntk(model, x1, x2, output=output, method="ntvp")
    assert_close_to_reference(got, reference_ntk(model, x1, x2, output=output), torch.float64)


def _module_listed_twice():
    torch.manual_seed(12)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    return nn.Sequential(conv, nn.Tanh(), conv, nn.Flatten(), nn.Linear(2 * 5 * 5, 3)).double().eval()


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntvp"])
def test_a_module_listed_twice_is_exact_and_keeps_its_parameters(method):
    # torch.func.functional_call does not restore a module reachable under two names
    model = _module_listed_twice()
    x1 = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    x2 = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    expected = reference_ntk(_module_listed_twice(), x1, x2, output="full")
    for _ in range(2):                       # a second call sees what the first left
        got = lazykernel.ntk(model, x1, x2, output="full", method=method)
        assert_close_to_reference(got, expected, torch.float64)
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())
    model.float()                             # a damaged module refuses to move


class _SparseEmbedding(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.emb = nn.Embedding(7, 4, sparse=sparse)
        self.bag = nn.EmbeddingBag(7, 4, mode="mean", sparse=sparse)
        self.lin = nn.Linear(4, 3)

    def forward(self, ids):
        return self.lin(torch.tanh(self.emb(ids)).sum(1) + self.bag(ids))


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntvp"])
def test_embeddings_with_sparse_gradients_give_the_dense_kernel(method):
    # sparse=True only changes the layout of the gradient, which torch.func cannot take
    torch.manual_seed(3)
    model = _SparseEmbedding(sparse=True).double().eval()
    dense = _SparseEmbedding(sparse=False).double().eval()
    dense.load_state_dict(model.state_dict())
    ids = torch.tensor([[0, 1, 2, 1], [3, 0, 0, 6], [5, 5, 2, 4]])
    got = lazykernel.ntk(model, ids, output="full", method=method)
    assert_close_to_reference(got, reference_ntk(dense, ids, output="full"), torch.float64)
    assert model.emb.sparse and model.bag.sparse
