"""The products under autograd and torch.func: derivatives in v, x and x2, vmap, and the
checks of cotangents and tangents, against float64 explicit per-example Jacobians."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import lazykernel

F64 = torch.float64


def _mlp(seed=0):
    """An nn.Sequential of Linear layers: the products take the fused layer walk."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class _Residual(nn.Module):
    """Not a Sequential: the products take one torch.func transform of the whole model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inner = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)) + x)


BUILDS = {"sequential": _mlp, "residual": lambda: _Residual().double()}


def _jacobian(model, x):
    """[N, O, P] float64 Jacobian of a copy of the (float64) ``model``, differentiable in ``x``."""
    double = copy.deepcopy(model)
    params = {n: p.detach() for n, p in double.named_parameters()}
    assert all(p.dtype == F64 for p in params.values()) and x.dtype == F64
    per_param = jacrev(lambda p, xx: functional_call(double, p, (xx,)).reshape(xx.shape[0], -1))(params, x)
    return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in per_param.values()], dim=2)


def _kernel(model, x, x2, output):
    """Θ(x, x2): ``[N, N2, O, O]`` (full) or ``[N, N2]`` (trace), differentiable in x and x2."""
    j1, j2 = _jacobian(model, x), _jacobian(model, x2)
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    return full if output == "full" else torch.einsum("ijaa->ij", full)


def _times(kernel, v):
    return torch.einsum("ijab,jb->ia", kernel, v) if kernel.dim() == 4 else kernel @ v


def _data(n=4, n2=5, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=F64), torch.randn(n2, 5, generator=gen, dtype=F64), gen


TOL = dict(rtol=1e-10, atol=1e-10)


# -- derivatives with respect to v ----------------------------------------------------

@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("output", ["trace", "full"])
@pytest.mark.parametrize("two_sets", [False, True])
def test_ntk_vp_gradient_in_v_is_the_transposed_product(build, output, two_sets):
    model = BUILDS[build]()
    x, x2, gen = _data()
    x2 = x2 if two_sets else None
    other = x if x2 is None else x2
    v_shape = (other.shape[0], 3) if output == "full" else (other.shape[0],)
    v = torch.randn(v_shape, generator=gen, dtype=F64, requires_grad=True)
    result = lazykernel.ntk_vp(model, x, v, x2, output=output, batch_size=2)
    w = torch.randn(result.shape, generator=gen, dtype=F64)
    (result * w).sum().backward()
    kernel = _kernel(model, x, other, output)
    # ⟨w, Θ v⟩ = ⟨Θᵀ w, v⟩ with Θ(x, x2)ᵀ = Θ(x2, x)
    expected = torch.einsum("ijab,ia->jb", kernel, w) if output == "full" else kernel.T @ w
    torch.testing.assert_close(v.grad, expected, **TOL)
    # the kernel is the one at the current parameters: none of them gets a gradient
    assert all(p.grad is None for p in model.parameters())


def test_ntk_vp_gradient_in_a_float32_v_of_a_float64_model_comes_back_in_float32():
    model = _mlp()
    x, _, gen = _data()
    v = torch.randn(4, 2, generator=gen).requires_grad_(True)
    result = lazykernel.ntk_vp(model, x, v)
    assert result.dtype == F64
    (grad,) = torch.autograd.grad(result.sum(), v)
    assert grad.dtype == torch.float32
    kernel = _kernel(model, x, x, "trace")
    torch.testing.assert_close(grad.double(), (kernel.T @ torch.ones(4, 2, dtype=F64)), rtol=1e-6, atol=1e-6)


def test_ntk_vp_second_derivative_through_its_gradient_in_v():
    # g(w) = ∂⟨w, Θ v⟩/∂v = Θᵀ w is itself a product, differentiable in w: ∂⟨g, z⟩/∂w = Θ z
    model = BUILDS["residual"]()
    x, x2, gen = _data()
    v = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(5, 3, generator=gen, dtype=F64)
    result = lazykernel.ntk_vp(model, x, v, x2, output="full")
    (g,) = torch.autograd.grad((result * w).sum(), v, create_graph=True)
    (second,) = torch.autograd.grad((g * z).sum(), w)
    kernel = _kernel(model, x, x2, "full")
    torch.testing.assert_close(g, torch.einsum("ijab,ia->jb", kernel, w), **TOL)
    torch.testing.assert_close(second, _times(kernel, z), **TOL)


@pytest.mark.parametrize("output", ["trace", "full"])
def test_ntk_vp_under_torch_func_grad_jacrev_and_jvp_in_v(output):
    # torch.func's transforms gave zeros: the product took its JVP under torch.no_grad
    model = _mlp()
    x, x2, gen = _data()
    kernel = _kernel(model, x, x2, output)
    v_shape = (5, 3) if output == "full" else (5,)
    v, v_dot = (torch.randn(v_shape, generator=gen, dtype=F64) for _ in range(2))
    w = torch.randn((4, 3) if output == "full" else (4,), generator=gen, dtype=F64)

    def product(vv):
        return lazykernel.ntk_vp(model, x, vv, x2, output=output, batch_size=3)

    grad = torch.func.grad(lambda vv: (product(vv) * w).sum())(v)
    torch.testing.assert_close(grad, torch.einsum("ijab,ia->jb", kernel, w) if output == "full" else kernel.T @ w,
                               **TOL)
    jac = jacrev(product)(v)
    torch.testing.assert_close(jac, kernel.permute(0, 2, 1, 3) if output == "full" else kernel, **TOL)
    value, tangent = torch.func.jvp(product, (v,), (v_dot,))
    torch.testing.assert_close(value, _times(kernel, v), **TOL)
    torch.testing.assert_close(tangent, _times(kernel, v_dot), **TOL)


def test_ntk_vp_backward_refuses_parameters_changed_in_place_since_the_product():
    model = _mlp()
    x, _, gen = _data()
    v = torch.randn(4, generator=gen, dtype=F64, requires_grad=True)
    result = lazykernel.ntk_vp(model, x, v)
    with torch.no_grad():
        model[0].weight.add_(1.0)                 # an optimizer step before the backward
    with pytest.raises(RuntimeError,
                       match=r"'0.weight' changed in place between ntk_vp and its backward.*call ntk_vp again"):
        result.sum().backward()


# -- derivatives with respect to x and x2 ----------------------------------------------

@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("output", ["trace", "full"])
def test_ntk_vp_gradient_in_x_and_x2(build, output):
    model = BUILDS[build]()
    x, x2, gen = _data()
    x.requires_grad_(True)
    x2.requires_grad_(True)
    v = torch.randn((5, 3) if output == "full" else (5,), generator=gen, dtype=F64, requires_grad=True)
    result = lazykernel.ntk_vp(model, x, v, x2, output=output, batch_size=2)
    w = torch.randn(result.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad((result * w).sum(), (x, x2, v))
    expected = torch.autograd.grad((_times(_kernel(model, x, x2, output), v) * w).sum(), (x, x2, v))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_ntk_vp_gradient_in_x_when_x2_is_x_and_under_torch_func_grad():
    model = BUILDS["residual"]()
    x, _, gen = _data()
    v = torch.randn(4, generator=gen, dtype=F64)

    def reference(xx):
        return _times(_kernel(model, xx, xx, "trace"), v).square().sum()

    expected = torch.func.grad(reference)(x)
    got = torch.func.grad(lambda xx: lazykernel.ntk_vp(model, xx, v).square().sum())(x)
    torch.testing.assert_close(got, expected, **TOL)
    xg = x.clone().requires_grad_(True)
    (by_autograd,) = torch.autograd.grad(lazykernel.ntk_vp(model, xg, v).square().sum(), xg)
    torch.testing.assert_close(by_autograd, expected, **TOL)


# -- the parameters ----------------------------------------------------------------------

def _functional():
    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(3, 5, generator=gen, dtype=F64), "b": torch.randn(3, generator=gen, dtype=F64)}

    def fn(p, x):
        return torch.tanh(x @ p["w"].T + p["b"]) * p["w"].sum()

    return fn, params


@pytest.mark.parametrize("function", ["jvp", "vjp", "ntk_vp"])
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_products_refuse_parameters_of_an_enclosing_torch_func_transform(function, transform):
    # jvp gave a zero derivative without a word; vjp and ntk_vp failed in their internals
    fn, params = _functional()
    x, _, _ = _data()
    tangent = {n: torch.ones_like(p) for n, p in params.items()}
    call = {"jvp": lambda p: lazykernel.jvp(fn, x, tangent, params=p)[1].sum(),
            "vjp": lambda p: lazykernel.vjp(fn, x, torch.ones(4, 3, dtype=F64), params=p)["b"].sum(),
            "ntk_vp": lambda p: lazykernel.ntk_vp(fn, x, torch.ones(4, dtype=F64), params=p).sum()}[function]
    if transform == "grad":
        run = lambda: torch.func.grad(call)(params)  # noqa: E731
    else:
        stacked = {n: torch.stack([p, 2 * p]) for n, p in params.items()}
        run = lambda: torch.func.vmap(call)(stacked)  # noqa: E731
    with pytest.raises(ValueError, match=r"params \['w', 'b'\] are tensors of an enclosing torch\.func transform"
                                         r".*constant.*torch\.func\.jvp"):
        run()


# -- torch.func.vmap -----------------------------------------------------------------------

@pytest.mark.parametrize("output, per_vector", [("trace", (5,)), ("trace", (5, 2)), ("full", (5, 3))])
@pytest.mark.parametrize("in_dim", [0, 1])
def test_ntk_vp_vmapped_over_v_is_the_batched_product(output, per_vector, in_dim):
    model = _mlp()
    x, x2, gen = _data()
    vs = torch.randn((3,) + per_vector, generator=gen, dtype=F64)
    got = torch.func.vmap(lambda vv: lazykernel.ntk_vp(model, x, vv, x2, output=output, batch_size=2),
                          in_dims=in_dim)(vs.movedim(0, in_dim))
    kernel = _kernel(model, x, x2, output)
    expected = torch.stack([_times(kernel, vv) for vv in vs])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


def test_ntk_vp_vmapped_over_v_checks_each_vectors_shape():
    model = _mlp()
    x, _, _ = _data()
    with pytest.raises(ValueError, match=r"v must be \[N2\] or \[N2, C\] with N2 = 4, got \(4, 2, 2\)"):
        torch.func.vmap(lambda vv: lazykernel.ntk_vp(model, x, vv))(torch.ones(3, 4, 2, 2, dtype=F64))


def test_vjp_vmapped_over_the_cotangent_is_one_vjp_per_cotangent():
    model = BUILDS["residual"]()
    x, _, gen = _data()
    cots = torch.randn(3, 4, 3, generator=gen, dtype=F64)
    got = torch.func.vmap(lambda c: lazykernel.vjp(model, x, c, batch_size=3))(cots)
    jac = _jacobian(model, x)
    expected = torch.einsum("nop,bno->bp", jac, cots)
    flat = torch.cat([got[n].reshape(3, -1) for n, _ in model.named_parameters()], dim=1)
    torch.testing.assert_close(flat, expected, **TOL)


@pytest.mark.parametrize("function", ["jvp", "vjp", "ntk_vp"])
def test_products_vmapped_over_the_inputs_say_they_take_a_batch_already(function):
    model = _mlp()
    xs, _, _ = _data(n=6)
    tangent = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    call = {"jvp": lambda xx: lazykernel.jvp(model, xx, tangent)[1],
            "vjp": lambda xx: lazykernel.vjp(model, xx, torch.ones(2, 3, dtype=F64))["2.bias"],
            "ntk_vp": lambda xx: lazykernel.ntk_vp(model, xx, torch.ones(2, dtype=F64))}[function]
    with pytest.raises(ValueError, match=r"x is batched by torch\.func\.vmap.*one x \[N, \*in\]"):
        torch.func.vmap(call)(xs.reshape(3, 2, 5))


def test_jvp_vmapped_over_the_tangent_says_to_call_it_once_per_tangent():
    model = _mlp()
    x, _, _ = _data()
    tangents = {n: torch.ones((2,) + p.shape, dtype=F64) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"tangent\['0.weight'\] is batched by torch\.func\.vmap.*once per tangent"):
        torch.func.vmap(lambda t: lazykernel.jvp(model, x, t)[1])(tangents)


# -- checks of cotangents, vectors and tangents --------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_vjp_refuses_an_integer_cotangent_as_ntk_vp_refuses_an_integer_v(dtype):
    # vjp converted an integer cotangent without a word while ntk_vp refused an integer v
    model = _mlp()
    x, _, _ = _data()
    with pytest.raises(ValueError, match=rf"cotangent must be a floating-point tensor, got {dtype}; "
                                         r"convert it to the model's dtype: cotangent\.to\(torch\.float64\)"):
        lazykernel.vjp(model, x, torch.ones(4, 3, dtype=dtype))
    with pytest.raises(ValueError, match=rf"v must be a floating-point tensor, got {dtype}; "
                                         r"convert it to the model's dtype: v\.to\(torch\.float64\)"):
        lazykernel.ntk_vp(model, x, torch.ones(4, dtype=dtype))


def test_tangent_entries_of_the_wrong_dtype_or_device_say_what_to_do():
    model = _mlp()
    x, _, _ = _data()
    tangent = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"tangent\['0.weight'\] must be floating point, got torch.int64; "
                                         r"convert it to the parameter's dtype: \.to\(torch\.float64\)"):
        lazykernel.jvp(model, x, {**tangent, "0.weight": torch.ones(6, 5, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"tangent\['0.weight'\] is on meta but the parameter is on cpu; "
                                         r"move it there: \.to\('cpu'\)"):
        lazykernel.jvp(model, x, {**tangent, "0.weight": torch.ones(6, 5, device="meta")})


def test_ntk_vp_refuses_a_forward_ad_dual_v_by_name():
    # PyTorch cannot nest forward mode inside forward_ad's dual level: a clear refusal,
    # with torch.func.jvp named as the way that works
    model = _mlp()
    x, _, gen = _data()
    v, v_dot = (torch.randn(4, generator=gen, dtype=F64) for _ in range(2))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(v, v_dot)
        with pytest.raises(ValueError, match=r"forward_ad dual tensors given as v.*torch\.func\.jvp"):
            lazykernel.ntk_vp(model, x, dual)
