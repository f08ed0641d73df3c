"""The compiled gram_hadamard_accumulate_ op against its pure-PyTorch reference."""

import pytest
import torch

import lazykernel
from lazykernel.ops import gram_hadamard_accumulate, gram_hadamard_accumulate_reference

from conftest import explicit_gram_hadamard

compiled_cpu = pytest.mark.skipif(
    not lazykernel.backend().cpu_kernels, reason="compiled CPU kernels not built"
)

# float64 differences come from summation order only; float32 ones from
# round-off over sums of at most a few hundred products of O(1) numbers.
TOL = {torch.float64: 1e-11, torch.float32: 2e-5}


def _layers(n1, n2, outputs, shapes, dtype, generator):
    """Random operands for layers of (T, K, D) sizes."""
    a1, a2, g1, g2 = [], [], [], []
    for t, k, d in shapes:
        a1.append(torch.randn(n1, t, k, dtype=dtype, generator=generator))
        a2.append(torch.randn(n2, t, k, dtype=dtype, generator=generator))
        g1.append(torch.randn(n1, t, outputs, d, dtype=dtype, generator=generator))
        g2.append(torch.randn(n2, t, outputs, d, dtype=dtype, generator=generator))
    return a1, a2, g1, g2


def _out_shape(n1, n2, outputs, output):
    return {"trace": (n1, n2), "diagonal": (n1, n2, outputs), "full": (n1, n2, outputs, outputs)}[output]


LAYER_SETS = {
    "dense": [(1, 7, 5)],
    "positions": [(3, 4, 6)],
    "mixed": [(1, 9, 3), (4, 2, 5), (1, 1, 8)],
}


@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
@pytest.mark.parametrize("layers", list(LAYER_SETS))
def test_reference_matches_explicit_per_example_gradients(output, layers):
    gen = torch.Generator().manual_seed(1)
    ops = _layers(5, 4, 3, LAYER_SETS[layers], torch.float64, gen)
    out = torch.zeros(_out_shape(5, 4, 3, output), dtype=torch.float64)
    gram_hadamard_accumulate_reference(out, *ops, output)
    torch.testing.assert_close(out, explicit_gram_hadamard(*ops, output), rtol=1e-12, atol=1e-12)


@compiled_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
@pytest.mark.parametrize("layers", list(LAYER_SETS))
@pytest.mark.parametrize("sizes", [(6, 6), (5, 3), (70, 130), (1030, 9)])
def test_cpu_kernel_matches_reference(dtype, output, layers, sizes):
    n1, n2 = sizes
    gen = torch.Generator().manual_seed(2)
    ops = _layers(n1, n2, 3, LAYER_SETS[layers], dtype, gen)
    initial = torch.randn(_out_shape(n1, n2, 3, output), dtype=dtype, generator=gen)
    fast, slow = initial.clone(), initial.clone()
    torch.ops.lazykernel.gram_hadamard_accumulate_(fast, *ops, output, False)
    gram_hadamard_accumulate_reference(slow, *ops, output)
    scale = slow.abs().max().item()
    assert (fast - slow).abs().max().item() <= TOL[dtype] * scale


@compiled_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
@pytest.mark.parametrize("n", [1, 7, 200, 1030])  # 1030: the larger tiles from N = 1024, a ragged last one
def test_cpu_kernel_symmetric_fills_both_triangles(dtype, output, n):
    gen = torch.Generator().manual_seed(3)
    a1, _, g1, _ = _layers(n, n, 2, [(1, 6, 4), (2, 3, 5)], dtype, gen)
    fast = torch.zeros(_out_shape(n, n, 2, output), dtype=dtype)
    slow = torch.zeros_like(fast)
    torch.ops.lazykernel.gram_hadamard_accumulate_(fast, a1, a1, g1, g1, output, True)
    gram_hadamard_accumulate_reference(slow, a1, a1, g1, g1, output)
    scale = slow.abs().max().item()
    assert (fast - slow).abs().max().item() <= TOL[dtype] * scale


@compiled_cpu
def test_cpu_kernel_accepts_non_contiguous_inputs_and_output():
    gen = torch.Generator().manual_seed(4)
    a1, a2, g1, g2 = _layers(6, 5, 2, [(2, 3, 4)], torch.float64, gen)
    # transposed copies hold the same values through non-contiguous strides
    a1n = [a.transpose(0, 2).contiguous().transpose(0, 2) for a in a1]
    g2n = [g.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0) for g in g2]
    assert not a1n[0].is_contiguous() and not g2n[0].is_contiguous()
    out = torch.zeros(5, 6, 2, 2, dtype=torch.float64).transpose(0, 1)
    assert not out.is_contiguous()
    torch.ops.lazykernel.gram_hadamard_accumulate_(out, a1n, a2, g1, g2n, "full", False)
    expected = torch.zeros(6, 5, 2, 2, dtype=torch.float64)
    gram_hadamard_accumulate_reference(expected, a1, a2, g1, g2, "full")
    torch.testing.assert_close(out, expected)


@compiled_cpu
@pytest.mark.parametrize("n1,n2", [(0, 4), (4, 0)])
def test_cpu_kernel_empty_inputs_leave_out_unchanged(n1, n2):
    gen = torch.Generator().manual_seed(5)
    ops = _layers(n1, n2, 2, [(1, 3, 4)], torch.float32, gen)
    out = torch.zeros(n1, n2)
    torch.ops.lazykernel.gram_hadamard_accumulate_(out, *ops, "trace", False)
    assert out.shape == (n1, n2)


@compiled_cpu
def test_cpu_kernel_with_no_layers_is_a_no_op():
    out = torch.ones(3, 3)
    torch.ops.lazykernel.gram_hadamard_accumulate_(out, [], [], [], [], "trace", False)
    assert torch.equal(out, torch.ones(3, 3))


_BAD_ARGUMENTS = [
        (lambda o, a1, a2, g1, g2: (o, a1, a2, g1, g2, "sideways", False), "output must be"),
        (lambda o, a1, a2, g1, g2: (o.double(), a1, a2, g1, g2, "trace", False), "dtype"),
        (lambda o, a1, a2, g1, g2: (o, [a1[0][:, :, :2]], a2, g1, g2, "trace", False), "last dimension K"),
        (lambda o, a1, a2, g1, g2: (o, a1, a2, [g1[0][:3]], g2, "trace", False), "N1 = 4"),
        (lambda o, a1, a2, g1, g2: (o, a1, a2, g1, [], "trace", False), "same number of layers"),
        (lambda o, a1, a2, g1, g2: (o, a1, a2, g1, g2, "full", False), "dimensions"),
        (lambda o, a1, a2, g1, g2: (o, a1, a2, g1, g2, "trace", True), "symmetric"),
        (lambda o, a1, a2, g1, g2: (o.int(), a1, a2, g1, g2, "trace", False), "float32 or float64"),
        (lambda o, a1, a2, g1, g2: (o, a1, a2, [g1[0][:, :, :1]], g2, "trace", False), "share \\[O, D\\]"),
        (lambda o, a1, a2, g1, g2: (o, a1, a2, [g1[0][:, :, :, 0]], g2, "trace", False), "4 dimensions"),
]


@compiled_cpu
@pytest.mark.parametrize("mutate, message", _BAD_ARGUMENTS)
def test_cpu_kernel_rejects_bad_arguments_with_clear_messages(mutate, message):
    gen = torch.Generator().manual_seed(6)
    a1, a2, g1, g2 = _layers(4, 3, 2, [(1, 3, 2)], torch.float32, gen)
    out = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lazykernel.gram_hadamard_accumulate_(*mutate(out, a1, a2, g1, g2))


@pytest.mark.parametrize("mutate, message", _BAD_ARGUMENTS)
def test_the_reference_the_op_falls_back_to_makes_the_same_checks(mutate, message):
    # without a compiled kernel the wrapper runs the reference, whose zip() would
    # silently drop layers and which would take N1 != N2 as symmetric
    gen = torch.Generator().manual_seed(6)
    a1, a2, g1, g2 = _layers(4, 3, 2, [(1, 3, 2)], torch.float32, gen)
    out = torch.zeros(4, 3)
    args = mutate(out, a1, a2, g1, g2)
    error = ValueError if args[5] not in ("trace", "diagonal", "full") else RuntimeError
    with pytest.raises(error, match=message):
        gram_hadamard_accumulate_reference(*args)


@compiled_cpu
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
def test_opcheck(output):
    gen = torch.Generator().manual_seed(7)
    a1, a2, g1, g2 = _layers(5, 4, 2, [(1, 3, 4), (2, 2, 3)], torch.float32, gen)
    out = torch.zeros(_out_shape(5, 4, 2, output))
    torch.library.opcheck(
        torch.ops.lazykernel.gram_hadamard_accumulate_.default,
        (out, a1, a2, g1, g2, output, False),
    )


def test_wrapper_rejects_unknown_output():
    with pytest.raises(ValueError, match="output must be one of"):
        gram_hadamard_accumulate(torch.zeros(2, 2), [], [], [], [], "everything")


def test_wrapper_returns_the_updated_tensor():
    gen = torch.Generator().manual_seed(8)
    ops = _layers(3, 2, 1, [(1, 2, 2)], torch.float64, gen)
    out = torch.zeros(3, 2, dtype=torch.float64)
    result = gram_hadamard_accumulate(out, *ops, "trace")
    assert result is out
    torch.testing.assert_close(out, explicit_gram_hadamard(*ops, "trace"))


@compiled_cpu
def test_op_works_under_torch_compile():
    gen = torch.Generator().manual_seed(9)
    a1, a2, g1, g2 = _layers(4, 3, 2, [(1, 3, 2)], torch.float32, gen)

    def kernel(a, b, g, h):
        out = torch.zeros(4, 3)
        torch.ops.lazykernel.gram_hadamard_accumulate_(out, [a], [b], [g], [h], "trace", False)
        return out * 2

    compiled = torch.compile(kernel, backend="aot_eager", fullgraph=True)
    expected = torch.zeros(4, 3)
    gram_hadamard_accumulate_reference(expected, a1, a2, g1, g2, "trace")
    torch.testing.assert_close(compiled(a1[0], a2[0], g1[0], g2[0]), 2 * expected)


cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and lazykernel.backend().cuda_kernels),
    reason="needs a CUDA device and the compiled CUDA kernels",
)


@pytest.mark.cuda
@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
@pytest.mark.parametrize("layers", list(LAYER_SETS))
@pytest.mark.parametrize("sizes", [(6, 6), (65, 130), (200, 200)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_kernel_matches_reference(dtype, output, layers, sizes, symmetric):
    n1, n2 = (sizes[0], sizes[0]) if symmetric else sizes
    gen = torch.Generator().manual_seed(10)
    a1, a2, g1, g2 = _layers(n1, n2, 3, LAYER_SETS[layers], dtype, gen)
    if symmetric:
        a2, g2 = a1, g1
    initial = torch.randn(_out_shape(n1, n2, 3, output), dtype=dtype, generator=gen)
    slow = initial.clone()
    gram_hadamard_accumulate_reference(slow, a1, a2, g1, g2, output)
    fast = initial.cuda()
    torch.ops.lazykernel.gram_hadamard_accumulate_(
        fast, [t.cuda() for t in a1], [t.cuda() for t in a2], [t.cuda() for t in g1],
        [t.cuda() for t in g2], output, symmetric)
    scale = slow.abs().max().item()
    assert (fast.cpu() - slow).abs().max().item() <= TOL[dtype] * scale


@pytest.mark.cuda
@cuda_kernels
def test_cuda_opcheck():
    gen = torch.Generator().manual_seed(11)
    a1, a2, g1, g2 = _layers(5, 4, 2, [(1, 3, 4), (2, 2, 3)], torch.float32, gen)
    cuda = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    torch.library.opcheck(
        torch.ops.lazykernel.gram_hadamard_accumulate_.default,
        (torch.zeros(5, 4, 2, 2, device="cuda"), cuda(a1), cuda(a2), cuda(g1), cuda(g2), "full", False),
    )


def test_wrapper_asks_for_lists_of_layers():
    gen = torch.Generator().manual_seed(8)
    a1, a2, g1, g2 = _layers(4, 4, 2, [(1, 3, 2)], torch.float32, gen)
    with pytest.raises(ValueError, match=r"a1 must be a list of tensors, one per layer.*\[a1\]"):
        gram_hadamard_accumulate(torch.zeros(4, 4), a1[0], a2, g1, g2)
