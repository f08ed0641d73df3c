"""jvp, vjp, ntk_vp and linearize on models whose Jacobian has a convention to follow
(embedding padding rows), on functional models with constants, and their messages."""

import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn import functional as F

import lazykernel
from conftest import _explicit_jacobian


def _reference_jacobian(model, x):
    """[N, O, P] float64 Jacobian of the trainable parameters, one backward per row."""
    double = copy.deepcopy(model).double()
    named = [(n, p) for n, p in double.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        return _explicit_jacobian(double, x, [p for _, p in named]), [n for n, _ in named]


def _flat(d, names):
    return torch.cat([d[n].reshape(-1).double() for n in names])


def _padded_tokens():
    torch.manual_seed(21)
    return nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Tanh(), nn.Flatten(), nn.Linear(6, 2)).double()


class _TiedPadded(nn.Module):
    """An embedding with a padding row whose table is also the output layer's weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(22)
        self.embed = nn.Embedding(6, 4, padding_idx=0)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


_IDS = torch.tensor([[0, 1], [2, 0], [3, 4], [0, 0]])


# -- padding rows: the products follow PyTorch's backward, as ntk and vjp do -------------

@pytest.mark.parametrize("method", ["auto", "generic", "structured"])
def test_jvp_gives_an_embedding_padding_row_no_derivative_as_vjp_and_ntk_do(method):
    # The backward of a lookup gives the row at padding_idx no gradient; forward-mode
    # AD differentiated the lookup of that row, so jvp's J was not vjp's transpose.
    model = _padded_tokens()
    jac, names = _reference_jacobian(model, _IDS)
    gen = torch.Generator().manual_seed(1)
    tangent = {n: torch.randn(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()}
    _, y_dot = lazykernel.jvp(model, _IDS, tangent, method=method)
    torch.testing.assert_close(y_dot, torch.einsum("nop,p->no", jac, _flat(tangent, names)),
                               rtol=1e-12, atol=1e-12)
    c = torch.randn(4, 2, dtype=torch.float64, generator=gen)
    grads = lazykernel.vjp(model, _IDS, c)
    # adjoint identity <c, J t> = <Jᵀ c, t>
    torch.testing.assert_close((c * y_dot).sum(), (_flat(grads, names) * _flat(tangent, names)).sum(),
                               rtol=1e-12, atol=1e-12)


def test_ntk_vp_of_a_padded_embedding_tied_to_the_output_layer_matches_ntk():
    model = _TiedPadded().double()
    jac, _ = _reference_jacobian(model, _IDS)
    v = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.einsum("iap,jbp,jb->ia", jac, jac, v)
    got = lazykernel.ntk_vp(model, _IDS, v, output="full", batch_size=3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    kernel = lazykernel.ntk(model, _IDS, output="full")
    torch.testing.assert_close(got, torch.einsum("ijab,jb->ia", kernel, v), rtol=1e-10, atol=1e-12)


def test_jvp_of_a_functional_model_with_a_negative_padding_index():
    gen = torch.Generator().manual_seed(3)
    params = {"table": torch.randn(5, 3, dtype=torch.float64, generator=gen),
              "w": torch.randn(2, 3, dtype=torch.float64, generator=gen)}

    def fn(p, ids):
        return torch.tanh(F.embedding(ids, p["table"], padding_idx=-1)).sum(1) @ p["w"].T

    ids = torch.tensor([[4, 1], [2, 4], [0, 3]])
    leaves = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    with torch.enable_grad():
        jac = _explicit_jacobian(lambda i: fn(leaves, i), ids, list(leaves.values()))
    tangent = {n: torch.randn(v.shape, dtype=torch.float64, generator=gen) for n, v in params.items()}
    _, y_dot = lazykernel.jvp(fn, ids, tangent, params=params)
    torch.testing.assert_close(y_dot, torch.einsum("nop,p->no", jac, _flat(tangent, list(params))),
                               rtol=1e-12, atol=1e-12)


def test_linearized_model_moves_with_the_same_jacobian_as_the_kernel_when_the_padding_row_moves():
    # weight decay, or a user's edit, moves the padding row: f_lin must move by J δ with the J of ntk
    model = _padded_tokens()
    jac, names = _reference_jacobian(model, _IDS)
    lin = lazykernel.linearize(model)
    gen = torch.Generator().manual_seed(4)
    delta = {n: torch.randn(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in lin.theta().items():
            p.add_(delta[n])
        torch.testing.assert_close(lin(_IDS), model(_IDS) + torch.einsum("nop,p->no", jac, _flat(delta, names)),
                                   rtol=1e-12, atol=1e-12)


# -- linearize: a private copy of the functional model's tensors ---------------------------

def test_a_linearized_functional_model_keeps_its_constants_as_they_were_at_construction():
    gen = torch.Generator().manual_seed(5)
    keep = torch.tensor([True, False, True, True])          # a pruning mask, later updated in place
    columns = torch.tensor([0, 2, 3])
    params = {"w1": torch.randn(4, 3, dtype=torch.float64, generator=gen), "keep": keep,
              "columns": columns, "w2": torch.randn(2, 3, dtype=torch.float64, generator=gen)}

    def fn(p, x):
        h = torch.tanh(x @ p["w1"].T) * p["keep"]
        return h[:, p["columns"]] @ p["w2"].T

    x = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    lin = lazykernel.linearize(fn, params)
    with torch.no_grad():
        before = lin(x)
        torch.testing.assert_close(before, fn(params, x), rtol=1e-13, atol=1e-13)
        keep[0] = False
        columns[0] = 1
        params["w1"].add_(1.0)
        torch.testing.assert_close(lin(x), before, rtol=0, atol=0)
        torch.testing.assert_close(lin.f0(x), before, rtol=0, atol=0)


# -- messages ----------------------------------------------------------------------------

def test_a_tangent_entry_for_a_frozen_parameter_is_called_not_selected_not_unknown():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    model[0].requires_grad_(False)                         # fine-tuning the head only
    tangent = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"not selected \['0.weight', '0.bias'\].*requires_grad=False.*drop them") \
            as error:
        lazykernel.jvp(model, torch.randn(3, 4), tangent)
    assert "unknown" not in str(error.value)
    with pytest.raises(ValueError, match=r"unknown names \['nope'\].*not selected \['0.weight', '0.bias'\]"):
        lazykernel.jvp(model, torch.randn(3, 4), dict(tangent, nope=torch.zeros(1)))


def test_a_tangent_entry_for_a_functional_constant_says_constants_have_no_tangent():
    params = {"w": torch.randn(2, 3), "columns": torch.tensor([0, 2])}

    def fn(p, x):
        return x[:, p["columns"]] @ p["w"][:, :2].T

    tangent = {"w": torch.zeros(2, 3), "columns": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"\['columns'\] .*not floating point.*constants.*drop them"):
        lazykernel.jvp(fn, torch.randn(4, 3), tangent, params=params)


# -- products inside another transform ------------------------------------------------------

def _tanh_mlp():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_jvp_under_an_enclosing_forward_mode_transform_keeps_the_outer_derivative():
    # auto took the fused layer walk (no forward-mode rule, under no_grad) whenever no
    # tensor required grad, and dropped the outer tangent: J_t of jvp's result came out 0
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    jac, names = _reference_jacobian(model, x)
    gen = torch.Generator().manual_seed(9)
    tangent = {n: torch.randn(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()}
    direction = {n: torch.randn(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()}
    # jvp is linear in the tangent: its derivative along `direction` is J·direction
    _, outer = torch.func.jvp(lambda t: lazykernel.jvp(model, x, t)[1], (tangent,), (direction,))
    torch.testing.assert_close(outer, torch.einsum("nop,p->no", jac, _flat(direction, names)),
                               rtol=1e-12, atol=1e-12)
    # torch.autograd.forward_ad cannot nest forward mode: refused by name, not a zero derivative
    with forward_ad.dual_level():
        dual = dict(tangent, **{"2.bias": forward_ad.make_dual(tangent["2.bias"], direction["2.bias"])})
        with pytest.raises(ValueError, match=r"forward_ad dual tensors given as tangent\['2.bias'\]: .*"
                                             r"torch.func.jvp"):
            lazykernel.jvp(model, x, dual)


def test_the_kernel_and_products_of_a_linearized_model_are_the_kernel_at_theta0():
    # f_lin is linear in θ, so its NTK is Θ(θ0) wherever θ is; lazykernel.ntk's forward-mode
    # method and the products reach the network's jvp inside their own transforms
    model = _tanh_mlp()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    jac, names = _reference_jacobian(model, x)
    lin = lazykernel.linearize(model)
    keys = {n: n.replace(".", "__") for n in names}
    with torch.no_grad():
        for n, p in lin.theta().items():
            p.add_(0.3)
    expected = torch.einsum("iap,jbp->ijab", jac, jac)
    torch.testing.assert_close(lazykernel.ntk(lin, x, output="full", method="ntvp"), expected,
                               rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(11)
    tangent = {keys[n]: torch.randn(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()}
    _, y_dot = lazykernel.jvp(lin, x, tangent)
    flat_tangent = torch.cat([tangent[keys[n]].reshape(-1) for n in names])
    torch.testing.assert_close(y_dot, torch.einsum("nop,p->no", jac, flat_tangent), rtol=1e-12, atol=1e-12)
    v = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(lazykernel.ntk_vp(lin, x, v, output="full"), torch.einsum("ijab,jb->ia", expected, v),
                               rtol=1e-10, atol=1e-12)


# -- linearize: converting the module converts all it computes with --------------------------

@pytest.mark.parametrize("functional", [False, True])
def test_a_linearized_model_converted_with_double_computes_in_float64(functional):
    # .double() converted θ alone: the float32 copy of the network refused float64
    # inputs, and with float32 ones θ − θ0 was cast back and f_lin computed in float32
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    if functional:
        values = {n: p.detach().clone() for n, p in model.named_parameters()}
        container = copy.deepcopy(model).double()  # computes in the dtype of the values it is given
        lin = lazykernel.linearize(lambda p, inp: torch.func.functional_call(container, p, (inp,)), values)
    else:
        lin = lazykernel.linearize(model)
    lin = lin.double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    jac, names = _reference_jacobian(model, x)
    keys = {n: n.replace(".", "__") for n in names}
    gen = torch.Generator().manual_seed(15)
    delta = {n: 1e-3 * torch.randn(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n in names:
            getattr(lin, keys[n]).add_(delta[n])
        got = lin(x)
        f0 = copy.deepcopy(model).double()(x)
    assert got.dtype == torch.float64 and all(v.dtype == torch.float64 for v in lin.theta0().values())
    # float32 round-off of f0 alone is ~1e-7; float64 throughout leaves ~1e-15
    torch.testing.assert_close(got, f0 + torch.einsum("nop,p->no", jac, _flat(delta, names)), rtol=1e-12, atol=1e-12)
    loss = (lin(x) ** 2).sum()
    loss.backward()
    assert all(p.grad.dtype == torch.float64 for p in lin.parameters())


class _PartlyUnderNoGrad(nn.Module):
    """A layer used both under torch.no_grad (held constant by reverse mode) and
    normally: forward mode would differentiate both uses."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.b(torch.tanh(h)) + self.a(x)[:, :2]


def test_products_hold_what_the_forward_computes_under_no_grad_constant():
    torch.manual_seed(0)
    model = _PartlyUnderNoGrad().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    params = list(model.parameters())
    jac = _explicit_jacobian(model, x, params)                              # [N, O, P]
    tangent = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    flat = torch.cat([tangent[name].reshape(-1) for name, _ in model.named_parameters()])
    _, y_dot = lazykernel.jvp(model, x, tangent)
    torch.testing.assert_close(y_dot, jac @ flat, rtol=1e-10, atol=1e-12)
    v = torch.randn(5, 2, dtype=torch.float64)
    kernel = torch.einsum("iop,jqp->iojq", jac, jac).reshape(10, 10)
    torch.testing.assert_close(lazykernel.ntk_vp(model, x, v, output="full").reshape(-1),
                               kernel @ v.reshape(-1), rtol=1e-10, atol=1e-12)
    moved = lazykernel.linearize(model)
    with torch.no_grad():
        for p, t in zip(moved.parameters(), tangent.values()):
            p.add_(t)
    torch.testing.assert_close(moved(x), model(x) + jac @ flat, rtol=1e-10, atol=1e-12)


class _NormedUnderNoGrad(nn.Module):
    """A hidden layer divided by its weight's norm, taken under torch.no_grad."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6, bias=False), nn.Linear(6, 2)

    def forward(self, x):
        with torch.no_grad():
            scale = self.a.weight.norm()
        return self.b(torch.tanh(self.a(x) / scale))


def test_the_forward_mode_check_does_not_rest_on_the_first_example():
    # the first example is all zeros, where forward mode's extra term vanishes
    torch.manual_seed(0)
    model = _NormedUnderNoGrad().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    x[0] = 0.0
    jac = _explicit_jacobian(model, x, list(model.parameters()))
    v = torch.randn(5, 2, dtype=torch.float64)
    kernel = torch.einsum("iop,jqp->iojq", jac, jac).reshape(10, 10)
    torch.testing.assert_close(lazykernel.ntk_vp(model, x, v, output="full").reshape(-1),
                               kernel @ v.reshape(-1), rtol=1e-10, atol=1e-12)
