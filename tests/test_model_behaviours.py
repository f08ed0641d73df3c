"""Models that behave unusually: forwards that write into the model's own tensors,
TorchScript modules, parameters whose elements share memory.

Every kernel is compared with a float64 reference built the obvious way: a fresh
float64 copy of the model, one forward of the batch, and one
``torch.autograd.grad`` per example and output. A fresh copy per reference
matters here: a forward that writes into its buffers would otherwise run from
the state an earlier reference forward left behind.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lazykernel
from conftest import METHODS, assert_close_to_reference, reference_ntk

# torch.func announces its loop over examples for in-place ops without a batching rule
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _reference_jacobian(model, x):
    """``[N, O, P]`` float64 Jacobian of a fresh float64 copy of ``model`` (or of a
    functional ``(fn, params)`` pair), over its trainable tensors in order."""
    if isinstance(model, nn.Module):
        twin = copy.deepcopy(model).double()
        params = [p for p in twin.parameters() if p.requires_grad]
        forward = twin
    else:
        fn, values = model
        leaves = {name: v.detach().double().clone().requires_grad_(True) for name, v in values.items()}
        params = list(leaves.values())

        def forward(inputs):
            return fn(leaves, inputs)

    xd = x.double() if x.is_floating_point() else x
    with torch.enable_grad():
        out = forward(xd).reshape(x.shape[0], -1)
        rows = []
        for i in range(out.shape[0]):
            per_output = []
            for o in range(out.shape[1]):
                grads = torch.autograd.grad(out[i, o], params, retain_graph=True, allow_unused=True)
                per_output.append(torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if g is None
                                             else g.reshape(-1) for g, p in zip(grads, params)]))
            rows.append(torch.stack(per_output))
    return torch.stack(rows)


def _reference_ntk(model, x, output):
    jac = _reference_jacobian(model, x)
    full = torch.einsum("iap,jbp->ijab", jac, jac)
    if output == "full":
        return full
    diagonal = full.diagonal(dim1=-2, dim2=-1)
    return diagonal if output == "diagonal" else diagonal.sum(-1)


# -- forwards that write into the model's buffers ---------------------------------------

class RunningMeanMonitor(nn.Module):
    """Eval-mode custom code that keeps a running mean of its hidden layer, read before it
    is updated (so one forward treats examples independently), and counts its calls."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)
        self.register_buffer("mean", torch.full((5,), 0.5))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        y = self.head(h - self.mean)
        with torch.no_grad():
            self.mean.lerp_(h.mean(0), 0.5)
        self.calls += 1
        return y


class PowerIterationScaled(nn.Module):
    """Divides a weight by an estimate of its largest singular value refined by one
    power-iteration step per forward, kept in a buffer (spectral_norm in training mode)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("u", torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def forward(self, x):
        w = self.inner.weight
        with torch.no_grad():
            v = F.normalize(w.T @ self.u, dim=0)
            self.u.copy_(F.normalize(w @ v, dim=0))
        sigma = self.u @ (w @ v)
        return self.head(torch.tanh(F.linear(x, w / sigma, self.inner.bias)))


class RebindsItsCount(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count = self.count + 1
        return self.net(x)


def _writing_model(cls, dtype):
    torch.manual_seed(0)
    return cls().to(dtype).eval()


@pytest.mark.parametrize("cls", [RunningMeanMonitor, PowerIterationScaled], ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_forward_that_writes_its_buffers_gets_the_kernel_of_the_model_as_it_is(cls, method, dtype):
    # Before, every evaluation ran from the state the previous one left: RunningMeanMonitor
    # was refused as coupling its examples (its mean moved between the probe's calls), and
    # PowerIterationScaled stopped on torch.func's refusal to write into a captured tensor.
    model = _writing_model(cls, dtype)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    ref = _reference_ntk(model, x, "full")
    result = lazykernel.ntk(model, x, output="full", method=method)
    assert_close_to_reference(result, ref, dtype)


@pytest.mark.parametrize("method", METHODS)
def test_the_model_keeps_its_buffers_as_they_were(method):
    model = _writing_model(RunningMeanMonitor, torch.float64)
    mean, calls = model.mean.clone(), model.calls.clone()
    lazykernel.ntk(model, torch.randn(5, 3, dtype=torch.float64), method=method)
    assert torch.equal(model.mean, mean)
    assert int(model.calls) == int(calls) == 0


def test_a_rebound_buffer_is_put_back_and_every_method_agrees():
    model = _writing_model(RebindsItsCount, torch.float64)
    count = model.count
    x = torch.randn(5, 3, dtype=torch.float64)
    ref = _reference_ntk(model, x, "trace")
    for method in METHODS:
        assert_close_to_reference(lazykernel.ntk(model, x, method=method), ref, torch.float64)
    assert model.count is count and float(count) == 0.0


def test_products_of_a_forward_that_writes_its_buffers_match_the_jacobian():
    model = _writing_model(RunningMeanMonitor, torch.float64)
    mean = model.mean.clone()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    jac = _reference_jacobian(model, x)                                  # [5, 2, P]
    gen = torch.Generator().manual_seed(3)
    tangent = {name: torch.randn(p.shape, generator=gen, dtype=torch.float64)
               for name, p in model.named_parameters()}
    flat_tangent = torch.cat([t.reshape(-1) for t in tangent.values()])
    cotangent = torch.randn(5, 2, generator=gen, dtype=torch.float64)

    _, y_dot = lazykernel.jvp(model, x, tangent)
    torch.testing.assert_close(y_dot, jac @ flat_tangent, rtol=1e-9, atol=1e-11)
    grads = lazykernel.vjp(model, x, cotangent)
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads.values()]),
                               torch.einsum("nop,no->p", jac, cotangent), rtol=1e-9, atol=1e-11)
    product = lazykernel.ntk_vp(model, x, cotangent, output="full")
    full = torch.einsum("iap,jbp->ijab", jac, jac)
    torch.testing.assert_close(product, torch.einsum("ijab,jb->ia", full, cotangent), rtol=1e-9, atol=1e-11)
    # at θ0 the linearization is the model's own output
    torch.testing.assert_close(lazykernel.linearize(model)(x), copy.deepcopy(model)(x), rtol=1e-12, atol=1e-12)
    assert torch.equal(model.mean, mean) and int(model.calls) == 0


# -- parts of the forward under torch.no_grad ------------------------------------------------

class ScaleUnderNoGrad(nn.Module):
    """A weight divided by its norm taken under no_grad: autograd treats the norm as a
    constant, forward-mode AD (which no_grad does not stop) differentiates it too."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        w = self.inner.weight
        with torch.no_grad():
            scale = w.norm()
        return self.head(torch.tanh(F.linear(x, w / scale, self.inner.bias)))


@pytest.mark.parametrize("cls", [ScaleUnderNoGrad, PowerIterationScaled], ids=lambda c: c.__name__)
@pytest.mark.parametrize("output", ["trace", "full"])
def test_ntvp_takes_what_no_grad_holds_constant_as_constant(cls, output):
    # before: the ntvp method's JVPs differentiated the norm too (ScaleUnderNoGrad's trace
    # kernel up to 6% off in float64) while the other methods and autograd hold it constant
    model = _writing_model(cls, torch.float64)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ref = _reference_ntk(model, x, output)
    assert_close_to_reference(lazykernel.ntk(model, x, output=output, method="ntvp"), ref, torch.float64)
    x2 = torch.randn(3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    j1, j2 = _reference_jacobian(model, x), _reference_jacobian(model, x2)
    cross = torch.einsum("iap,jbp->ijab", j1, j2)
    cross = cross if output == "full" else cross.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert_close_to_reference(lazykernel.ntk(model, x, x2, output=output, method="ntvp"), cross,
                              torch.float64)


# -- forwards that change the model otherwise -------------------------------------------

class MovesItselfInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        self.to(x.device)
        return self.head(torch.tanh(self.inner(x)))


@pytest.mark.parametrize("method", ["jacobian", "ntvp"])
def test_model_to_inside_forward_is_refused_with_what_to_do(method):
    # before: torch's "mutating directly with `.data` inside functorch transform is not allowed"
    model = MovesItselfInForward().double()
    with pytest.raises(ValueError, match=r"changes tensors of the model in place.*move the conversion out of forward"):
        lazykernel.ntk(model, torch.randn(4, 3, dtype=torch.float64), method=method)


def test_a_functional_model_writing_into_a_tensor_it_closes_over_is_refused_with_what_to_do():
    seen = torch.zeros(())

    def fn(p, x):
        seen.add_(1)
        return torch.tanh(x @ p["w"])

    params = {"w": torch.randn(3, 2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"changes tensors of the model in place.*register_buffer"):
        lazykernel.ntk(fn, torch.randn(4, 3, dtype=torch.float64), params=params, method="jacobian")


# -- TorchScript ---------------------------------------------------------------------------

def _scripted(kind):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    if kind == "script":
        return torch.jit.script(model)
    return torch.jit.trace(model, torch.randn(2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind", ["script", "trace"])
def test_a_torchscript_module_is_refused_by_every_entry_point(kind):
    # before: torch's "register_forward_hook is not supported on ScriptModules" or
    # "The stateless API can't be used with Jitted modules"
    model = _scripted(kind)
    x = torch.randn(4, 3)
    match = r"TorchScript module.*pass the nn.Module it was made from"
    for method in METHODS:
        with pytest.raises(ValueError, match=match):
            lazykernel.ntk(model, x, method=method)
    with pytest.raises(ValueError, match=match):
        lazykernel.plan(model, x)
    with pytest.raises(ValueError, match=match):
        lazykernel.jvp(model, x, {name: torch.ones_like(p) for name, p in model.named_parameters()})
    with pytest.raises(ValueError, match=match):
        lazykernel.vjp(model, x, torch.ones(4, 2))
    with pytest.raises(ValueError, match=match):
        lazykernel.ntk_vp(model, x, torch.ones(4))


# -- parameters whose elements share memory -------------------------------------------------

def _expanded_bias_model():
    def fn(p, x):
        return torch.tanh(x @ p["w"].T + p["b"]) @ p["v"].T

    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=torch.float64),
              "b": torch.randn(1, generator=gen, dtype=torch.float64).expand(4),
              "v": torch.randn(2, 4, generator=gen, dtype=torch.float64)}
    return fn, params


@pytest.mark.parametrize("method", METHODS)
def test_a_functional_parameter_made_by_expand_counts_per_element(method):
    # before: ntvp stopped on "more than one element of the written-to tensor refers to a
    # single memory location" (forward-mode AD's tangent of the expanded primal)
    fn, params = _expanded_bias_model()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = _reference_ntk((fn, params), x, "full")
    assert_close_to_reference(lazykernel.ntk(fn, x, output="full", method=method, params=params), ref,
                              torch.float64)


def test_products_with_a_parameter_made_by_expand_match_the_jacobian():
    fn, params = _expanded_bias_model()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    jac = _reference_jacobian((fn, params), x)
    tangent = {name: torch.full(p.shape, 0.5, dtype=torch.float64) for name, p in params.items()}
    _, y_dot = lazykernel.jvp(fn, x, tangent, params=params)
    torch.testing.assert_close(y_dot, jac @ torch.full((jac.shape[2],), 0.5, dtype=torch.float64),
                               rtol=1e-9, atol=1e-11)
    v = torch.randn(5, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    full = torch.einsum("iap,jbp->ijab", jac, jac)
    torch.testing.assert_close(lazykernel.ntk_vp(fn, x, v, output="full", params=params),
                               torch.einsum("ijab,jb->ia", full, v), rtol=1e-9, atol=1e-11)


# -- outputs that are not one row per example -------------------------------------------------

class FirstThreeRows(nn.Module):
    """Returns the outputs of the first three examples only: as many rows as the examples
    `ntk` probes the batch axis with."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.inner(x))[:3]


def test_ntvp_refuses_an_output_without_one_row_per_example():
    # before: a [6, 6, 2, 2] kernel of rows that are not examples, without a word
    model = FirstThreeRows().double()
    with pytest.raises(ValueError, match=r"returned shape \(3, 2\) for 4 example\(s\).*one row per example"):
        lazykernel.ntk(model, torch.randn(6, 3, dtype=torch.float64), output="full", method="ntvp")


class _FrozenUnderNoGrad(nn.Module):
    """A first layer run under torch.no_grad (its parameters have no derivative), or
    outputs detached as a whole (no parameter has one)."""

    def __init__(self, detach_output):
        super().__init__()
        self.first, self.head, self.detach_output = nn.Linear(3, 4), nn.Linear(4, 2), detach_output

    def forward(self, x):
        with torch.no_grad():
            h = self.first(x)
        y = self.head(torch.tanh(h))
        return y.detach() if self.detach_output else y


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntvp"])
def test_layers_under_no_grad_contribute_nothing_with_every_method(method):
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    model = _FrozenUnderNoGrad(detach_output=False).double()
    got = lazykernel.ntk(model, x, output="full", method=method)
    assert_close_to_reference(got, reference_ntk(model, x, None, "full", None), torch.float64)
    assert lazykernel.plan(model, x).flops > 0
    detached = _FrozenUnderNoGrad(detach_output=True).double()
    assert torch.equal(lazykernel.ntk(detached, x, output="full", method=method),
                       torch.zeros(5, 5, 2, 2, dtype=torch.float64))


class _DropsAtRandom(nn.Module):
    """Dropout that ignores eval mode, at a rate low enough that a few examples often
    come out alike from one evaluation to the next."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        return F.dropout(self.layer(x), 0.02, training=True)


class _ComplexOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        y = self.layer(x)
        return torch.complex(y, 2 * y)


@pytest.mark.parametrize("method", METHODS)
def test_a_forward_that_draws_random_numbers_is_refused_every_time(method):
    torch.manual_seed(0)
    model, x = _DropsAtRandom(), torch.randn(6, 3)
    for _ in range(5):
        with pytest.raises(ValueError, match=r"draws random numbers in its forward .*training=self.training"):
            lazykernel.ntk(model, x, method=method)
    with pytest.raises(ValueError, match="draws random numbers"):
        lazykernel.ntk_vp(model, x, torch.randn(6))


@pytest.mark.parametrize("method", METHODS)
def test_complex_outputs_are_refused_with_what_to_return(method):
    with pytest.raises(ValueError, match=r"complex outputs .*torch.view_as_real"):
        lazykernel.ntk(_ComplexOutputs(), torch.randn(4, 3), method=method)


class _WideningOutputs(nn.Module):
    """A model whose outputs are cast to float32 after its own layers (logits of a
    bfloat16 network)."""

    def __init__(self):
        super().__init__()
        self.first, self.head = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.first(x))).float()


@pytest.mark.parametrize("method", METHODS)
def test_outputs_in_another_dtype_than_the_layers_are_exact_to_that_dtype(method):
    torch.manual_seed(0)
    model, x = _WideningOutputs().bfloat16(), torch.randn(6, 3).bfloat16()
    got = lazykernel.ntk(model, x, output="full", method=method)
    ref = reference_ntk(model, x, None, "full", None)
    assert got.dtype == torch.bfloat16
    assert float((got.double() - ref).abs().max() / ref.abs().max()) < 2e-2


class _SeedsItself(nn.Module):
    """Draws from the global generator after seeding it: the same numbers every time."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, x):
        torch.manual_seed(0)
        return self.layer(x + 0.1 * torch.randn(4))


def test_a_forward_that_draws_the_same_numbers_every_time_is_accepted():
    model = _SeedsItself().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    got = lazykernel.ntk(model, x, output="full")
    assert_close_to_reference(got, reference_ntk(model, x, None, "full", None), torch.float64)
