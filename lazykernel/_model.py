"""A uniform functional view of the two kinds of model `ntk` accepts.

* an ``nn.Module`` applied as ``model(x)``, whose trainable parameters are chosen
  by ``params`` (None, names, or a predicate);
* a torch.func-style ``fn(params, x)`` with ``params`` a dict of tensors.

Both become a `ModelAdapter` with one method, ``call(values, x)``, that applies
the model with the selected parameters replaced by ``values``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import threading
import weakref
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call

from lazykernel._inputs import InputLayout

ParamSelection = Union[None, str, List[str], tuple, Callable[[str, torch.Tensor], bool]]


class ModelAdapter:
    """A model with a chosen set of trainable parameters.

    Attributes:
        module: the ``nn.Module``, or None for a functional model.
        params: the selected parameters, by name (the tensors themselves).
        forward_mode_agrees: whether forward-mode JVPs agree with reverse mode on this
            model, once `lazykernel._jacobian.forward_mode_works` has checked (None
            before); where False, JVPs come from reverse mode.
    """

    def __init__(self, module: Optional[nn.Module], fn: Optional[Callable],
                 params: Dict[str, torch.Tensor], constants: Dict[str, torch.Tensor]):
        self.module = module
        self._fn = fn
        self.params = params
        # Values of the functional model that are not differentiated (non-floating).
        self._constants = constants
        # A module's buffers as they are now: every evaluation starts from these
        # (`_module_call`), so that a forward that writes into its buffers (a call
        # counter, a cache, the power iteration of spectral_norm in training mode)
        # computes the same function each time and the model keeps them.
        self._buffers: Dict[str, torch.Tensor] = dict(module.named_buffers()) if module is not None else {}
        # names of the buffers the forward writes in place; None until an evaluation showed it
        self._written: Optional[frozenset] = None if self._buffers else frozenset()
        # False where forward-mode AD differs from reverse mode on this model (an op without
        # it, or a forward computing from the parameters under torch.no_grad, which stops
        # reverse mode only): products then take reverse mode (`_jacobian.forward_mode_works`).
        self.forward_mode_agrees: Optional[bool] = None
        # How a batch of several inputs per example is packed into one tensor
        # (`lazykernel._inputs`), set by the public function that packed them; None
        # for a model of one tensor.
        self.layout: Optional[InputLayout] = None

    def call(self, values: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Apply the model to a batch ``x`` with the selected parameters set to ``values``."""
        with _explained_self_changes():
            if self.module is not None:
                return self._module_call(values, x)
            merged = dict(self._constants)
            merged.update(values)
            return self._fn(merged, x if self.layout is None else self.layout.unpack(x))

    def forward_with(self, replaced: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Apply the model with some selected parameters replaced by ``replaced`` (the rest as they are)."""
        if not replaced:
            return self.forward(x)
        if self.module is not None:
            return self._module_call(replaced, x)
        merged = dict(self.params)
        merged.update(replaced)
        return self.call(merged, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the model with its own parameters (autograd tracks them as usual)."""
        if self.module is not None:
            return self._module_call({}, x)
        return self.call(self.params, x)

    def _module_call(self, values: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The module on ``x`` with ``values`` swapped in, and its buffers as they were.

        The buffers go through ``functional_call`` too: one the forward rebinds
        (``self.count = self.count + 1``) is put back afterwards, and one it writes
        in place is handed over as a copy of its own. Which ones are written shows
        on the first evaluation, which copies them all; torch.func's transforms
        refuse in-place writes into the module's own tensors anyway.
        """
        if not self._buffers:
            if values:
                return restoring_functional_call(self.module, values, x, self.layout)
            return self.module(x) if self.layout is None else self.layout.apply(self.module, x)
        written = self._written
        buffers = {name: (b.clone() if written is None or name in written else b)
                   for name, b in self._buffers.items()}
        merged = dict(buffers)
        merged.update(values)
        y = restoring_functional_call(self.module, merged, x, self.layout)
        if written is None:
            self._written = _written_copies(buffers)
        return y

    def detached_params(self) -> Dict[str, torch.Tensor]:
        """The parameters without autograd history; one whose elements share memory
        (an expanded tensor) as a dense copy, which forward-mode AD needs for its tangent."""
        return {name: _dense(p.detach()) for name, p in self.params.items()}

    def with_leaves(self, names: List[str]) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor]]:
        """The detached parameters for `call`, those of ``names`` replaced by copies
        that require grad: leaves of a backward of its own, whether or not the
        caller's tensors require grad. Returns the mapping and the leaves in the
        order of ``names``."""
        values = self.detached_params()
        leaves = [values[name].clone().requires_grad_(True) for name in names]
        values.update(zip(names, leaves))
        return values, leaves

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())


def _written_copies(copies: Mapping[str, torch.Tensor]) -> Optional[frozenset]:
    """The names of the buffer copies an evaluation wrote into, or None where that cannot
    be read (copies made in inference mode keep no version counter)."""
    try:
        return frozenset(name for name, copy in copies.items() if copy._version)
    except RuntimeError:
        return None


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy of it where its elements may share memory (``expand``)."""
    return t if torch._debug_has_internal_overlap(t) == 0 else t.contiguous()


@contextlib.contextmanager
def _explained_self_changes() -> Iterator[None]:
    """torch.func's refusal of a forward that changes the model itself, as a ValueError
    that says what does it and what to do."""
    try:
        yield
    except RuntimeError as error:
        if re.search(r"mutate a captured Tensor|mutating directly with `\.data`", str(error)) is None:
            raise
        raise ValueError(
            f"the model's forward changes tensors of the model in place ({first_line(error)}): an in-place "
            "write into a tensor it holds outside its parameters and buffers (or into a buffer on some "
            "inputs only, not on the first ones it was run on), or model.to(...), .float(), .double() "
            "called inside forward, which torch.func's transforms cannot differentiate through. Register "
            "such a tensor as a buffer (module.register_buffer) written on every call (every evaluation then "
            "gets a copy of it), or move the conversion out of forward (convert the model once, before "
            "lazykernel)"
        ) from error


def restoring_functional_call(module: nn.Module, values: Mapping[str, torch.Tensor], x: torch.Tensor,
                              layout: Optional[InputLayout] = None) -> torch.Tensor:
    """``torch.func.functional_call``, leaving ``module`` with its own tensors afterwards.

    ``x`` is the one input, or the packed inputs of ``layout``.

    With a submodule reachable under two names (one layer listed twice in an
    ``nn.Sequential``), PyTorch puts back the swapped-in values instead of the
    module's parameters for one of the names, and the model would keep plain
    tensors in place of its ``nn.Parameter``s. Such models have their tensors
    restored here.
    """
    if layout is None:
        args, kwargs = (x,), None
    else:
        parts = layout.unpack(x)
        args, kwargs = ((), parts) if layout.keyword else (parts, None)
    if not _reachable_twice(module):
        return functional_call(module, dict(values), args, kwargs)
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    try:
        return functional_call(module, dict(values), args, kwargs)
    finally:
        for m, parameters, buffers in saved:
            m._parameters.update(parameters)
            m._buffers.update(buffers)


def _reachable_twice(module: nn.Module) -> bool:
    seen = set()
    for _, m in module.named_modules(remove_duplicate=False):
        if id(m) in seen:
            return True
        seen.add(id(m))
    return False


def _select_module_parameters(module: nn.Module, params: ParamSelection) -> Dict[str, torch.Tensor]:
    named = dict(module.named_parameters())
    if params is None:
        chosen = list(named)
    elif isinstance(params, (Mapping, nn.Module)):
        raise ValueError(
            "params must be None, a list of parameter names or a predicate "
            "(name, param) -> bool for an nn.Module; a dict of values (or a "
            f"{type(params).__name__}) is only accepted with a functional model fn(params, x)"
        )
    elif callable(params):
        _check_predicate(params)
        chosen = [name for name, p in named.items() if params(name, p)]
    else:
        chosen = _selected_names(params)
        unknown = [name for name in chosen if name not in named]
        if unknown:
            raise ValueError(
                f"params names {unknown} are not parameters of the model; "
                f"its parameters are {list(named)}"
            )
    # in the model's order, whatever the order of the names given
    chosen_set = set(chosen)
    return {name: p for name, p in named.items() if name in chosen_set and p.requires_grad}


def _check_predicate(predicate: Callable) -> None:
    """Refuse a ``params`` predicate that cannot be called as ``predicate(name, param)``."""
    try:
        inspect.signature(predicate).bind("name", None)
    except TypeError:
        given = getattr(predicate, "__qualname__", type(predicate).__name__)
        raise ValueError(
            "a params predicate is called as predicate(name, param) -> bool, with the name from "
            f"model.named_parameters() and the parameter; {given} does not take those two "
            "arguments (e.g. lambda name, p: name.startswith('fc'))"
        ) from None
    except ValueError:
        # a builtin without a signature: calling it will tell
        pass


def _selected_names(params) -> List[str]:
    """The names of a ``params`` given as one name or an iterable of names."""
    if isinstance(params, str):
        return [params]
    try:
        chosen = list(params)
    except TypeError:
        raise ValueError(
            "params must be None, a parameter name, a list of names from model.named_parameters() "
            f"or a predicate (name, param) -> bool; got {type(params).__name__}"
        ) from None
    wrong = [type(name).__name__ for name in chosen if not isinstance(name, str)]
    if wrong:
        raise ValueError(
            f"params must list parameters by name (strings from model.named_parameters()), "
            f"got entries of type {sorted(set(wrong))}; to select tensors, pass their names or "
            "a predicate such as lambda name, p: p is model.fc.weight"
        )
    return chosen


def _refuse_complex(params: Mapping[str, torch.Tensor], where: str) -> None:
    complex_names = [name for name, value in params.items() if value.is_complex()]
    if complex_names:
        raise ValueError(
            f"{where} {complex_names} are complex; the NTK is defined here for real parameters "
            "only. Hold each as a real tensor (its real and imaginary parts, as torch.view_as_real "
            "gives them) and form the complex value inside the model with torch.view_as_complex"
        )


def make_adapter(model, params: ParamSelection) -> ModelAdapter:
    """Build the functional view of ``model`` and check that it has something to differentiate."""
    if isinstance(model, nn.DataParallel):
        raise ValueError(
            "model is an nn.DataParallel wrapper, whose parameters torch.func cannot swap; pass "
            "the model it wraps, model.module (the same function, with parameter names without "
            "the 'module.' prefix)"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"model is a TorchScript module ({type(model).__name__}, from torch.jit.script or "
            "torch.jit.trace), whose parameters torch.func cannot swap and whose layers take no hooks; "
            "pass the nn.Module it was made from, which computes the same function (torch.compile'd "
            "modules are accepted)"
        )
    if isinstance(model, nn.Module):
        selected = _select_module_parameters(model, params)
        _refuse_complex(selected, "the selected parameters")
        adapter = ModelAdapter(model, None, selected, {})
        where = "the model"
    elif callable(model):
        if not isinstance(params, Mapping):
            raise ValueError(
                "a functional model fn(params, x) needs params: a dict mapping names to "
                f"tensors, got {type(params).__name__}"
            )
        for name, value in params.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"params[{name!r}] must be a tensor, got {type(value).__name__}")
        # a complex entry would otherwise pass for a constant and drop out of the kernel
        _refuse_complex(params, "the entries of params")
        selected, constants = {}, {}
        for name, value in params.items():
            (selected if value.is_floating_point() else constants)[name] = value
        adapter = ModelAdapter(None, model, selected, constants)
        where = "params"
    else:
        raise ValueError(
            "model must be an nn.Module or a callable fn(params, x), "
            f"got {type(model).__name__}"
        )
    if not adapter.params or adapter.num_params == 0:
        raise ValueError(
            f"no trainable parameters: {where} has no floating-point parameter with "
            "requires_grad=True that `params` selects, so the NTK is empty. Unfreeze "
            "parameters or change `params`."
        )
    return adapter


def parameters_device_and_dtype(adapter: ModelAdapter) -> Tuple[torch.device, torch.dtype]:
    """The one device and dtype of the selected parameters; ValueError if they have several."""
    devices = {p.device for p in adapter.params.values()}
    dtypes = {p.dtype for p in adapter.params.values()}
    if len(devices) > 1:
        raise ValueError(f"the selected parameters are spread over several devices {sorted(map(str, devices))}; "
                         "move the model to one device")
    if len(dtypes) > 1:
        raise ValueError(f"the selected parameters mix dtypes {sorted(map(str, dtypes))}; "
                         "convert the model to one dtype (e.g. model.float())")
    return devices.pop(), dtypes.pop()


def check_eval_mode(module: nn.Module) -> None:
    """Refuse modules whose per-example outputs depend on the batch or on chance."""
    for name, sub in module.named_modules():
        label = name or type(module).__name__
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            if sub.training:
                raise ValueError(
                    f"module {label!r} ({type(sub).__name__}) is in training mode and normalises with "
                    "batch statistics, which couples examples and makes the per-example NTK "
                    "undefined. Call model.eval() first."
                )
            if not sub.track_running_stats or sub.running_mean is None or sub.running_var is None:
                raise ValueError(
                    f"module {label!r} ({type(sub).__name__}) has no running statistics (running_mean "
                    "or running_var is None), so even in eval mode it normalises with batch statistics, "
                    "which couples examples and makes the per-example NTK undefined. Give it running "
                    "statistics (for example by training it with track_running_stats=True)."
                )
        if isinstance(sub, nn.Embedding) and sub.scale_grad_by_freq:
            raise ValueError(
                f"module {label!r} (Embedding, scale_grad_by_freq=True) divides its gradients by "
                "how often each token occurs in the batch, so what autograd reports is not the "
                "derivative of the model and the NTK would depend on how examples are batched. "
                "Set scale_grad_by_freq=False (it only changes training, not the model)."
            )
        if isinstance(sub, nn.MultiheadAttention) and sub.training and sub.dropout > 0:
            raise ValueError(
                f"module {label!r} (MultiheadAttention, dropout={sub.dropout}) drops attention "
                "weights at random in training mode, which makes its NTK undefined. Call model.eval() first."
            )
        if isinstance(sub, nn.RNNBase) and sub.training and sub.dropout > 0 and sub.num_layers > 1:
            raise ValueError(
                f"module {label!r} ({type(sub).__name__}, dropout={sub.dropout}) drops activations "
                "between its layers at random in training mode, which makes its NTK undefined. "
                "Call model.eval() first."
            )
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            raise ValueError(
                f"module {label!r} ({type(sub).__name__}, p={sub.p}) is active in training "
                "mode, which makes the model random and its NTK undefined. Call model.eval() first."
            )


def first_line(error: Exception) -> str:
    """The first line of an error's message (PyTorch's go on with a request to file an issue)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def explained_autograd_errors() -> Iterator[None]:
    """Autograd's refusal to differentiate a tensor in ``params`` (a functional
    model's BatchNorm statistics) as a ValueError that says which tensors belong there."""
    try:
        yield
    except RuntimeError as error:
        if re.search(r"is not differentiable (with respect to|wrt)", str(error)) is None:
            raise
        raise ValueError(
            f"the parameters hold a tensor the model cannot be differentiated in "
            f"({first_line(error)}). "
            "Every floating-point tensor in params counts as a trainable parameter: keep buffers such "
            "as BatchNorm's running statistics out of params (inside fn, or as a constant it closes over)"
        ) from error


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError naming ``name`` if ``tensor`` holds a NaN or an Inf."""
    if tensor.is_meta:
        # nothing to read, here or in any later step
        raise ValueError(
            f"{name} is on the meta device, which holds shapes but no values, so nothing can be computed "
            "from it; create it on a real device (a model built on meta: model.to_empty(device=...), "
            "then load its weights)"
        )
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return
    # One reduction decides the common case; only a non-finite sum (which can
    # also come from overflow) needs the exact element-wise test.
    if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
        return
    raise ValueError(f"{name} contains NaN or Inf values; the NTK would be meaningless")


def model_tensors(adapter: ModelAdapter) -> Dict[str, torch.Tensor]:
    """Every tensor the model computes with: parameters and buffers, by name."""
    if adapter.module is None:
        merged = dict(adapter._constants)
        merged.update(adapter.params)
        return merged
    tensors = dict(adapter.module.named_parameters())
    tensors.update(dict(adapter.module.named_buffers()))
    return tensors


# -- one call per module at a time ---------------------------------------------------

# id(module) -> (a weak reference to it, its lock); an entry leaves with its module
_LOCKS: Dict[int, Tuple[weakref.ref, threading.RLock]] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_of(module: nn.Module) -> threading.RLock:
    key = id(module)
    with _LOCKS_GUARD:
        entry = _LOCKS.get(key)
        if entry is not None and entry[0]() is module:
            return entry[1]
        lock = threading.RLock()
        _LOCKS[key] = (weakref.ref(module, lambda _, key=key: _LOCKS.pop(key, None)), lock)
        return lock


def one_call_per_model(fn: Callable) -> Callable:
    """Calls of ``fn(model, ...)`` on one ``nn.Module`` take turns across threads.

    Computing a kernel or a product swaps the module's parameters for other
    tensors and back (``torch.func.functional_call``, the expanded parameters
    of the broadcast rule) and attaches hooks: two threads doing that at once
    on the same module restore each other's swaps wrongly and can leave it
    without its parameters. The lock is re-entrant, so a call may make others
    on the same module (``linearize`` calls ``jvp``). Functional models
    ``fn(params, x)`` are not locked: nothing of theirs is modified.
    """

    @functools.wraps(fn)
    def locked(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            return fn(model, *args, **kwargs)
        with _lock_of(model), _dense_embedding_gradients(model):
            return fn(model, *args, **kwargs)

    return locked


@contextlib.contextmanager
def _dense_embedding_gradients(model: nn.Module) -> Iterator[None]:
    """Embeddings built with ``sparse=True`` give dense gradients for the call.

    ``sparse`` only chooses the layout of the weight's gradient, which
    torch.func's transforms cannot take; the function, and so the kernel, is
    the same. The flags are restored afterwards.
    """
    switched = [m for m in model.modules()
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "sparse", False)]
    for m in switched:
        m.sparse = False
    try:
        yield
    finally:
        for m in switched:
            m.sparse = True
