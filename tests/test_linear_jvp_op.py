"""The compiled linear_jvp op against its reference and against float64 derivatives."""

import pytest
import torch

import lazykernel
from lazykernel.ops import linear_jvp, linear_jvp_reference, linear_jvp_stacked

compiled_cpu = pytest.mark.skipif(
    not lazykernel.backend().cpu_kernels, reason="compiled CPU kernels not built"
)
cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and lazykernel.backend().cuda_kernels),
    reason="needs a CUDA device and the compiled CUDA kernels",
)

# float64: summation order only. float32: sums of K <= 33 products of O(1)
# numbers, each rounded at ~6e-8 relative, stay far below 1e-5 absolute.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _operands(s, m, k, d, dtype, present, gen):
    xs = torch.randn(s, m, k, dtype=dtype, generator=gen)
    w = torch.randn(d, k, dtype=dtype, generator=gen)
    w_dot = torch.randn(d, k, dtype=dtype, generator=gen) if "weight_dot" in present else None
    b = torch.randn(d, dtype=dtype, generator=gen) if "bias" in present else None
    b_dot = torch.randn(d, dtype=dtype, generator=gen) if "bias_dot" in present else None
    return xs, w, w_dot, b, b_dot


PRESENT = [("weight_dot", "bias", "bias_dot"), ("weight_dot",), ("bias", "bias_dot"), ()]


def test_reference_is_the_derivative_of_a_linear_map_float64():
    gen = torch.Generator().manual_seed(0)
    xs, w, w_dot, b, b_dot = _operands(2, 5, 4, 3, torch.float64, PRESENT[0], gen)
    out = linear_jvp_reference(xs, w, w_dot, b, b_dot)
    y, y_dot = torch.func.jvp(lambda x_, w_, b_: x_ @ w_.T + b_, (xs[0], w, b), (xs[1], w_dot, b_dot))
    torch.testing.assert_close(out[0], y, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out[1], y_dot, rtol=1e-13, atol=1e-13)
    # central difference: exact for a bilinear map up to round-off
    h = 1e-3
    plus = (xs[0] + h * xs[1]) @ (w + h * w_dot).T + b + h * b_dot
    minus = (xs[0] - h * xs[1]) @ (w - h * w_dot).T + b - h * b_dot
    torch.testing.assert_close(out[1], (plus - minus) / (2 * h), rtol=1e-9, atol=1e-9)


@compiled_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("present", PRESENT)
@pytest.mark.parametrize("stacked", [1, 2])
@pytest.mark.parametrize("sizes", [(7, 5, 3), (1, 33, 17), (64, 8, 1)])
def test_cpu_kernel_matches_reference(dtype, present, stacked, sizes):
    gen = torch.Generator().manual_seed(hash((present, stacked, sizes)) % 1000)
    ops = _operands(stacked, *sizes, dtype, present, gen)
    fast = torch.ops.lazykernel.linear_jvp(*ops)
    ref = linear_jvp_reference(*(t.double() if t is not None else None for t in ops))
    assert fast.shape == (2, sizes[0], sizes[2]) and fast.dtype == dtype
    torch.testing.assert_close(fast.double(), ref, **TOL[dtype])


@compiled_cpu
def test_cpu_kernel_accepts_non_contiguous_operands():
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(2, 6, 10, dtype=torch.float64, generator=gen)[:, :, ::2]
    w = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    w_dot = torch.randn(5, 4, dtype=torch.float64, generator=gen).T
    b = torch.randn(8, dtype=torch.float64, generator=gen)[::2]
    fast = torch.ops.lazykernel.linear_jvp(xs, w, w_dot, b, None)
    torch.testing.assert_close(fast, linear_jvp_reference(xs, w, w_dot, b, None), **TOL[torch.float64])


@compiled_cpu
def test_cpu_kernel_with_no_rows_returns_empty():
    out = torch.ops.lazykernel.linear_jvp(torch.zeros(2, 0, 3), torch.zeros(4, 3), None, None, None)
    assert out.shape == (2, 0, 4)


@compiled_cpu
@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(xs=torch.zeros(3, 4, 5)), r"\[2, M, K\]"),
    (lambda a: a.update(xs=torch.zeros(2, 4, 6)), "K = 6 features"),
    (lambda a: a.update(weight=torch.zeros(3, 5, dtype=torch.int64)), "float32 or float64"),
    (lambda a: a.update(weight_dot=torch.zeros(3, 4)), "weight_dot must have"),
    (lambda a: a.update(bias=torch.zeros(4)), "bias must have 3 rows"),
    (lambda a: a.update(bias_dot=torch.zeros(3, dtype=torch.float64)), "bias_dot has dtype"),
    (lambda a: a.update(xs=torch.zeros(2, 4, 5, dtype=torch.float64)), "xs has dtype"),
])
def test_cpu_kernel_rejects_bad_arguments_with_clear_messages(mutate, message):
    args = dict(xs=torch.zeros(2, 4, 5), weight=torch.zeros(3, 5), weight_dot=torch.zeros(3, 5),
                bias=torch.zeros(3), bias_dot=torch.zeros(3))
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lazykernel.linear_jvp(args["xs"], args["weight"], args["weight_dot"], args["bias"],
                                        args["bias_dot"])


@compiled_cpu
@pytest.mark.parametrize("stacked", [1, 2])
def test_opcheck(stacked):
    gen = torch.Generator().manual_seed(4)
    torch.library.opcheck(torch.ops.lazykernel.linear_jvp.default,
                          _operands(stacked, 5, 3, 4, torch.float32, PRESENT[0], gen))
    torch.library.opcheck(torch.ops.lazykernel.linear_jvp.default,
                          _operands(stacked, 5, 3, 4, torch.float32, (), gen))


@compiled_cpu
def test_op_works_under_torch_compile():
    gen = torch.Generator().manual_seed(5)
    ops = _operands(2, 6, 3, 4, torch.float32, PRESENT[0], gen)
    compiled = torch.compile(lambda *a: torch.ops.lazykernel.linear_jvp(*a) * 2, backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(*ops), 2 * linear_jvp_reference(*ops), **TOL[torch.float32])


def test_wrapper_keeps_batch_dimensions_and_matches_torch_func():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen)
    x_dot = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen)
    w, w_dot = torch.randn(5, 4, dtype=torch.float64, generator=gen), torch.randn(5, 4, dtype=torch.float64, generator=gen)
    b, b_dot = torch.randn(5, dtype=torch.float64, generator=gen), torch.randn(5, dtype=torch.float64, generator=gen)
    y, y_dot = linear_jvp(x, x_dot, w, w_dot, b, b_dot)
    ry, ry_dot = torch.func.jvp(torch.nn.functional.linear, (x, w, b), (x_dot, w_dot, b_dot))
    assert y.shape == y_dot.shape == (3, 2, 5)
    torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_dot, ry_dot, rtol=1e-12, atol=1e-12)
    _, no_input_tangent = linear_jvp(x, None, w, w_dot, None, None)
    torch.testing.assert_close(no_input_tangent, x @ w_dot.T, rtol=1e-12, atol=1e-12)


def test_wrapper_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="K = 4"):
        linear_jvp(torch.zeros(2, 3), None, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="x_dot must have the shape of x"):
        linear_jvp(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"x_dot must have the dtype of x \(torch.float32\)"):
        linear_jvp(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float64), torch.zeros(5, 4))


@compiled_cpu
@pytest.mark.parametrize("present", PRESENT)
@pytest.mark.parametrize("stacked", [1, 2])
def test_op_has_its_own_derivative(present, stacked):
    # an autograd formula registered for the op (opcheck's test_autograd_registration),
    # checked against finite differences in float64
    gen = torch.Generator().manual_seed(9)
    ops = [t if t is None else t.requires_grad_(True)
           for t in _operands(stacked, 4, 3, 5, torch.float64, present, gen)]
    torch.library.opcheck(torch.ops.lazykernel.linear_jvp.default, tuple(ops))
    assert torch.autograd.gradcheck(lambda *a: torch.ops.lazykernel.linear_jvp(*a), tuple(ops))
    out = torch.ops.lazykernel.linear_jvp(*ops)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((out * weights).sum(), [t for t in ops if t is not None])
    expected = torch.autograd.grad((linear_jvp_reference(*ops) * weights).sum(), [t for t in ops if t is not None])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


def test_stacked_wrapper_falls_back_to_the_reference_for_other_dtypes():
    xs = torch.ones(2, 3, 2, dtype=torch.bfloat16)
    out = linear_jvp_stacked(xs, torch.ones(4, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 4)
    torch.testing.assert_close(out[0].float(), torch.full((3, 4), 2.0))


@pytest.mark.cuda
@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("present", PRESENT)
@pytest.mark.parametrize("stacked", [1, 2])
@pytest.mark.parametrize("sizes", [(7, 5, 3), (300, 65, 129)])
def test_cuda_kernel_matches_reference(dtype, present, stacked, sizes):
    gen = torch.Generator().manual_seed(11)
    ops = _operands(stacked, *sizes, dtype, present, gen)
    fast = torch.ops.lazykernel.linear_jvp(*(t.cuda() if t is not None else None for t in ops))
    ref = linear_jvp_reference(*(t.double() if t is not None else None for t in ops))
    # TF32 is off by default for matmul in torch; float32 error is K * 6e-8 relative.
    torch.testing.assert_close(fast.double().cpu(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.cuda
@cuda_kernels
def test_cuda_opcheck():
    gen = torch.Generator().manual_seed(12)
    ops = _operands(2, 5, 3, 4, torch.float32, PRESENT[0], gen)
    torch.library.opcheck(torch.ops.lazykernel.linear_jvp.default,
                          tuple(t.cuda() for t in ops))
