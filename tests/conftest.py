"""Shared helpers for the ntk() tests: a float64 ground-truth empirical NTK.

The reference is written to be obviously right rather than fast: it converts the
model (or the functional parameter dict) and the inputs to float64, runs the
batch forward once, and obtains every row of the Jacobian with its own
``torch.autograd.grad`` call, one backward per (example, output component).
"""

import copy
import re

import pytest
import torch
from torch import nn

OUTPUTS = ("trace", "full", "diagonal")
METHODS = ("jacobian", "ntvp", "structured", "auto")
DTYPES = (torch.float32, torch.float64)


def _to_double(x):
    """Floating tensors become float64; integer tensors (token ids) are left alone."""
    if torch.is_tensor(x) and x.is_floating_point():
        return x.detach().to(torch.float64)
    return x


def _selected_module_params(model, params_selection):
    """(name, param) pairs of ``model`` selected as the specification says."""
    named = list(model.named_parameters())  # tied weights appear once
    if params_selection is None:
        chosen = named
    elif callable(params_selection):
        chosen = [(n, p) for n, p in named if params_selection(n, p)]
    else:
        wanted = set(params_selection)
        chosen = [(n, p) for n, p in named if n in wanted]
    # requires_grad=False never counts, even if named or accepted by the predicate.
    return [(n, p) for n, p in chosen if p.requires_grad]


def _explicit_jacobian(forward, inputs, params):
    """[N, O, P] Jacobian, one torch.autograd.grad per (example, output)."""
    out = forward(inputs)
    n = inputs.shape[0]
    out = out.reshape(n, -1)  # an output of shape [N] is O = 1
    rows = []
    for i in range(n):
        per_output = []
        for o in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, o], params, retain_graph=True, allow_unused=True)
            flat = [
                torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.reshape(-1)
                for g, p in zip(grads, params)
            ]
            per_output.append(torch.cat(flat))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def reference_ntk(model_or_fn, x1, x2=None, output="trace", params_selection=None):
    """Float64 empirical NTK of ``model_or_fn`` between x1 and x2 (x2=None means x1).

    ``model_or_fn`` is an nn.Module (``params_selection``: None, names or a
    predicate) or a callable fn(params, x) (``params_selection``: the dict of all
    its parameter values; every floating entry counts as trainable).
    """
    if x2 is None:
        x2 = x1
    x1d, x2d = _to_double(x1), _to_double(x2)

    if isinstance(model_or_fn, nn.Module):
        model = copy.deepcopy(model_or_fn).double()
        params = [p for _, p in _selected_module_params(model, params_selection)]
        forward = model
    else:
        fn = model_or_fn
        pdict = {}
        params = []
        for name, value in params_selection.items():
            if torch.is_tensor(value) and value.is_floating_point():
                leaf = value.detach().to(torch.float64).clone().requires_grad_(True)
                params.append(leaf)
                pdict[name] = leaf
            else:
                pdict[name] = value

        def forward(x):
            return fn(pdict, x)

    if not params:
        raise AssertionError("reference_ntk: no trainable parameters selected")

    with torch.enable_grad():
        j1 = _explicit_jacobian(forward, x1d, params)
        j2 = _explicit_jacobian(forward, x2d, params)

    full = torch.einsum("iap,jbp->ijab", j1, j2)  # [N1, N2, O, O]
    n_out = full.shape[-1]
    if output == "full":
        result = full
    elif output == "diagonal":
        result = torch.diagonal(full, dim1=-2, dim2=-1)  # [N1, N2, O]
    elif output == "trace":
        result = torch.diagonal(full, dim1=-2, dim2=-1).sum(-1)  # a sum, not a mean
    else:
        raise AssertionError(f"reference_ntk: unknown output {output!r}")
    if n_out == 1:
        result = result.reshape(full.shape[0], full.shape[1])
    return result


def assert_close_to_reference(result, ref, dtype):
    """Compare a library kernel (in ``dtype``) with the float64 reference."""
    assert result.dtype == dtype, f"dtype {result.dtype}, expected {dtype}"
    assert tuple(result.shape) == tuple(ref.shape), f"shape {tuple(result.shape)}, expected {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    assert scale > 0, "degenerate test case: the reference kernel is all zeros"
    if dtype == torch.float64:
        torch.testing.assert_close(result, ref, rtol=1e-9, atol=1e-10 * scale)
    else:
        # float32 against the float64 reference: each kernel entry is a sum of a few
        # hundred products, each carrying float32 round-off (~6e-8 relative) from the
        # forward/backward passes. By Cauchy-Schwarz every |J_a . J_b| <= max|Θ|, so
        # an absolute error of 1e-4 * max|ref| leaves a wide margin over
        # (few hundred) * 6e-8 while still catching any real mistake.
        torch.testing.assert_close(result.double(), ref, rtol=0.0, atol=1e-4 * scale)


class SlicedPositions(nn.Module):
    """Token ids ``[N, T]`` with learned positions sliced by the length, ``pos[:T]`` (T ≤ 4).

    Its expanded-parameter rule slices the expanded copy's batch axis instead:
    right for chunks of at most 4 examples, an error for longer ones, which
    only the chunk size shows (`_Engine.settle`).
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.pos = nn.Parameter(torch.randn(4, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids) + self.pos[:ids.shape[1]])).mean(1)


def low_rank_float32_problem():
    """``nn.Linear(3, 1)`` on 20 training and 4 test examples: its float32 NTK has rank 4,
    and its 16 zero eigenvalues come out of float32 as about ±5e-7.

    Returns (model, x, y, x_test, f0, f0_test), the outputs at θ0 as ``[N]``, ``[M]``.
    """
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y, xt = torch.randn(20, 3), torch.randn(20), torch.randn(4, 3)
    with torch.no_grad():
        f0, f0t = model(x)[:, 0], model(xt)[:, 0]
    return model, x, y, xt, f0, f0t


@pytest.fixture
def ref_ntk():
    return reference_ntk


def explicit_gram_hadamard(a1, a2, g1, g2, output):
    """The op's terms written out in float64: per-example gradients ``Σ_t g_t ⊗ a_t``
    of each layer and their Gram, in the op's output layout."""
    total = 0
    for A, B, G, H in zip(a1, a2, g1, g2):
        J1 = torch.einsum("ntod,ntk->nodk", G.double(), A.double()).flatten(2)
        J2 = torch.einsum("ntod,ntk->nodk", H.double(), B.double()).flatten(2)
        total = total + torch.einsum("iop,jqp->ijoq", J1, J2)
    if output == "trace":
        return total.diagonal(dim1=2, dim2=3).sum(-1)
    if output == "diagonal":
        return total.diagonal(dim1=2, dim2=3)
    return total


def functional_model_with_buffers_in_params():
    """(fn, params) of an eval-mode BatchNorm MLP whose ``params`` wrongly hold its buffers."""
    torch.manual_seed(16)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    params = {**dict(net.named_parameters()), **dict(net.named_buffers())}

    def fn(p, x):
        return torch.func.functional_call(net, p, (x,))

    return fn, params


# -- models of several inputs (x as a tuple or dict of tensors) ----------------------

def float64_part(part):
    return part.double() if part.is_floating_point() else part


def several_inputs_jacobian(model, inputs):
    """[N, O, P] per-example Jacobians of ``model`` (already float64) on a tuple or dict of inputs,
    one example and one output at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    keyword = isinstance(inputs, dict)
    n = next(iter(inputs.values() if keyword else inputs)).shape[0]
    rows = []
    for i in range(n):
        if keyword:
            y = model(**{k: v[i:i + 1] for k, v in inputs.items()}).reshape(-1)
        else:
            y = model(*(v[i:i + 1] for v in inputs)).reshape(-1)
        per_output = []
        for o in range(y.shape[0]):
            grads = torch.autograd.grad(y[o], params, retain_graph=True, allow_unused=True)
            per_output.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                         for g, p in zip(grads, params)]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def several_inputs_reference(model, x1, x2=None, output="trace"):
    """Float64 NTK of a model of several inputs (tuples or dicts of tensors), as ntk's outputs."""
    model = copy.deepcopy(model).double()
    as_double = (lambda x: {k: float64_part(v) for k, v in x.items()}) if isinstance(x1, dict) \
        else (lambda x: tuple(float64_part(v) for v in x))
    j1 = several_inputs_jacobian(model, as_double(x1))
    j2 = j1 if x2 is None else several_inputs_jacobian(model, as_double(x2))
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    if output == "full":
        return full
    if output == "diagonal":
        return torch.diagonal(full, dim1=2, dim2=3)
    return torch.diagonal(full, dim1=2, dim2=3).sum(-1)


def assert_near_reference(got, want):
    """Any-dtype result within 2e-5 of the float64 reference's largest entry."""
    got = got.detach().double()
    scale = want.abs().max().clamp(min=1e-12)
    assert got.shape == want.shape
    assert float((got - want).abs().max() / scale) < 2e-5


def peak_allocated_bytes(fn) -> int:
    """The most bytes ``fn`` holds allocated at once on the CPU, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def stated_least_budget(call) -> int:
    """The least budget, in bytes, that the error of ``call(1)`` (a memory budget of one byte) asks for."""
    with pytest.raises(ValueError, match="memory_budget of 1 B is too small") as error:
        call(1)
    stated = re.search(r"at least (\d+) bytes", str(error.value))
    assert stated, f"the error states no least budget: {error.value}"
    return int(stated.group(1))
