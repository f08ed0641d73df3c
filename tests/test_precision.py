"""The ``precision`` option: TF32 switches scoped to the call, and the GEMM Gram path it takes."""

import sys

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import _precision
from lazykernel._precision import gemm_gram_accumulate, matmul_precision
from lazykernel.ops import gram_hadamard_accumulate_reference

from conftest import OUTPUTS, assert_close_to_reference, reference_ntk

ntk_module = sys.modules["lazykernel.ntk"]


def _result(n1, n2, o, output, dtype=torch.float64):
    shape = {"trace": (n1, n2), "diagonal": (n1, n2, o), "full": (n1, n2, o, o)}[output]
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("output", OUTPUTS)
def test_gemm_gram_equals_the_reference_op(output):
    torch.manual_seed(0)
    n1, n2, o = 5, 4, 3
    a1 = [torch.randn(n1, 1, k, dtype=torch.float64) for k in (2, 7)]
    a2 = [torch.randn(n2, 1, k, dtype=torch.float64) for k in (2, 7)]
    g1 = [torch.randn(n1, 1, o, d, dtype=torch.float64) for d in (4, 1)]
    g2 = [torch.randn(n2, 1, o, d, dtype=torch.float64) for d in (4, 1)]
    want = _result(n1, n2, o, output)
    gram_hadamard_accumulate_reference(want, a1, a2, g1, g2, output)
    start = torch.randn_like(want)
    got = gemm_gram_accumulate(start.clone(), a1, a2, g1, g2, output)
    # it accumulates into what is there
    torch.testing.assert_close(got, start + want, rtol=1e-12, atol=1e-12)


def test_gemm_gram_refuses_terms_over_positions():
    a = torch.randn(3, 2, 4)
    g = torch.randn(3, 2, 1, 5)
    with pytest.raises(ValueError, match="single-position"):
        gemm_gram_accumulate(torch.zeros(3, 3), [a], [a], [g], [g], "trace")


def test_unknown_precision_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        lazykernel.ntk(model, torch.randn(4, 3), precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        lazykernel.plan(model, torch.randn(4, 3), precision=None)


def _tf32_state():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def test_switches_follow_the_precision_inside_the_call_only_and_survive_errors():
    before = _tf32_state()
    cuda = torch.device("cuda")
    with matmul_precision("tf32", cuda, torch.float32):
        assert _tf32_state() == (True, True)
        # PyTorch's newer precision settings agree: reading them does not raise
        assert torch.get_float32_matmul_precision() == "high"
    assert _tf32_state() == before
    # "highest" turns off cuDNN's default TF32 convolutions for the call
    with matmul_precision("highest", cuda, torch.float32):
        assert _tf32_state() == (False, False)
    assert _tf32_state() == before
    with pytest.raises(RuntimeError, match="inside"):
        with matmul_precision("tf32", cuda, torch.float32):
            raise RuntimeError("inside")
    assert _tf32_state() == before
    # nothing changes for the CPU or float64
    for args in (("tf32", torch.device("cpu"), torch.float32), ("highest", torch.device("cpu"), torch.float32),
                 ("tf32", cuda, torch.float64)):
        with matmul_precision(*args):
            assert _tf32_state() == before


def test_calls_that_set_the_switches_take_turns():
    import threading

    entered, release = threading.Event(), threading.Event()
    seen = []

    def first():
        with matmul_precision("tf32", torch.device("cuda"), torch.float32):
            entered.set()
            release.wait(5)
            seen.append(_tf32_state())

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(5)
    # another thread cannot switch while the first call runs
    assert not _precision._SWITCHES.acquire(blocking=False)
    release.set()
    thread.join(5)
    assert seen == [(True, True)]
    with matmul_precision("highest", torch.device("cuda"), torch.float32):
        assert _tf32_state() == (False, False)


class MixedTerms(nn.Module):
    """Linear layers on vectors (T = 1 terms) and on a short sequence (T = 2, pairwise), and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Linear(12, 12)
        self.norm = nn.LayerNorm(12)
        self.mid = nn.Linear(24, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):                       # x: [N, 2, 12]
        h = torch.tanh(self.norm(self.seq(x))).flatten(1)
        return self.head(torch.tanh(self.mid(h)))


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("batch_size", [None, 4])
def test_the_gemm_gram_path_is_exact_where_it_is_taken(output, same, batch_size, monkeypatch):
    # on the CPU "tf32" computes as "highest"; forcing the GEMM path runs it in float64
    monkeypatch.setattr(ntk_module, "uses_tf32", lambda precision, device, dtype: precision == "tf32")
    positions = {"gemm": set(), "fused": set()}
    for name, key in (("gemm_gram_accumulate", "gemm"), ("gram_hadamard_accumulate", "fused")):
        def spy(out, a1, a2, g1, g2, mode, *args, real=getattr(ntk_module, name), key=key, **kwargs):
            positions[key].update(a.shape[1] for a in a1)
            return real(out, a1, a2, g1, g2, mode, *args, **kwargs)

        monkeypatch.setattr(ntk_module, name, spy)
    torch.manual_seed(5)
    model = MixedTerms().double()
    x1 = torch.randn(6, 2, 12, dtype=torch.float64)
    x2 = None if same else torch.randn(4, 2, 12, dtype=torch.float64)
    got = lazykernel.ntk(model, x1, x2, output=output, method="structured", precision="tf32",
                         batch_size=batch_size)
    # single-position terms take the GEMMs, the sequence layer's pairwise term the fused op
    assert positions == {"gemm": {1}, "fused": {2}}
    assert_close_to_reference(got, reference_ntk(model, x1, x2, output=output), torch.float64)


def test_the_plan_counts_the_gemm_grams_buffers(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(64, 8)
    plain = lazykernel.plan(model, x)
    monkeypatch.setattr(ntk_module, "uses_tf32", lambda precision, device, dtype: precision == "tf32")
    tf32 = lazykernel.plan(model, x, precision="tf32")
    # two [64, 64] float32 buffers more
    assert tf32.peak_bytes - plain.peak_bytes == pytest.approx(2 * 64 * 64 * 4)
    assert tf32.flops == pytest.approx(plain.flops)


def test_tf32_on_the_cpu_computes_as_highest():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    x = torch.randn(6, 5)
    assert torch.equal(lazykernel.ntk(model, x, precision="tf32"), lazykernel.ntk(model, x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("output", OUTPUTS)
def test_tf32_on_cuda_is_close_to_the_reference_and_leaves_the_switches(output):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))
    x1, x2 = torch.randn(300, 64), torch.randn(200, 64)
    want = reference_ntk(model, x1, x2, output=output)
    before = _tf32_state()
    got = lazykernel.ntk(model.cuda(), x1.cuda(), x2.cuda(), output=output, precision="tf32").cpu().double()
    assert _tf32_state() == before
    # TF32 keeps 10 mantissa bits: relative error about 1e-3 on these sums of products
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-2 * scale
    exact = lazykernel.ntk(model, x1.cuda(), x2.cuda(), output=output).cpu()
    assert_close_to_reference(exact, want, torch.float32)


def _products(model, x, precision):
    """Every product of `lazykernel.products` on ``model`` (two outputs), with ``precision``."""
    tangent = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    return {
        "jvp": lazykernel.jvp(model, x, tangent, precision=precision)[1],
        "vjp": lazykernel.vjp(model, x, x.new_ones(x.shape[0], 2), precision=precision),
        "ntk_vp": lazykernel.ntk_vp(model, x, torch.ones(x.shape[0]), precision=precision),
    }


def test_products_refuse_an_unknown_precision():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        lazykernel.jvp(model, x, {n: torch.zeros_like(p) for n, p in model.named_parameters()}, precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        lazykernel.vjp(model, x, torch.ones(4, 2), precision="TF32")
    with pytest.raises(ValueError, match="unknown precision"):
        lazykernel.ntk_vp(model, x, torch.ones(4), precision=None)


def test_products_with_tf32_on_the_cpu_compute_as_highest():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randn(5, 2, 6)
    tf32, highest = _products(model, x, "tf32"), _products(model, x, "highest")
    assert torch.equal(tf32["jvp"], highest["jvp"])
    assert torch.equal(tf32["ntk_vp"], highest["ntk_vp"])
    for name, grad in highest["vjp"].items():
        assert torch.equal(tf32["vjp"][name], grad)


class SwitchRecorder(nn.Module):
    """A convolution and a linear map that note PyTorch's TF32 switches whenever they run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.head = nn.Linear(12, 2)
        self.seen = set()

    def forward(self, x):
        self.seen.add(_tf32_state())
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision, inside", [("highest", (False, False)), ("tf32", (True, True))])
def test_products_on_cuda_set_the_switches_for_the_call_only(precision, inside):
    torch.manual_seed(4)
    model = SwitchRecorder().cuda()
    x = torch.randn(5, 2, 6, device="cuda")
    before = _tf32_state()
    _products(model, x, precision)
    # every forward of every product ran with the call's switches, and the caller's are back
    assert model.seen == {inside}
    assert _tf32_state() == before
