"""Calls on one model from several threads take turns, stay exact and leave the model whole."""

import gc
import threading
import weakref

import torch
from torch import nn

import lazykernel
from lazykernel import _model

from conftest import reference_ntk


class WithPositions(nn.Module):
    """A Linear stack plus a parameter used directly in forward (expanded during the capture)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.bias = nn.Parameter(torch.randn(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x) + self.bias))


def _run_together(work, count):
    errors = []
    barrier = threading.Barrier(count)

    def run(i):
        barrier.wait()
        try:
            work(i)
        except Exception as error:  # a thread's exception would be lost otherwise
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors


def test_threads_computing_kernels_and_products_of_one_model_get_exact_results():
    torch.manual_seed(0)
    model = WithPositions().double()
    names = [name for name, _ in model.named_parameters()]
    xs = [torch.randn(7, 6, dtype=torch.float64) for _ in range(2)]
    wants = [reference_ntk(model, x, output="full") for x in xs]
    tangent = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    with torch.no_grad():
        want_jvp = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (xs[0],)),
                                  (dict(model.named_parameters()),), (tangent,))[1]
    wrong = []

    def work(i):
        for _ in range(8):
            if i < 2:
                got = lazykernel.ntk(model, xs[i], output="full")
                if not torch.allclose(got, wants[i], rtol=1e-10, atol=1e-12):
                    wrong.append(i)
            else:
                _, got = lazykernel.jvp(model, xs[0], tangent)
                if not torch.allclose(got, want_jvp, rtol=1e-10, atol=1e-12):
                    wrong.append(i)

    _run_together(work, 3)
    assert wrong == []
    # the model still has its own parameters, as parameters
    assert [name for name, _ in model.named_parameters()] == names
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_the_locks_do_not_keep_models_alive():
    model = nn.Linear(3, 2)
    lazykernel.ntk(model, torch.randn(4, 3))
    assert any(ref() is model for ref, _ in _model._LOCKS.values())
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert all(ref() is not None for ref, _ in _model._LOCKS.values())
