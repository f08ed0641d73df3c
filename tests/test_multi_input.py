"""Models with several inputs per example: x1 and x2 as tuples or dicts of tensors."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lazykernel
from lazykernel._inputs import pack_inputs

from conftest import reference_ntk
from conftest import float64_part
from conftest import assert_near_reference as _close
from conftest import several_inputs_jacobian as _jacobian
from conftest import several_inputs_reference as _reference


class MaskedMean(nn.Module):
    """Token embeddings averaged over the unmasked positions, then an MLP: model(ids, mask)."""

    def __init__(self, vocab=11, d=6, outputs=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, 8)
        self.head = nn.Linear(8, outputs)

    def forward(self, ids, mask):
        h = self.embed(ids) * mask.unsqueeze(-1).to(self.embed.weight.dtype)
        h = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(h.dtype)
        return self.head(torch.tanh(self.hidden(h)))


class TimeConditioned(nn.Module):
    """A network of an input and a scalar time per example: model(x, t)."""

    def __init__(self, d=4, outputs=2):
        super().__init__()
        self.inp = nn.Linear(d, 7)
        self.time = nn.Linear(1, 7, bias=False)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Linear(14, outputs)

    def forward(self, x, t):
        h = torch.relu(self.inp(x) + self.time(t))
        return self.head(torch.tanh(self.conv(h.unsqueeze(1))).flatten(1))


class Keywords(nn.Module):
    """model(ids=..., mask=...): a dict of keyword arguments."""

    def __init__(self):
        super().__init__()
        self.inner = MaskedMean()

    def forward(self, *, ids, mask):
        return self.inner(ids, mask)


def _tokens(n, seed, length=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.rand(n, length, generator=g) > 0.3
    mask[:, 0] = True
    return ids, mask


def _timed(n, seed, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.rand(n, 1, generator=g)


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntvp"])
@pytest.mark.parametrize("output", ["trace", "full"])
def test_tuple_inputs_match_reference(method, output):
    torch.manual_seed(0)
    model = MaskedMean().eval()
    x1, x2 = _tokens(5, 1), _tokens(3, 2)
    _close(lazykernel.ntk(model, x1, x2, output=output, method=method), _reference(model, x1, x2, output))
    _close(lazykernel.ntk(model, x1, output=output, method=method), _reference(model, x1, None, output))


def test_float_and_time_inputs_in_chunks():
    torch.manual_seed(1)
    model = TimeConditioned().eval()
    x1, x2 = _timed(7, 3), _timed(4, 4)
    want = _reference(model, x1, x2, "diagonal")
    _close(lazykernel.ntk(model, x1, x2, output="diagonal", batch_size=2), want)
    # x2 equal to x1, part by part: the symmetric kernel
    same = tuple(p.clone() for p in x1)
    _close(lazykernel.ntk(model, x1, same, batch_size=3), _reference(model, x1))


def test_dict_inputs_are_keyword_arguments():
    torch.manual_seed(2)
    model = Keywords().eval()
    ids, mask = _tokens(4, 5)
    x = {"ids": ids, "mask": mask}
    _close(lazykernel.ntk(model, x, output="full"), _reference(model, x, None, "full"))
    # the same keys in another order are the same inputs: the symmetric kernel
    _close(lazykernel.ntk(model, x, {"mask": mask, "ids": ids}), _reference(model, x))


def test_functional_model_receives_the_tuple():
    torch.manual_seed(3)
    model = TimeConditioned().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(p, inputs):
        x, t = inputs
        return torch.func.functional_call(model, p, (x, t))

    x1 = _timed(4, 6)
    _close(lazykernel.ntk(fn, x1, params=params, output="full"), _reference(model, x1, None, "full"))


def test_products_take_several_inputs():
    torch.manual_seed(4)
    model = TimeConditioned().eval()
    x = _timed(5, 7)
    j = _jacobian(copy.deepcopy(model).double(), tuple(float64_part(v) for v in x))     # [N, O, P]
    g = torch.Generator().manual_seed(8)
    tangent = {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}
    flat = torch.cat([t.reshape(-1) for t in tangent.values()]).double()
    _, y_dot = lazykernel.jvp(model, x, tangent)
    _close(y_dot.reshape(5, -1), j @ flat)
    cotangent = torch.randn(5, 2, generator=g)
    grads = lazykernel.vjp(model, x, cotangent)
    got = torch.cat([grads[name].reshape(-1) for name, _ in model.named_parameters()])
    _close(got, torch.einsum("no,nop->p", cotangent.double(), j))
    v = torch.randn(5, 2, generator=g)
    kernel = _reference(model, x, None, "full")
    _close(lazykernel.ntk_vp(model, x, v, output="full"), torch.einsum("ijab,jb->ia", kernel, v.double()))


def test_plan_and_disk_take_several_inputs(tmp_path):
    torch.manual_seed(5)
    model = MaskedMean().eval()
    x1 = _tokens(6, 9)
    plan = lazykernel.plan(model, x1, output="full")
    assert plan.flops > 0
    path = tmp_path / "k.npy"
    kernel = lazykernel.ntk_to_disk(model, x1, out=str(path), output="full", batch_size=2)
    want = _reference(model, x1, None, "full")
    _close(torch.from_numpy(np.load(path)), want)
    _close(torch.as_tensor(np.asarray(kernel)), want)


def test_parts_must_agree():
    model = TimeConditioned().eval()
    x, t = _timed(4, 1)
    with pytest.raises(ValueError, match=r"same number of examples.*x1\[0\] has 4, x1\[1\] has 3"):
        lazykernel.ntk(model, (x, t[:3]))
    with pytest.raises(ValueError, match=r"x1\[1\] must be a torch.Tensor.*got float"):
        lazykernel.ntk(model, (x, 0.5))
    with pytest.raises(ValueError, match=r"empty tuple"):
        lazykernel.ntk(model, ())
    with pytest.raises(ValueError, match=r"x1 and x2 must have the same parts.*x1 is \(\(4,\) torch.float32, "
                                         r"\(1,\) torch.float32\), x2 is \(\(4,\) torch.float32, \(2,\) "
                                         r"torch.float32\)"):
        lazykernel.ntk(model, (x, t), (x, torch.cat([t, t], 1)))
    with pytest.raises(ValueError, match=r"x1 and x2 must have the same parts.*x1 is \(\(4,\) torch.float32, "
                                         r"\(1,\) torch.float32\), x2 is one tensor"):
        lazykernel.ntk(model, (x, t), x)
    with pytest.raises(ValueError, match=r"x1\[1\] has dtype torch.float64 but the model's parameters"):
        lazykernel.ntk(model, (x, t.double()))
    bad = t.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"x1\[1\] contains NaN"):
        lazykernel.ntk(model, (x, bad))
    with pytest.raises(ValueError, match=r"keys must be the names"):
        lazykernel.ntk(model, {0: x, 1: t})


def test_a_model_that_writes_into_a_part_is_refused():
    class Writes(TimeConditioned):
        def forward(self, x, t):
            t.mul_(2)
            return super().forward(x, t)

    x, t = _timed(3, 2)
    before = t.clone()
    with pytest.raises(ValueError, match="changed its input in place"):
        lazykernel.ntk(Writes().eval(), (x, t))
    assert torch.equal(t, before)


def test_packing_round_trips_every_dtype():
    g = torch.Generator().manual_seed(0)
    parts = (torch.randn(3, 2, 2, generator=g), torch.randint(0, 5, (3, 7), generator=g),
             torch.rand(3, 1, generator=g) > 0.5, torch.randn(3, 1, dtype=torch.complex128, generator=g),
             torch.randn(3, 5, generator=g).half(), torch.zeros(3, 0))
    packed, layout = pack_inputs(parts, "x1")
    assert packed.dtype == torch.uint8 and packed.shape[1] % 16 == 0
    for rows in (slice(0, 3), slice(1, 3), slice(2, 3)):
        for got, want in zip(layout.unpack(packed[rows]), parts):
            assert got.dtype == want.dtype and torch.equal(got, want[rows])
    # one tensor in a sequence is that tensor
    single, none = pack_inputs([parts[0]], "x1")
    assert single is parts[0] and none is None


def test_linearized_model_is_called_as_the_network():
    torch.manual_seed(6)
    model = TimeConditioned().eval()
    lin = lazykernel.linearize(model)
    x, t = _timed(5, 10)
    with torch.no_grad():
        want = model(x, t)
    _close(lin(x, t), want.double())
    _close(lin.f0(x, t), want.double())
    # after a step, f0 + J·Δθ: compared with the explicit Jacobian of a float64 copy
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.01 * torch.randn_like(p))
    j = _jacobian(copy.deepcopy(model).double(), (x.double(), t.double()))
    delta = torch.cat([(lin.theta()[n] - lin.theta0()[n]).reshape(-1) for n, _ in model.named_parameters()])
    _close(lin(x, t), want.double() + (j @ delta.double()).reshape(want.shape))
    keyword = lazykernel.linearize(Keywords().eval())
    ids, mask = _tokens(3, 11)
    _close(keyword(ids=ids, mask=mask), keyword.f0(ids=ids, mask=mask).double())
    with pytest.raises(ValueError, match="either all by position or all by keyword"):
        keyword(ids, mask=mask)


def test_any_mapping_is_a_dict_of_keyword_arguments():
    from collections import UserDict

    class Encoding(UserDict):
        """A tokenizer's output: a mapping of names to tensors that is not a dict."""

    torch.manual_seed(7)
    model = Keywords().eval()
    ids, mask = _tokens(4, 12)
    x = Encoding(ids=ids, mask=mask)
    want = _reference(model, {"ids": ids, "mask": mask}, None, "full")
    _close(lazykernel.ntk(model, x, output="full"), want)
    monitor = lazykernel.RegimeMonitor(model, x)
    _close(monitor.k0, want.diagonal(dim1=2, dim2=3).sum(-1))


def test_a_model_that_takes_fewer_inputs_is_told_how_it_was_called():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x, t = _timed(6, 13)
    with pytest.raises(ValueError, match=r"could not be applied to x1, 6 examples of \(\(4,\) torch.float32, "
                                         r"\(1,\) torch.float32\) passed as model\(\*x1\).*TypeError"):
        lazykernel.ntk(model, (x, t))
    with pytest.raises(ValueError, match=r"passed as model\(\*\*x1\)"):
        lazykernel.ntk(model, {"x": x, "t": t})


def test_a_functional_model_keeps_a_one_element_tuple():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(p, inputs):
        (x,) = inputs
        return torch.func.functional_call(model, p, (x,))

    x = _timed(4, 14)[0]
    want = reference_ntk(model, x, output="full")
    _close(lazykernel.ntk(fn, (x,), params=params, output="full"), want)
    _, y_dot = lazykernel.jvp(fn, (x,), {k: torch.ones_like(v) for k, v in params.items()}, params=params)
    assert y_dot.shape == (4, 2)
