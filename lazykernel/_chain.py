"""Cotangents of a plain layer chain, taken layer by layer without autograd.

For an ``nn.Sequential`` of standard layers (linear maps, convolutions,
elementwise activations, average and max pooling, flattening, eval-mode batch
norm and dropout) the backward of the O output cotangents is a fixed sequence of
linear maps, and `LayerChain` runs it directly, batched over outputs:

* PyTorch's batched backward has no batching rule for convolution or pooling
  backward; it loops over the outputs and stacks, and one plain backward per
  output then copies every cotangent into the layout the rules read. Here a
  convolution backward takes a chunk of examples with all their outputs as
  one batch, and each cotangent is written once, in the rules' layout, by
  the multiply with the activation's derivative.
* The head's backward ``W_o`` is the same for every example: it stays a
  broadcast view until the activation's derivative multiplies it, and an
  average pool's backward is folded into that multiply the same way.
* On a CPU the chunks are small enough (a few MiB per layer) for each
  layer's backward to find its cotangents still in the cache.

Autograd remains the reference: `StructuredPlan.verify` compares the chain's
cotangents with autograd's on the verification examples and uses the chain
only where every one agrees.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lazykernel._memory import empty_buffer
from lazykernel.rules import StructuredRule

# Cotangent bytes per layer that one chunk of the chain's backward handles: on
# a CPU a chunk whose cotangents stay in the cache while every layer's backward
# reads them runs faster than one big batch; a GPU wants large batches.
_CHUNK_BYTES_CPU = 4 << 20
_CHUNK_BYTES_CUDA = 256 << 20
# channels per block of oneDNN's blocked layouts (16 on AVX-512 machines, 8 on others)
_CHANNEL_BLOCK = 16

# layers whose derivative is elementwise: the chain takes it from autograd, on
# one batch of examples, once per capture
_ELEMENTWISE: Tuple[Type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
_DROPOUT: Tuple[Type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_CONV: Tuple[Type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AVG_POOL: Tuple[Type[nn.Module], ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOL: Tuple[Type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_MAX_POOL: Tuple[Type[nn.Module], ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_BATCH_NORM: Tuple[Type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ChainDoesNotApply(RuntimeError):
    """Raised by a capture whose shapes the chain does not cover (autograd takes over)."""


class _Cotangent:
    """``∂f_b/∂y`` of one layer's output y for a chunk of k examples and every seed b.

    ``shape`` is ``[k, B, *y.shape[1:]]``, the examples first. ``values`` holds
    them, either in that shape or in a finer one (some axes split in two, as
    an average pool's backward leaves them), and may be a broadcast view.
    ``owned`` marks values that are a fresh contiguous tensor nobody else
    reads, safe to scale in place.
    """

    def __init__(self, values: torch.Tensor, shape: Sequence[int], owned: bool = False):
        self.values, self.shape, self.owned = values, tuple(shape), owned

    def is_split(self) -> bool:
        return tuple(self.values.shape) != self.shape

    def materialised(self) -> torch.Tensor:
        """The values as one contiguous tensor of ``shape``."""
        values = self.values.reshape(self.shape) if self.is_split() else self.values
        return values.contiguous()

    def scaled(self, factor: torch.Tensor, out: Optional[torch.Tensor]) -> "_Cotangent":
        """Multiplied elementwise by ``factor``, one value per example's element.

        ``factor`` broadcasts to ``[k, *y.shape[1:]]`` (its first axis is k or 1);
        it is shared by the B seeds. With ``out`` (contiguous, of ``shape``) the
        product is written there.
        """
        return self._combined(torch.mul, factor, out)

    def passed_where_positive(self, y: torch.Tensor, out: Optional[torch.Tensor]) -> "_Cotangent":
        """Kept where ``y > 0`` and zero elsewhere (a ReLU's backward, as autograd's
        ``threshold_backward`` takes it from the output); ``y`` broadcasts as ``factor``
        does in `scaled`."""
        return self._combined(lambda g, y, out=None: torch.ops.aten.threshold_backward.grad_input(
            g, y, 0, grad_input=out) if out is not None else torch.ops.aten.threshold_backward(g, y, 0), y, out)

    def _combined(self, op, factor: torch.Tensor, out: Optional[torch.Tensor]) -> "_Cotangent":
        factor = factor.expand((factor.shape[0],) + self.shape[2:]).unsqueeze(1)
        values = self.values
        if self.is_split():
            factor = factor.reshape(factor.shape[:2] + tuple(values.shape[2:]))
        if out is not None:
            broadcast = tuple(max(a, b) for a, b in zip(values.shape, factor.shape))
            op(values, factor, out=out.view(broadcast))
            return _Cotangent(out, self.shape, owned=False)
        if self.owned and not self.is_split() and torch.result_type(values, factor) == values.dtype:
            return _Cotangent(op(values, factor, out=values), self.shape, owned=True)
        return _Cotangent(op(values, factor).view(self.shape), self.shape, owned=True)

    def reshaped(self, example_shape: Sequence[int]) -> "_Cotangent":
        shape = self.shape[:2] + tuple(example_shape)
        values = self.materialised() if self.is_split() else self.values
        return _Cotangent(values.reshape(shape), shape, owned=self.owned)


# -- one step per layer ---------------------------------------------------------------

class _Step:
    """One layer: what its forward keeps, and its input's cotangent from its output's.

    `backward` takes the cotangents of a chunk of examples (``rows`` of the
    batch) and may write its result into ``out``, the store of the layer
    before when that one has a rule; it returns what it computed either way.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.input_shape: Tuple[int, ...] = ()

    def forward(self, x: torch.Tensor, needs_backward: bool) -> torch.Tensor:
        self.input_shape = tuple(x.shape)
        return self.layer(x)

    def backward(self, g: _Cotangent, rows: slice, out: Optional[torch.Tensor]) -> _Cotangent:
        raise NotImplementedError

    def release(self) -> None:
        """Drop what the forward kept, once the capture is done."""

    def kept_elements(self, sizes: "_Sizes", elt: int) -> float:
        """Elements (of ``elt`` bytes) per example that the forward keeps until the capture ends:
        its output, which the next layer's rule or backward reads."""
        return sizes.output

    def backward_elements(self, sizes: "_Sizes", g: "_Held", into: bool) -> Tuple[float, "_Held"]:
        """What `backward` allocates per example and seed, for a cotangent held as ``g``
        and, with ``into``, a store of the layer before to write into: (elements
        allocated while it runs, its result included; how its result is held)."""
        raise NotImplementedError

    def workspace_elements(self, sizes: "_Sizes") -> float:
        """Elements per example and seed that the library kernel of `backward` allocates inside itself."""
        return 0.0

    def fixed_elements(self, sizes: "_Sizes", g: "_Held") -> float:
        """Elements per seed that `backward` allocates once per capture, whatever the examples."""
        return 0.0


class _Held:
    """How a cotangent of the capture is held, for counting its bytes: ``kind`` is
    ``"broadcast"`` (the same for every example: no memory per example), ``"stored"``
    (in a rule's store, counted with the stores), ``"split"`` (a broadcast view of a
    smaller buffer, as an average pool's backward leaves it) or ``"fresh"`` (a
    tensor of its own); ``elements``: the elements per example and seed of its own
    buffer."""

    def __init__(self, kind: str, elements: float = 0.0):
        self.kind, self.elements = kind, elements

    def copied(self, size: float) -> float:
        """Elements a contiguous copy of the cotangent (``size`` per example) allocates: none
        for one already contiguous."""
        return size if self.kind in ("broadcast", "split") else 0.0


class _Sizes:
    """Elements per example of a layer's input and output."""

    def __init__(self, input_shape: Sequence[int], output_shape: Sequence[int]):
        self.input, self.output = math.prod(input_shape), math.prod(output_shape)


class _IdentityStep(_Step):
    def backward(self, g, rows, out):
        return g

    def kept_elements(self, sizes, elt):
        return 0.0

    def backward_elements(self, sizes, g, into):
        return 0.0, g


class _LinearStep(_Step):
    """``y = x Wᵀ + b`` on the last axis: ``∂/∂x = g W``."""

    def __init__(self, layer):
        super().__init__(layer)
        self._common: Optional[Tuple[tuple, torch.Tensor]] = None

    def backward(self, g, rows, out):
        weight = self.layer.weight
        shape = g.shape[:-1] + (weight.shape[1],)
        if not g.is_split() and g.values.stride(0) == 0:
            # the same for every example (the seeds): one product, broadcast again,
            # and the same for every chunk
            common = g.values[0]
            key = (common.data_ptr(), tuple(common.shape), tuple(common.stride()))
            if self._common is None or self._common[0] != key:
                self._common = (key, torch.matmul(common, weight))
            one = self._common[1].expand(shape)
            if out is not None:
                return _Cotangent(out.copy_(one), shape, owned=False)
            return _Cotangent(one, shape, owned=False)
        if out is not None:
            return _Cotangent(torch.matmul(g.materialised(), weight, out=out), shape, owned=False)
        return _Cotangent(torch.matmul(g.materialised(), weight), shape, owned=True)

    def release(self):
        self._common = None

    def backward_elements(self, sizes, g, into):
        if g.kind == "broadcast":
            # the product is formed once (`fixed_elements`) and broadcast again
            return 0.0, _Held("stored") if into else g
        copy = g.copied(sizes.output)
        if into:
            return copy, _Held("stored")
        return copy + sizes.input, _Held("fresh", sizes.input)

    def fixed_elements(self, sizes, g):
        # the broadcast product stays until the capture ends
        return sizes.input if g.kind == "broadcast" else 0.0


class _ConvStep(_Step):
    """A convolution's input gradient: one convolution backward over the chunk's ``k·B`` cotangents."""

    def __init__(self, layer):
        super().__init__(layer)
        spatial = len(layer.kernel_size)
        padding = layer.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * spatial
            else:
                total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
                if any(t % 2 for t in total):
                    # "same" with an even kernel pads one side more: not a plain padding
                    raise ChainDoesNotApply("asymmetric 'same' padding")
                padding = tuple(t // 2 for t in total)
        self.padding = list(padding)

    def backward(self, g, rows, out):
        layer = self.layer
        batch = g.shape[0] * g.shape[1]
        grad_out = g.materialised().view((batch,) + g.shape[2:])
        spatial = len(layer.kernel_size)
        # Only the input's shape is read, but oneDNN would copy a broadcast stand-in
        # to make it contiguous: an unfilled buffer of that shape is never touched.
        shape_only = torch.empty((batch,) + self.input_shape[1:], dtype=grad_out.dtype, device=grad_out.device)
        grad_in = torch.ops.aten.convolution_backward(
            grad_out, shape_only, layer.weight, None, list(layer.stride), self.padding,
            list(layer.dilation), False, [0] * spatial, layer.groups, [True, False, False])[0]
        shape = g.shape[:2] + self.input_shape[1:]
        return _Cotangent(grad_in.view(shape), shape, owned=True)

    def backward_elements(self, sizes, g, into):
        # a contiguous cotangent, the stand-in of the input's shape and the input's
        # gradient (never written into the store: copied there afterwards)
        return g.copied(sizes.output) + 2 * sizes.input, _Held("fresh", sizes.input)

    def workspace_elements(self, sizes):
        # oneDNN (on a CPU, float32 and narrower) copies the output's gradient and forms
        # the input's in a layout of channel blocks, padded, then reorders it: at most
        # two copies of the larger of the two, as measured for 1 to 128 channels (1.0 to
        # 2.0 of them beside the result). cuDNN's workspace on a GPU is taken to be as large.
        c_in, c_out = self.layer.in_channels, self.layer.out_channels
        padded_in = sizes.input // c_in * _padded_channels(c_in)
        padded_out = sizes.output // c_out * _padded_channels(c_out)
        return 2.0 * max(padded_in, padded_out)


def _padded_channels(channels: int) -> int:
    return -(-channels // _CHANNEL_BLOCK) * _CHANNEL_BLOCK


class _ElementwiseStep(_Step):
    """An activation: its derivative at this batch, taken from autograd once, then a multiply."""

    def forward(self, x, needs_backward):
        self.input_shape = tuple(x.shape)
        self.derivative = self.output = None
        if needs_backward and type(self.layer) is not nn.ReLU:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_()
                # a clone, so an in-place activation does not write into a leaf
                out = self.layer(leaf.clone())
                self.derivative, = torch.autograd.grad(out, leaf, torch.ones_like(out))
        y = self.layer(x)
        if needs_backward and type(self.layer) is nn.ReLU:
            # autograd's ReLU backward passes the cotangent where the output is
            # positive, reading the output itself (the next layer keeps it anyway;
            # autograd saves it too and refuses a model that writes into it later)
            self.output = y
        return y

    def backward(self, g, rows, out):
        if self.output is None:
            return g.scaled(self.derivative[rows], out)
        return g.passed_where_positive(self.output[rows], out)

    def release(self) -> None:
        self.derivative = self.output = None

    def kept_elements(self, sizes, elt):
        # the output, and the derivative of any activation but ReLU
        return sizes.output * (1 if type(self.layer) is nn.ReLU else 2)

    def backward_elements(self, sizes, g, into):
        return _multiplied_elements(sizes, g, into)


def _multiplied_elements(sizes: _Sizes, g: _Held, into: bool) -> Tuple[float, _Held]:
    """`_Cotangent.scaled` and `passed_where_positive`: into the store, in place where the
    cotangent is a tensor of its own, a new tensor otherwise."""
    if into:
        return 0.0, _Held("stored")
    if g.kind == "fresh":
        return 0.0, g
    return sizes.input, _Held("fresh", sizes.input)


class _AvgPoolStep(_Step):
    """Average pooling in non-overlapping windows that tile the input exactly.

    Its backward spreads each cotangent over its window, divided by the
    window's size. Along the last axis a small matrix product does it (a
    broadcast copy with an inner axis of 2 runs many times slower); along the
    others the result stays a broadcast view, each axis split into (windows,
    window), until the next multiply writes it out.
    """

    def forward(self, x, needs_backward):
        y = super().forward(x, needs_backward)
        self.window = self._window()
        self._spread_matrix: Optional[torch.Tensor] = None
        return y

    def _window(self) -> Tuple[int, ...]:
        layer = self.layer
        kinds = _ADAPTIVE_AVG_POOL if isinstance(layer, _ADAPTIVE_AVG_POOL) else _AVG_POOL
        spatial = _pooling_rank(layer, kinds, self.input_shape)
        if isinstance(layer, _ADAPTIVE_AVG_POOL):
            size = layer.output_size
            size = (size,) * spatial if isinstance(size, int) else tuple(size)
            out = [s if o is None else o for s, o in zip(self.input_shape[2:], size)]
            if any(s % o for s, o in zip(self.input_shape[2:], out)):
                raise ChainDoesNotApply("adaptive pooling with uneven windows")
            return tuple(s // o for s, o in zip(self.input_shape[2:], out))
        kernel = _tuple(layer.kernel_size, spatial)
        stride = _tuple(layer.stride if layer.stride else layer.kernel_size, spatial)
        if (kernel != stride or any(_tuple(layer.padding, spatial)) or layer.ceil_mode
                or getattr(layer, "divisor_override", None) is not None
                or any(s % k for s, k in zip(self.input_shape[2:], kernel))):
            raise ChainDoesNotApply("average pooling with overlapping or partial windows")
        return kernel

    def backward(self, g, rows, out):
        pooled = g.materialised() if g.is_split() else g.values
        spread = self._spread(pooled)
        split, expanded = list(g.shape[:3]), list(g.shape[:3])
        for size, k in zip(g.shape[3:-1], self.window[:-1]):
            split += [size, 1]
            expanded += [size, k]
        last = self.input_shape[-1]
        split.append(last)
        expanded.append(last)
        shape = g.shape[:2] + self.input_shape[1:]
        values = torch.matmul(pooled, spread).reshape(split).expand(expanded)
        return _Cotangent(values, shape, owned=False)

    def _spread(self, like: torch.Tensor) -> torch.Tensor:
        """``[W_out, W]``: each pooled position to its window on the last axis, over the window's size."""
        if self._spread_matrix is not None:
            return self._spread_matrix
        width, k = self.input_shape[-1], self.window[-1]
        columns = torch.arange(width, device=like.device)
        spread = torch.zeros(width // k, width, dtype=like.dtype, device=like.device)
        spread[columns // k, columns] = 1.0 / math.prod(self.window)
        self._spread_matrix = spread
        return spread

    def release(self):
        self._spread_matrix = None

    def backward_elements(self, sizes, g, into):
        # the product along the last axis; the other axes stay a broadcast view of it
        spread = sizes.output * self.window[-1]
        pooled = sizes.output if g.kind == "split" else 0.0
        return pooled + spread, _Held("split", spread)


class _MaxPoolStep(_Step):
    """Max pooling: its backward adds each cotangent at the input position its window took.

    The forward records those positions (``return_indices``), as autograd's
    backward uses them, ties included. It pools with the layer's own rank (the
    rules after the pool record its outputs as their inputs, which no check of
    the cotangents sees).
    """

    def forward(self, x, needs_backward):
        self.input_shape = tuple(x.shape)
        layer = self.layer
        spatial = _pooling_rank(layer, _MAX_POOL, self.input_shape)
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
        y, self.indices = pool(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                               ceil_mode=layer.ceil_mode, return_indices=True)
        if not needs_backward:
            self.indices = None
        return y

    def backward(self, g, rows, out):
        k, b, c = g.shape[:3]
        pooled = g.materialised().view(k, b, c, -1)
        indices = self.indices[rows].reshape(k, 1, c, -1).expand(k, b, c, pooled.shape[3])
        grad_in = pooled.new_zeros((k, b, c, math.prod(self.input_shape[2:])))
        grad_in.scatter_add_(3, indices, pooled)
        shape = g.shape[:2] + self.input_shape[1:]
        return _Cotangent(grad_in.view(shape), shape, owned=True)

    def release(self):
        self.indices = None

    def kept_elements(self, sizes, elt):
        # the output, and the positions its windows took (int64)
        return sizes.output * (1 + 8 / elt)

    def backward_elements(self, sizes, g, into):
        return g.copied(sizes.output) + sizes.input, _Held("fresh", sizes.input)


class _BatchNormStep(_Step):
    """Eval-mode batch norm: per channel, ``∂/∂x = g · w / √(running_var + eps)``."""

    def backward(self, g, rows, out):
        layer = self.layer
        scale = torch.rsqrt(layer.running_var + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        dims = len(self.input_shape) - 2
        return g.scaled(scale.to(g.values.dtype).reshape((1, -1) + (1,) * dims), out)

    def backward_elements(self, sizes, g, into):
        return _multiplied_elements(sizes, g, into)


class _FlattenStep(_Step):
    """``nn.Flatten`` or ``nn.Unflatten`` of axes after the batch axis: the cotangents are reshaped back."""

    def forward(self, x, needs_backward):
        layer = self.layer
        axis = layer.start_dim if isinstance(layer, nn.Flatten) else layer.dim
        if x.dim() == 0 or axis % x.dim() == 0:
            raise ChainDoesNotApply("a reshape of the batch axis")
        return super().forward(x, needs_backward)

    def backward(self, g, rows, out):
        return g.reshaped(self.input_shape[1:])

    def kept_elements(self, sizes, elt):
        return 0.0

    def backward_elements(self, sizes, g, into):
        if g.kind == "split":
            return sizes.input, _Held("fresh", sizes.input)
        return 0.0, g


def _pooling_rank(layer: nn.Module, kinds: Tuple[Type[nn.Module], ...], input_shape: Tuple[int, ...]) -> int:
    """The spatial axes a pooling layer of one of ``kinds`` (1d, 2d, 3d) pools, for an input ``[N, C, *spatial]``.

    Refused: an input with one axis less, which PyTorch pools as one unbatched
    image whose channels are the examples. The pooling steps read axis 1 as
    the channels and the axes after it as the pooled ones; on such an input
    their backward would be wrong without failing, and a pooling of another
    rank than the layer's would be wrong in the forward too.
    """
    spatial = kinds.index(type(layer)) + 1
    if len(input_shape) != spatial + 2:
        raise ChainDoesNotApply(f"{type(layer).__name__} on an input of {len(input_shape)} axes, "
                                f"not batched [N, C, *spatial] ({spatial + 2} axes)")
    return spatial


def _tuple(value, size: int) -> Tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * size


def _step_for(layer: nn.Module) -> Optional[_Step]:
    kind = type(layer)
    if kind is nn.Linear:
        return _LinearStep(layer)
    if kind in _CONV:
        if layer.padding_mode != "zeros":
            return None
        try:
            return _ConvStep(layer)
        except ChainDoesNotApply:
            return None
    if kind in _ELEMENTWISE:
        return _ElementwiseStep(layer)
    if kind is nn.Identity or (kind in _DROPOUT and not layer.training):
        return _IdentityStep(layer)
    if kind in _AVG_POOL or kind in _ADAPTIVE_AVG_POOL:
        return _AvgPoolStep(layer)
    if kind in _MAX_POOL and not layer.return_indices:
        return _MaxPoolStep(layer)
    if kind in _BATCH_NORM and not layer.training and layer.running_var is not None:
        return _BatchNormStep(layer)
    if kind is nn.Flatten or kind is nn.Unflatten:
        return _FlattenStep(layer)
    return None


def named_leaves(module: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    """The layers of nested ``nn.Sequential`` containers in call order (a layer listed
    twice appears twice), each with the prefix of its parameters' names."""
    if type(module) is not nn.Sequential:
        return [(prefix, module)]
    return [leaf for name, child in module._modules.items() if child is not None
            for leaf in named_leaves(child, f"{prefix}{name}.")]


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in vars(module))


def _global_hooks() -> bool:
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


def plain_leaves(module: Optional[nn.Module]) -> Optional[List[Tuple[str, nn.Module]]]:
    """The layers a plain (nested) ``nn.Sequential`` applies in turn, with their name
    prefixes; None where walking them would not be the model's forward.

    Refused: a subclass or another container, a hook anywhere (or a ``forward`` set
    on an instance), a parametrized layer (its weight is computed), a layer with
    parameters listed twice or parameters shared between layers (the tangent is
    found by each layer's own names).
    """
    if module is None or type(module) is not nn.Sequential or _global_hooks():
        return None
    if any(_has_hooks(m) or parametrize.is_parametrized(m) for m in module.modules()):
        return None
    leaves = named_leaves(module)
    owners: Dict[int, int] = {}
    for index, (_, leaf) in enumerate(leaves):
        for p in leaf.parameters():
            if owners.setdefault(id(p), index) != index:
                return None
    return leaves


def _linear_as_declared(layer: nn.Linear) -> bool:
    """Are the Linear's tensors those its rule reads: a ``[out, in]`` weight, a separate
    ``[out]`` bias or none, and no other parameter (no tensor reassigned after construction)?"""
    weight, bias = layer.weight, layer.bias
    own = dict(layer.named_parameters(recurse=False, remove_duplicate=False))
    if set(own) - {"weight", "bias"} or len({id(p) for p in own.values()}) != len(own):
        return False
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (layer.out_features, layer.in_features):
        return False
    return bias is None or (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (layer.out_features,))


def exact_by_construction(module: Optional[nn.Module], x: torch.Tensor) -> bool:
    """Is ``module`` on ``x`` a perceptron whose rules are exact and examples independent by construction?

    True for a plain chain (`plain_leaves`) of ``nn.Linear`` layers (with the
    weight and bias their sizes declare, `_linear_as_declared`), elementwise
    activations that do not work in place, ``nn.Identity``, dropout in eval
    mode and ``nn.Flatten`` from an axis after the first (all of exactly these
    types, not subclasses), applied to a floating-point ``x`` with a batch
    axis and at least one more. Every such layer maps each example on its
    own and keeps the batch axis first, and each ``nn.Linear`` is called once,
    on its own parameters, mapping the last axis: the Linear rule's account of
    it holds whatever the weights and inputs, and no example's output depends
    on another's. The checks on the probe examples (`StructuredPlan.verify`,
    `ntk._check_independent`), which exist for models that might break those
    facts, are then skipped.
    """
    if not x.is_floating_point() or x.dim() < 2:
        return False
    leaves = plain_leaves(module)
    if not leaves:
        return False
    for _, leaf in leaves:
        kind = type(leaf)
        if kind is nn.Identity or (kind is nn.Linear and _linear_as_declared(leaf)):
            continue
        if kind in _ELEMENTWISE and not getattr(leaf, "inplace", False):
            continue
        if kind in _DROPOUT and not leaf.training:
            continue
        if kind is nn.Flatten and leaf.start_dim >= 1 and (leaf.end_dim == -1 or leaf.end_dim >= leaf.start_dim):
            continue
        return False
    return True


class LayerChain:
    """The layers of an ``nn.Sequential`` whose backward the chain can take itself."""

    def __init__(self, steps: List[_Step]):
        self.steps = steps
        # per layer, the sizes of one example's input and output in the last capture
        self._sizes: List[_Sizes] = []

    @classmethod
    def of(cls, module: Optional[nn.Module]) -> Optional["LayerChain"]:
        """The chain of ``module``, or None where it is anything but a plain chain of known layers.

        Refused: other containers or models with their own ``forward``, a layer
        of an unknown or subclassed type, a hook anywhere (the model must run
        as written), a layer with parameters that appears twice.
        """
        if module is None or type(module) is not nn.Sequential or _global_hooks():
            return None
        if any(_has_hooks(m) for m in module.modules()):
            return None
        steps, seen = [], set()
        for _, layer in named_leaves(module):
            step = _step_for(layer)
            if step is None:
                return None
            stateful = next(layer.parameters(recurse=False), None) is not None \
                or next(layer.buffers(recurse=False), None) is not None
            if stateful:
                if id(layer) in seen:
                    return None
                seen.add(id(layer))
            steps.append(step)
        return cls(steps) if steps else None

    def capture(self, x: torch.Tensor, rules: Sequence[StructuredRule], weights: Optional[torch.Tensor] = None,
                chunked: Sequence[StructuredRule] = ()) -> Tuple[torch.Tensor, List[Optional[List[torch.Tensor]]]]:
        """Forward, recording what ``rules`` read, then every rule's output cotangents.

        Returns ``f: [n, O]`` and, per rule, one cotangent ``[B, *y.shape]``
        (B = O, one per output, or with ``weights: [O]`` B = 1, the cotangent
        of ``Σ_o weights_o f_o``), stored
        ``[n, B, ...]`` and seen through a transpose, the layout the
        convolution rule reads without a copy (`StructuredRule.examples_first`).
        The rules in ``chunked`` (begun with `StructuredRule.start_chunks`)
        take their cotangents chunk by chunk instead (`add_chunk`), and get None.
        """
        # the parameters require grad, but nothing here is differentiated again (the
        # activations' derivatives are taken with autograd: the plan's captures run
        # this outside inference mode)
        with torch.no_grad():
            try:
                return self._capture(x, rules, weights, chunked)
            finally:
                for step in self.steps:
                    step.release()

    def _capture(self, x, rules, weights, chunked):
        at = {id(rule.module): rule for rule in rules}
        targets = {i for i, step in enumerate(self.steps) if id(step.layer) in at}
        if len(targets) != len(at):
            raise ChainDoesNotApply("a rule's module is not a layer of the chain")
        first = min(targets, default=len(self.steps))
        n = x.shape[0]
        h = x
        shapes: Dict[int, Tuple[int, ...]] = {}
        for i, step in enumerate(self.steps):
            rule = at.get(id(step.layer))
            if rule is not None:
                rule.clear()
                rule.inputs.append(h.detach())
            h = step.forward(h, needs_backward=i > first)
            shapes[i] = tuple(h.shape[1:])
            if rule is not None:
                rule.outputs.append(h.detach())
        self._sizes = [_Sizes(step.input_shape[1:], shapes[i]) for i, step in enumerate(self.steps)]
        f = h.reshape(n, -1)
        o = f.shape[1]
        b = o if weights is None else 1
        chunk = self._chunk_rows(first, b, f.element_size(), f.device, n)
        # a chunked rule's cotangents pass through one buffer of a chunk; the others are kept
        streamed = {i for i in targets if at[id(self.steps[i].layer)] in chunked}
        stores = {i: empty_buffer(((chunk if i in streamed else n), b) + shapes[i], f.dtype, f.device)
                  for i in targets}
        basis = torch.eye(o, dtype=f.dtype, device=f.device) if weights is None \
            else weights.to(dtype=f.dtype, device=f.device).reshape(1, o)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            size = rows.stop - rows.start
            held = {i: store[:size] if i in streamed else store[rows] for i, store in stores.items()}
            g = _seed(basis, size, shapes[len(self.steps) - 1])
            for i in range(len(self.steps) - 1, first - 1, -1):
                if i in targets:
                    if g.values is held[i]:
                        # written in place by the step after: it must stay as it is
                        g.owned = False
                    else:
                        held[i].copy_(g.values.reshape(g.shape) if g.is_split() else g.values)
                    if i in streamed:
                        at[id(self.steps[i].layer)].add_chunk(held[i], rows)
                if i > first:
                    g = self.steps[i].backward(g, rows, held.get(i - 1))
        per_rule = []
        for rule in rules:
            index = next(i for i in targets if self.steps[i].layer is rule.module)
            per_rule.append(None if index in streamed else [stores[index].transpose(0, 1)])
        return f.detach(), per_rule

    def _chunk_rows(self, first: int, seeds: int, elt: int, device: torch.device, n: int) -> int:
        """Examples per chunk of the backward from layer ``first`` on, with ``seeds`` cotangents per example."""
        # Every example's backward is its own: a chunk of examples runs the whole
        # chain while its cotangents are still in the cache.
        widest = max((self._sizes[i].output for i in range(first, len(self.steps))), default=1)
        # each chunk reads every weight its backward multiplies by: a chunk's
        # cotangents should be no smaller than the largest of them (a width-4096
        # Linear's 64 MiB, read again per chunk, made small chunks 10 % slower)
        heaviest = max((step.layer.weight.numel() * step.layer.weight.element_size()
                        for step in self.steps[first + 1:] if isinstance(step, _LinearStep)), default=0)
        return _chunk_examples(widest * seeds * elt, device, n, heaviest)

    def capture_elements(self, rules: Sequence[StructuredRule], chunked: Sequence[StructuredRule], rows: int,
                         dtype: torch.dtype, device: torch.device, gathered: float = 0.0) -> float:
        """Elements of ``dtype`` that `capture` of ``rows`` examples, one cotangent per
        output, holds at its peak: what its forward keeps, the rules' stores (those in
        ``chunked`` a chunk long) and, for one chunk of examples, the largest
        layer backward's cotangents and temporaries, beside ``gathered`` elements per
        example of the chunk that the rules in ``chunked`` gather themselves
        (`StructuredRule.add_chunk`).

        Counted from the layers' sizes in the last capture (the plan's check runs one).
        """
        if not self._sizes:
            raise RuntimeError("the layer chain's sizes are known once it has captured examples")
        elt = torch.empty((), dtype=dtype).element_size()
        at = {id(rule.module) for rule in rules}
        streamed_at = {id(rule.module) for rule in chunked}
        targets = [i for i, step in enumerate(self.steps) if id(step.layer) in at]
        first = min(targets, default=len(self.steps))
        last = len(self.steps) - 1
        seeds = self._sizes[last].output
        chunk = self._chunk_rows(first, seeds, elt, device, rows)
        # oneDNN's blocked layouts (and cuDNN's workspace); PyTorch's float64 CPU convolution has none
        blocked = not (device.type == "cpu" and dtype == torch.float64)
        kept = sum(step.kept_elements(sizes, elt) for step, sizes in zip(self.steps, self._sizes))
        stored = sum(self._sizes[i].output for i in targets if id(self.steps[i].layer) not in streamed_at)
        streamed = sum(self._sizes[i].output for i in targets if id(self.steps[i].layer) in streamed_at)
        # the backward of one chunk, layer by layer from the seeds (broadcast views)
        g, fixed, largest = _Held("broadcast"), 0.0, 0.0
        for i in range(last, first, -1):
            step, sizes = self.steps[i], self._sizes[i]
            fixed += step.fixed_elements(sizes, g)
            allocated, result = step.backward_elements(sizes, g, i - 1 in targets)
            workspace = step.workspace_elements(sizes) if blocked else 0.0
            # the cotangent it reads stays until the step returns
            largest = max(largest, g.elements + allocated + workspace)
            g = result
        return rows * (kept + seeds * stored) + chunk * (seeds * (streamed + largest) + gathered) + seeds * fixed


def _chunk_examples(bytes_per_example: int, device: torch.device, n: int, at_least: int = 0) -> int:
    """Examples per chunk of the chain's backward: a few MiB of cotangents per layer on a CPU,
    and at least ``at_least`` bytes of them."""
    budget = max(_CHUNK_BYTES_CUDA if device.type == "cuda" else _CHUNK_BYTES_CPU, at_least)
    return max(1, min(n, budget // max(bytes_per_example, 1)))


def _seed(basis: torch.Tensor, k: int, example_shape: Tuple[int, ...]) -> _Cotangent:
    """The cotangents of the model's output for ``k`` examples: the rows of ``basis`` (one-hot, or weights)."""
    b, o = basis.shape
    full = (k, b) + example_shape
    return _Cotangent(basis.unsqueeze(0).expand(k, b, o).reshape(full), full)
