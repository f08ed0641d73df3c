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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

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
    parts: Tuple[_Part, ...]
    row_bytes: int

    def unpack(self, x: torch.Tensor) -> Union[Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]:
        """The parts of the packed ``x`` (``[n, row_bytes]``, or one row under vmap), as views."""
        lead = tuple(x.shape[:-1])
        views = [x[..., p.offset:p.offset + p.nbytes].view(p.dtype).reshape(lead + p.shape) for p in self.parts]
        if self.keyword:
            return {p.key: v for p, v in zip(self.parts, views)}
        return tuple(views)

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
                          for p in self.parts)
        return ("{" + inner + "}") if self.keyword else ("(" + inner + ")")


def pack_inputs(x: Any, name: str, check: Optional[Callable[[torch.Tensor, str], None]] = None
                ) -> Tuple[Any, Optional[InputLayout]]:
    """``x`` as one tensor, and the layout of its parts (None for a tensor, returned as it is).

    A tuple, list or dict of tensors is checked (every part a tensor with the
    examples first, the same number of them, on one device; then
    ``check(part, label)``, the caller's checks of an input, on each part) and
    packed. A sequence of one tensor is that tensor. Anything else is returned
    unchanged, for the caller's own checks to refuse.
    """
    if isinstance(x, torch.Tensor):
        return x, None
    if isinstance(x, dict):
        if not x:
            raise ValueError(f"{name} is an empty dict; pass the model's inputs, e.g. {{'ids': ids, 'mask': mask}}")
        bad = [k for k in x if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{name} is a dict whose keys must be the names of the model's keyword arguments "
                             f"(strings); got key {bad[0]!r}")
        # in the order of their names: x1 and x2 with the same keys in another order are the same inputs
        keyed = sorted(x.items())
        keyword = True
    elif isinstance(x, (tuple, list)):
        if not x:
            raise ValueError(f"{name} is an empty {type(x).__name__}; pass the model's inputs, e.g. (x, mask)")
        keyed = list(enumerate(x))
        keyword = False
    else:
        return x, None
    for key, part in keyed:
        label = f"{name}[{key!r}]"
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
    if not keyword and len(keyed) == 1:
        return first, None
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
                flat = part.detach().reshape(n, -1).contiguous()
                packed[:, p.offset:p.offset + p.nbytes] = flat.view(torch.uint8)
    return packed, InputLayout(keyword, tuple(parts), row_bytes)


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
