"""Structured NTK rules: one small object per kind of layer.

A rule owns the parameters of one module. During a forward pass its hook
records what the rule needs (the layer's inputs ``a`` and its outputs ``y``);
after the batched backward pass gives the cotangents ``g = ∂f_o/∂y`` of every
output ``o``, the rule turns them into *terms*, each one parameter block's
share of the NTK:

* `Pairwise` ``(a: [N, T, K], g: [N, T, O, D])``: a linear map applied at T
  positions, whose term ``Σ_{t,s} (a_it·a_js)(g_it·g_js)`` (DESIGN.md,
  "structured rule for a linear map") is what
  :func:`lazykernel.gram_hadamard_accumulate` computes. A per-example gradient
  is the special case T = 1, ``a = 1``, ``g = ∂f/∂θ``.
* `TokenRows` ``(example, ids, g)``: an embedding's per-example gradient,
  sparse in token ids; its term is ``Σ_v G_i[v]·G_j[v]`` over shared ids
  (:func:`lazykernel.ops.token_gram_accumulate`).

Each term can be produced in one or more *forms* (the pairwise positions form,
or the materialised per-example gradient); the plan chooses per term by cost
(`TermShape`). Adding a layer type means writing one subclass and decorating
it with ``@register_rule(ModuleType)``; nothing else changes. Parameters of
modules without a rule go through the generic per-example-Jacobian rule.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from lazykernel._memory import empty_buffer

_RULES: Dict[Type[nn.Module], Type["StructuredRule"]] = {}

PAIRWISE = "pairwise"
GRADIENT = "gradient"
TOKENS = "tokens"


class RuleDoesNotApply(RuntimeError):
    """A rule's hooked call does not look the way the rule describes (e.g. no batch axis first)."""


class Pairwise(NamedTuple):
    """Operands of a linear map's NTK term: ``a: [N, T, K]``, ``g: [N, T, O, D]``."""

    a: torch.Tensor
    g: torch.Tensor


class GradientOf(NamedTuple):
    """A linear map's per-example gradient ``Σ_t g_t a_tᵀ``, to be formed block by block.

    The operands of `Pairwise`, with the cotangent outputs first as the
    batched backward returns it (``a: [N, T, K]``, ``g: [O, N, T, D]``, so it
    is not copied into the pairwise layout); the engine forms the
    ``[O, N, D', K]`` gradients for slabs of D' output features at a time,
    when their Gram is taken, so one example's full gradient never has to
    exist for all examples at once.
    """

    a: torch.Tensor
    g: torch.Tensor


class TokenRows(NamedTuple):
    """Rows of per-example embedding gradients, one per distinct (example, token id).

    ``example: [M]`` and ``ids: [M]`` (int64), ``g: [M, O, D]``: the gradient of
    output o with respect to row ``ids[m]`` of the table, for example ``example[m]``.
    """

    example: torch.Tensor
    ids: torch.Tensor
    g: torch.Tensor


@dataclass
class TermShape:
    """Per-example size of one term, measured on the probe examples.

    Attributes:
        kind: ``"linear"`` (a map at ``positions`` positions, inputs of ``k``
            features, outputs of ``d``; a per-example gradient has positions 1,
            k 1), ``"conv"`` (the same, but its gradient form is always built
            with the operands, never block by block) or ``"tokens"`` (an
            embedding: ``positions`` token rows per example, ``d`` features,
            ``k`` the vocabulary size).
        forms: the forms the rule can produce for this term.
        matches: tokens only: average number of shared (token, token) row pairs
            between two examples, which is what the sparse form costs.
    """

    kind: str
    positions: int
    k: int
    d: int
    forms: Tuple[str, ...]
    matches: float = 0.0


def register_rule(module_type: Type[nn.Module]):
    """Class decorator: use the decorated rule for modules of ``module_type``.

    Subclasses of ``module_type`` get the rule too when they keep its
    ``forward`` and add no parameters of their own.
    """

    def decorate(rule_cls: Type["StructuredRule"]) -> Type["StructuredRule"]:
        _RULES[module_type] = rule_cls
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> Optional[Type["StructuredRule"]]:
    """The rule class registered for the module's type (or a compatible base), or None."""
    cls = type(module)
    rule_cls = _RULES.get(cls)
    if rule_cls is None:
        for base in cls.__mro__[1:]:
            if base in _RULES and cls.forward is base.forward:
                rule_cls = _RULES[base]
                break
    if rule_cls is None or not rule_cls.supports(module):
        return None
    return rule_cls


class StructuredRule:
    """NTK terms of the selected parameters of one module.

    Args:
        module: the module.
        names: the module's selected parameters, local name -> full model name
            (only names in :meth:`handled` are passed).
    """

    # Cotangents always reach `operands` as ``[O, *y.shape]``. A rule that reads
    # them fastest with the examples outermost sets this; a capture that runs one
    # backward per output then stores them ``[n, O, *y.shape[1:]]`` and passes
    # the transposed view (a convolution with one group then reads each
    # example's ``[O·D, T]`` without a copy).
    examples_first = False
    # A capture that runs a layer step by step in Python (a recurrent layer's) has a
    # backward of many small ops, which PyTorch's backward batched over the outputs
    # runs far slower than one plain pass per output (a GRU of 128 units over 32
    # steps: 3.4x the time), with or without fallbacks: such a rule asks for the latter.
    stepwise = False

    def __init__(self, module: nn.Module, names: Dict[str, str]):
        self.module = module
        self.names = names
        self.inputs: List[torch.Tensor] = []
        self.outputs: List[torch.Tensor] = []
        self._handle = None
        # per-term sizes, measured when the plan was verified
        self.shapes: List[TermShape] = []
        # examples in the batch being captured (set by the plan before each forward)
        self.batch: Optional[int] = None
        # per recorded call, the axis of its input that holds the examples, found
        # by `find_batch_axes` when the plan is verified; empty means axis 0
        self.batch_axes: List[int] = []

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether the rule describes this module's configuration at all."""
        return True

    @classmethod
    def handled(cls, module: nn.Module) -> Dict[str, nn.Parameter]:
        """Local name -> parameter of everything this rule can take over: the module's
        own weight and bias (a subclass's further parameters go to other rules)."""
        return {name: p for name, p in module.named_parameters(recurse=False) if name in ("weight", "bias")}

    # -- capture ---------------------------------------------------------------
    def attach(self) -> None:
        self.inputs, self.outputs = [], []
        self._handle = self.module.register_forward_hook(self._hook_call, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def clear(self) -> None:
        self.inputs, self.outputs = [], []

    def _hook_call(self, module, args, kwargs, output):
        # A layer may be called with its input by keyword, ``layer(input=x)``. A call
        # whose input is not found is not recorded: the plan's check then finds its
        # part of the gradient missing and gives the parameters to the generic rule.
        if not args:
            if "input" not in kwargs:
                return None
            args = (kwargs["input"],)
        return self._hook(module, args, output)

    def _hook(self, module, args, output):
        # No copy of the input is needed: a selected weight requires grad, so
        # autograd itself refuses any in-place change of it after the layer.
        self.inputs.append(args[0].detach())
        # The cotangent is taken with respect to this exact tensor; the clone that
        # flows on protects it from in-place operations that follow the layer.
        self.outputs.append(output)
        return output.clone()

    # -- the rule ----------------------------------------------------------------
    def find_batch_axes(self, n: int) -> None:
        """Settle, from the calls recorded on ``n`` verification examples, which axis of
        each call's input holds the examples (`batch_axes`). Rules that take the
        examples first only, the default, keep axis 0."""
        self.batch_axes = []

    def batch_axis(self, call: int, x: torch.Tensor, n: int) -> int:
        """The examples' axis of call ``call``'s input ``x`` on a batch of ``n``, as verified.

        A layer that saw its examples along another axis on the verification
        examples (a sequence-first ``[T, N, E]``) must see them there again.
        """
        axis = self.batch_axes[call] if call < len(self.batch_axes) else 0
        if x.dim() <= axis or x.shape[axis] != n:
            raise RuleDoesNotApply(
                f"lazykernel: a {type(self.module).__name__} saw an input of shape {tuple(x.shape)} for {n} "
                f"examples; its rule needs the examples along axis {axis}, as on the examples it was checked on")
        return axis

    def term_shapes(self) -> List[TermShape]:
        """Sizes of the terms for the calls recorded now, per example."""
        raise NotImplementedError

    def operands(self, cotangents: List[torch.Tensor], n: int, forms: Optional[Sequence[str]]
                 ) -> List[tuple]:
        """This module's NTK terms (`Pairwise` or `TokenRows`) for the recorded calls.

        Args:
            cotangents: for each recorded call, ``∂f_o/∂y`` stacked over outputs,
                ``[O, *y.shape]``.
            n: number of examples in the batch.
            forms: one form per term (from its `TermShape.forms`); None means
                each term's first form, the one :meth:`per_example_gradients`
                reads.
        """
        raise NotImplementedError

    # A rule whose terms in ``forms`` add up over chunks of examples can take its
    # cotangents a chunk at a time while they are still in the cache, and then
    # needs no store of them for the whole batch (`lazykernel._chain`).
    def takes_chunks(self, forms: Optional[Sequence[str]]) -> bool:
        """Can the terms in ``forms`` be built from the cotangents one chunk of examples at a time?"""
        return False

    def start_chunks(self, n: int, outputs: int) -> None:
        """Begin the terms of ``n`` examples with ``outputs`` outputs, built by `add_chunk`."""
        raise NotImplementedError

    def add_chunk(self, g: torch.Tensor, rows: slice, call: int = 0) -> None:
        """Add the examples ``rows`` (of the batch) from the cotangents of recorded call ``call``,
        ``g: [k, O, *y.shape[1:]]``, examples first."""
        raise NotImplementedError

    def chunk_terms(self) -> List[tuple]:
        """The terms `add_chunk` built, as `operands` would return them; the chunk state is dropped."""
        raise NotImplementedError

    def per_example_gradients(self, terms: List[tuple]) -> Dict[str, torch.Tensor]:
        """``Σ_o ∂f_o(x_i)/∂θ`` for each example i and parameter, from terms in the first form.

        Compared with autograd on a few examples, this catches a module whose
        rows are not laid out batch-first or whose parameters are used outside
        the hooked call, so a rule is never trusted where it does not apply.
        Returns ``[n, *param.shape]`` per full parameter name.
        """
        raise NotImplementedError

    def directional(self, terms: List[tuple], n: int, direction: Dict[str, torch.Tensor]
                    ) -> torch.Tensor:
        """``[n]``: ``⟨Σ_o ∂f_o(x_i)/∂θ, V⟩`` for each example, V given per full parameter name.

        The default contracts :meth:`per_example_gradients`; rules override it
        when the contraction is cheaper without building those gradients.
        """
        total = None
        for name, grad in self.per_example_gradients(terms).items():
            part = grad.reshape(n, -1) @ direction[name].reshape(-1).to(grad.dtype)
            total = part if total is None else total + part
        return total


# -- parameters used directly in a forward -----------------------------------------

class BroadcastParameterRule(StructuredRule):
    """A parameter the forward combines with batched activations (``h + pos``, ``x @ W``).

    While the rule captures, the model runs with the parameter replaced by
    ``θ`` expanded along a new leading batch axis, ``[N, *θ.shape]``: every
    example reads its own copy, with the same values. When the forward lines
    that copy up with the example's own rows (elementwise with ``[N, …]``
    activations, batched matrix products), the cotangent of copy i is example
    i's gradient, for all outputs from the one batched backward pass, instead
    of a per-example Jacobian through the whole model. Uses that mix examples
    or slice the parameter fail the rule check (or the forward itself) and go
    to the generic rule.
    """

    # how many singleton axes may follow the batch axis, so that a parameter that
    # broadcasts against the last axes of an activation ([D] with [N, T, D]) lines up
    max_lead = 3

    def __init__(self, name: str, param: torch.Tensor):
        super().__init__(None, {"": name})
        self.param = param
        self.lead = self.leads()[0]

    def leads(self) -> Tuple[int, ...]:
        """The values of `lead` to try, the likeliest first. A parameter with a leading
        singleton axis (``[1, T, D]`` positions added to ``[N, T, D]``) is most often
        written to broadcast along the batch axis with it: ``lead = -1`` expands that
        axis itself to the batch, ``[N, T, D]``."""
        own = tuple(range(self.max_lead + 1))
        return (-1,) + own if self.param.dim() and self.param.shape[0] == 1 else own

    def attach(self):
        self.clear()

    def detach(self):
        pass

    def tap(self, n: int) -> torch.Tensor:
        """The expanded parameter ``[n, 1 × lead, *θ.shape]`` (``[n, *θ.shape[1:]]`` for
        ``lead = -1``), recorded as this rule's output."""
        leaf = self.param.detach().requires_grad_(True)
        if self.lead < 0:
            expanded = leaf.expand((n,) + tuple(self.param.shape[1:]))
        else:
            shape = (1,) * self.lead + tuple(self.param.shape)
            expanded = leaf.reshape((1,) + shape).expand((n,) + shape)
        self.outputs.append(expanded)
        return expanded

    def term_shapes(self):
        return [TermShape("linear", 1, 1, self.param.numel(), (GRADIENT,))]

    def operands(self, cotangents, n, forms):
        g = cotangents[0]
        o = g.shape[0]
        per_example = g.reshape(o, n, -1).permute(1, 0, 2).unsqueeze(1)     # [n, 1, O, P]
        return [Pairwise(per_example.new_ones(n, 1, 1), per_example.contiguous())]

    def per_example_gradients(self, terms):
        g = terms[0].g
        return {self.names[""]: g.sum(dim=(1, 2)).reshape((g.shape[0],) + tuple(self.param.shape))}


def with_first_copy_changed(copies: torch.Tensor) -> torch.Tensor:
    """A copy of ``copies`` ``[n, ...]`` (one per example) with example 0's changed: the
    plan's check that each example reads only its own copy."""
    changed = copies.detach().clone()
    changed[0] = changed[0] + 0.5 * (changed[0].abs() + 1)
    return changed


# -- linear maps -------------------------------------------------------------------

def _positions(a: torch.Tensor, g: torch.Tensor, n: int, k: int, d: int, module: nn.Module
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a: [n, *, k]`` and cotangent ``g: [O, n, *, d]`` as ``[n, T, k]`` and ``[n, T, O, d]``."""
    if a.dim() < 2 or a.shape[0] != n or g.shape[1] != n:
        raise RuleDoesNotApply(
            f"lazykernel: a {type(module).__name__} saw a batch of {a.shape[0]} "
            f"rows for {n} examples; its rule needs the batch axis first"
        )
    o, t = g.shape[0], math.prod(a.shape[1:-1])
    # the positions from the shape, not numel // k: a layer may have k or d = 0
    return a.reshape(n, t, k), g.reshape(o, n, t, d).permute(1, 2, 0, 3)


def along_positions(a_parts: Sequence[torch.Tensor], g_parts: Sequence[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One term's ``a: [n, T, K]`` and ``g: [n, T, O, D]`` from the parts of several calls,
    their positions side by side (a single call's, as they are)."""
    if len(a_parts) == 1:
        return a_parts[0], g_parts[0]
    return torch.cat(list(a_parts), dim=1), torch.cat(list(g_parts), dim=1)


def examples_axes(inputs: Sequence[torch.Tensor], n: int, leading: int) -> List[int]:
    """Per input, the axis holding the ``n`` examples: 0 where its size is n, else the one
    other axis among the first ``dim - leading`` of size n, else 0 (the rule then refuses
    the call). The plan's check confirms the choice on the verification examples."""
    axes = []
    for x in inputs:
        if x.dim() < 2 or x.shape[0] == n:
            axes.append(0)
            continue
        found = [axis for axis in range(1, x.dim() - leading) if x.shape[axis] == n]
        axes.append(found[0] if len(found) == 1 else 0)
    return axes


def gradient_is_smaller(positions: int, k: int, d: int, outputs: int) -> bool:
    """Is one example's gradient (``O·D·K`` elements) no larger than its pairwise operands (``T·(K + O·D)``)?

    Then the gradient form builds it with the operands; otherwise it is formed
    block by block from them (`GradientOf`).
    """
    return outputs * d * k <= positions * (k + outputs * d)


def _linear_term(a: torch.Tensor, g: torch.Tensor, use_weight: bool, use_bias: bool, form: str
                 ) -> Pairwise:
    """One linear map's term from ``a: [n, T, K]`` and ``g: [n, T, O, D]``.

    The bias is folded in by appending a constant 1 to ``a``; a bias alone
    needs only ``Σ_t g_t``. The gradient form builds ``Σ_t g_t a_tᵀ``, the
    per-example gradient, once per example.
    """
    n = a.shape[0]
    if not use_weight:
        return Pairwise(a.new_ones(n, 1, 1), g.sum(dim=1, keepdim=True).contiguous())
    if use_bias:
        a = torch.cat([a, a.new_ones(n, a.shape[1], 1)], dim=2)
    if form == GRADIENT:
        o, d, k = g.shape[2], g.shape[3], a.shape[2]
        if gradient_is_smaller(a.shape[1], k, d, o):
            per_example = torch.einsum("ntod,ntk->nodk", g, a)
            return Pairwise(a.new_ones(n, 1, 1), per_example.reshape(n, 1, o, -1))
        return GradientOf(a.contiguous(), g.permute(2, 0, 1, 3).contiguous())
    return Pairwise(a.contiguous(), g.contiguous())


def _linear_gradients(term: Pairwise, use_weight: bool, use_bias: bool, k: int
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(weight ``[n, D, k]``, bias ``[n, D]``) gradients summed over outputs, from a pairwise term."""
    total = torch.einsum("ntod,ntk->ndk", term.g, term.a)
    if not use_weight:
        return None, total[:, :, 0]
    return total[:, :, :k], (total[:, :, k] if use_bias else None)


def _linear_shape(positions: int, k: int, d: int, use_weight: bool, use_bias: bool,
                  kind: str = "linear") -> TermShape:
    if not use_weight:
        return TermShape("linear", 1, 1, d, (PAIRWISE,))
    forms = (PAIRWISE, GRADIENT) if positions > 1 else (PAIRWISE,)
    return TermShape(kind, positions, k + int(use_bias), d, forms)


@register_rule(nn.Linear)
class LinearRule(StructuredRule):
    """``y_t = W a_t + b`` at every position t of inputs ``[N, *, d_in]``.

    Per-example weight gradient ``Σ_t g_t a_tᵀ`` and bias gradient ``Σ_t g_t``.
    A module called several times contributes every call's positions.
    """

    def _use(self) -> Tuple[bool, bool]:
        return "weight" in self.names, "bias" in self.names

    def find_batch_axes(self, n):
        # a sequence-first layout ([T, N, E], nn.Transformer's default) has the examples on axis 1
        self.batch_axes = examples_axes(self.inputs, n, leading=1)

    def _batch_first(self, call: int, a: torch.Tensor, g: torch.Tensor, n: int):
        """The call's input and cotangent with the examples moved to the front."""
        axis = self.batch_axis(call, a, n)
        if axis == 0:
            return a, g
        return a.movedim(axis, 0), g.movedim(axis + 1, 1)

    def _stacked(self, cotangents, n):
        d_in, d_out = self.module.in_features, self.module.out_features
        parts = [_positions(*self._batch_first(call, a, g, n), n, d_in, d_out, self.module)
                 for call, (a, g) in enumerate(zip(self.inputs, cotangents))]
        return along_positions([p[0] for p in parts], [p[1] for p in parts])

    def term_shapes(self):
        # every axis but the examples' and the features'
        positions = sum(math.prod(size for i, size in enumerate(a.shape[:-1]) if i != axis)
                        for a, axis in zip(self.inputs, self.batch_axes or [0] * len(self.inputs)))
        return [_linear_shape(positions, self.module.in_features, self.module.out_features, *self._use())]

    def operands(self, cotangents, n, forms):
        a, g = self._stacked(cotangents, n)
        form = forms[0] if forms else PAIRWISE
        return [_linear_term(a, g, *self._use(), form)]

    def per_example_gradients(self, terms):
        use_weight, use_bias = self._use()
        weight, bias = _linear_gradients(terms[0], use_weight, use_bias, self.module.in_features)
        grads = {}
        if use_weight:
            grads[self.names["weight"]] = weight
        if use_bias:
            grads[self.names["bias"]] = bias
        return grads

    def directional(self, terms, n, direction):
        use_weight, use_bias = self._use()
        a, g = terms[0]
        # ⟨Σ_t g_t a_tᵀ, V⟩ = Σ_t g_t · (V a_t): no per-example [D, K] gradient is formed
        d_in = self.module.in_features
        if use_weight:
            va = a[..., :d_in] @ direction[self.names["weight"]].t()
            if use_bias:
                va = va + a[..., d_in:] * direction[self.names["bias"]]
        else:
            va = a * direction[self.names["bias"]]
        return torch.einsum("ntod,ntd->n", g, va)


class _ConvRule(StructuredRule):
    """A convolution as a linear map on unfolded patches, one term per group.

    With ``G`` groups, group ``c`` maps the patches of its ``C_in/G`` input
    channels (``K = C_in/G · ∏kernel`` features) at every output position
    (``T = ∏output size``) to its ``C_out/G`` output channels. The weight
    gradient of one example is ``Σ_t g_t a_tᵀ`` per group, the bias gradient
    ``Σ_t g_t``. Padding modes other than zeros are applied before unfolding,
    as the convolution itself does.
    """

    spatial = 0
    # `add_chunk` reads each example's cotangent as one [O·D, T] matrix
    examples_first = True

    @classmethod
    def supports(cls, module):
        return module.transposed is False

    def _use(self) -> Tuple[bool, bool]:
        return "weight" in self.names, "bias" in self.names

    def _patch_features(self) -> int:
        m = self.module
        k = 1
        for size in m.kernel_size:
            k *= size
        return (m.in_channels // m.groups) * k

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, *spatial]`` -> every patch as a strided window of the padded input,
        ``[N, C_in, *kernel, *out]`` (F.unfold's order: channel, then kernel offsets)."""
        m = self.module
        if x.dim() != self.spatial + 2:
            raise RuleDoesNotApply(f"lazykernel: {type(m).__name__} input of shape {tuple(x.shape)} "
                                   "is not batched; its rule needs [N, C, *spatial]")
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        n, c, size = x.shape[0], x.shape[1], x.shape[2:]
        kernel, steps = tuple(m.kernel_size), x.stride()[2:]
        out = tuple((size[i] - m.dilation[i] * (kernel[i] - 1) - 1) // m.stride[i] + 1
                    for i in range(self.spatial))
        if min(out) < 1:
            raise RuleDoesNotApply(f"lazykernel: {type(m).__name__} input of shape {tuple(x.shape)} "
                                   "is smaller than its kernel")
        return x.as_strided(
            (n, c) + kernel + out,
            x.stride()[:2] + tuple(steps[i] * m.dilation[i] for i in range(self.spatial))
            + tuple(steps[i] * m.stride[i] for i in range(self.spatial)))

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, *spatial]`` -> patches ``[N, C_in·∏kernel, T]``, gathered by one copy
        into a buffer of their own."""
        windows = self._windows(x)
        n, c = windows.shape[:2]
        patches = empty_buffer((n, c * math.prod(self.module.kernel_size), math.prod(windows.shape[2 + self.spatial:])),
                               windows.dtype, windows.device)
        patches.view(windows.shape).copy_(windows)
        return patches

    def _groups(self, cotangents, n):
        """Per group: ``a: [n, T, K]`` and ``g: [n, T, O, D]``, all calls stacked along T."""
        m = self.module
        groups, k = m.groups, self._patch_features()
        d = m.out_channels // groups
        per_group = [([], []) for _ in range(groups)]
        for x, g in zip(self.inputs, cotangents):
            if x.shape[0] != n or g.shape[1] != n:
                raise RuleDoesNotApply(f"lazykernel: a {type(m).__name__} saw a batch of {x.shape[0]} "
                                       f"rows for {n} examples; its rule needs the batch axis first")
            patches = self._unfold(x)                       # [n, G·K, T]
            t = patches.shape[2]
            o = g.shape[0]
            patches = patches.reshape(n, groups, k, t).permute(1, 0, 3, 2)   # [G, n, T, K]
            cot = g.reshape(o, n, groups, d, t).permute(2, 1, 4, 0, 3)      # [G, n, T, O, D]
            for c in range(groups):
                per_group[c][0].append(patches[c])
                per_group[c][1].append(cot[c])
        return [along_positions(a, g) for a, g in per_group]

    def term_shapes(self):
        m = self.module
        positions = sum(y[0].numel() // m.out_channels for y in self.outputs)
        # a convolution builds its gradients with its operands, whatever their size (`add_chunk`)
        shape = _linear_shape(positions, self._patch_features(), m.out_channels // m.groups, *self._use(),
                              kind="conv")
        return [shape] * m.groups

    def operands(self, cotangents, n, forms):
        use = self._use()
        if self.takes_chunks(forms):
            self.start_chunks(n, cotangents[0].shape[0])
            for call, (x, g) in enumerate(zip(self.inputs, cotangents)):
                if x.shape[0] != n or g.shape[1] != n:
                    raise RuleDoesNotApply(f"lazykernel: a {type(self.module).__name__} saw a batch of "
                                           f"{x.shape[0]} rows for {n} examples; its rule needs the batch axis first")
                self.add_chunk(g.transpose(0, 1), slice(0, n), call)
            return self.chunk_terms()
        terms = []
        for c, (a, g) in enumerate(self._groups(cotangents, n)):
            terms.append(_linear_term(a, g, *use, forms[c] if forms else PAIRWISE))
        return terms

    # -- the gradient form, built a chunk of examples at a time ---------------------
    def takes_chunks(self, forms):
        return bool(forms) and self._use()[0] and all(form == GRADIENT for form in forms)

    def start_chunks(self, n, outputs):
        self._chunk_state = (n, outputs)
        self._totals: List[Optional[torch.Tensor]] = [None] * self.module.groups
        self._patches: Optional[torch.Tensor] = None

    def add_chunk(self, g, rows, call=0):
        """``[O·D, T] × [T, K+1]`` per example reads the cotangent in its own layout
        (outputs, channels, positions) and the patches with a row of ones, whose
        column of the product is the bias gradient ``Σ_t g_t``. The patches are
        gathered a few MiB of examples at a time into one buffer that is reused,
        so the gather writes memory the GEMM then finds in the cache.
        """
        m = self.module
        n, o = self._chunk_state
        groups, k = m.groups, self._patch_features()
        d = m.out_channels // groups
        width = k + int(self._use()[1])
        x = self.inputs[call]
        windows = self._windows(x[rows])                            # [size, C_in, *kernel, *out]
        size, t = windows.shape[0], math.prod(windows.shape[2 + self.spatial:])
        cot = g.reshape(size, o, groups, d, t)                      # [size, O, G, D, T]
        chunk = _patch_chunk(groups * width * t * x.element_size(), x.device, size)
        if self._patches is None or self._patches.shape[0] < chunk or self._patches.shape[3] != t:
            self._patches = empty_buffer((chunk, groups, width, t), g.dtype, g.device)
            if width > k:
                self._patches[:, :, k].fill_(1.0)
        for c in range(groups):
            if self._totals[c] is None:
                self._totals[c] = empty_buffer((n, o * d, width), g.dtype, g.device)
        by_group = (groups, windows.shape[1] // groups) + tuple(windows.shape[2:])
        for start in range(0, size, chunk):
            part = slice(start, min(size, start + chunk))
            count = part.stop - part.start
            self._patches[:count, :, :k].view((count,) + by_group).copy_(windows[part].view((count,) + by_group))
            target = slice(rows.start + part.start, rows.start + part.stop)
            for c in range(groups):
                gc = cot[part, :, c].reshape(count, o * d, t)
                patches = self._patches[:count, c].transpose(1, 2)                 # [count, T, K+1]
                if call == 0:
                    torch.bmm(gc, patches, out=self._totals[c][target])
                else:
                    self._totals[c][target].baddbmm_(gc, patches)                  # [count, O·D, K+1]

    def chunk_terms(self):
        n, o = self._chunk_state
        totals = self._totals
        self._chunk_state, self._totals, self._patches = None, [], None
        ones = totals[0].new_ones(n, 1, 1)
        # per group, the weight and bias gradients of an example side by side:
        # a Gram over them is the sum of the weight's and the bias's Grams
        return [Pairwise(ones, grad.view(n, 1, o, -1)) for grad in totals]

    def per_example_gradients(self, terms):
        use_weight, use_bias = self._use()
        m = self.module
        n = terms[0].a.shape[0]
        weights, biases = [], []
        for term in terms:
            weight, bias = _linear_gradients(term, use_weight, use_bias, self._patch_features())
            weights.append(weight)
            biases.append(bias)
        grads = {}
        if use_weight:
            grads[self.names["weight"]] = torch.cat(weights, 1).reshape(n, *m.weight.shape)
        if use_bias:
            grads[self.names["bias"]] = torch.cat(biases, 1)
        return grads


def _patch_chunk(bytes_per_example: int, device: torch.device, n: int) -> int:
    """Examples whose patches one chunk of `_ConvRule.add_chunk` gathers: a few MiB on a CPU."""
    budget = (256 << 20) if device.type == "cuda" else (8 << 20)
    return max(1, min(n, budget // max(bytes_per_example, 1)))


@register_rule(nn.Conv1d)
class Conv1dRule(_ConvRule):
    spatial = 1


@register_rule(nn.Conv2d)
class Conv2dRule(_ConvRule):
    spatial = 2


@register_rule(nn.Conv3d)
class Conv3dRule(_ConvRule):
    spatial = 3


class _ConvTransposeRule(StructuredRule):
    """A transposed convolution as a linear map at every *input* position, one term per group.

    Input position ``t`` of group ``c`` sends its ``K = C_in/G`` channels ``a_t``
    through the kernel to the outputs ``stride·t + dilation·κ − padding``. The
    weight gradient of one example is therefore ``Σ_t a_t h_tᵀ`` with ``h_t``
    the cotangent's window over those outputs, ``D = C_out/G · ∏kernel`` values,
    which are the patches a plain convolution with the same stride, dilation
    and padding would unfold from the cotangent. The bias reads the cotangent at
    every output position, not at the input positions: its own term, the
    per-example gradient ``Σ_p g_p``.
    """

    spatial = 0

    @classmethod
    def supports(cls, module):
        return module.transposed is True and module.padding_mode == "zeros"

    def _use(self) -> Tuple[bool, bool]:
        return "weight" in self.names, "bias" in self.names

    def _checked(self, x: torch.Tensor, g: torch.Tensor, n: int) -> None:
        m = self.module
        if x.dim() != self.spatial + 2:
            raise RuleDoesNotApply(f"lazykernel: {type(m).__name__} input of shape {tuple(x.shape)} "
                                   "is not batched; its rule needs [N, C, *spatial]")
        if x.shape[0] != n or g.shape[1] != n:
            raise RuleDoesNotApply(f"lazykernel: a {type(m).__name__} saw a batch of {x.shape[0]} "
                                   f"rows for {n} examples; its rule needs the batch axis first")

    def _cotangent_windows(self, g: torch.Tensor, positions: Tuple[int, ...]) -> torch.Tensor:
        """``g: [O, n, C_out, *out]`` -> the window of every input position,
        ``[O, n, C_out, *kernel, *positions]`` (a strided view of the zero-padded cotangent)."""
        m = self.module
        pad = tuple(m.padding)
        if any(pad):
            g = F.pad(g, tuple(p for size in reversed(pad) for p in (size, size)))
        kernel, steps = tuple(m.kernel_size), g.stride()[3:]
        for axis in range(self.spatial):
            reach = m.stride[axis] * (positions[axis] - 1) + m.dilation[axis] * (kernel[axis] - 1) + 1
            if reach > g.shape[3 + axis]:
                raise RuleDoesNotApply(f"lazykernel: the output of a {type(m).__name__} is shorter than "
                                       "its input positions reach")
        return g.as_strided(
            tuple(g.shape[:3]) + kernel + tuple(positions),
            g.stride()[:3] + tuple(steps[i] * m.dilation[i] for i in range(self.spatial))
            + tuple(steps[i] * m.stride[i] for i in range(self.spatial)))

    def _groups(self, cotangents, n):
        """Per group: ``a: [n, T, K]`` and ``h: [n, T, O, D]``, all calls stacked along T."""
        m = self.module
        groups = m.groups
        k, d = m.in_channels // groups, m.out_channels // groups
        per_group = [([], []) for _ in range(groups)]
        for x, g in zip(self.inputs, cotangents):
            self._checked(x, g, n)
            positions = tuple(x.shape[2:])
            t = math.prod(positions)
            o = g.shape[0]
            a = x.reshape(n, groups, k, t).permute(1, 0, 3, 2)                              # [G, n, T, K]
            h = self._cotangent_windows(g, positions).reshape(o, n, groups, d * math.prod(m.kernel_size), t)
            h = h.permute(2, 1, 4, 0, 3)                                                   # [G, n, T, O, D]
            for c in range(groups):
                per_group[c][0].append(a[c])
                per_group[c][1].append(h[c])
        return [along_positions(a, h) for a, h in per_group]

    def _bias_gradient(self, cotangents, n) -> torch.Tensor:
        """``[n, 1, O, C_out]``: each example's bias gradient, every call and output position summed."""
        total = None
        for x, g in zip(self.inputs, cotangents):
            self._checked(x, g, n)
            part = g.sum(dim=tuple(range(3, g.dim())))                                     # [O, n, C_out]
            total = part if total is None else total + part
        return total.permute(1, 0, 2).unsqueeze(1).contiguous()

    def term_shapes(self):
        m = self.module
        use_weight, use_bias = self._use()
        shapes = []
        if use_weight:
            positions = sum(x[0].numel() // m.in_channels for x in self.inputs)
            d = (m.out_channels // m.groups) * math.prod(m.kernel_size)
            shapes += [_linear_shape(positions, m.in_channels // m.groups, d, True, False)] * m.groups
        if use_bias:
            shapes.append(_linear_shape(1, 1, m.out_channels, False, True))
        return shapes

    def operands(self, cotangents, n, forms):
        use_weight, use_bias = self._use()
        terms = []
        if use_weight:
            for c, (a, h) in enumerate(self._groups(cotangents, n)):
                terms.append(_linear_term(a, h, True, False, forms[c] if forms else PAIRWISE))
        if use_bias:
            bias = self._bias_gradient(cotangents, n)
            terms.append(Pairwise(bias.new_ones(n, 1, 1), bias))
        return terms

    def per_example_gradients(self, terms):
        use_weight, use_bias = self._use()
        m = self.module
        grads = {}
        if use_weight:
            n = terms[0].a.shape[0]
            # per group [n, K, D]: input channels by (output channel, kernel offset), W's own layout
            weights = [torch.einsum("ntod,ntk->nkd", term.g, term.a) for term in terms[:m.groups]]
            grads[self.names["weight"]] = torch.cat(weights, 1).reshape(n, *m.weight.shape)
        if use_bias:
            grads[self.names["bias"]] = terms[-1].g.sum(dim=(1, 2))
        return grads


@register_rule(nn.ConvTranspose1d)
class ConvTranspose1dRule(_ConvTransposeRule):
    spatial = 1


@register_rule(nn.ConvTranspose2d)
class ConvTranspose2dRule(_ConvTransposeRule):
    spatial = 2


@register_rule(nn.ConvTranspose3d)
class ConvTranspose3dRule(_ConvTransposeRule):
    spatial = 3


# -- embeddings ----------------------------------------------------------------------

@register_rule(nn.Embedding)
class EmbeddingRule(StructuredRule):
    """``y_t = E[id_t]``: the per-example gradient of ``E`` is ``Σ_t onehot(id_t) g_tᵀ``.

    Only the rows of the ids an example uses are nonzero, so the term is kept
    sparse: one row per distinct (example, id), and two examples meet only on
    the ids they share. The dense gradient form (``[vocab, dim]`` per example)
    is chosen only when it is cheaper (tiny vocabularies, long sequences).
    Rows of ``padding_idx`` get no gradient.

    Ids without the batch axis (``pos(torch.arange(T))``, or ``[1, T]``), one
    lookup that the forward then broadcasts along the batch, are every example's
    ids: while the rule captures, the lookup's output is expanded to a copy per
    example, ``[N, T, D]``, as `BroadcastParameterRule` expands a parameter, so
    that the batched backward gives each example's cotangent. All examples then
    use the same U distinct rows, so each example's gradient is formed on those
    rows alone, ``[U·D]``, and the term is one Gram of them. Which of the two the
    ids are is decided on the first capture (the plan's check), and the ids of a
    shared lookup must stay the same for every later batch.
    """

    def __init__(self, module: nn.Module, names: Dict[str, str]):
        super().__init__(module, names)
        self.shared: Optional[bool] = None
        # the ids of each shared lookup, as the first capture saw them (then fixed)
        self._shared_ids: List[torch.Tensor] = []
        self._shared_fixed = False
        # the plan's checks of a shared lookup, which record nothing: "perturb" changes
        # example 0's copy (does each example read only its own?), "expand" only expands
        self.trial: Optional[str] = None

    def detach(self) -> None:
        super().detach()
        if self.shared and not self.trial:
            self._shared_fixed = True

    @classmethod
    def supports(cls, module):
        # max_norm rewrites the table during the forward; scale_grad_by_freq and
        # sparse change what the backward reports: the generic rule handles them.
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse

    # -- capture ---------------------------------------------------------------------
    def _hook(self, module, args, output):
        ids = args[0]
        if self.shared is None and self.batch is not None:
            self.shared = ids.dim() == 0 or ids.shape[0] != self.batch
        if not self.shared:
            return super()._hook(module, args, output)
        call = len(self.inputs)
        if not self.trial:
            if call == len(self._shared_ids) and not self._shared_fixed:
                self._shared_ids.append(ids.detach().clone())
            seen = self._shared_ids[call] if call < len(self._shared_ids) else None
            if self.batch is None or seen is None or seen.shape != ids.shape or not torch.equal(seen, ids):
                raise RuleDoesNotApply(f"lazykernel: an Embedding looked up ids {tuple(ids.shape)} for all "
                                       "examples, other than when its rule was checked")
        # one copy per example: the leading axis of [1, T] ids, or a new one for [T]
        lookups = output[0] if ids.dim() >= 2 and ids.shape[0] == 1 else output
        expanded = lookups.unsqueeze(0).expand((self.batch,) + tuple(lookups.shape))
        if self.trial:
            return with_first_copy_changed(expanded) if self.trial == "perturb" else expanded.detach().clone()
        self.inputs.append(ids.detach())
        self.outputs.append(expanded)
        return expanded.clone()

    def _shared_rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the distinct rows ``[U]`` the shared lookups use, padding left out; for every
        position of every call, the index of its row among them or −1 for padding)."""
        # the ids every capture must look up (checked in `_hook`), kept past `clear`
        ids = torch.cat([t.reshape(-1) for t in self._shared_ids]).long()
        padding = self.module.padding_idx
        kept = ids if padding is None else ids[ids != padding]
        unique = torch.unique(kept)
        index = torch.searchsorted(unique, ids)
        if padding is not None:
            index = torch.where(ids == padding, torch.full_like(index, -1), index)
        return unique, index

    # -- the rule ---------------------------------------------------------------------
    def _rows(self, cotangents, n) -> TokenRows:
        m = self.module
        ids_parts, g_parts, ex_parts = [], [], []
        for ids, g in zip(self.inputs, cotangents):
            if ids.dim() < 1 or ids.shape[0] != n or g.shape[1] != n:
                raise RuleDoesNotApply(f"lazykernel: an Embedding saw a batch of {ids.shape[0]} "
                                       f"rows for {n} examples; its rule needs the batch axis first")
            o = g.shape[0]
            flat = ids.reshape(n, -1)
            t = flat.shape[1]
            ids_parts.append(flat.reshape(-1))
            ex_parts.append(torch.arange(n, device=ids.device).repeat_interleave(t))
            g_parts.append(g.reshape(o, n * t, m.embedding_dim).transpose(0, 1))
        ids = torch.cat(ids_parts).long()
        example = torch.cat(ex_parts)
        g = torch.cat(g_parts)
        if m.padding_idx is not None:
            keep = ids != m.padding_idx
            ids, example, g = ids[keep], example[keep], g[keep]
        # one row per distinct (example, id): repeated tokens are summed first
        key = example * m.num_embeddings + ids
        unique, inverse = torch.unique(key, return_inverse=True)
        summed = g.new_zeros((unique.numel(),) + tuple(g.shape[1:])).index_add_(0, inverse, g)
        return TokenRows(unique // m.num_embeddings, unique % m.num_embeddings, summed.contiguous())

    def term_shapes(self):
        m = self.module
        if self.shared:
            return [TermShape("linear", 1, 1, self._shared_rows()[0].numel() * m.embedding_dim, (GRADIENT,))]
        per_example = [ids.reshape(ids.shape[0], -1) for ids in self.inputs]
        flat = torch.cat(per_example, dim=1) if per_example else torch.zeros(1, 0, dtype=torch.long)
        n = flat.shape[0]
        rows = [torch.unique(flat[i][flat[i] != m.padding_idx] if m.padding_idx is not None else flat[i])
                for i in range(n)]
        positions = max((r.numel() for r in rows), default=0)
        # shared ids between distinct probe examples estimate what a pair costs
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j] or [(i, i) for i in range(n)]
        matches = sum(int(torch.isin(rows[i], rows[j]).sum()) for i, j in pairs) / max(len(pairs), 1)
        return [TermShape("tokens", positions, m.num_embeddings, m.embedding_dim,
                          (TOKENS, GRADIENT), matches)]

    def operands(self, cotangents, n, forms):
        if self.shared:
            return [self._shared_term(cotangents, n)]
        rows = self._rows(cotangents, n)
        if forms and forms[0] == GRADIENT:
            m = self.module
            o = rows.g.shape[1]
            dense = rows.g.new_zeros(n, m.num_embeddings, o, m.embedding_dim)
            dense.index_put_((rows.example, rows.ids), rows.g, accumulate=True)
            per_example = dense.permute(0, 2, 1, 3).reshape(n, 1, o, -1)
            return [Pairwise(rows.g.new_ones(n, 1, 1), per_example.contiguous())]
        return [rows]

    def _shared_term(self, cotangents, n) -> Pairwise:
        """Each example's gradient on the U rows the shared lookups use, ``[n, 1, O, U·D]``."""
        d = self.module.embedding_dim
        if len(cotangents) != len(self._shared_ids) or any(g.shape[1] != n for g in cotangents):
            raise RuleDoesNotApply(f"lazykernel: a shared Embedding lookup was called {len(cotangents)} "
                                   f"times for {n} examples, {len(self._shared_ids)} when its rule was checked")
        o = cotangents[0].shape[0]
        g = torch.cat([c.reshape(o, n, -1, d) for c in cotangents], dim=2)        # [O, n, positions, D]
        unique, index = self._shared_rows()
        keep = index >= 0
        compact = g.new_zeros(o, n, unique.numel(), d).index_add_(2, index[keep], g[:, :, keep])
        per_example = compact.permute(1, 0, 2, 3).reshape(n, 1, o, -1)
        return Pairwise(per_example.new_ones(n, 1, 1), per_example.contiguous())

    def per_example_gradients(self, terms):
        m = self.module
        if self.shared:
            g = terms[0].g                                                      # [n, 1, O, U·D]
            unique, _ = self._shared_rows()
            dense = g.new_zeros(g.shape[0], m.num_embeddings, m.embedding_dim)
            dense[:, unique] = g.sum(dim=(1, 2)).reshape(g.shape[0], unique.numel(), m.embedding_dim)
            return {self.names["weight"]: dense}
        rows = terms[0]
        n = int(rows.example.max()) + 1 if rows.example.numel() else 0
        dense = rows.g.new_zeros(n, m.num_embeddings, m.embedding_dim)
        dense.index_put_((rows.example, rows.ids), rows.g.sum(1), accumulate=True)
        return {self.names["weight"]: dense}

    def directional(self, terms, n, direction):
        if self.shared:
            return super().directional(terms, n, direction)
        rows = terms[0]
        picked = direction[self.names["weight"]][rows.ids].to(rows.g.dtype)      # [M, D]
        per_row = torch.einsum("mod,md->m", rows.g, picked)
        return per_row.new_zeros(n).index_add_(0, rows.example, per_row)


# -- normalisation layers' affine parameters -------------------------------------------

class _AffineNormRule(StructuredRule):
    """``y = x̂ ⊙ w + b`` with ``x̂`` the normalised input: per-example gradients, materialised.

    ``∂f/∂w = Σ g ⊙ x̂`` and ``∂f/∂b = Σ g``, summed over the axes the
    parameters are broadcast along. These groups are small (a few per-channel
    vectors), so their per-example gradients are formed directly.
    """

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _param_axes(self, y: torch.Tensor) -> Tuple[int, ...]:
        """Axes of one example's output that the parameters span (the rest are summed)."""
        raise NotImplementedError

    def _order(self) -> List[str]:
        return [local for local in ("weight", "bias") if local in self.names]

    def term_shapes(self):
        size = sum(getattr(self.module, local).numel() for local in self._order())
        return [TermShape("linear", 1, 1, size, (GRADIENT,))]

    # Norms over the last axes (LayerNorm, RMSNorm) may see the examples on another
    # axis (sequence-first inputs); per-channel norms take them first only.
    last_axes = False

    def find_batch_axes(self, n):
        self.batch_axes = (examples_axes(self.inputs, n, leading=self._normalised_axes())
                           if self.last_axes else [])

    def _normalised_axes(self) -> int:
        return 0

    def operands(self, cotangents, n, forms):
        parts = {local: [] for local in self._order()}
        for call, (x, y, g) in enumerate(zip(self.inputs, self.outputs, cotangents)):
            if self.last_axes and x.dim() <= self._normalised_axes():
                raise RuleDoesNotApply(f"lazykernel: a {type(self.module).__name__} saw an input of shape "
                                       f"{tuple(x.shape)}, no axis besides its normalised ones (an unbatched "
                                       "call); its rule needs the examples on an axis before them")
            axis = self.batch_axis(call, x, n) if x.dim() > 1 else 0
            if axis:
                x, y, g = x.movedim(axis, 0), y.movedim(axis, 0), g.movedim(axis + 1, 1)
            if x.shape[0] != n or g.shape[1] != n:
                raise RuleDoesNotApply(f"lazykernel: a {type(self.module).__name__} saw a batch of "
                                       f"{x.shape[0]} rows for {n} examples; its rule needs the batch axis first")
            keep = self._param_axes(y)
            summed = tuple(2 + ax for ax in range(y.dim() - 1) if ax + 1 not in keep)
            if "weight" in parts:
                parts["weight"].append(_sum_over(g * self._normalised(x).to(g.dtype), summed))
            if "bias" in parts:
                parts["bias"].append(_sum_over(g, summed))
        o = cotangents[0].shape[0]
        flat = [torch.stack(p).sum(0).reshape(o, n, -1) for p in parts.values()]
        per_example = torch.cat(flat, dim=2).permute(1, 0, 2).unsqueeze(1)     # [n, 1, O, P]
        return [Pairwise(per_example.new_ones(n, 1, 1), per_example.contiguous())]

    def per_example_gradients(self, terms):
        g = terms[0].g.sum(dim=(1, 2))      # [n, P]
        grads, start = {}, 0
        for local in self._order():
            shape = getattr(self.module, local).shape
            size = getattr(self.module, local).numel()
            grads[self.names[local]] = g[:, start:start + size].reshape(g.shape[0], *shape)
            start += size
        return grads


def _sum_over(t: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    # an empty tuple means no reduction here (torch.sum would reduce everything)
    return t.sum(dim=dims) if dims else t


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    """LayerNorm's ``weight``/``bias`` over its ``normalized_shape`` (the last axes)."""

    last_axes = True

    def _normalised_axes(self):
        return len(self.module.normalized_shape)

    def _normalised(self, x):
        m = self.module
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def _param_axes(self, y):
        k = len(self.module.normalized_shape)
        return tuple(range(y.dim() - k, y.dim()))


@register_rule(nn.GroupNorm)
class GroupNormRule(_AffineNormRule):
    """GroupNorm's per-channel ``weight``/``bias`` (channels on axis 1)."""

    def _normalised(self, x):
        m = self.module
        return F.group_norm(x, m.num_groups, None, None, m.eps)

    def _param_axes(self, y):
        return (1,)


@register_rule(nn.RMSNorm)
class RMSNormRule(_AffineNormRule):
    """RMSNorm's ``weight`` over its ``normalized_shape`` (the last axes):
    ``x̂ = x / √(mean(x²) + eps)`` over those axes (Zhang & Sennrich, 2019)."""

    last_axes = True

    def _normalised_axes(self):
        return len(self.module.normalized_shape)

    def _normalised(self, x):
        m = self.module
        return F.rms_norm(x, m.normalized_shape, None, m.eps)

    def _param_axes(self, y):
        k = len(self.module.normalized_shape)
        return tuple(range(y.dim() - k, y.dim()))


class _InstanceNormRule(_AffineNormRule):
    """InstanceNorm's per-channel ``weight``/``bias`` (``affine=True``), channels on axis 1.

    Each example is normalised with its own statistics per channel (or, in
    eval mode with ``track_running_stats=True``, with the running ones), so
    examples stay independent in either mode. An unbatched input ``[C, *spatial]``
    has no example axis for the rule and goes to the generic rule.
    """

    spatial = 0

    def _normalised(self, x):
        m = self.module
        if x.dim() != self.spatial + 2:
            raise RuleDoesNotApply(f"lazykernel: {type(m).__name__} input of shape {tuple(x.shape)} is not "
                                   "batched; its rule needs [N, C, *spatial]")
        own = m.training or not m.track_running_stats
        # running statistics are only read: with them the input statistics are off, and
        # without them there is nothing to update
        mean = None if own or m.running_mean is None else m.running_mean
        var = None if own or m.running_var is None else m.running_var
        return F.instance_norm(x, mean, var, None, None, use_input_stats=own or mean is None, momentum=0.0,
                               eps=m.eps)

    def _param_axes(self, y):
        return (1,)


@register_rule(nn.InstanceNorm1d)
class InstanceNorm1dRule(_InstanceNormRule):
    spatial = 1


@register_rule(nn.InstanceNorm2d)
class InstanceNorm2dRule(_InstanceNormRule):
    spatial = 2


@register_rule(nn.InstanceNorm3d)
class InstanceNorm3dRule(_InstanceNormRule):
    spatial = 3


class _BatchNormRule(_AffineNormRule):
    """BatchNorm in eval mode: ``x̂ = (x − running_mean)/√(running_var + eps)`` per channel.

    Training-mode BatchNorm couples examples and is refused before any rule runs.
    """

    @classmethod
    def supports(cls, module):
        return module.track_running_stats and module.running_mean is not None

    def _normalised(self, x):
        m = self.module
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = m.running_mean.reshape(shape)
        std = torch.sqrt(m.running_var.reshape(shape) + m.eps)
        return (x - mean) / std

    def _param_axes(self, y):
        return (1,)


@register_rule(nn.BatchNorm1d)
class BatchNorm1dRule(_BatchNormRule):
    pass


@register_rule(nn.BatchNorm2d)
class BatchNorm2dRule(_BatchNormRule):
    pass


@register_rule(nn.BatchNorm3d)
class BatchNorm3dRule(_BatchNormRule):
    pass


@register_rule(nn.PReLU)
class PReLURule(_AffineNormRule):
    """PReLU, ``y = max(0, x) + w ⊙ min(0, x)``: the weight's per-example gradient is
    ``Σ g ⊙ min(0, x)``, per channel (axis 1) or, with one shared slope, over everything."""

    def _normalised(self, x):
        return torch.clamp(x, max=0)

    def _param_axes(self, y):
        return () if self.module.weight.numel() == 1 else (1,)


# -- attention -------------------------------------------------------------------------

class ExplicitForwardRule(StructuredRule):
    """A rule whose module, while it captures, runs `_forward` instead of its own forward:
    the same function written with explicit products, exposing (recording) what the
    module's fused kernels hide."""

    def attach(self):
        self.clear()
        # an instance attribute shadows the class's forward for the capture only
        self._previous = self.module.__dict__.get("forward")
        self.module.forward = self._forward

    def detach(self):
        if getattr(self, "_previous", None) is not None:
            self.module.forward = self._previous
        else:
            self.module.__dict__.pop("forward", None)
        self._previous = None

    def _forward(self, *args, **kwargs):
        raise NotImplementedError


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(ExplicitForwardRule):
    """``nn.MultiheadAttention``: its input and output projections as linear maps.

    The module's own forward hides the projections' outputs, so while the rule
    captures it runs an equivalent forward (the attention of Vaswani et al.,
    2017, with the module's masks) that exposes them. The input projection
    ``[W_q; W_k; W_v]`` is one linear map with ``D = 3E``: in self-attention
    every position feeds all three blocks; when query, key and value differ,
    each position feeds only its own block (the others' cotangents are zero),
    so that every call of the module adds to one per-example gradient. The
    output projection is a second map on the attention's context vectors.
    Configurations the equivalent forward does not describe (separate q/k/v
    weights of other sizes, ``bias_k``, ``add_zero_attn``) use the generic rule.
    """

    @classmethod
    def supports(cls, module):
        return (module._qkv_same_embed_dim and module.in_proj_weight is not None
                and module.bias_k is None and not module.add_zero_attn)

    @classmethod
    def handled(cls, module):
        found = {"in_proj_weight": module.in_proj_weight, "in_proj_bias": module.in_proj_bias,
                 "out_proj.weight": module.out_proj.weight, "out_proj.bias": module.out_proj.bias}
        return {name: p for name, p in found.items() if p is not None}

    def clear(self):
        super().clear()
        self.tags: List[str] = []

    def _record(self, tag: str, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.tags.append(tag)
        self.inputs.append(a.detach())
        self.outputs.append(y)
        return y

    def _forward(self, *args, **kwargs):
        return attention_forward(self.module, self._record, *args, **kwargs)

    def _use(self, prefix: str) -> Tuple[bool, bool]:
        if prefix == "in":
            return "in_proj_weight" in self.names, "in_proj_bias" in self.names
        return "out_proj.weight" in self.names, "out_proj.bias" in self.names

    def _maps(self) -> List[str]:
        return [p for p in ("in", "out") if any(self._use(p))]

    def term_shapes(self):
        e = self.module.embed_dim
        shapes = []
        for prefix in self._maps():
            rows = [a[0].numel() // e for a, tag in zip(self.inputs, self.tags)
                    if (tag == "out") == (prefix == "out")]
            d = 3 * e if prefix == "in" else e
            shapes.append(_linear_shape(sum(rows), e, d, *self._use(prefix)))
        return shapes

    def _stacked(self, prefix: str, cotangents, n):
        e = self.module.embed_dim
        blocks = {"q": 0, "k": 1, "v": 2}
        a_parts, g_parts = [], []
        for a, g, tag in zip(self.inputs, cotangents, self.tags):
            if (tag == "out") != (prefix == "out"):
                continue
            d = 3 * e if tag == "qkv" else e
            a_t, g_t = _positions(a, g, n, e, d, self.module)
            if tag in blocks:
                # this call feeds one block of W_in: the other blocks' cotangents are zero
                padded = g_t.new_zeros(g_t.shape[:3] + (3 * e,))
                padded[..., blocks[tag] * e:(blocks[tag] + 1) * e] = g_t
                g_t = padded
            a_parts.append(a_t)
            g_parts.append(g_t)
        return along_positions(a_parts, g_parts)

    def operands(self, cotangents, n, forms):
        terms = []
        for index, prefix in enumerate(self._maps()):
            a, g = self._stacked(prefix, cotangents, n)
            terms.append(_linear_term(a, g, *self._use(prefix), forms[index] if forms else PAIRWISE))
        return terms

    def per_example_gradients(self, terms):
        e = self.module.embed_dim
        names = {"in": ("in_proj_weight", "in_proj_bias"), "out": ("out_proj.weight", "out_proj.bias")}
        grads = {}
        for term, prefix in zip(terms, self._maps()):
            use_weight, use_bias = self._use(prefix)
            weight, bias = _linear_gradients(term, use_weight, use_bias, e)
            if use_weight:
                grads[self.names[names[prefix][0]]] = weight
            if use_bias:
                grads[self.names[names[prefix][1]]] = bias
        return grads


def attention_forward(m: nn.MultiheadAttention, record, query, key, value, key_padding_mask=None,
                      need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """``m(query, key, value, …)`` computed with explicit matrix products.

    Same inputs, outputs and masks as ``nn.MultiheadAttention.forward`` for the
    configurations `MultiheadAttentionRule` supports, batched (``[N, L, E]``, or
    ``[L, N, E]`` unless ``batch_first``) or not (``[L, E]``). ``record(tag, a, y)``,
    if given, sees each projection's input and output in a batched call (tags
    ``"qkv"``, or ``"q"``, ``"k"``, ``"v"``, then ``"out"``) and returns the output
    to use.
    """
    if record is None:
        def record(tag, a, y):
            return y
    if query.dim() == 2:
        return _unbatched_attention(m, query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise RuleDoesNotApply(f"lazykernel: MultiheadAttention takes query, key and value of 3 axes (batched) "
                               f"or 2 (one sequence), not {query.dim()}, {key.dim()} and {value.dim()}")
    if m.training and m.dropout > 0:
        raise RuleDoesNotApply("lazykernel: MultiheadAttention with active dropout")
    if is_causal and attn_mask is None:
        raise RuntimeError("MultiheadAttention: is_causal needs attn_mask as well")
    self_attention = query is key and key is value
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, heads = m.embed_dim, m.num_heads
    w, b = m.in_proj_weight, m.in_proj_bias
    if self_attention:
        q, k, v = record("qkv", query, F.linear(query, w, b)).chunk(3, dim=-1)
    else:
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        q = record("q", query, F.linear(query, wq, bq))
        k = record("k", key, F.linear(key, wk, bk))
        v = record("v", value, F.linear(value, wv, bv))
    n, length, _ = q.shape
    source = k.shape[1]
    hd = e // heads
    q = q.reshape(n, length, heads, hd).transpose(1, 2)
    k = k.reshape(n, source, heads, hd).transpose(1, 2)
    v = v.reshape(n, source, heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) * (1.0 / hd ** 0.5)
    mask = _attention_mask(attn_mask, key_padding_mask, n, heads, length, source, scores.dtype)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    context = (weights @ v).transpose(1, 2).reshape(n, length, e)
    out = record("out", context, F.linear(context, m.out_proj.weight, m.out_proj.bias))
    out = out.clone()
    if not m.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, (weights.mean(dim=1) if average_attn_weights else weights)


def _unbatched_attention(m: nn.MultiheadAttention, query, key, value, key_padding_mask, need_weights, attn_mask,
                         average_attn_weights, is_causal):
    """`attention_forward` of one ``[L, E]`` sequence (keys ``[S, E]``, ``key_padding_mask: [S]``,
    ``attn_mask: [L, S]`` or ``[heads, L, S]``), as a batch of one.

    Nothing is recorded: such a call belongs to no example of a batch, so a rule
    that needs its projections' inputs per example leaves it to the generic rule
    (the plan's check finds it missing).
    """
    if key.dim() != 2 or value.dim() != 2:
        raise RuleDoesNotApply(f"lazykernel: MultiheadAttention got an unbatched query (2 axes) with key and "
                               f"value of {key.dim()} and {value.dim()} axes; all three must have 2")
    axis = 0 if m.batch_first else 1
    q = query.unsqueeze(axis)
    # the same tensor stays the same tensor: self-attention projects it once
    k = q if key is query else key.unsqueeze(axis)
    v = k if value is key else (q if value is query else value.unsqueeze(axis))
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    out, weights = attention_forward(m, None, q, k, v, key_padding_mask, need_weights, attn_mask,
                                     average_attn_weights, is_causal)
    return out.squeeze(axis), (None if weights is None else weights[0])


@contextlib.contextmanager
def explicit_attention(root: Optional[nn.Module]):
    """Within the block, supported attention modules of ``root`` use `attention_forward`.

    torch.func transforms (vmap of per-example Jacobians) have no batching rule
    for the fused attention kernels and fall back to slow loops; the explicit
    products batch well and compute the same function.
    """
    patched = []
    if root is not None:
        for module in root.modules():
            # a subclass with a forward of its own computes something else: left as it is
            if (isinstance(module, nn.MultiheadAttention) and "forward" not in module.__dict__
                    and type(module).forward is nn.MultiheadAttention.forward
                    and MultiheadAttentionRule.supports(module)):
                module.forward = functools.partial(attention_forward, module, None)
                patched.append(module)
    # the fused inference path of transformer layers has no forward-mode or
    # batching rules either; its unfused path computes the same function
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module in patched:
            module.__dict__.pop("forward", None)


def _attention_mask(attn_mask, key_padding_mask, n, heads, length, source, dtype
                    ) -> Optional[torch.Tensor]:
    """Additive ``[n or 1, heads or 1, L, S]`` mask; boolean masks mark positions to ignore."""

    def additive(mask):
        if mask.dtype == torch.bool:
            # out of place: under vmap a per-example mask cannot be written into an unbatched tensor
            ignore, keep = (torch.full((), value, dtype=dtype, device=mask.device) for value in (float("-inf"), 0.0))
            return torch.where(mask, ignore, keep)
        return mask.to(dtype)

    total = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.reshape(1, 1, length, source) if mask.dim() == 2 else mask.reshape(n, heads, length, source)
        total = mask
    if key_padding_mask is not None:
        mask = additive(key_padding_mask).reshape(n, 1, 1, source)
        total = mask if total is None else total + mask
    return total


# the recurrent layers' rules, in a module of their own, register themselves with `register_rule`
importlib.import_module("lazykernel._recurrent")
