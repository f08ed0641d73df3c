"""jvp, vjp and ntk_vp against float64 products with explicit per-example Jacobians."""

import copy

import pytest
import torch
from torch import nn

import lazykernel
from conftest import _explicit_jacobian, reference_ntk


def _mlp(widths=(5, 7, 6, 3), act=nn.ReLU, seed=0, bias=True):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    """Not a Sequential: takes the generic path."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)) + x)


def _nested():
    """Sequential inside Sequential, a conv and a flatten between linear maps."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(),
        nn.Sequential(nn.Linear(2 * 3 * 3, 6), nn.GELU(), nn.Linear(6, 2, bias=False)),
    )


CASES = {
    "mlp_relu": (lambda: _mlp(), (6, 5)),
    "mlp_tanh_nobias": (lambda: _mlp(act=nn.Tanh, bias=False), (4, 5)),
    "mlp_scalar_output": (lambda: _mlp(widths=(3, 8, 1)), (5, 3)),
    "nested_conv": (_nested, (3, 1, 5, 5)),
    "residual": (_Residual, (5, 4)),
}


def _reference_jacobian(model, x, names=None):
    """[N, O, P] float64 Jacobian over the named parameters (all when None)."""
    double = copy.deepcopy(model).double()
    named = dict(double.named_parameters())
    names = list(named) if names is None else names
    with torch.enable_grad():
        return _explicit_jacobian(double, x.double(), [named[n] for n in names]), names


def _random_like_params(model, names, dtype, seed=5):
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    return {n: torch.randn(named[n].shape, dtype=dtype, generator=gen) for n in names}


def _flat(d, names):
    return torch.cat([d[n].reshape(-1).double() for n in names])


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["auto", "generic", "structured"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jvp_matches_explicit_jacobian(case, method, dtype):
    build, shape = CASES[case]
    model = build().to(dtype)
    if method == "structured" and not isinstance(model, nn.Sequential):
        pytest.skip("structured needs an nn.Sequential (tested in test_jvp_errors)")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    jac, names = _reference_jacobian(model, x)
    tangent = _random_like_params(model, names, dtype)
    y, y_dot = lazykernel.jvp(model, x, tangent, method=method)
    assert y.dtype == y_dot.dtype == dtype
    with torch.no_grad():
        expected_y = copy.deepcopy(model).double()(x.double())
    expected = (jac @ _flat(tangent, names)).reshape(expected_y.shape)
    assert y.shape == y_dot.shape == expected_y.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(y.double(), expected_y, **TOL[dtype])
    torch.testing.assert_close(y_dot.double(), expected, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


def test_jvp_tangent_is_a_central_difference_of_the_network():
    model = _mlp(act=nn.Tanh).double()
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    names = [n for n, _ in model.named_parameters()]
    tangent = _random_like_params(model, names, torch.float64)
    _, y_dot = lazykernel.jvp(model, x, tangent)
    h = 1e-5

    def shifted(sign):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p += sign * h * tangent[n]
            return moved(x)

    difference = (shifted(1) - shifted(-1)) / (2 * h)
    # central difference error is O(h²·‖f'''‖) ~ 1e-10 here; round-off ~1e-16/h ~ 1e-11
    torch.testing.assert_close(y_dot, difference, rtol=1e-7, atol=1e-8)


def test_jvp_with_parameter_selection_list_tangent_and_functional_model():
    model = _mlp().double()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    names = ["0.weight", "4.bias"]
    jac, _ = _reference_jacobian(model, x, names)
    tangent = _random_like_params(model, names, torch.float64)
    expected = (jac @ _flat(tangent, names)).reshape(4, 3)
    _, by_dict = lazykernel.jvp(model, x, tangent, params=names)
    _, by_list = lazykernel.jvp(model, x, [tangent[n] for n in names], params=names)
    torch.testing.assert_close(by_dict, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(by_list, expected, rtol=1e-10, atol=1e-12)

    values = {n: p.detach() for n, p in model.named_parameters()}
    fn = lambda p, inp: torch.func.functional_call(model, p, (inp,))  # noqa: E731
    full_tangent = {n: tangent.get(n, torch.zeros_like(v)) for n, v in values.items()}
    _, functional = lazykernel.jvp(fn, x, full_tangent, params=values)
    torch.testing.assert_close(functional, expected, rtol=1e-10, atol=1e-12)


def test_jvp_chunks_agree_with_one_batch():
    model = _mlp().double()
    x = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    tangent = _random_like_params(model, [n for n, _ in model.named_parameters()], torch.float64)
    whole = lazykernel.jvp(model, x, tangent)
    chunked = lazykernel.jvp(model, x, tangent, batch_size=3)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_jvp_errors():
    model = _mlp()
    x = torch.randn(3, 5)
    good = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="missing names"):
        lazykernel.jvp(model, x, {"0.weight": good["0.weight"]})
    with pytest.raises(ValueError, match="unknown names"):
        lazykernel.jvp(model, x, dict(good, extra=torch.zeros(1)))
    with pytest.raises(ValueError, match="has shape"):
        lazykernel.jvp(model, x, dict(good, **{"0.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match="sequence of 1 tensors"):
        lazykernel.jvp(model, x, [good["0.weight"]])
    with pytest.raises(ValueError, match="unknown method"):
        lazykernel.jvp(model, x, good, method="fast")
    with pytest.raises(ValueError, match="needs a plain nn.Sequential"):
        lazykernel.jvp(_Residual(), torch.randn(2, 4),
                       {n: torch.zeros_like(p) for n, p in _Residual().named_parameters()}, method="structured")
    with pytest.raises(ValueError, match="batch_size"):
        lazykernel.jvp(model, x, good, batch_size=0)
    with pytest.raises(ValueError, match="memory_budget .* too small"):
        lazykernel.jvp(model, x, good, memory_budget=10)
    dropout = nn.Sequential(nn.Linear(5, 2), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="eval"):
        lazykernel.jvp(dropout, x, {n: torch.zeros_like(p) for n, p in dropout.named_parameters()})


def test_jvp_generic_path_is_differentiable_in_the_tangent():
    model = _mlp().double()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    names = [n for n, _ in model.named_parameters()]
    tangent = {n: t.requires_grad_(True) for n, t in _random_like_params(model, names, torch.float64).items()}
    _, y_dot = lazykernel.jvp(model, x, tangent)
    c = torch.randn_like(y_dot)
    grads = torch.autograd.grad((y_dot * c).sum(), [tangent[n] for n in names])
    jac, _ = _reference_jacobian(model, x)
    expected = torch.einsum("nop,no->p", jac, c)  # d⟨c, J t⟩/dt = Jᵀ c
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["mlp_relu", "nested_conv", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vjp_matches_explicit_jacobian(case, dtype):
    build, shape = CASES[case]
    model = build().to(dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    jac, names = _reference_jacobian(model, x)
    with torch.no_grad():
        out_shape = model(x).shape
    cot = torch.randn(out_shape, generator=torch.Generator().manual_seed(10)).to(dtype)
    grads = lazykernel.vjp(model, x, cot, batch_size=2)
    assert list(grads) == names
    expected = torch.einsum("nop,no->p", jac, cot.double().reshape(jac.shape[0], -1))
    got = _flat(grads, names)
    torch.testing.assert_close(got, expected, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * expected.abs().max().item())
    for n, p in model.named_parameters():
        assert grads[n].shape == p.shape and grads[n].dtype == dtype


def test_vjp_rejects_a_misshapen_cotangent():
    model = _mlp()
    with pytest.raises(ValueError, match="cotangent must be shaped like"):
        lazykernel.vjp(model, torch.randn(3, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="cotangent must be a tensor"):
        lazykernel.vjp(model, torch.randn(3, 5), [1.0])
    with pytest.raises(ValueError, match=r"cotangent must be shaped like the model's output \[0, \*\(3,\)\]"):
        lazykernel.vjp(model, torch.randn(0, 5), torch.randn(0, 4))
    grads = lazykernel.vjp(model, torch.randn(0, 5), torch.randn(0, 3))
    assert all(torch.equal(grads[n], torch.zeros_like(p)) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", ["mlp_relu", "mlp_scalar_output", "nested_conv"])
@pytest.mark.parametrize("output", ["trace", "full"])
@pytest.mark.parametrize("two_sets", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ntk_vp_matches_kernel_times_vector(case, output, two_sets, dtype):
    build, shape = CASES[case]
    model = build().to(dtype)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(*shape, generator=gen).to(dtype)
    x2 = torch.randn(shape[0] + 2, *shape[1:], generator=gen).to(dtype) if two_sets else None
    n2 = (x2 if two_sets else x).shape[0]
    kernel = reference_ntk(model, x, x2, output=output)  # float64
    if kernel.dim() == 4:  # full, O > 1: r[i, a] = Σ_jb Θ[i, j, a, b] v[j, b]
        v = torch.randn(n2, kernel.shape[-1], generator=gen)
        expected = torch.einsum("ijab,jb->ia", kernel, v.double())
    else:
        v = torch.randn(n2, generator=gen)
        expected = kernel @ v.double()
    got = lazykernel.ntk_vp(model, x, v.to(dtype), x2, output=output, batch_size=2)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * expected.abs().max().item())


def test_ntk_vp_agrees_with_library_ntk_for_several_columns():
    model = _mlp()
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(9, 5, generator=gen)
    v = torch.randn(9, 4, generator=gen)
    expected = lazykernel.ntk(model, x, output="trace").double() @ v.double()
    got = lazykernel.ntk_vp(model, x, v)
    assert got.shape == (9, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_ntk_vp_errors():
    model = _mlp()
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="unknown output"):
        lazykernel.ntk_vp(model, x, torch.randn(4), output="diagonal")
    with pytest.raises(ValueError, match=r"\[N2\] or \[N2, C\]"):
        lazykernel.ntk_vp(model, x, torch.randn(5))
    with pytest.raises(ValueError, match=r"\[N2, O\] = \[4, 3\]"):
        lazykernel.ntk_vp(model, x, torch.randn(4), output="full")
    with pytest.raises(ValueError, match="same trailing shape"):
        lazykernel.ntk_vp(model, x, torch.randn(2), torch.randn(2, 6))
    with pytest.raises(ValueError, match="floating-point"):
        lazykernel.ntk_vp(model, x, torch.ones(4, dtype=torch.int64))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def test_products_of_a_transformer_layer_in_eval_mode():
    # an eval-mode encoder layer takes PyTorch's fused path where it can, which has no
    # forward-mode rule: the products run the layer's unfused path, as ntk does
    torch.manual_seed(11)
    model = _Encoder().double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    jac, names = _reference_jacobian(model, x)
    tangent = _random_like_params(model, names, torch.float64)
    cot = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        _, y_dot = lazykernel.jvp(model, x, tangent)
        grads = lazykernel.vjp(model, x, cot)
        v = torch.randn(5, dtype=torch.float64)
        kv = lazykernel.ntk_vp(model, x, v)
    torch.testing.assert_close(y_dot.reshape(-1), jac.reshape(-1, jac.shape[2]) @ _flat(tangent, names),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_flat(grads, names), torch.einsum("nop,no->p", jac, cot), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kv, reference_ntk(model, x) @ v, rtol=1e-10, atol=1e-10)
    assert torch.backends.mha.get_fastpath_enabled()


def test_products_leave_a_module_listed_twice_with_its_parameters():
    torch.manual_seed(4)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    tangent = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    lazykernel.jvp(model, x, tangent, method="generic")
    lazykernel.vjp(model, x, torch.randn(5, 4, dtype=torch.float64))
    lazykernel.ntk_vp(model, x, torch.randn(5, dtype=torch.float64))
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())
    model.float()


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def _shared_activation():
    act = nn.Tanh()
    return nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 6), act, nn.Linear(6, 2))


def _linear_listed_twice():
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 2))


class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def _parametrized_linear():
    from torch.nn.utils import parametrize
    first = nn.Linear(4, 4)
    parametrize.register_parametrization(first, "weight", _Symmetric())
    return nn.Sequential(first, nn.Tanh(), nn.Linear(4, 2))


def _subclassed_linear():
    return nn.Sequential(_DoubledLinear(4, 6), nn.Tanh(), nn.Linear(6, 2))


@pytest.mark.parametrize("build", [_shared_activation, _linear_listed_twice, _parametrized_linear,
                                   _subclassed_linear])
def test_products_of_sequentials_the_layer_walk_must_not_misread(build):
    # the layer-by-layer jvp walks a Sequential only where that is its forward
    torch.manual_seed(6)
    model = build().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    jac, names = _reference_jacobian(model, x)
    tangent = _random_like_params(model, names, torch.float64)
    with torch.no_grad():
        expected_y = model(x)
        y, y_dot = lazykernel.jvp(model, x, tangent)
    torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_dot, (jac @ _flat(tangent, names)).reshape(5, 2), rtol=1e-10, atol=1e-12)
    v = torch.randn(5, 2, dtype=torch.float64)
    kernel = torch.einsum("iop,jqp->iojq", jac, jac).reshape(10, 10)
    got = lazykernel.ntk_vp(model, x, v, output="full")
    torch.testing.assert_close(got.reshape(-1), kernel @ v.reshape(-1), rtol=1e-10, atol=1e-10)


def test_a_list_tangent_follows_the_models_parameter_order_whatever_the_selection_order():
    model = _mlp().double()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    names = ["4.bias", "0.bias"]                      # not in named_parameters() order
    tangent = _random_like_params(model, names, torch.float64)
    _, by_dict = lazykernel.jvp(model, x, tangent, params=names)
    in_model_order = [tangent["0.bias"], tangent["4.bias"]]
    _, by_list = lazykernel.jvp(model, x, in_model_order, params=names)
    torch.testing.assert_close(by_list, by_dict, rtol=1e-12, atol=1e-12)


def test_ntk_vp_with_no_examples_on_either_side_is_the_empty_sum():
    model = _mlp().double()
    x, empty = torch.randn(4, 5, dtype=torch.float64), torch.zeros(0, 5, dtype=torch.float64)
    assert torch.equal(lazykernel.ntk_vp(model, x, torch.zeros(0, dtype=torch.float64), empty),
                       torch.zeros(4, dtype=torch.float64))
    assert lazykernel.ntk_vp(model, empty, torch.randn(4, dtype=torch.float64), x).shape == (0,)
    assert lazykernel.ntk_vp(model, empty, torch.zeros(0, 2, dtype=torch.float64)).shape == (0, 2)
    full = lazykernel.ntk_vp(model, x, torch.zeros(0, 3, dtype=torch.float64), empty, output="full")
    assert torch.equal(full, torch.zeros(4, 3, dtype=torch.float64))


class _TwiceInside(nn.Module):
    """One Linear under two names inside a layer of a Sequential."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_the_structured_jvp_leaves_a_layer_holding_a_module_twice_with_its_parameters():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), _TwiceInside(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    jac, names = _reference_jacobian(model, x)
    tangent = _random_like_params(model, names, torch.float64)
    _, y_dot = lazykernel.jvp(model, x, tangent, method="structured")
    torch.testing.assert_close(y_dot, (jac @ _flat(tangent, names)).reshape(5, 2), rtol=1e-10, atol=1e-12)
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())


def test_auto_jvp_keeps_the_gradient_with_respect_to_x():
    # auto took the structured path (under no_grad) whenever the tangent needed no
    # gradient, so the outputs lost their dependence on x, and with them a
    # LinearizedModel's input gradient (a saliency map of the lazy model).
    model = _mlp(act=nn.Tanh).double()
    tangent = _random_like_params(model, [n for n, _ in model.named_parameters()], torch.float64)
    x = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    f, f_dot = lazykernel.jvp(model, x, tangent, method="auto")
    (got,) = torch.autograd.grad(f.sum() + f_dot.sum(), x)
    g, g_dot = lazykernel.jvp(model, x, tangent, method="generic")
    (expected,) = torch.autograd.grad(g.sum() + g_dot.sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (direct,) = torch.autograd.grad(model(x).sum(), x)
    assert not torch.allclose(got, direct)  # the tangent term contributes
    with pytest.raises(ValueError, match="does not propagate gradients to the tangent or to x"):
        lazykernel.jvp(model, x, tangent, method="structured")
    lin = lazykernel.linearize(model).requires_grad_(False)
    xx = x.detach().clone().requires_grad_(True)
    (saliency,) = torch.autograd.grad(lin(xx).sum(), xx)
    (reference,) = torch.autograd.grad(model(xx).sum(), xx)  # f_lin(θ0) = f(θ0)
    torch.testing.assert_close(saliency, reference, rtol=1e-12, atol=1e-12)


class _ViewedOffset(nn.Module):
    """A learned offset that reaches the output through views alone: with one example
    per chunk, autograd's gradient of it is a view of the cotangent."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(3, 2)
        self.b = nn.Parameter(torch.randn(2))

    def forward(self, x):
        out = self.lin(x)
        return out + self.b.view(1, 2).expand_as(out)


class _SummedScale(nn.Module):
    """A parameter used through a sum: autograd's gradient of it is an expanded tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.lin(x) * self.scale.sum()


@pytest.mark.parametrize("build", [_ViewedOffset, _SummedScale])
@pytest.mark.parametrize("batch_size", [1, 2, None])
def test_chunked_products_neither_write_into_their_arguments_nor_return_views_of_them(build, batch_size):
    model = build().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    jac, names = _reference_jacobian(model, x)
    cot = torch.randn(5, 2, dtype=torch.float64)
    kept = cot.clone()
    grads = lazykernel.vjp(model, x, cot, batch_size=batch_size)
    assert torch.equal(cot, kept)
    torch.testing.assert_close(_flat(grads, names), torch.einsum("nop,no->p", jac, cot), rtol=1e-12, atol=1e-12)
    for g in grads.values():
        assert g.untyped_storage().data_ptr() != cot.untyped_storage().data_ptr()
    v = torch.randn(5, 2, dtype=torch.float64)
    kept = v.clone()
    first = lazykernel.ntk_vp(model, x, v, output="full", batch_size=batch_size)
    assert torch.equal(v, kept)
    expected = torch.einsum("iap,jbp,jb->ia", jac, jac, v)
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lazykernel.ntk_vp(model, x, v, output="full", batch_size=batch_size), first,
                               rtol=0, atol=0)


class _Pick(nn.Module):
    def forward(self, pair):
        return pair[0]


def test_the_structured_walk_hands_a_layer_that_returns_a_tuple_to_the_generic_path():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (1, 6)), nn.MaxPool1d(2, return_indices=True),
                          _Pick(), nn.Flatten(), nn.Linear(3, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    jac, names = _reference_jacobian(model, x)
    tangent = _random_like_params(model, names, torch.float64)
    expected = torch.einsum("nop,p->no", jac, _flat(tangent, names))
    _, got = lazykernel.jvp(model, x, tangent, method="auto", batch_size=2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    v = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(lazykernel.ntk_vp(model, x, v, output="full"),
                               torch.einsum("iap,jbp,jb->ia", jac, jac, v), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"layer '2' \(MaxPool1d\) returns a tuple"):
        lazykernel.jvp(model, x, tangent, method="structured")


def test_the_structured_walk_takes_examples_with_no_features():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(0, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.zeros(4, 0, dtype=torch.float64)
    jac, names = _reference_jacobian(model, x)
    tangent = _random_like_params(model, names, torch.float64)
    for method in ("auto", "structured"):
        _, got = lazykernel.jvp(model, x, tangent, method=method)
        torch.testing.assert_close(got, torch.einsum("nop,p->no", jac, _flat(tangent, names)),
                                   rtol=1e-12, atol=1e-12)
    v = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(lazykernel.ntk_vp(model, x, v),
                               torch.einsum("iop,jop,j->i", jac, jac, v), rtol=1e-10, atol=1e-10)


def test_products_take_an_unlimited_memory_budget_and_no_columns():
    model = _mlp().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    jac, names = _reference_jacobian(model, x)
    tangent = _random_like_params(model, names, torch.float64)
    _, got = lazykernel.jvp(model, x, tangent, memory_budget=float("inf"))
    torch.testing.assert_close(got, torch.einsum("nop,p->no", jac, _flat(tangent, names)), rtol=1e-12, atol=1e-12)
    v = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(lazykernel.ntk_vp(model, x, v, memory_budget=float("inf")),
                               torch.einsum("iop,jop,j->i", jac, jac, v), rtol=1e-10, atol=1e-10)
    assert lazykernel.ntk_vp(model, x, torch.zeros(6, 0, dtype=torch.float64)).shape == (6, 0)


def test_a_model_without_outputs_has_no_kernel_but_has_products():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 0))
    x = torch.randn(5, 4)
    for call in (lambda: lazykernel.ntk(model, x), lambda: lazykernel.ntk_vp(model, x, torch.ones(5))):
        with pytest.raises(ValueError, match="returns no outputs per example"):
            call()
    tangent = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    assert lazykernel.jvp(model, x, tangent)[1].shape == (5, 0)


class _Warp(nn.Module):
    """A sampling grid predicted from the input: F.grid_sample has no forward-mode AD,
    but its backward is differentiable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.loc = nn.Linear(16, 6)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        grid = nn.functional.affine_grid(self.loc(x.flatten(1)).view(-1, 2, 3), list(x.shape), align_corners=False)
        return self.head(nn.functional.grid_sample(x, grid, align_corners=False).flatten(1))


def test_products_of_a_model_without_forward_mode_come_from_reverse_mode_twice():
    model = _Warp().double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    jac, names = _reference_jacobian(model, x)
    tangent = _random_like_params(model, names, torch.float64)
    y, got = lazykernel.jvp(model, x, tangent, batch_size=3)
    torch.testing.assert_close(y, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, torch.einsum("nop,p->no", jac, _flat(tangent, names)), rtol=1e-10, atol=1e-12)
    v = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(lazykernel.ntk_vp(model, x, v, output="full"),
                               torch.einsum("iap,jbp,jb->ia", jac, jac, v), rtol=1e-10, atol=1e-10)
    # differentiable in the tangent: one gradient step of the linearized model
    lin = lazykernel.linearize(model)
    loss = (lin(x) ** 2).sum()
    loss.backward()
    grads = _flat({n: lin.theta()[n].grad for n in names}, names)
    torch.testing.assert_close(grads, 2 * torch.einsum("nop,no->p", jac, model(x).detach()), rtol=1e-10, atol=1e-12)


class _Distances(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(13)
        self.centres = nn.Parameter(torch.randn(5, 3))
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.cdist(x, self.centres))


def test_products_name_what_a_model_without_forward_mode_or_double_backward_lacks():
    model = _Distances()
    x = torch.randn(4, 3)
    tangent = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    for call in (lambda: lazykernel.jvp(model, x, tangent), lambda: lazykernel.ntk_vp(model, x, torch.ones(4)),
                 lambda: lazykernel.linearize(model)(x)):
        with pytest.raises(ValueError, match="neither for one of its ops.*lazykernel.ntk and vjp need reverse mode"):
            call()


def test_products_of_a_functional_transformer():
    # a torch.func-style model calls the fused attention kernel, which has no forward mode
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                          nn.Flatten(), nn.Linear(8 * 3, 2)).eval()
    x = torch.randn(5, 3, 4)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(p, inputs):
        return torch.func.functional_call(model, p, (inputs,))

    jac, names = _reference_jacobian(model, x)
    tangent = _random_like_params(model, names, torch.float32)
    _, got = lazykernel.jvp(fn, x, tangent, params=params)
    expected = torch.einsum("nop,p->no", jac, _flat(tangent, names))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    v = torch.randn(5, dtype=torch.float64)
    expected = torch.einsum("iop,jop,j->i", jac, jac, v)
    torch.testing.assert_close(lazykernel.ntk_vp(fn, x, v.float(), params=params).double(), expected,
                               rtol=1e-4, atol=1e-4 * expected.abs().max().item())
