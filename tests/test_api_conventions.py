"""How the public functions treat PyTorch's conventions: parameter selections,
model kinds, dtypes and devices they cannot use, and the vectors of the products."""

import shutil

import pytest
import torch
from torch import nn

import lazykernel


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _products(model, x):
    tangent = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    return {
        "ntk": lambda: lazykernel.ntk(model, x),
        "jvp": lambda: lazykernel.jvp(model, x, tangent),
        "vjp": lambda: lazykernel.vjp(model, x, torch.zeros(x.shape[0], 3, device=x.device)),
        "ntk_vp": lambda: lazykernel.ntk_vp(model, x, torch.zeros(x.shape[0], device=x.device)),
    }


def test_a_single_unknown_parameter_name_is_named_as_unknown():
    with pytest.raises(ValueError, match=r"params names \['nope'\] are not parameters.*'0.weight'"):
        lazykernel.ntk(_mlp(), torch.randn(3, 4), params="nope")


@pytest.mark.parametrize("params, phrase", [
    (3, "got int"),
    (b"0.weight", r"entries of type \['int'\]"),
])
def test_params_that_are_neither_names_nor_a_predicate_are_refused(params, phrase):
    with pytest.raises(ValueError, match=phrase):
        lazykernel.ntk(_mlp(), torch.randn(3, 4), params=params)


def test_params_given_as_tensors_instead_of_names_are_refused_asking_for_names():
    model = _mlp()
    with pytest.raises(ValueError, match=r"by name .*entries of type \['Parameter'\]") as error:
        lazykernel.ntk(model, torch.randn(3, 4), params=[model[0].weight])
    # the message names types, it does not print the tensors' values
    assert "tensor(" not in str(error.value)


@pytest.mark.parametrize("method", ["auto", "jacobian", "ntvp"])
def test_a_complex_parameter_of_a_module_is_refused_by_name(method):
    class ComplexLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))

        def forward(self, x):
            return (x.to(torch.complex64) @ self.w).abs()

    x = torch.randn(3, 4, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"parameters \['w'\] are complex.*view_as_real"):
        lazykernel.ntk(ComplexLayer(), x, method=method)


def test_a_complex_entry_of_a_functional_models_params_is_refused_not_dropped():
    # before, the complex weight passed for a constant and the kernel held the bias's term alone
    params = {"w": torch.randn(4, 3, dtype=torch.complex64), "b": torch.randn(3)}

    def fn(p, x):
        return (x.to(torch.complex64) @ p["w"]).abs() + p["b"]

    with pytest.raises(ValueError, match=r"entries of params \['w'\] are complex"):
        lazykernel.ntk(fn, torch.randn(3, 4), params=params)


@pytest.mark.parametrize("function", ["ntk", "linearize"])
def test_a_data_parallel_model_is_refused_pointing_at_model_module(function):
    model = nn.DataParallel(_mlp())
    call = {"ntk": lambda: lazykernel.ntk(model, torch.randn(3, 4)),
            "linearize": lambda: lazykernel.linearize(model)}[function]
    with pytest.raises(ValueError, match=r"nn.DataParallel.*model.module"):
        call()


@pytest.mark.parametrize("function", ["ntk", "jvp", "vjp", "ntk_vp"])
def test_meta_tensors_are_refused_as_having_no_values(function):
    model = _mlp().to("meta")
    x = torch.randn(3, 4, device="meta")
    with pytest.raises(ValueError, match=r"x1? is on the meta device.*to_empty"):
        _products(model, x)[function]()


def test_a_meta_buffer_is_refused_by_name():
    class WithMetaBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.register_buffer("shift", torch.zeros(3, device="meta"))

        def forward(self, x):
            return self.linear(x) + self.shift

    with pytest.raises(ValueError, match=r"model tensor 'shift' is on the meta device"):
        lazykernel.ntk(WithMetaBuffer(), torch.randn(3, 4))


@pytest.mark.parametrize("function", ["jvp", "vjp", "ntk_vp"])
def test_products_refuse_parameters_of_several_dtypes_as_ntk_does(function):
    model = _mlp()
    model[2].double()
    with pytest.raises(ValueError, match=r"mix dtypes \['torch.float32', 'torch.float64'\].*model.float\(\)"):
        _products(model, torch.randn(3, 4))[function]()


@pytest.mark.parametrize("function", ["vjp", "ntk_vp"])
def test_an_output_vector_on_another_device_is_refused_naming_both(function):
    model = _mlp()
    x = torch.randn(3, 4)
    call = {"vjp": lambda: lazykernel.vjp(model, x, torch.zeros(3, 3, device="meta")),
            "ntk_vp": lambda: lazykernel.ntk_vp(model, x, torch.zeros(3, device="meta"))}[function]
    name = "cotangent" if function == "vjp" else "v"
    with pytest.raises(ValueError, match=rf"{name} is on device meta but .* on cpu"):
        call()


def test_a_complex_cotangent_is_refused_rather_than_losing_its_imaginary_part():
    with pytest.raises(ValueError, match=r"cotangent must be real.*complex64"):
        lazykernel.vjp(_mlp(), torch.randn(3, 4), torch.ones(3, 3, dtype=torch.complex64))


def test_a_half_precision_kernel_beyond_float16s_range_says_so():
    # computed in float32 and returned in the model's dtype: entries past 65504 become
    # Inf in the cast, and the warning must say that, not blame the model's derivatives
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4)).half()
    x = (torch.randn(3, 64) * 30).half()
    with pytest.warns(UserWarning, match="beyond the range of the model's torch.float16") as caught:
        kernel = lazykernel.ntk(model, x)
    assert not any("overflow in" in str(w.message) for w in caught)
    assert kernel.dtype == torch.float16
    wide = lazykernel.ntk(model.float(), x.float())
    finite = torch.isfinite(kernel)
    assert not finite.all() and (wide.abs() > 65504).any()
    torch.testing.assert_close(kernel[finite].float(), wide[finite], rtol=2e-3, atol=0)


def test_a_params_predicate_of_one_argument_is_refused_with_the_expected_call():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"predicate\(name, param\)"):
        lazykernel.ntk(model, torch.randn(2, 3), params=lambda name: "weight" in name)


def test_a_parameter_container_passed_as_params_is_refused():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="ParameterDict"):
        lazykernel.ntk(model, torch.randn(2, 3), params=nn.ParameterDict({"w": nn.Parameter(torch.ones(2))}))


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_a_compiled_model_gives_the_eager_kernel_without_breaking_its_graph(caplog):
    # the probe reads each layer's largest value after the forward, not inside a hook
    # (a float() there is a graph break, which torch.compile reports at length)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with caplog.at_level("WARNING"):
        compiled = lazykernel.ntk(torch.compile(model), x, output="full")
    torch.testing.assert_close(compiled, lazykernel.ntk(model, x, output="full"), rtol=1e-12, atol=1e-12)
    assert not [r for r in caplog.records if "Graph break" in r.getMessage()]


@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap", "forward_ad", "params"])
def test_ntk_inside_a_torch_func_transform_is_refused_not_zero(transform):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    if transform == "grad":
        run = lambda: torch.func.grad(lambda x: lazykernel.ntk(model, x).sum())(x)          # noqa: E731
    elif transform == "jvp":
        run = lambda: torch.func.jvp(lambda x: lazykernel.ntk(model, x), (x,), (torch.ones_like(x),))  # noqa: E731
    elif transform == "vmap":
        run = lambda: torch.func.vmap(lambda xi: lazykernel.ntk(model, xi))(x.reshape(5, 1, 3))  # noqa: E731
    elif transform == "forward_ad":
        def run():
            with torch.autograd.forward_ad.dual_level():
                lazykernel.ntk(model, torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
    else:
        fn = lambda p, x: torch.func.functional_call(model, p, (x,))                        # noqa: E731
        run = lambda: torch.func.grad(lambda p: lazykernel.ntk(fn, x, params=p).sum())(    # noqa: E731
            dict(model.named_parameters()))
    with pytest.raises(ValueError, match=r"is a tensor of an enclosing torch.func transform .* holds them constant"):
        run()
