"""Models with several inputs per example: ``model(x, mask)``, ``model(ids=..., mask=...)``.

The public functions take ``x1``/``x2`` as one tensor ``[N, *in]``, or as a
tuple or list of tensors (passed to an ``nn.Module`` as positional arguments,
to a functional ``fn(params, x)`` as the tuple), or as a dict of tensors with
string keys (passed to an ``nn.Module`` as keyword arguments, to ``fn`` as the
dict). Every part has the examples along its first axis.

Everything lazykernel does with the inputs (slicing them into chunks, taking
the probe examples, comparing ``x1`` with ``x2``, hashing them for a
resumable store, ``torch.func.vmap`` over examples) is done on one tensor. So
the parts are packed: each example's bytes of every part side by side in one
``uint8`` row, ``[N, row_bytes]``, and the model receives views of the rows
(`InputLayout.unpack`), each part in its own dtype and shape. Each part starts
at a multiple of 16 bytes within a row and rows are a multiple of 16 bytes, so
that every slice of examples can be viewed in any dtype. Packing copies the
inputs once; unpacking copies nothing.

The parts of a dict are packed in the order of their keys, so that an ``x2``
listing them in another order holds the same rows as ``x1``; the model receives
them in the order of ``x1``, whose ``**kwargs`` (or a functional ``fn``'s dict)
may rely on it.

Packing keeps the parts' values only: a derivative carried by a part (autograd's
``requires_grad``, forward mode's tangent) does not reach the packed tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch.autograd import forward_ad

# Alignment of each part within a row, and of the row length: the largest element size (complex128).
_ALIGN = 16


@dataclass(frozen=True)
class _Part:
    key: Union[int, str]
    dtype: torch.dtype
    shape: Tuple[int, ...]   # one example's shape
    offset: int              # first byte within a row
    nbytes: int              # bytes of one example


@dataclass(frozen=True)
class InputLayout:
    """Where each part of a packed batch lies in a row (see the module docstring)."""

    keyword: bool            # a dict of keyword arguments (else positional)
    parts: Tuple[_Part, ...]  # in the order of the row: by position, or by key
    row_bytes: int
    # The order in which the model receives the parts (indices into ``parts``): the
    # caller's order of a dict's keys. Not compared: x2 may list the keys otherwise.
    order: Tuple[int, ...] = field(default=(), compare=False)

    def unpack(self, x: torch.Tensor) -> Union[Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]:
        """The parts of the packed ``x`` (``[n, row_bytes]``, or one row under vmap), as views."""
        lead = tuple(x.shape[:-1])
        views = [x[..., p.offset:p.offset + p.nbytes].view(p.dtype).reshape(lead + p.shape) for p in self.parts]
        if self.keyword:
            return {self.parts[i].key: views[i] for i in self._call_order()}
        return tuple(views)

    def _call_order(self) -> Tuple[int, ...]:
        return self.order or tuple(range(len(self.parts)))

    def apply(self, fn, x: torch.Tensor):
        """``fn`` called on the parts of ``x``: ``fn(*parts)`` or ``fn(**parts)``."""
        parts = self.unpack(x)
        return fn(**parts) if self.keyword else fn(*parts)

    def names(self, name: str) -> Tuple[str, ...]:
        """How each part is called in messages: ``x1[0]``, ``x1['mask']``."""
        return tuple(f"{name}[{p.key!r}]" for p in self.parts)

    def describe(self) -> str:
        """One example's parts, as a message shows them."""
        inner = ", ".join((f"{p.key!r}: " if self.keyword else "") + f"{tuple(p.shape)} {p.dtype}"
                          for p in (self.parts[i] for i in self._call_order()))
        return ("{" + inner + "}") if self.keyword else ("(" + inner + ")")


def pack_inputs(x: Any, name: str, check: Optional[Callable[[torch.Tensor, str], None]] = None,
                collapse: bool = True) -> Tuple[Any, Optional[InputLayout]]:
    """``x`` as one tensor, and the layout of its parts (None for a tensor, returned as it is).

    A tuple, list or dict of tensors is checked (every part a tensor with the
    examples first, the same number of them, on one device; then
    ``check(part, label)``, the caller's checks of an input, on each part) and
    packed. With ``collapse`` (for a module, which gets ``model(*x)`` either way)
    a sequence of one tensor is that tensor; a functional model's ``fn(params, x)``
    keeps the one-element tuple it was given. Anything else is returned
    unchanged, for the caller's own checks to refuse.
    """
    if isinstance(x, torch.Tensor):
        return x, None
    if isinstance(x, Mapping):
        if not x:
            raise ValueError(f"{name} is an empty dict; pass the model's inputs, e.g. {{'ids': ids, 'mask': mask}}")
        bad = [k for k in x if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{name} is a dict whose keys must be the names of the model's keyword arguments "
                             f"(strings); got key {bad[0]!r}")
        # packed in the order of their names: x1 and x2 with the same keys in another order are the
        # same inputs; the model receives them in the caller's order
        keyed = sorted(x.items())
        position = {key: i for i, (key, _) in enumerate(keyed)}
        order = tuple(position[key] for key in x)
        keyword = True
    elif isinstance(x, (tuple, list)):
        if not x:
            raise ValueError(f"{name} is an empty {type(x).__name__}; pass the model's inputs, e.g. (x, mask)")
        keyed = list(enumerate(x))
        order = ()
        keyword = False
    else:
        return x, None
    for key, part in keyed:
        label = f"{name}[{key!r}]"
        if part is None:
            raise ValueError(f"{label} is None; leave an optional argument out of {name} (drop its key from a "
                             f"dict), or bind it in a closure, e.g. lambda x: model(x, None)")
        if isinstance(part, (tuple, list, Mapping)):
            raise ValueError(f"{label} is a {type(part).__name__} inside {name}; the parts must be tensors, "
                             f"[N, *in] each, in one flat tuple or dict: for a model of nested inputs, pass "
                             f"them flat and regroup them in a wrapper, e.g. lambda a, b, c: model(a, (b, c))")
        if not isinstance(part, torch.Tensor):
            raise ValueError(f"{label} must be a torch.Tensor with the examples along its first axis, got "
                             f"{type(part).__name__}; inputs shared by every example belong in the model "
                             f"(a buffer, or a closure: lambda *a: model(*a, shared))")
        if part.dim() < 1:
            raise ValueError(f"{label} must have a batch dimension first, [N, *in]; got a scalar")
        if part.is_meta:
            raise ValueError(f"{label} is on the meta device, which holds shapes but no values; "
                             "create it on a real device")
    first_key, first = keyed[0]
    for key, part in keyed[1:]:
        if part.shape[0] != first.shape[0]:
            raise ValueError(
                f"the parts of {name} must hold the same number of examples (their first axis): "
                f"{name}[{first_key!r}] has {first.shape[0]}, {name}[{key!r}] has {part.shape[0]}")
        if part.device != first.device:
            raise ValueError(f"the parts of {name} must be on one device: {name}[{first_key!r}] is on "
                             f"{first.device}, {name}[{key!r}] on {part.device}")
    if collapse and not keyword and len(keyed) == 1:
        return first, None
    for key, part in keyed:
        if forward_ad.unpack_dual(part).tangent is not None:
            # torch.func.jvp or jacfwd with respect to it, or a forward_ad dual: packing keeps the values only
            raise ValueError(
                f"{name}[{key!r}] carries a forward-mode derivative (torch.func.jvp, jacfwd or a forward_ad "
                f"dual), but inputs given as several parts count as constants (they are packed into one "
                f"tensor) and it would be lost. Transform a function of the other arguments only, or, for "
                f"jvp, vjp and ntk_vp, which differentiate with respect to an input given as one tensor, "
                f"write the model as a model of that one input")
    if check is not None:
        for key, part in keyed:
            check(part, f"{name}[{key!r}]")

    n = first.shape[0]
    parts, offset = [], 0
    for key, part in keyed:
        nbytes = _example_bytes(part)
        parts.append(_Part(key, part.dtype, tuple(part.shape[1:]), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    row_bytes = max(offset, _ALIGN)
    with torch.inference_mode(False):
        packed = torch.zeros((n, row_bytes), dtype=torch.uint8, device=first.device)
        for (_, part), p in zip(keyed, parts):
            if p.nbytes:
                # the count per example spelled out: with no examples, -1 would be ambiguous; a lazily
                # conjugated or negated view resolved, as its memory does not hold its values
                flat = part.detach().resolve_conj().resolve_neg().reshape(n, p.nbytes // part.element_size())
                flat = flat.contiguous()
                packed[:, p.offset:p.offset + p.nbytes] = flat.view(torch.uint8)
    return packed, InputLayout(keyword, tuple(parts), row_bytes, order)


def _example_bytes(part: torch.Tensor) -> int:
    count = 1
    for size in part.shape[1:]:
        count *= size
    return count * part.element_size()


def matching_layouts(layout1: Optional[InputLayout], layout2: Optional[InputLayout],
                     names: Tuple[str, str] = ("x1", "x2")) -> None:
    """Refuse two inputs whose parts differ in kind, names, dtypes or one example's shape."""
    if layout1 == layout2:
        return

    def shown(layout):
        return "one tensor" if layout is None else layout.describe()

    raise ValueError(
        f"{names[0]} and {names[1]} must have the same parts, each with the same dtype and the same shape per "
        f"example: {names[0]} is {shown(layout1)}, {names[1]} is {shown(layout2)}")
