"""Every op and public function on every device it has a path for, against float64 references.

Each test runs on the CPU and, where a GPU is present, on CUDA (marked ``cuda``);
on CUDA the result is also compared with the CPU op's. The checks run on the
CPU too so that they are known to be right before a GPU ever runs them.
"""

import numpy as np
import pytest
import torch
from torch import nn

import lazykernel
from lazykernel.ops import gram_hadamard_accumulate_reference

from conftest import assert_close_to_reference, reference_ntk

_NO_CUDA = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(_NO_CUDA, reason="needs a CUDA device")])]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _out_shape(n1, n2, o, output):
    return {"trace": (n1, n2), "diagonal": (n1, n2, o), "full": (n1, n2, o, o)}[output]


def _strided(shape, dtype, device, gen):
    """A tensor of ``shape`` that is a transposed, offset view into a larger buffer."""
    base = torch.randn((shape[0] + 1,) + tuple(reversed(shape[1:])), dtype=dtype, generator=gen)
    view = base[1:].permute(0, *range(len(shape) - 1, 0, -1))
    assert view.shape == tuple(shape) and view.storage_offset() > 0
    return view.to(device) if device != "cpu" else view


def _terms(n1, n2, o, layers, dtype, device, gen):
    a1 = [_strided((n1, t, k), dtype, device, gen) for t, k, _ in layers]
    a2 = [_strided((n2, t, k), dtype, device, gen) for t, k, _ in layers]
    g1 = [_strided((n1, t, o, d), dtype, device, gen) for t, _, d in layers]
    g2 = [_strided((n2, t, o, d), dtype, device, gen) for t, _, d in layers]
    return a1, a2, g1, g2


def _linear_jvp64(x, x_dot, w, w_dot, b, b_dot):
    """``y = x Wᵀ + b`` and ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ`` in float64 on the CPU (a None tangent is zero)."""
    x, w, w_dot, b, b_dot = (t.detach().cpu().double() for t in (x, w, w_dot, b, b_dot))
    y_dot = x @ w_dot.T + b_dot
    if x_dot is not None:
        y_dot = y_dot + x_dot.detach().cpu().double() @ w.T
    return x @ w.T + b, y_dot


def _cpu64(ts):
    return [t.detach().cpu().double() for t in ts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
@pytest.mark.parametrize("sizes", [(7, 5), (67, 33)])
def test_gram_op_on_strided_offset_inputs(device, dtype, output, sizes):
    gen = torch.Generator().manual_seed(1)
    n1, n2 = sizes
    layers = [(1, 5, 3), (3, 2, 4), (2, 70, 1)]     # (T, K, D): sizes off any tile multiple
    a1, a2, g1, g2 = _terms(n1, n2, 3, layers, dtype, device, gen)
    assert not any(t.is_contiguous() for t in a1[1:] + g1)
    start = torch.randn(_out_shape(n1, n2, 3, output), dtype=dtype, generator=gen)
    want = start.double()
    gram_hadamard_accumulate_reference(want, _cpu64(a1), _cpu64(a2), _cpu64(g1), _cpu64(g2), output)
    got = lazykernel.gram_hadamard_accumulate(start.to(device), a1, a2, g1, g2, output)
    assert got.device.type == device and got.dtype == dtype
    scale = want.abs().max().item()
    assert (got.cpu().double() - want).abs().max().item() <= TOL[dtype] * scale
    if device != "cpu":
        on_cpu = lazykernel.gram_hadamard_accumulate(start.clone(), *[[t.cpu() for t in ts] for ts in (a1, a2, g1, g2)],
                                                     output)
        assert (got.cpu() - on_cpu).abs().max().item() <= TOL[dtype] * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n1, n2", [(0, 4), (4, 0), (0, 0)])
def test_gram_op_with_empty_batches_leaves_out_alone(device, n1, n2):
    gen = torch.Generator().manual_seed(2)
    a1, a2, g1, g2 = _terms(n1, n2, 2, [(2, 3, 4)], torch.float32, device, gen)
    out = torch.zeros(n1, n2, 2, 2, device=device)
    lazykernel.gram_hadamard_accumulate(out, a1, a2, g1, g2, "full")
    assert out.shape == (n1, n2, 2, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_gram_op_along_a_long_side(device):
    # many tiles along one side: the launch covers every one of them
    gen = torch.Generator().manual_seed(3)
    n1, n2 = 2, 70_001
    a1 = torch.randn(n1, 1, 3, generator=gen)
    a2 = torch.randn(n2, 1, 3, generator=gen)
    g1 = torch.randn(n1, 1, 2, 2, generator=gen)
    g2 = torch.randn(n2, 1, 2, 2, generator=gen)
    want = (a1[:, 0].double() @ a2[:, 0].double().T) * (g1.reshape(n1, -1).double() @ g2.reshape(n2, -1).double().T)
    out = torch.zeros(n1, n2, device=device)
    lazykernel.gram_hadamard_accumulate(out, [a1.to(device)], [a2.to(device)], [g1.to(device)], [g2.to(device)])
    assert (out.cpu().double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()


@pytest.mark.cuda
@pytest.mark.skipif(_NO_CUDA, reason="needs a CUDA device")
def test_ops_on_a_side_stream():
    gen = torch.Generator().manual_seed(4)
    a1, a2, g1, g2 = _terms(40, 30, 2, [(2, 7, 3)], torch.float32, "cuda", gen)
    want = torch.zeros(40, 30, dtype=torch.float64)
    gram_hadamard_accumulate_reference(want, _cpu64(a1), _cpu64(a2), _cpu64(g1), _cpu64(g2), "trace")
    x = torch.randn(9, 6, device="cuda")
    w, wd, b, bd = (torch.randn(5, 6, device="cuda"), torch.randn(5, 6, device="cuda"),
                    torch.randn(5, device="cuda"), torch.randn(5, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = torch.zeros(40, 30, device="cuda")
        lazykernel.gram_hadamard_accumulate(out, a1, a2, g1, g2, "trace")
        y, y_dot = lazykernel.linear_jvp(x, None, w, wd, b, bd)
    side.synchronize()
    assert (out.cpu().double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    y_ref, dot_ref = _linear_jvp64(x, None, w, wd, b, bd)
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_dot.cpu().double(), dot_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_jvp_on_strided_inputs(device, dtype):
    gen = torch.Generator().manual_seed(5)
    x = _strided((4, 3, 6), dtype, device, gen)
    x_dot = _strided((4, 3, 6), dtype, device, gen)
    w, w_dot = _strided((5, 6), dtype, device, gen), _strided((5, 6), dtype, device, gen)
    b, b_dot = torch.randn(5, dtype=dtype, generator=gen).to(device), torch.randn(5, dtype=dtype, generator=gen).to(device)
    y, y_dot = lazykernel.linear_jvp(x, x_dot, w, w_dot, b, b_dot)
    y_ref, dot_ref = _linear_jvp64(x, x_dot, w, w_dot, b, b_dot)
    assert y.device.type == device and y.dtype == dtype
    tol = TOL[dtype] * 10
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y_dot.cpu().double(), dot_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_op_on_device(device):
    info = lazykernel.backend()
    if not (info.cpu_kernels if device == "cpu" else info.cuda_kernels):
        pytest.skip(f"the compiled {device} kernels are not built")
    gen = torch.Generator().manual_seed(6)
    a1, a2, g1, g2 = _terms(4, 3, 2, [(2, 3, 2)], torch.float32, device, gen)

    def kernel(a, b, g, h):
        out = torch.zeros(4, 3, 2, device=a.device)
        torch.ops.lazykernel.gram_hadamard_accumulate_(out, [a], [b], [g], [h], "diagonal", False)
        return out + 1

    compiled = torch.compile(kernel, backend="aot_eager", fullgraph=True)
    want = torch.zeros(4, 3, 2, dtype=torch.float64)
    gram_hadamard_accumulate_reference(want, _cpu64(a1), _cpu64(a2), _cpu64(g1), _cpu64(g2), "diagonal")
    got = compiled(a1[0], a2[0], g1[0], g2[0])
    assert got.device.type == device
    torch.testing.assert_close(got.cpu().double(), want + 1, rtol=1e-5, atol=1e-5)


def _model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LayerNorm(48),
                         nn.Linear(48, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntvp"])
@pytest.mark.parametrize("output", ["trace", "full"])
def test_ntk_on_device(device, method, output):
    model = _model()
    x1, x2 = torch.randn(5, 2, 4, 4), torch.randn(4, 2, 4, 4)
    want = reference_ntk(model, x1, x2, output=output)
    got = lazykernel.ntk(model.to(device), x1.to(device), x2.to(device), output=output, method=method)
    assert got.device.type == device
    assert_close_to_reference(got.cpu(), want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_products_on_device(device):
    model = _model().double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    v = torch.randn(5, dtype=torch.float64)
    want = reference_ntk(model, x, output="trace") @ v
    moved = model.to(device)
    got = lazykernel.ntk_vp(moved, x.to(device), v.to(device))
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)
    tangent = {name: torch.randn_like(p) for name, p in moved.named_parameters()}
    y, y_dot = lazykernel.jvp(moved, x.to(device), tangent)
    assert y.device.type == y_dot.device.type == device
    _, reference_dot = torch.func.jvp(lambda p: torch.func.functional_call(moved, p, (x.to(device),)),
                                      (dict(moved.named_parameters()),), (tangent,))
    torch.testing.assert_close(y_dot, reference_dot, rtol=1e-9, atol=1e-9)
    cot = torch.randn(5, 3, dtype=torch.float64, device=device)
    grads = lazykernel.vjp(moved, x.to(device), cot)
    assert all(g.device.type == device for g in grads.values())
    # ⟨J ṫ, c⟩ = ⟨ṫ, Jᵀ c⟩
    lhs = (y_dot * cot).sum()
    rhs = sum((grads[name] * tangent[name]).sum() for name in grads)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_ntk_to_disk_on_device(device, tmp_path):
    model = _model()
    x = torch.randn(6, 2, 4, 4)
    want = reference_ntk(model, x, output="trace")
    got = lazykernel.ntk_to_disk(model.to(device), x.to(device), out=tmp_path / "k.npy", batch_size=4,
                                 progress=False)
    assert_close_to_reference(torch.tensor(np.array(got)), want, torch.float32)
