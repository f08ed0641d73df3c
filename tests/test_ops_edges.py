"""Edge cases of the ops: the promise of symmetric=True, memory shared with out, out views,
autograd, the batch sizes of the sparse token Gram, and linear_jvp on empty sizes."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lazykernel
from lazykernel.ops import (gram_hadamard_accumulate, gram_hadamard_accumulate_reference,
                            token_gram_accumulate)

from conftest import explicit_gram_hadamard

compiled_cpu = pytest.mark.skipif(
    not lazykernel.backend().cpu_kernels, reason="compiled CPU kernels not built"
)


def op(*args):
    """The compiled op (looked up on call: without the extension the module still loads)."""
    return torch.ops.lazykernel.gram_hadamard_accumulate_(*args)


F64 = torch.float64


def _layer(n, t, k, o, d, gen):
    return (torch.randn(n, t, k, dtype=F64, generator=gen),
            torch.randn(n, t, o, d, dtype=F64, generator=gen))


def _out_shape(n1, n2, o, output):
    return {"trace": (n1, n2), "diagonal": (n1, n2, o), "full": (n1, n2, o, o)}[output]


# -- symmetric=True is a promise about the operands ------------------------------------

@compiled_cpu
@pytest.mark.parametrize("output", ["trace", "full"])
def test_symmetric_with_other_operands_is_refused(output):
    # the op computes the upper tiles from (a1, a2) and mirrors them: with a2 != a1 the
    # lower triangle would hold a1·a2 values transposed, not Θ(x2_j, x1_i)
    gen = torch.Generator().manual_seed(1)
    a1, g1 = _layer(300, 1, 3, 2, 2, gen)
    a2, g2 = _layer(300, 1, 3, 2, 2, gen)
    out = torch.zeros(_out_shape(300, 300, 2, output), dtype=F64)
    with pytest.raises(RuntimeError, match=r"symmetric=True.*a2\[0\] differs from a1\[0\].*symmetric=False"):
        op(out, [a1], [a2], [g1], [g2], output, True)
    with pytest.raises(RuntimeError, match=r"symmetric=True.*g2\[0\] differs from g1\[0\]"):
        op(out, [a1], [a1], [g1], [g2], output, True)
    assert not out.any()  # refused before anything was added


@compiled_cpu
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
def test_symmetric_accepts_equal_copies_of_the_operands(output):
    gen = torch.Generator().manual_seed(2)
    a, g = _layer(150, 2, 3, 2, 3, gen)
    out = torch.zeros(_out_shape(150, 150, 2, output), dtype=F64)
    op(out, [a], [a.clone()], [g], [g.clone()], output, True)
    torch.testing.assert_close(out, explicit_gram_hadamard([a], [a], [g], [g], output), rtol=1e-12, atol=1e-10)


def test_reference_refuses_symmetric_with_other_operands_too():
    gen = torch.Generator().manual_seed(3)
    a1, g1 = _layer(4, 1, 3, 2, 2, gen)
    a2, g2 = _layer(4, 1, 3, 2, 2, gen)
    with pytest.raises(RuntimeError, match=r"a2\[0\] differs from a1\[0\]"):
        gram_hadamard_accumulate_reference(torch.zeros(4, 4, dtype=F64), [a1], [a2], [g1], [g2],
                                           "trace", True)


# -- out must own its memory --------------------------------------------------------------

@compiled_cpu
def test_out_sharing_memory_with_an_input_is_refused():
    # out's first rows are a1's memory: tiles written early would change a1 for later tiles
    gen = torch.Generator().manual_seed(4)
    n = 300
    buffer = torch.randn(n * n, dtype=F64, generator=gen)
    out = buffer.view(n, n)
    a1 = buffer[:n * 4].view(n, 1, 4)
    a2, g1, g2 = (torch.randn(n, 1, 4, dtype=F64, generator=gen),
                  torch.randn(n, 1, 2, 3, dtype=F64, generator=gen),
                  torch.randn(n, 1, 2, 3, dtype=F64, generator=gen))
    before = buffer.clone()
    with pytest.raises(RuntimeError, match=r"out shares memory with a1\[0\].*separate"):
        op(out, [a1], [a2], [g1], [g2], "trace", False)
    assert torch.equal(buffer, before)


@compiled_cpu
def test_out_with_elements_sharing_memory_is_refused_up_front():
    gen = torch.Generator().manual_seed(5)
    a, g = _layer(3, 1, 2, 1, 2, gen)
    out = torch.zeros(1, 3, dtype=F64).expand(3, 3)
    with pytest.raises(RuntimeError, match=r"gram_hadamard_accumulate_: out has elements that share memory"):
        op(out, [a], [a], [g], [g], "trace", False)


@compiled_cpu
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
def test_out_views_into_a_larger_result(output):
    # a block of a bigger kernel (row stride of the whole result, storage offset) and a
    # transposed block; symmetric blocks fill their mirror image in the view
    gen = torch.Generator().manual_seed(6)
    a1, g1 = _layer(37, 2, 3, 3, 2, gen)
    a2, g2 = _layer(21, 2, 3, 3, 2, gen)
    cell = _out_shape(1, 1, 3, output)[2:]
    big = torch.randn((50, 60) + cell, dtype=F64, generator=gen)
    initial = big.clone()
    op(big[5:42, 30:51], [a1], [a2], [g1], [g2], output, False)
    op(big[8:29, 2:23], [a2], [a2], [g2], [g2], output, True)
    expected = initial.clone()
    expected[5:42, 30:51] += explicit_gram_hadamard([a1], [a2], [g1], [g2], output)
    expected[8:29, 2:23] += explicit_gram_hadamard([a2], [a2], [g2], [g2], output)
    torch.testing.assert_close(big, expected, rtol=1e-12, atol=1e-10)
    t = torch.zeros((21, 37) + cell, dtype=F64).transpose(0, 1)
    op(t, [a1], [a2], [g1], [g2], output, False)
    torch.testing.assert_close(t, explicit_gram_hadamard([a1], [a2], [g1], [g2], output), rtol=1e-12, atol=1e-10)


@compiled_cpu
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
def test_opcheck_symmetric_into_a_view(output):
    # opcheck runs the op on copies of its arguments: the copies of a symmetric call's
    # operands are equal but not the same tensors
    gen = torch.Generator().manual_seed(10)
    a, g = _layer(9, 3, 2, 2, 3, gen)
    big = torch.zeros((12, 11) + _out_shape(1, 1, 2, output)[2:], dtype=F64)
    torch.library.opcheck(torch.ops.lazykernel.gram_hadamard_accumulate_.default,
                          (big[2:11, 1:10], [a], [a], [g], [g], output, True))


# -- autograd: the op has no derivative, and says so --------------------------------------

def _grad_operands(name, gen):
    a1, g1 = _layer(4, 1, 3, 2, 2, gen)
    a2, g2 = _layer(3, 1, 3, 2, 2, gen)
    plain = dict(a1=a1, a2=a2, g1=g1, g2=g2)
    args = dict(plain, **{name: plain[name].clone().requires_grad_(True)})
    return [[args[k]] for k in ("a1", "a2", "g1", "g2")], [[plain[k]] for k in ("a1", "a2", "g1", "g2")]


@compiled_cpu
@pytest.mark.parametrize("name", ["a1", "a2", "g1", "g2"])
def test_raw_op_refuses_operands_requiring_grad(name):
    # the op adds to out in place and records nothing: a loss built on out would
    # silently miss this term's gradient
    lists, plain = _grad_operands(name, torch.Generator().manual_seed(7))
    out = torch.zeros(4, 3, dtype=F64)
    with pytest.raises(RuntimeError, match=rf"{name}\[0\] requires grad.*no derivative.*torch.no_grad\(\)"):
        op(out, *lists, "trace", False)
    assert not out.any()
    with torch.no_grad():
        op(out, *lists, "trace", False)
    torch.testing.assert_close(out, explicit_gram_hadamard(*plain, "trace"), rtol=1e-12, atol=1e-12)


def test_reference_refuses_operands_requiring_grad():
    lists, _ = _grad_operands("g2", torch.Generator().manual_seed(7))
    with pytest.raises(RuntimeError, match=r"g2\[0\] requires grad.*no derivative"):
        gram_hadamard_accumulate_reference(torch.zeros(4, 3, dtype=F64), *lists, "trace")


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_wrapper_uses_operands_as_constants_on_every_backend(backend, monkeypatch):
    # the compiled kernels give out no gradient; the plain-PyTorch fallback must not
    # give it one either, or the result would depend on the backend
    if backend == "compiled" and not lazykernel.backend().cpu_kernels:
        pytest.skip("compiled CPU kernels not built")
    if backend == "reference":
        monkeypatch.setattr(lazykernel.ops._extension, "has_kernel", lambda device: False)
    lists, plain = _grad_operands("a1", torch.Generator().manual_seed(7))
    out = torch.zeros(4, 3, dtype=F64)
    assert gram_hadamard_accumulate(out, *lists, "trace") is out
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, explicit_gram_hadamard(*plain, "trace"), rtol=1e-12, atol=1e-12)
    a = lists[0][0]
    sym = torch.zeros(4, 4, 2, 2, dtype=F64)
    gram_hadamard_accumulate(sym, [a], [a], lists[2], lists[2], "full", symmetric=True)
    torch.testing.assert_close(sym, explicit_gram_hadamard([a], [a], lists[2], lists[2], "full"), rtol=1e-12, atol=1e-12)


# -- token Gram: every temporary of a batch within max_pairs_elements -----------------------

class _LargestTemporary(TorchDispatchMode):
    """Largest floating-point tensor a non-mutating op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable:
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
def test_token_gram_batches_stay_within_max_pairs_elements(output):
    # O = 8 outputs, D = 1 feature: a pair's full block (O·O = 64) is larger than its
    # gathered rows (O·D = 8), so batches must be sized by the larger of the two
    gen = torch.Generator().manual_seed(8)
    o, d, vocab = 8, 1, 6
    ex1, ids1 = torch.arange(vocab), torch.arange(vocab)           # example i uses token i
    ex2, ids2 = torch.zeros(vocab, dtype=torch.long), torch.arange(vocab)  # one example, all tokens
    g1 = torch.randn(vocab, o, d, dtype=F64, generator=gen)
    g2 = torch.randn(vocab, o, d, dtype=F64, generator=gen)
    out = torch.zeros(_out_shape(vocab, 1, o, output), dtype=F64)
    cap = o * o
    with _LargestTemporary() as probe:
        token_gram_accumulate(out, (ex1, ids1, g1), (ex2, ids2, g2), output, max_pairs_elements=cap)
    assert probe.largest <= cap
    # per-example gradients, one-hot in the token: [N, O, vocab·D]
    dense1 = torch.zeros(vocab, o, vocab, d, dtype=F64)
    dense1[ex1, :, ids1] = g1
    dense2 = torch.zeros(1, o, vocab, d, dtype=F64)
    dense2[ex2, :, ids2] = g2
    full = torch.einsum("iop,jqp->ijoq", dense1.flatten(2), dense2.flatten(2))
    expected = {"trace": full.diagonal(dim1=2, dim2=3).sum(-1), "diagonal": full.diagonal(dim1=2, dim2=3),
                "full": full}[output]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# -- linear_jvp wrapper: batches and features of size zero ---------------------------------

@pytest.mark.parametrize("x_shape, d", [((0, 4), 5), ((2, 0, 4), 5), ((3, 0), 5), ((3, 4), 0), ((0, 0), 0)])
def test_linear_jvp_with_empty_batches_or_features(x_shape, d):
    gen = torch.Generator().manual_seed(9)
    k = x_shape[-1]
    x, x_dot = torch.randn(x_shape, dtype=F64, generator=gen), torch.randn(x_shape, dtype=F64, generator=gen)
    w, w_dot = torch.randn(d, k, dtype=F64, generator=gen), torch.randn(d, k, dtype=F64, generator=gen)
    b, b_dot = torch.randn(d, dtype=F64, generator=gen), torch.randn(d, dtype=F64, generator=gen)
    y, y_dot = lazykernel.linear_jvp(x, x_dot, w, w_dot, b, b_dot)
    ry, ry_dot = torch.func.jvp(torch.nn.functional.linear, (x, w, b), (x_dot, w_dot, b_dot))
    assert y.shape == y_dot.shape == x_shape[:-1] + (d,)
    torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_dot, ry_dot, rtol=1e-12, atol=1e-12)
