"""How `lazykernel.ntk` tiles a kernel: chunk sizes under a budget, the operands it holds, and
what an interrupted or unusual call leaves behind; values against the float64 reference."""

import importlib
import sys
import warnings
import weakref

import pytest
import torch
from torch import nn

import lazykernel
from conftest import assert_close_to_reference, reference_ntk

ntk_module = importlib.import_module("lazykernel.ntk")


def _randn(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _mlp(width=6, outputs=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, outputs)).double().eval()


class _TokenModel(nn.Module):
    """Token ids ``[N, T]``: an embedding (sparse token rows), a linear map over positions, a mean."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids))).mean(1)


# -- chunk sizes ---------------------------------------------------------------------


def test_symmetric_ntvp_kernel_in_one_chunk_counts_the_products_of_the_chunk_with_itself():
    # The NTK-vector products of one chunk of N examples against itself carry N·O tangents,
    # each through a JVP over the N examples: at least N·O·N·512 hidden values of 4 bytes,
    # 512 KiB here. A budget of 300 KiB must split the kernel into chunks, as it does for
    # two different inputs of the same size.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 512), nn.Tanh(), nn.Linear(512, 1)).eval()
    n, budget = 16, 300 * 1024
    x = _randn(n, 2, seed=1, dtype=torch.float32)
    assert n * 1 * n * 512 * 4 > budget
    chunks = lazykernel.plan(model, x, method="ntvp", memory_budget=budget).chunks
    assert chunks[0] < n, f"one chunk of {n} examples planned under {budget} bytes: {chunks}"
    result = lazykernel.ntk(model, x, method="ntvp", memory_budget=budget)
    assert_close_to_reference(result, reference_ntk(model, x), torch.float32)


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntvp"])
def test_an_unlimited_memory_budget_is_accepted_for_token_inputs(method):
    torch.manual_seed(2)
    model = _TokenModel().double().eval()
    ids = torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(3))
    result = lazykernel.ntk(model, ids, output="full", method=method, memory_budget=float("inf"))
    assert_close_to_reference(result, reference_ntk(model, ids, output="full"), torch.float64)
    assert lazykernel.plan(model, ids, output="full", method=method, memory_budget=float("inf")).chunks == (6, 6)


# -- inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("x2_given", [False, True], ids=["x2_none", "x2_given"])
@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntvp"])
def test_inputs_that_require_grad_give_a_kernel_without_autograd_history(method, x2_given):
    # the kernel of every method is a plain tensor: no graph holding each tile's Jacobians
    model = _mlp()
    x1 = _randn(5, 4, seed=4).requires_grad_(True)
    x2 = _randn(3, 4, seed=5).requires_grad_(True) if x2_given else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lazykernel.ntk(model, x1, x2, output="full", method=method, batch_size=2)
    assert not result.requires_grad and result.grad_fn is None
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
    assert_close_to_reference(result, reference_ntk(model, x1, x2, "full"), torch.float64)


# -- operands held while tiling ------------------------------------------------------


@pytest.mark.parametrize("n1, n2", [(8, None), (2, 9), (9, 9), (7, 4)])
def test_a_chunks_operands_are_released_before_the_next_chunks_are_formed(monkeypatch, n1, n2):
    # The budget counts the operands of two chunks, one on each side of a tile; a chunk
    # whose tiles are done must not stay held while another is formed.
    formed, held_at_formation = [], []
    original = ntk_module._JacobianEngine.features

    def features(self, x):
        held_at_formation.append(sum(ref() is not None for ref in formed))
        result = original(self, x)
        formed.append(weakref.ref(result))
        return result

    monkeypatch.setattr(ntk_module._JacobianEngine, "features", features)
    model = _mlp()
    x1 = _randn(n1, 4, seed=6)
    x2 = None if n2 is None else _randn(n2, 4, seed=7)
    result = lazykernel.ntk(model, x1, x2, output="full", method="jacobian", batch_size=3)
    assert len(held_at_formation) > 2
    assert max(held_at_formation) <= 1, held_at_formation
    assert_close_to_reference(result, reference_ntk(model, x1, x2, "full"), torch.float64)


# -- an interrupted call -------------------------------------------------------------


class _InterruptedOnCall(nn.Module):
    """Mixed rules (linear maps, a LayerNorm, a generic scale) and a frozen layer and a buffer;
    raises KeyboardInterrupt on the ``stop``-th forward once armed."""

    def __init__(self, stop):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.out = nn.Linear(6, 3)
        self.register_buffer("offset", torch.full((6,), 0.1))
        self.stop, self.calls, self.armed = stop, 0, False

    def forward(self, x):
        if self.armed:
            self.calls += 1
            if self.calls == self.stop:
                raise KeyboardInterrupt
        return self.out(torch.tanh(self.frozen(self.norm(self.fc(x)) * self.scale) + self.offset))


def _state(model):
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
              len(m._backward_pre_hooks)) for m in model.modules()]
    params = {n: (p.requires_grad, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return hooks, params, buffers


def _interrupt_mid_tiling(monkeypatch, method, progress):
    """Run ``ntk`` on a model that is interrupted at its third forward once the tiles start;
    return the model, its state before the call and the interrupt (kept, as an interactive
    session keeps the last traceback)."""
    model = _InterruptedOnCall(stop=3).eval()
    before = _state(model)
    run_tiles = ntk_module._run_tiles

    def armed(*args, **kwargs):
        model.armed = True
        return run_tiles(*args, **kwargs)

    monkeypatch.setattr(ntk_module, "_run_tiles", armed)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        lazykernel.ntk(model, _randn(8, 4, seed=8, dtype=torch.float32), output="full", method=method,
                       batch_size=2, progress=progress, params=lambda name, p: name != "norm.weight")
    monkeypatch.setattr(ntk_module, "_run_tiles", run_tiles)
    assert model.calls == 3
    model.armed = False
    return model, before, interrupt


def _assert_state_unchanged(model, before):
    hooks, params, buffers = _state(model)
    assert hooks == before[0]
    for name, (requires_grad, pointer, value) in before[1].items():
        assert params[name][0] == requires_grad, name
        assert params[name][1] == pointer, name
        torch.testing.assert_close(params[name][2], value, rtol=0, atol=0)
    for name, value in before[2].items():
        torch.testing.assert_close(buffers[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["auto", "jacobian"])
def test_an_interrupt_mid_tiling_closes_the_progress_bar_and_leaves_the_model_as_it_was(monkeypatch, method):
    tqdm = pytest.importorskip("tqdm")
    open_before = {id(bar) for bar in list(tqdm.tqdm._instances)}
    model, before, _ = _interrupt_mid_tiling(monkeypatch, method, progress=True)
    _assert_state_unchanged(model, before)
    left_open = [bar for bar in list(tqdm.tqdm._instances) if id(bar) not in open_before]
    assert not left_open, "the interrupted call's progress bar is still open"
    x = _randn(5, 4, seed=9, dtype=torch.float32)
    assert_close_to_reference(lazykernel.ntk(model, x, output="full", batch_size=2), reference_ntk(model, x, output="full"),
                              torch.float32)


def test_an_interrupt_mid_tiling_ends_the_progress_line_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)      # import fails: progress on stderr
    model, before, _ = _interrupt_mid_tiling(monkeypatch, "auto", progress=True)
    _assert_state_unchanged(model, before)
    err = capsys.readouterr().err
    assert "lazykernel.ntk: 1/10 tiles" in err
    assert err.endswith("\n"), repr(err)


def test_the_forward_mode_check_on_a_parameter_subset_raises_no_autograd_warning():
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    x = torch.randn(5, 3, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lazykernel.ntk(model, x, method="ntvp", params=lambda name, p: name.startswith("2."))
