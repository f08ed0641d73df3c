"""Jacobian-vector, vector-Jacobian and NTK-vector products of a model.

``J(x) = ∂f(x; θ)/∂θ`` is the Jacobian of the outputs of a batch with respect to
the selected parameters. ``jvp`` pushes a parameter-space direction forward
(``J·θ̇``, the change of every output), ``vjp`` pulls output cotangents back
(``Jᵀ·c``, a gradient) and ``ntk_vp`` multiplies by the NTK ``Θ = J Jᵀ``
without forming it (DESIGN.md, "NTK-vector product").

Memory: the products work on chunks of examples sized so that the activations
of a chunk (and their tangents) stay under ``memory_budget``; the only
full-size temporaries are parameter-space vectors (P numbers each).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import numbers
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor
from torch.autograd import forward_ad
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from lazykernel import _memory
from lazykernel._chain import plain_leaves
from lazykernel._inputs import InputLayout, matching_layouts, pack_inputs
from lazykernel._jacobian import forward_mode_works
from lazykernel._model import (ModelAdapter, ParamSelection, check_eval_mode, first_line,
                               make_adapter, one_call_per_model, parameters_device_and_dtype,
                               restoring_functional_call)
from lazykernel._precision import check_precision, matmul_precision
from lazykernel.ntk import _budget_advice, _budget_bytes, _check_examples, _check_input, _probe
from lazykernel.ops import linear_jvp_stacked
from lazykernel.rules import explicit_attention

Tangent = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]
JVP_METHODS = ("auto", "structured", "generic")
NTK_VP_OUTPUTS = ("trace", "full")
# Live copies of one example's activations while a chunk is differentiated: the
# value, its tangent or cotangent, and temporaries of the layer being processed.
_ACTIVATION_COPIES = 4


# -- argument handling -------------------------------------------------------------

def _prepare(model, x, params: ParamSelection, precision: str
             ) -> Tuple[ModelAdapter, torch.dtype, torch.Tensor]:
    """The adapter, the parameters' dtype, and ``x`` checked (several inputs packed into one tensor)."""
    check_precision(precision)
    adapter = make_adapter(model, params)
    if adapter.module is not None:
        check_eval_mode(adapter.module)
    _refuse_transformed_params(adapter)
    x, adapter.layout = _packed_batch(adapter, x, "x")
    return adapter, parameters_device_and_dtype(adapter)[1], x


def _packed_batch(adapter: ModelAdapter, x, name: str) -> Tuple[torch.Tensor, Optional[InputLayout]]:
    """``x`` checked; a tuple, list or dict of inputs (`lazykernel._inputs`) with each part
    checked, then packed into one tensor, with its layout (None for one tensor)."""
    def check_part(part: torch.Tensor, label: str) -> None:
        if part.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{label} requires grad, but inputs given as several parts count as constants (they are "
                f"packed into one tensor): the products carry derivatives to an input given as one tensor "
                f"only. Pass {label}.detach(), or a model of one input to differentiate with respect to it")
        _check_batch(adapter, part, label)

    packed, layout = pack_inputs(x, name, check_part, collapse=adapter.module is not None)
    if layout is None:
        _check_batch(adapter, packed, name)
    return packed, layout


def _refuse_transformed_params(adapter: ModelAdapter) -> None:
    """The products take the Jacobian at the parameters' current values and hold
    them constant: a parameter that a ``torch.func`` transform differentiates or
    maps over (a functional model's ``params``) would get a zero derivative
    without a word, or fail deep inside."""
    wrapped = [name for name, p in adapter.params.items() if is_functorch_wrapped_tensor(p)]
    if wrapped:
        raise ValueError(
            f"params {wrapped} are tensors of an enclosing torch.func transform (grad, jvp or vmap over the "
            "parameters), but the products hold the parameters constant (the Jacobian at their current "
            "values): they give no derivative with respect to them and cannot map over them. Differentiate "
            "or map torch.func.jvp / torch.func.vjp of the model itself instead")


def _is_vmapped(t: torch.Tensor) -> bool:
    """Is ``t`` batched by an enclosing ``torch.func.vmap``, at any level of nesting?"""
    while is_functorch_wrapped_tensor(t):
        if is_batchedtensor(t):
            return True
        t = get_unwrapped(t)
    return False


def _check_batch(adapter: ModelAdapter, x, name: str) -> torch.dtype:
    """The checks of ``ntk``'s inputs that cost no pass over the parameters.

    A product is one pass over the parameters itself, so scanning them for NaN
    first (as ``ntk`` does before a long computation) would add a large fraction
    to its cost; a non-finite parameter shows in the result instead.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N, *in], got {type(x).__name__}")
    if _is_vmapped(x):
        raise ValueError(f"{name} is batched by torch.func.vmap, which the products cannot map over: they take "
                         f"a batch of examples already. Call them once on all the examples, stacked into one "
                         f"{name} [N, *in]")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension first, [N, *in]; got a scalar")
    device, dtype = parameters_device_and_dtype(adapter)
    _check_input(name, x, device, dtype)
    return dtype


def _check_vector(v: torch.Tensor, name: str, device: torch.device, dtype: torch.dtype) -> None:
    """An output-space vector (``vjp``'s cotangent, ``ntk_vp``'s v): real floating point, on the
    inputs' device."""
    if v.is_complex():
        # its imaginary part would be dropped without a word by the conversion
        raise ValueError(f"{name} must be real (it is converted to the model's dtype), got {v.dtype}")
    if not v.is_floating_point():
        # integers and booleans are more likely a wrong argument (labels, a mask) than a vector
        raise ValueError(f"{name} must be a floating-point tensor, got {v.dtype}; convert it to the "
                         f"model's dtype: {name}.to({dtype})")
    if v.device != device:
        raise ValueError(f"{name} is on device {v.device} but the inputs and the model's parameters are on "
                         f"{device}; move it there (e.g. {name}.to({str(device)!r}))")


def _tangent_dict(adapter: ModelAdapter, tangent: Tangent, what: str = "tangent"
                  ) -> Dict[str, torch.Tensor]:
    """``tangent`` as a dict over exactly the selected parameters, checked against them."""
    names = list(adapter.params)
    if isinstance(tangent, Mapping):
        extra = [name for name in tangent if name not in adapter.params]
        missing = [name for name in names if name not in tangent]
        if extra or missing:
            raise ValueError(f"{what} must have one entry per selected parameter {names}; "
                             + "; ".join(_extra_names(adapter, extra)
                                         + ([f"missing names {missing} (pass zeros for a fixed parameter)"]
                                            if missing else [])))
        values = {name: tangent[name] for name in names}
    elif isinstance(tangent, (list, tuple)):
        if len(tangent) != len(names):
            raise ValueError(f"{what} is a sequence of {len(tangent)} tensors but {len(names)} "
                             f"parameters are selected: {names}")
        values = dict(zip(names, tangent))
    else:
        raise ValueError(f"{what} must be a dict name -> tensor or a list of tensors in the order "
                         f"of the selected parameters {names}, got {type(tangent).__name__}")
    for name, value in values.items():
        param = adapter.params[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}[{name!r}] must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{what}[{name!r}] has shape {tuple(value.shape)} but the parameter "
                             f"has shape {tuple(param.shape)}")
        if value.device != param.device:
            raise ValueError(f"{what}[{name!r}] is on {value.device} but the parameter is on "
                             f"{param.device}; move it there: .to({str(param.device)!r})")
        if not value.is_floating_point():
            raise ValueError(f"{what}[{name!r}] must be floating point, got {value.dtype}; convert it "
                             f"to the parameter's dtype: .to({param.dtype})")
    return {name: value.to(adapter.params[name].dtype) for name, value in values.items()}


def _extra_names(adapter: ModelAdapter, extra: Sequence[str]) -> List[str]:
    """What is wrong with each tangent entry that no selected parameter has: a
    parameter left out of the selection, a functional model's constant, or a name
    the model does not have."""
    if not extra:
        return []
    if adapter.module is not None:
        known = {name for name, _ in adapter.module.named_parameters()}
        unselected = ("not selected {} (parameters with requires_grad=False or left out by params "
                      "have no tangent: drop them)")
    else:
        known = set(adapter._constants)
        unselected = "{} are not floating point: params entries that are constants have no tangent (drop them)"
    parts = []
    unknown = [name for name in extra if name not in known]
    if unknown:
        parts.append(f"unknown names {unknown}")
    if len(unknown) < len(extra):
        parts.append(unselected.format([name for name in extra if name in known]))
    return parts


def _attention_with_forward_mode():
    """``F.scaled_dot_product_attention`` by its composite (math) form, which has
    forward-mode AD; the fused CPU and GPU kernels have none, so a JVP through a
    model that calls it directly (a functional transformer) would fail."""
    return sdpa_kernel([SDPBackend.MATH])


_EMBEDDING_SIGNATURE = inspect.signature(F.embedding)


class _PaddingLookupsHeld(TorchFunctionMode):
    """Lookups of an embedding's ``padding_idx`` row carry no tangent.

    PyTorch's backward of ``F.embedding`` gives that row no gradient from the
    lookup although the forward reads it, so the Jacobian of ``ntk`` and ``vjp``
    (and the padding row's own training) leaves it out; forward-mode AD
    differentiates the lookup like any other. Holding the looked-up padding
    vectors constant makes ``J θ̇`` the same J. Only the lookup is held: a
    table tied to another layer keeps that layer's derivative.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not F.embedding or not isinstance(out, torch.Tensor):
            return out
        bound = _EMBEDDING_SIGNATURE.bind(*args, **kwargs).arguments
        padding_idx = bound.get("padding_idx")
        if padding_idx is None:
            return out
        if padding_idx < 0:
            padding_idx += bound["weight"].shape[0]
        padded = (bound["input"] == padding_idx).unsqueeze(-1)
        return torch.where(padded, out.detach(), out)


def _padding_lookups_held(adapter: ModelAdapter):
    """`_PaddingLookupsHeld` where the model may look up a padding row: a module with
    an ``nn.Embedding`` that has one, or a functional model (it cannot be inspected)."""
    if adapter.module is not None and not any(
            isinstance(m, nn.Embedding) and m.padding_idx is not None for m in adapter.module.modules()):
        return contextlib.nullcontext()
    return _PaddingLookupsHeld()


def _chunk_size(adapter: ModelAdapter, x: torch.Tensor, batch_size: Optional[int],
                memory_budget: Optional[float], vectors: int, checked_beside: Optional[int] = None) -> int:
    """Examples per chunk: activations of a chunk plus ``vectors`` parameter-space vectors fit.

    ``checked_beside``: where the chunks' JVPs may take the generic path, the number of
    parameter-space vectors held while its first chunk checks forward mode
    (`_forward_mode_agrees`); that check then fits beside them too.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = x.shape[0]
    if n == 0:
        return 1
    param = next(iter(adapter.params.values()))
    elt = param.element_size()
    budget = _budget_bytes(memory_budget, param.device)
    _, activations = _probe(adapter, x, "x", needs_outputs=False)
    checked = checked_beside is not None and adapter.forward_mode_agrees is None
    # a pullback (vjp's and ntk_vp's chunks, the check of forward mode) sums the
    # gradients of a parameter used several times
    summing = _summed_gradient_elements(adapter, x) * elt if vectors >= 2 or checked else 0.0
    fixed = vectors * adapter.num_params * elt + summing
    summed = " and the sums of a shared parameter's gradients" if summing else ""
    held = f"{vectors} parameter-space vector(s){summed} take {_memory.format_bytes(fixed)}"
    if checked:
        # the check runs on no more examples than the first chunk holds, whose share per
        # example covers theirs: only its parameter-sized part may outgrow the vectors
        check = checked_beside * adapter.num_params * elt + _forward_check_bytes(adapter, summing)
        if check > fixed:
            fixed = check
            held = f"the check of forward mode takes {_memory.format_bytes(fixed)}"
    per_example = _ACTIVATION_COPIES * activations * elt
    if budget < fixed + per_example:
        default = "the default " if memory_budget is None else ""
        raise ValueError(
            f"{default}memory_budget of {_memory.format_bytes(budget)} is too small: {held} and one "
            f"example about {_memory.format_bytes(per_example)}. "
            + _budget_advice(fixed + per_example, budget, memory_budget is None, param.device))
    size = n if math.isinf(budget) else max(1, int((budget - fixed) // per_example))
    if batch_size is not None:
        size = min(size, int(batch_size))
    return min(size, n)


def _summed_gradient_elements(adapter: ModelAdapter, x: torch.Tensor) -> float:
    """Elements a pullback holds beside its parameter-sized gradients while it sums the
    gradients of a parameter used more than once (a tied weight, a module called
    twice): autograd forms one per use and adds them, the sum a third tensor of the
    parameter's size beside the two it adds (which measured twice that parameter
    beyond the vectors). The uses are counted in a forward of one example
    (`_ParameterUses`)."""
    values = adapter.detached_params()
    uses = _ParameterUses(values)
    try:
        with torch.no_grad(), uses:
            adapter.call(values, x[:1])
    except Exception:
        # the chunks will say what is wrong with the model
        return 0.0
    return 2.0 * sum(values[name].numel() for name, count in uses.counts.items() if count > 1)


class _ParameterUses(TorchFunctionMode):
    """Counts, per parameter, the calls that read it (or a view of it) and return a new
    tensor: each is a gradient a pullback adds to the parameter's. Calls that return
    a view of a parameter (a transpose, a slice) pass it on instead, and calls that
    return no tensor (its shape, its dtype) are not uses."""

    def __init__(self, values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.counts = {name: 0 for name in values}
        self._owner = {id(t): name for name, t in values.items()}
        self._storage = {name: _storage_of(t) for name, t in values.items()}
        # the views found, kept so that no other tensor takes one's id during the forward
        self._views: List[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        read = {self._owner[id(a)] for a in _flat_tensors((args, kwargs)) if id(a) in self._owner}
        results = _flat_tensors(out)
        if not read or not results:
            return out
        for name in read:
            storage = self._storage[name]
            views = [t for t in results if storage is not None and _storage_of(t) == storage]
            if views:
                for t in views:
                    self._owner[id(t)] = name
                self._views.extend(views)
            else:
                self.counts[name] += 1
        return out


def _flat_tensors(value) -> List[torch.Tensor]:
    """The tensors in ``value``, a tensor or nested tuples, lists and dicts of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for part in value for t in _flat_tensors(part)]
    return []


def _storage_of(t: torch.Tensor) -> Optional[int]:
    """The address of ``t``'s storage; None for a tensor without one (of a torch.func transform)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _forward_check_bytes(adapter: ModelAdapter, summing: float = 0.0) -> float:
    """Bytes `_jacobian.forward_mode_works` holds beside the examples' passes: the random
    direction and the pulled-back gradient (a parameter-sized vector each), and the larger
    of ``summing`` bytes while the pullback sums a shared parameter's gradients
    (`_summed_gradient_elements`) and up to three float64 copies of the largest
    parameter while the two are compared, which comes after."""
    largest = max(p.numel() for p in adapter.params.values())
    vectors = 2.0 * adapter.num_params * next(iter(adapter.params.values())).element_size()
    return vectors + max(3.0 * 8 * largest, summing)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# -- jvp ---------------------------------------------------------------------------

@one_call_per_model
def jvp(
    model,
    x: torch.Tensor,
    tangent: Tangent,
    *,
    params: ParamSelection = None,
    method: str = "auto",
    batch_size: Optional[int] = None,
    memory_budget: Optional[float] = None,
    precision: str = "highest",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Outputs and Jacobian-vector product ``(f(x), J(x)·θ̇)``.

    Args:
        model: an ``nn.Module`` applied as ``model(x)`` or a torch.func-style
            ``fn(params, x)`` (then ``params`` is the dict of its tensors), as in
            :func:`lazykernel.ntk`.
        x: ``[N, *in]`` inputs, or a model's several inputs as a tuple, list or
            dict of such tensors (as in :func:`lazykernel.ntk`; inputs given in
            parts count as constants).
        tangent: ``θ̇``: a dict mapping each selected parameter name to a tensor of
            that parameter's shape, or a list of such tensors in the order of
            ``model.named_parameters()`` (restricted to the selection).
        params: which parameters θ are (as in :func:`lazykernel.ntk`).
        method: ``"structured"``: walk an ``nn.Sequential`` layer by layer, with
            ``nn.Linear`` layers computed by the fused ``linear_jvp`` kernel (value
            and tangent in one pass over each weight) and every other layer by
            ``torch.func.jvp``; ``"generic"``: one ``torch.func.jvp`` of the whole
            model; ``"auto"``: structured for a plain ``nn.Sequential`` (no
            hooks, no parametrized layers, no layer with parameters listed
            twice) whose layers with parameters are all ``nn.Linear`` itself,
            not a subclass, when no gradient has to flow through the result;
            generic otherwise.
        batch_size: at most this many examples per chunk.
        memory_budget: bytes of working memory; default a quarter of the memory
            available on the CPU, half of the free memory on a CUDA device;
            ``float('inf')``, or a number too large for a float, means no limit.
        precision: ``"highest"`` or ``"tf32"``, as in :func:`lazykernel.ntk`:
            on CUDA in float32, whether PyTorch's matrix products and cuDNN
            convolutions may use TF32 during the call (the fused ``linear_jvp``
            kernel is float32 either way). ``"highest"`` turns off the TF32
            convolutions cuDNN allows by default.

    Returns:
        ``(f(x), J(x)·θ̇)``, both shaped like the model's output ``[N, *out]``.
        Differentiable with respect to ``tangent`` and ``x`` on the generic path,
        which ``"auto"`` takes whenever either of them requires grad or is a
        tensor of an enclosing ``torch.func`` transform (``torch.func.jvp`` of
        this function). A ``torch.autograd.forward_ad`` dual tensor is refused:
        PyTorch cannot nest forward mode inside that API. The parameters count
        as constants (the Jacobian at their current values), as in :func:`vjp`
        and :func:`ntk_vp`: the results carry no derivative to them, and a
        functional model's parameter that is a tensor of an enclosing
        ``torch.func`` transform is refused. ``torch.func.vmap`` over ``x`` or
        the tangent is refused: call it on all the examples at once, once per
        tangent.

    Embedding lookups of a ``padding_idx`` row count as constant, as in
    PyTorch's backward and so in ``vjp`` and :func:`lazykernel.ntk`: ``J`` is
    the same Jacobian in all of them.
    """
    if method not in JVP_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {JVP_METHODS}")
    adapter, dtype, x = _prepare(model, x, params, precision)
    with explicit_attention(adapter.module), matmul_precision(precision, x.device, dtype), \
            _attention_with_forward_mode(), _padding_lookups_held(adapter):
        return _jvp(adapter, x, tangent, method, batch_size, memory_budget)


def _jvp(adapter: ModelAdapter, x: torch.Tensor, tangent: Tangent, method: str, batch_size: Optional[int],
         memory_budget: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    values = _tangent_dict(adapter, tangent)
    _refuse_forward_ad_duals(x, values)
    _refuse_vmapped_tangents(values)
    structured_ok = _is_structured(adapter)
    if method == "structured" and not structured_ok:
        raise ValueError("method='structured' needs a plain nn.Sequential model (no hooks, no parametrized "
                         "layers, no layer with parameters listed twice) with at least one nn.Linear "
                         "layer; use method='generic' (or 'auto') for this model")
    needs_grad = _result_needs_grad(x, values)
    if method == "structured" and needs_grad:
        raise ValueError("method='structured' does not propagate gradients to the tangent or to x; use "
                         "method='generic' to differentiate the result")
    use_structured = method == "structured" or (method == "auto" and not needs_grad
                                                  and _prefers_structured(adapter))
    size = _chunk_size(adapter, x, batch_size, memory_budget, vectors=1,
                       checked_beside=None if use_structured else 0)
    outs, tans = [], []
    for part in _chunks(x.shape[0], size):
        if use_structured:
            try:
                with torch.no_grad():
                    y, y_dot = _structured_jvp(adapter.module, adapter.params, values, x[part])
            except _WalkRefused as error:
                if method == "structured":
                    raise ValueError(f"method='structured' walks the layers with one tensor between them "
                                     f"and forward-mode AD, but {error}; use method='generic' (or 'auto') "
                                     "for this model") from None
                use_structured = False
        if not use_structured:
            y, y_dot = _generic_jvp(adapter, values, x[part])
        outs.append(y)
        tans.append(y_dot)
    if not outs:
        y, y_dot = _generic_jvp(adapter, values, x)
        return y, y_dot
    return torch.cat(outs), torch.cat(tans)


def _generic_jvp(adapter: ModelAdapter, values: Dict[str, torch.Tensor], x: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    primals = adapter.detached_params()
    try:
        if not _forward_mode_agrees(adapter, primals, x):
            # forward mode differentiates what the forward computes under torch.no_grad,
            # which reverse mode, and so vjp and ntk, hold constant
            return _jvp_by_double_backward(adapter, values, x)
        return torch.func.jvp(lambda p: adapter.call(p, x), (primals,), (values,))
    except NotImplementedError as forward_error:
        try:
            return _jvp_by_double_backward(adapter, values, x)
        except NotImplementedError as reverse_error:
            raise ValueError(
                "this model's Jacobian-vector products need forward-mode AD, or reverse mode "
                f"differentiated twice, and PyTorch has neither for one of its ops ({first_line(forward_error)}; "
                f"{first_line(reverse_error)}). lazykernel.ntk and vjp need reverse mode only; for the products, "
                "replace that op (e.g. torch.cdist by an explicit distance, nn.EmbeddingBag by nn.Embedding "
                "and a sum or mean)"
            ) from None


def _forward_mode_agrees(adapter: ModelAdapter, primals: Dict[str, torch.Tensor], x: torch.Tensor) -> bool:
    """Does forward mode give this model's JVPs as reverse mode's transpose? Checked once
    per call on ntk's probe examples (`_jacobian.forward_mode_works`, which also says no
    for an op without forward mode, and keeps the answer on the adapter)."""
    if adapter.forward_mode_agrees is None:
        if not x.shape[0]:
            return True  # no example for the modes to differ on
        # ntk's probe examples: one alone may not reach the part computed under no_grad
        # (a zero input, a gate it does not pass); a property of the model, not of x's graph
        forward_mode_works(adapter, primals, _check_examples(x.detach(), None))
    return adapter.forward_mode_agrees


def _result_needs_grad(x: torch.Tensor, tangent: Mapping[str, torch.Tensor]) -> bool:
    """Must a derivative flow through the JVP's result, to ``x`` or to the tangent?

    In reverse mode, where one of them requires grad; and where one of them is a
    tensor of an enclosing ``torch.func`` transform, forward mode included (a
    ``LinearizedModel`` under ``lazykernel.ntk``'s forward-mode method).
    """
    tensors = [x, *tangent.values()]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return any(is_functorch_wrapped_tensor(t) for t in tensors)


def _refuse_forward_ad_duals(x: torch.Tensor, tangent: Mapping[str, torch.Tensor]) -> None:
    """A ``torch.autograd.forward_ad`` dual tensor cannot go through the JVP: it is
    forward-mode AD itself, which PyTorch does not nest inside that API's."""
    duals = [name for name, t in [("x", x), *((f"tangent[{n!r}]", v) for n, v in tangent.items())]
             if not is_functorch_wrapped_tensor(t) and forward_ad.unpack_dual(t).tangent is not None]
    if duals:
        raise ValueError(f"torch.autograd.forward_ad dual tensors given as {', '.join(duals)}: the JVP is "
                         "forward-mode AD itself, which PyTorch cannot nest inside forward_ad's dual level; "
                         "differentiate through lazykernel.jvp with torch.func.jvp (or reverse mode) instead")


def _refuse_vmapped_tangents(tangent: Mapping[str, torch.Tensor]) -> None:
    """Choosing between forward and reverse mode draws random directions
    (`_jacobian.forward_mode_works`), which vmap refuses by default, and the
    paths branch on values: neither can be mapped over a batch of tangents."""
    mapped = [name for name, t in tangent.items() if _is_vmapped(t)]
    if mapped:
        raise ValueError(f"tangent[{mapped[0]!r}] is batched by torch.func.vmap, which jvp cannot map over; "
                         "call lazykernel.jvp once per tangent (a loop over them)")


def _jvp_by_double_backward(adapter: ModelAdapter, tangent: Dict[str, torch.Tensor], x: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(f(x), J θ̇)`` from reverse mode alone: ``J θ̇ = ∂/∂u ⟨Jᵀu, θ̇⟩``, which is
    linear in ``u``, so the second backward can start from ``u = 0``. For ops with a
    backward that is itself differentiable but no forward-mode rule (grid_sample)."""
    names = list(tangent)
    merged, leaves = adapter.with_leaves(names)
    keep_graph = _result_needs_grad(x, tangent)
    with torch.enable_grad():
        y = adapter.call(merged, x)
        u = torch.zeros_like(y, requires_grad=True)
        grads = torch.autograd.grad(y, leaves, grad_outputs=u, create_graph=True, allow_unused=True)
        inner = sum(((g * tangent[name]).sum() for g, name in zip(grads, names) if g is not None),
                    torch.zeros((), dtype=y.dtype, device=y.device))
        if inner.requires_grad:
            (y_dot,) = torch.autograd.grad(inner, u, create_graph=keep_graph, allow_unused=True)
        else:
            y_dot = None
    y_dot = torch.zeros_like(y) if y_dot is None else y_dot
    if not keep_graph:
        return y.detach(), y_dot.detach()
    return y, y_dot


def _is_structured(adapter: ModelAdapter) -> bool:
    if adapter.layout is not None:
        # the walk applies the layers to x itself: one input tensor only
        return False
    leaves = plain_leaves(adapter.module)
    return leaves is not None and any(type(leaf) is nn.Linear for _, leaf in leaves)


def _prefers_structured(adapter: ModelAdapter) -> bool:
    """Whether ``method="auto"`` takes the layer-by-layer path.

    Only when every layer with parameters is an ``nn.Linear``: layers that go
    through torch.func one at a time pay a copy into the stacked buffer each,
    which measured slower than one torch.func.jvp of the whole model on a CNN.
    """
    if not _is_structured(adapter):
        return False
    return all(type(leaf) is nn.Linear or not any(True for _ in leaf.parameters())
               for _, leaf in plain_leaves(adapter.module))


class _WalkRefused(Exception):
    """A layer of the structured walk returned something other than one tensor, or
    has an op without forward-mode AD: the whole model goes to the generic path."""


def _structured_jvp(module: nn.Sequential, selected: Mapping[str, torch.Tensor],
                    tangent: Mapping[str, torch.Tensor], x: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    # The activations travel as one buffer [S, N, ...]: S = 1 while the input's
    # tangent is still zero (before the first selected parameter), then S = 2
    # (value, tangent), which is what the fused kernel multiplies by W at once.
    xs = x.unsqueeze(0)
    for prefix, leaf in plain_leaves(module):
        own = {name[len(prefix):]: value for name, value in tangent.items() if name.startswith(prefix)}
        if type(leaf) is nn.Linear and xs.is_floating_point():
            xs = _linear_layer(leaf, own, xs)
        elif type(leaf) is nn.ReLU and xs.shape[0] == 2:
            # relu and its derivative share one mask: both halves are scaled by 1[x > 0].
            xs = xs * (xs[0] > 0)
        else:
            xs = _generic_layer(leaf, own, xs)
        if not isinstance(xs, torch.Tensor):
            raise _WalkRefused(f"layer {prefix[:-1]!r} ({type(leaf).__name__}) returns a "
                              f"{type(xs).__name__}")
    if xs.shape[0] == 1:
        return xs[0], torch.zeros_like(xs[0])
    return xs[0], xs[1]


def _linear_layer(layer: nn.Linear, own: Mapping[str, torch.Tensor], xs: torch.Tensor) -> torch.Tensor:
    k = xs.shape[-1]
    lead = xs.shape[1:-1]
    flat = xs.reshape(xs.shape[0], math.prod(lead), k)
    bias = layer.bias.detach() if layer.bias is not None else None
    out = linear_jvp_stacked(flat, layer.weight.detach(), own.get("weight"), bias, own.get("bias"))
    return out.reshape(2, *lead, out.shape[-1])


def _generic_layer(leaf: nn.Module, own: Mapping[str, torch.Tensor], xs: torch.Tensor) -> torch.Tensor:
    x = xs[0]
    has_input_tangent = xs.shape[0] == 2
    if not own and not has_input_tangent:
        y = leaf(x)
        return y.unsqueeze(0) if isinstance(y, torch.Tensor) else y
    primals = {name: p.detach() for name, p in leaf.named_parameters() if name in own}
    try:
        if has_input_tangent:
            y, y_dot = torch.func.jvp(lambda p, inp: restoring_functional_call(leaf, p, inp),
                                      (primals, x), (dict(own), xs[1]))
        else:
            y, y_dot = torch.func.jvp(lambda p: restoring_functional_call(leaf, p, x), (primals,), (dict(own),))
    except NotImplementedError as error:
        raise _WalkRefused(f"layer {type(leaf).__name__} has an op without forward-mode AD "
                           f"({first_line(error)})") from None
    return torch.stack([y, y_dot]) if isinstance(y, torch.Tensor) else y


# -- vjp ---------------------------------------------------------------------------

@one_call_per_model
def vjp(
    model,
    x: torch.Tensor,
    cotangent: torch.Tensor,
    *,
    params: ParamSelection = None,
    batch_size: Optional[int] = None,
    memory_budget: Optional[float] = None,
    precision: str = "highest",
) -> Dict[str, torch.Tensor]:
    """Vector-Jacobian product ``J(x)ᵀ·c = Σ_i J(x_i)ᵀ c_i`` for each parameter.

    Args:
        model, x, params, batch_size, memory_budget, precision: as in :func:`jvp`.
        cotangent: ``c``, shaped like the model's output ``[N, *out]``.

    Returns:
        A dict mapping each selected parameter name to a tensor of its shape:
        the gradient of ``Σ_i ⟨f(x_i), c_i⟩`` with respect to that parameter.
        Differentiable with respect to ``cotangent`` and ``x``; ``torch.func.vmap``
        over the cotangent gives one VJP per cotangent. The parameters count as
        constants, as in :func:`jvp`.
    """
    adapter, dtype, x = _prepare(model, x, params, precision)
    if not isinstance(cotangent, torch.Tensor):
        raise ValueError(f"cotangent must be a tensor shaped like the model's output, got "
                         f"{type(cotangent).__name__}")
    _check_vector(cotangent, "cotangent", x.device, dtype)
    with explicit_attention(adapter.module), matmul_precision(precision, x.device, dtype):
        return _vjp(adapter, x, cotangent, batch_size, memory_budget)


def _vjp(adapter: ModelAdapter, x: torch.Tensor, cotangent: torch.Tensor, batch_size: Optional[int],
         memory_budget: Optional[float]) -> Dict[str, torch.Tensor]:
    size = _chunk_size(adapter, x, batch_size, memory_budget, vectors=2)
    primals = adapter.detached_params()
    total: Optional[Dict[str, torch.Tensor]] = None
    for part in _chunks(x.shape[0], size):
        y, pullback = torch.func.vjp(lambda p: adapter.call(p, x[part]), primals)
        if part.start == 0 and tuple(cotangent.shape[1:]) != tuple(y.shape[1:]) \
                or cotangent.shape[0] != x.shape[0]:
            raise ValueError(f"cotangent must be shaped like the model's output "
                             f"[{x.shape[0]}, *{tuple(y.shape[1:])}], got {tuple(cotangent.shape)}")
        (grads,) = pullback(cotangent[part].to(y.dtype))
        total = _accumulate(total, grads)
    if total is None:
        # no examples: the cotangent must still be shaped like the model's outputs
        with torch.no_grad():
            y = adapter.call(primals, x.new_zeros((1,) + tuple(x.shape[1:])))
        if tuple(cotangent.shape) != (0,) + tuple(y.shape[1:]):
            raise ValueError(f"cotangent must be shaped like the model's output "
                             f"[0, *{tuple(y.shape[1:])}], got {tuple(cotangent.shape)}")
        return {name: torch.zeros_like(p) for name, p in primals.items()}
    return total


def _accumulate(total: Optional[Dict[str, torch.Tensor]], grads: Dict[str, torch.Tensor]
                ) -> Dict[str, torch.Tensor]:
    """Add one chunk's gradients into the running sum, which the first chunk starts.

    Autograd may hand back a view of the cotangent (a parameter that reaches the
    output through views alone) or an expanded tensor (one used through a sum), so
    the first chunk's gradients are copied into tensors of their own when they
    are not already, and never written into in place while they could alias.
    """
    if total is None:
        return {name: g if _owns_its_memory(g) else g.clone(memory_format=torch.contiguous_format)
                for name, g in grads.items()}
    for name, g in grads.items():
        if total[name].requires_grad:
            # autograd may have saved the first chunk's gradient for its own backward
            total[name] = total[name] + g
        else:
            total[name] += g
    return total


def _owns_its_memory(g: torch.Tensor) -> bool:
    """A dense tensor that is not a view of another: safe to return and to add into.
    A tensor of an enclosing torch.func transform shows no storage: copied to be safe."""
    if is_functorch_wrapped_tensor(g):
        return False
    return g._base is None and g.is_contiguous() and g.untyped_storage().nbytes() == g.numel() * g.element_size()


# -- ntk_vp ------------------------------------------------------------------------

@one_call_per_model
def ntk_vp(
    model,
    x: torch.Tensor,
    v: torch.Tensor,
    x2: Optional[torch.Tensor] = None,
    *,
    output: str = "trace",
    params: ParamSelection = None,
    batch_size: Optional[int] = None,
    memory_budget: Optional[float] = None,
    precision: str = "highest",
) -> torch.Tensor:
    """NTK-vector product ``Θ(x, x2) v`` without forming the ``N × N2`` kernel.

    ``Θ(x, x2) = J(x) J(x2)ᵀ`` (Jacot et al., 2018); the product is one VJP through
    ``x2`` (``u = J(x2)ᵀ v``, a parameter-space vector) and one JVP through ``x``
    (``J(x) u``), each over chunks of examples: O(N·P) work, no ``N × N2`` matrix.

    Args:
        model, params, batch_size, memory_budget, precision: as in :func:`lazykernel.ntk`.
        x: ``[N, *in]``; x2: ``[N2, *in]``, ``None`` means ``x`` (or, for a model of
            several inputs, tuples or dicts of such tensors, as in :func:`lazykernel.ntk`).
        output: which kernel multiplies ``v``, with O the number of outputs:

            * ``"full"``: the ``[N, N2, O, O]`` kernel of ``ntk(..., output="full")``;
              ``v: [N2, O]`` gives ``[N, O]`` with ``r[i, a] = Σ_{j,b} Θ[i, j, a, b] v[j, b]``.
            * ``"trace"``: the ``[N, N2]`` kernel ``Σ_o Θ_oo`` of ``ntk(..., output="trace")``;
              ``v: [N2]`` gives ``[N]``, ``v: [N2, C]`` gives ``[N, C]`` (C vectors at once).
              Costs O times a full product (one per output).

            With O = 1 both modes are the ``[N, N2]`` kernel and take ``v: [N2]`` or ``[N2, C]``.

    Returns:
        ``Θ v`` in the model's dtype; ``v`` is converted to that dtype first.

    Derivatives:
        * in ``v``: the map is linear, so its derivatives are products again:
          ``Θ(x, x2)ᵀ w = Θ(x2, x) w`` backwards (returned in ``v``'s dtype),
          ``Θ v̇`` forwards. Works with ``torch.autograd`` (higher orders too) and
          ``torch.func.grad``/``jacrev``/``jvp``, and keeps no graph of the model.
          ``torch.func.vmap`` over ``v`` is the batched product: the vectors go
          side by side as the columns of one trace-mode call (which takes
          ``[N2, C]`` directly), one product per vector for ``output="full"``.
        * in ``x`` and ``x2``, where one of them requires grad or is a tensor of
          an enclosing ``torch.func`` transform: the product then goes through
          autograd on the generic path and keeps every chunk's graph until the
          backward (memory grows with N, as for :func:`jvp`).
        * the parameters count as constants: ``Θ`` is the kernel at their current
          values, as in :func:`jvp` and :func:`vjp`, and the result carries no
          derivative to them. A functional model's parameter that is a tensor of
          an enclosing ``torch.func`` transform is refused; a backward after the
          parameters, ``x`` or ``x2`` changed in place raises a RuntimeError.

        ``torch.func.vmap`` over ``x`` or ``x2`` is refused: pass all the
        examples as one batch.
    """
    if output not in NTK_VP_OUTPUTS:
        raise ValueError(f"unknown output {output!r}; expected one of {NTK_VP_OUTPUTS}")
    adapter, dtype, x = _prepare(model, x, params, precision)
    if x2 is not None:
        x2, layout2 = _packed_batch(adapter, x2, "x2")
        matching_layouts(adapter.layout, layout2, ("x", "x2"))
        if tuple(x.shape[1:]) != tuple(x2.shape[1:]):
            raise ValueError(f"x and x2 must have the same trailing shape (one example's shape): "
                             f"x is {tuple(x.shape)}, x2 is {tuple(x2.shape)}")
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"v must be a floating-point tensor, got {type(v).__name__}")
    _check_vector(v, "v", x.device, dtype)
    duals = [name for name, t in (("x", x), ("x2", x2), ("v", v)) if t is not None
             and not is_functorch_wrapped_tensor(t) and forward_ad.unpack_dual(t).tangent is not None]
    if duals:
        raise ValueError(f"torch.autograd.forward_ad dual tensors given as {', '.join(duals)}: ntk_vp runs "
                         "forward-mode AD itself, which PyTorch cannot nest inside forward_ad's dual level; "
                         "differentiate it with torch.func.jvp (or reverse mode) instead")
    product = _KernelProduct(model, adapter, x, x2, output, dtype, batch_size, memory_budget, precision)
    product.check(v)
    if _result_needs_grad(x, {} if x2 is None else {"x2": x2}):
        return product(v, differentiable=True)
    return _KernelTimesVector.apply(v, product)


class _KernelProduct:
    """``v ↦ Θ(x, x2) v`` for one call of :func:`ntk_vp`, kept for its derivatives:
    the model, the inputs and the chunk sizes planned once (each plan runs the
    model on a few examples). ``Θ(x, x2)ᵀ = Θ(x2, x)`` is the same product with
    the inputs swapped."""

    def __init__(self, model, adapter: ModelAdapter, x: torch.Tensor, x2: Optional[torch.Tensor], output: str,
                 dtype: torch.dtype, batch_size: Optional[int], memory_budget: Optional[float], precision: str):
        self.model, self.adapter, self.output, self.dtype, self.precision = model, adapter, output, dtype, precision
        self.x, self.x2 = x, (x if x2 is None else x2)
        # the pushforwards (either way: the transposed product's go through x2) check forward
        # mode on the generic path, beside the pulled-back vector they push
        generic = not _prefers_structured(adapter) or _result_needs_grad(x, {"x2": self.x2})
        checked = 1 if generic else None
        with self._settings():
            self.outputs, _ = _probe(adapter, self.x2 if self.x2.shape[0] else x, "x2" if x2 is not None else "x")
            self.size_x = _chunk_size(adapter, x, batch_size, memory_budget, vectors=3, checked_beside=checked)
            self.size_x2 = self.size_x if x2 is None else _chunk_size(adapter, self.x2, batch_size,
                                                                       memory_budget, vectors=3,
                                                                       checked_beside=checked)
        self._versions = self._current_versions()

    @property
    def takes_columns(self) -> bool:
        """Whether v is ``[N2]`` or ``[N2, C]`` (trace mode, or one output) rather than ``[N2, O]``."""
        return self.outputs == 1 or self.output == "trace"

    def check(self, v: torch.Tensor) -> None:
        n2 = self.x2.shape[0]
        if self.takes_columns:
            if v.dim() not in (1, 2) or v.shape[0] != n2:
                raise ValueError(f"for output='trace' (or a one-output model) v must be [N2] or [N2, C] "
                                 f"with N2 = {n2}, got {tuple(v.shape)}")
        elif tuple(v.shape) != (n2, self.outputs):
            raise ValueError(f"for output='full' v must be [N2, O] = [{n2}, {self.outputs}], got {tuple(v.shape)}")

    def transposed(self) -> "_KernelProduct":
        swapped = copy.copy(self)
        swapped.x, swapped.x2 = self.x2, self.x
        swapped.size_x, swapped.size_x2 = self.size_x2, self.size_x
        return swapped

    def __call__(self, v: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        return _kernel_times(self.model, self, v, differentiable)

    def _settings(self) -> contextlib.ExitStack:
        """What the products run under, entered again by a backward that comes later."""
        stack = contextlib.ExitStack()
        for context in (explicit_attention(self.adapter.module),
                        matmul_precision(self.precision, self.x.device, self.dtype),
                        _attention_with_forward_mode(), _padding_lookups_held(self.adapter)):
            stack.enter_context(context)
        return stack

    def _watched(self) -> Dict[str, torch.Tensor]:
        return {"x": self.x, "x2": self.x2, **{repr(name): p for name, p in self.adapter.params.items()}}

    def _current_versions(self) -> Dict[str, Optional[int]]:
        # inference tensors keep no version counter (and cannot be changed outside inference mode)
        return {name: None if t.is_inference() else t._version for name, t in self._watched().items()}

    def check_unchanged(self) -> None:
        """The derivative is the product at the values of the forward: refuse if they moved since."""
        changed = [name for name, version in self._current_versions().items() if version != self._versions[name]]
        if changed:
            raise RuntimeError(f"{', '.join(changed)} changed in place between ntk_vp and its backward (an "
                               "optimizer step, say), so the derivative would be taken at other values; call "
                               "ntk_vp again after the change, or run the backward before it")

    def compute(self, v: torch.Tensor, differentiable: bool) -> torch.Tensor:
        self.check(v)
        adapter, x, x2, outputs = self.adapter, self.x, self.x2, self.outputs
        n, n2 = x.shape[0], x2.shape[0]
        vv = v.to(self.dtype)
        with self._settings():
            if self.takes_columns:
                if n == 0 or n2 == 0 or vv.numel() == 0:
                    # no examples on one side, or no vectors: the empty sum, or no columns
                    return vv.new_zeros((n,) + tuple(vv.shape[1:]))
                columns = vv.reshape(n2, -1)
                result = torch.stack([_trace_product(adapter, x, x2, columns[:, c], outputs, self.size_x,
                                                     self.size_x2, differentiable)
                                      for c in range(columns.shape[1])], dim=1)
                return result.reshape((n,) + tuple(vv.shape[1:]))
            if n == 0 or n2 == 0:
                return vv.new_zeros(n, outputs)
            return _pushforward(adapter, x, _pullback(adapter, x2, vv, self.size_x2), self.size_x, differentiable)


@one_call_per_model
def _kernel_times(model, product: _KernelProduct, v: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """`_KernelProduct.compute` holding the model's lock, which a backward run later needs again."""
    return product.compute(v, differentiable)


class _KernelTimesVector(torch.autograd.Function):
    """``Θ v`` as one autograd node that keeps no graph of the model.

    The map is linear in ``v``, so each derivative is a product again: ``Θᵀ w =
    Θ(x2, x) w`` backwards and ``Θ v̇`` forwards, both through this node so
    that higher orders work, and a vmap over ``v`` is one product of the vectors
    side by side.
    """

    @staticmethod
    def forward(v: torch.Tensor, product: _KernelProduct) -> torch.Tensor:
        return product(v)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        v, product = inputs
        ctx.product = product
        ctx.v_dtype = v.dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.product.check_unchanged()
        return _KernelTimesVector.apply(grad, ctx.product.transposed()).to(ctx.v_dtype), None

    @staticmethod
    def jvp(ctx, v_dot: torch.Tensor, _):
        return _KernelTimesVector.apply(v_dot, ctx.product)

    @staticmethod
    def vmap(info, in_dims, v: torch.Tensor, product: _KernelProduct):
        if in_dims[0] is None:
            return _KernelTimesVector.apply(v, product), None
        vs = v.movedim(in_dims[0], 0)
        if product.takes_columns:
            # [B, N2, *C] as the columns of one product, [N2, B·C], whose result is [N, B, *C]
            columns = vs.movedim(0, 1)
            out = _KernelTimesVector.apply(columns.reshape(columns.shape[0], math.prod(columns.shape[1:])), product)
            return out.reshape((out.shape[0],) + tuple(columns.shape[1:])), 1
        if not vs.shape[0]:
            return vs.new_zeros((0, product.x.shape[0], product.outputs), dtype=product.dtype), 0
        return torch.stack([_KernelTimesVector.apply(one, product) for one in vs]), 0


def _pullback(adapter: ModelAdapter, x: torch.Tensor, cot: torch.Tensor, size: int
              ) -> Dict[str, torch.Tensor]:
    """``J(x)ᵀ cot`` with ``cot: [N, O]``, summed over chunks of ``size`` examples."""
    primals = adapter.detached_params()
    total: Optional[Dict[str, torch.Tensor]] = None
    for part in _chunks(x.shape[0], size):
        chunk = x[part]
        y, pull = torch.func.vjp(lambda p: adapter.call(p, chunk).reshape(chunk.shape[0], -1), primals)
        (grads,) = pull(cot[part])
        total = _accumulate(total, grads)
    return total if total is not None else {name: torch.zeros_like(p) for name, p in primals.items()}


def _pushforward(adapter: ModelAdapter, x: torch.Tensor, u: Dict[str, torch.Tensor], size: int,
                 differentiable: bool = False) -> torch.Tensor:
    """``J(x) u`` as ``[N, O]``, over chunks of ``size`` examples; where ``differentiable``,
    on the generic path through autograd (in ``x`` and ``u``)."""
    structured = not differentiable and _prefers_structured(adapter)
    parts = []
    with contextlib.nullcontext() if differentiable else torch.no_grad():
        for part in _chunks(x.shape[0], size):
            if structured:
                try:
                    _, y_dot = _structured_jvp(adapter.module, adapter.params, u, x[part])
                except _WalkRefused:
                    structured = False
            if not structured:
                _, y_dot = _generic_jvp(adapter, u, x[part])
            parts.append(y_dot.reshape(y_dot.shape[0], -1))
    if not parts:
        return _generic_jvp(adapter, u, x)[1].reshape(0, -1)
    return torch.cat(parts)


def _trace_product(adapter, x, x2, column, outputs, size_x, size_x2, differentiable=False) -> torch.Tensor:
    # Σ_o Θ_oo v = Σ_o J_o(x) (J_o(x2)ᵀ v): one pullback and one pushforward per output o.
    n2 = x2.shape[0]
    result = None
    for o in range(outputs):
        cot = column.new_zeros(n2, outputs)
        cot[:, o] = column
        u = _pullback(adapter, x2, cot, size_x2)
        part = _pushforward(adapter, x, u, size_x, differentiable)[:, o]
        result = part if result is None else result + part
    return result
