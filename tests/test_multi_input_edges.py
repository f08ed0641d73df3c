"""Inputs in parts at their edges: no examples, conjugate views, derivatives through a part,
keyword order, and parts that are not tensors."""


import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import lazykernel
from lazykernel._inputs import pack_inputs

from conftest import assert_near_reference as _close
from conftest import several_inputs_reference as _reference


class TimeConditioned(nn.Module):
    """A network of an input and a scalar time per example: model(x, t)."""

    def __init__(self, d=4, outputs=2):
        super().__init__()
        self.inp = nn.Linear(d, 7)
        self.time = nn.Linear(1, 7, bias=False)
        self.head = nn.Linear(7, outputs)

    def forward(self, x, t):
        return self.head(torch.tanh(self.inp(x) + self.time(t)))


class Phase(nn.Module):
    """model(x, c) with a complex part c whose real and imaginary parts scale the features."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, c):
        scale = (c.real + 2 * c.imag).to(x.dtype)
        return self.head(torch.tanh(self.inp(x) * scale))


class Concatenated(nn.Module):
    """model(**parts): the parts concatenated in the order they are passed."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 2)

    def forward(self, **parts):
        h = torch.cat(list(parts.values()), -1)
        return self.head(torch.tanh(h) * torch.arange(1.0, 6.0, dtype=h.dtype))


def _timed(n, seed, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.rand(n, 1, generator=g)


def test_parts_with_no_examples_give_empty_results():
    torch.manual_seed(0)
    model = TimeConditioned().eval()
    x, t = _timed(5, 1)
    empty = (x[:0], t[:0])
    assert lazykernel.ntk(model, empty).shape == (0, 0)
    assert lazykernel.ntk(model, (x, t), empty, output="full").shape == (5, 0, 2, 2)
    assert lazykernel.plan(model, empty).flops == 0
    tangent = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    y, y_dot = lazykernel.jvp(model, empty, tangent)
    assert y.shape == y_dot.shape == (0, 2)
    grads = lazykernel.vjp(model, empty, torch.zeros(0, 2))
    assert all(float(g.abs().sum()) == 0.0 and g.shape == p.shape
               for (_, p), g in zip(model.named_parameters(), grads.values()))
    assert lazykernel.ntk_vp(model, empty, torch.zeros(0, 2)).shape == (0, 2)
    v = torch.randn(0, 2)
    assert float(lazykernel.ntk_vp(model, (x, t), v, x2=empty).abs().sum()) == 0.0
    assert lazykernel.linearize(model)(*empty).shape == (0, 2)


def test_a_conjugate_view_is_packed_as_its_values():
    torch.manual_seed(1)
    model = Phase().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=g)
    c = torch.randn(4, 4, dtype=torch.complex64, generator=g)
    part = c.conj()          # conjugated lazily: a flag of the view, not in its memory
    assert part.is_conj()
    values = part.resolve_conj()
    _close(lazykernel.ntk(model, (x, part), output="full"), _reference(model, (x, values), None, "full"))
    packed, layout = pack_inputs((x, part), "x1")
    assert torch.equal(layout.unpack(packed)[1], values)


def test_forward_mode_derivative_through_a_part_is_refused():
    torch.manual_seed(2)
    model = TimeConditioned().eval()
    x, t = _timed(5, 3)
    tangent = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    message = r"x\[1\] carries a forward-mode derivative.*count as constants"
    # torch.func.jvp with respect to a part would otherwise give a zero derivative
    for product in (lambda time: lazykernel.jvp(model, (x, time), tangent)[1],
                    lambda time: lazykernel.vjp(model, (x, time), torch.ones(5, 2))["head.weight"],
                    lambda time: lazykernel.ntk_vp(model, (x, time), torch.ones(5, 2))):
        with pytest.raises(ValueError, match=message):
            torch.func.jvp(product, (t,), (torch.ones_like(t),))
    with pytest.raises(ValueError, match=r"x1\[1\] carries a forward-mode derivative"):
        torch.func.jvp(lambda time: lazykernel.ntk(model, (x, time)), (t,), (torch.ones_like(t),))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(t, torch.ones_like(t))
        with pytest.raises(ValueError, match=message):
            lazykernel.jvp(model, (x, dual), tangent)
        with pytest.raises(ValueError, match=r"x1\[1\] carries a forward-mode derivative"):
            lazykernel.ntk(model, (x, dual))
    # a sequence of one tensor is that tensor, to which the products carry derivatives
    mlp = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
    mlp_tangent = {name: torch.randn_like(p) for name, p in mlp.named_parameters()}
    direction = torch.randn_like(x)
    _, alone = torch.func.jvp(lambda inp: lazykernel.jvp(mlp, inp, mlp_tangent)[1], (x,), (direction,))
    _, wrapped = torch.func.jvp(lambda inp: lazykernel.jvp(mlp, (inp,), mlp_tangent)[1], (x,), (direction,))
    assert float(alone.abs().max()) > 0 and torch.equal(wrapped, alone)
    # the kernel of a linearized model goes through the products under ntk's own transforms,
    # whose parts carry no derivative: still computed
    lin = lazykernel.linearize(model)
    for method in ("jacobian", "ntvp"):
        _close(lazykernel.ntk(lin, (x, t), method=method), _reference(model, (x, t)))


def test_keyword_arguments_reach_the_model_in_the_callers_order():
    torch.manual_seed(3)
    model = Concatenated().eval()
    g = torch.Generator().manual_seed(4)
    x1 = {"b": torch.randn(4, 3, generator=g), "a": torch.randn(4, 2, generator=g)}
    x2 = {"b": torch.randn(3, 3, generator=g), "a": torch.randn(3, 2, generator=g)}
    _close(lazykernel.ntk(model, x1, output="full"), _reference(model, x1, None, "full"))
    # x2 with its keys in another order: the model is still called as with x1's
    swapped = {"a": x2["a"], "b": x2["b"]}
    _close(lazykernel.ntk(model, x1, swapped, method="jacobian"), _reference(model, x1, x2))
    _close(lazykernel.ntk(model, x1, {"a": x1["a"], "b": x1["b"]}), _reference(model, x1))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def fn(p, inputs):
        h = torch.cat(list(inputs.values()), -1)
        return torch.nn.functional.linear(torch.tanh(h) * torch.arange(1.0, 6.0), p["head.weight"], p["head.bias"])

    _close(lazykernel.ntk(fn, x1, params=params), _reference(model, x1))
    with torch.no_grad():
        want = model(**x1)
    _close(lazykernel.linearize(model)(**x1), want.double())
    _close(lazykernel.jvp(model, x1, {k: torch.zeros_like(v) for k, v in params.items()})[0], want.double())


def test_parts_that_are_not_tensors_are_explained():
    model = TimeConditioned().eval()
    x, t = _timed(3, 5)
    with pytest.raises(ValueError, match=r"x1\[1\] is None.*leave an optional argument out"):
        lazykernel.ntk(model, (x, None))
    with pytest.raises(ValueError, match=r"x1\['mask'\] is None.*leave an optional argument out"):
        lazykernel.ntk(model, {"x": x, "mask": None})
    with pytest.raises(ValueError, match=r"x1\[1\] is a tuple inside x1.*one flat tuple or dict.*regroup"):
        lazykernel.ntk(model, (x, (t, t)))
    with pytest.raises(ValueError, match=r"x\['t'\] is a dict inside x.*one flat tuple or dict"):
        lazykernel.jvp(model, {"x": x, "t": {"t": t}}, {})
