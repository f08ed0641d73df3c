"""What a call learns about a model's structure, kept for later calls on the same model.

Before it computes, a call runs the model on a few examples to learn its
number of outputs and activation size (`ntk._probe`), and the structured
method checks every layer rule against autograd on them
(`StructuredPlan.verify`). What these find depends on how the model is built
and on the shape of one example, not on the values of its parameters, so a
later call on the same model object, unchanged in structure, with examples of
the same shape, dtype and device, reuses it, so a kernel tracked at every
step of a training run pays for the checks once (for an MLP of width 4096
with N = 256 they were a third of a call).

The structure of a model (`structure_key`) is, for an ``nn.Module``: every
submodule (identity, type, train or eval mode, its hooks, a ``forward``
set on the instance), every parameter and buffer (identity, shape, dtype,
device, ``requires_grad``), the selected parameters and PyTorch's global
module hooks. For a functional model it is the function object and its
tensors. Replacing a parameter, adding a hook or a layer, switching modes
or changing the example shape starts a new check. A model whose forward
follows another path for other inputs of the same shape (data-dependent
control flow) was only ever checked on a few examples; `clear_cache` forgets
every result, so the next call checks again.

The store holds models weakly: a model that is no longer used elsewhere is
not kept alive by it.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Hashable, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from lazykernel._model import ModelAdapter

# (the model object, a hashable description of its structure and of one example)
Key = Tuple[Any, Hashable]

# example shapes remembered per model: a few sequence lengths, say, without
# growing without bound over a run with ever-new shapes
_PER_MODEL = 16


def _tensor_key(name: str, t: torch.Tensor) -> tuple:
    return (name, id(t), tuple(t.shape), t.dtype, t.device, t.requires_grad)


def structure_key(adapter: ModelAdapter, x: torch.Tensor) -> Optional[Key]:
    """The key under which results for ``adapter`` on examples like ``x`` are kept.

    None when the model cannot be held weakly (its results are then not kept).
    """
    owner = adapter.module if adapter.module is not None else adapter._fn
    try:
        weakref.ref(owner)
    except TypeError:
        return None
    example = (tuple(x.shape[1:]), x.dtype, x.device)
    selected = tuple(_tensor_key(name, p) for name, p in adapter.params.items())
    if adapter.module is None:
        tensors = tuple(_tensor_key(name, t) for name, t in adapter._constants.items())
        return owner, (example, selected, tensors)
    root = adapter.module
    modules = tuple(
        (name, id(m), type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
         len(m._backward_hooks), len(m._backward_pre_hooks), id(m.__dict__.get("forward")))
        for name, m in root.named_modules(remove_duplicate=False))
    tensors = tuple(_tensor_key(name, t) for name, t in root.named_parameters(remove_duplicate=False))
    buffers = tuple(_tensor_key(name, t) for name, t in root.named_buffers(remove_duplicate=False))
    hooks = (len(_module_globals._global_forward_hooks), len(_module_globals._global_forward_pre_hooks),
             len(_module_globals._global_backward_hooks), len(_module_globals._global_backward_pre_hooks))
    return owner, (example, selected, modules, tensors, buffers, hooks)


class _Store:
    """Results by (model, structure, kind), the models held weakly; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()

    def get(self, key: Optional[Key], kind: str) -> Any:
        if key is None:
            return None
        owner, signature = key
        with self._lock:
            entries = self._models.get(owner)
            if entries is None or (signature, kind) not in entries:
                return None
            entries.move_to_end((signature, kind))
            return entries[(signature, kind)]

    def put(self, key: Optional[Key], kind: str, value: Any) -> None:
        if key is None:
            return
        owner, signature = key
        with self._lock:
            entries = self._models.get(owner)
            if entries is None:
                entries = self._models[owner] = OrderedDict()
            entries[(signature, kind)] = value
            entries.move_to_end((signature, kind))
            while len(entries) > 2 * _PER_MODEL:
                entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._models = weakref.WeakKeyDictionary()


STORE = _Store()


def clear_cache() -> None:
    """Forget every model check kept for later calls; the next call on a model checks it again.

    `lazykernel.ntk`, `plan`, `ntk_to_disk`, `jvp`, `vjp` and `ntk_vp` run a
    model on a few examples before computing (to learn its outputs and, for
    the structured method, to check each layer rule against autograd) and keep
    what they found for later calls on the same model with examples of the
    same shape (see ``lazykernel._checks``). Call this when a model's forward
    takes another path for other inputs of the same shape, so that the rules
    are checked on the new inputs' first examples.
    """
    STORE.clear()
