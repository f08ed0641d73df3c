"""Structured NTK rules: one small object per kind of layer.

A rule owns the parameters of one module. During a forward pass its hook
records what the rule needs (the layer's inputs ``a`` and its outputs ``y``);
after the batched backward pass gives the cotangents ``g = ∂f_o/∂y`` of every
output ``o``, the rule turns them into the operands ``(a, g)`` of
:func:`lazykernel.gram_hadamard_accumulate`, whose NTK term is
``Σ_{t,s} (a_it·a_js)(g_it·g_js)`` (DESIGN.md, "structured rule for a linear map").

Adding a layer type means writing one subclass and decorating it with
``@register_rule(ModuleType)``; nothing else changes. Parameters of modules
without a rule go through the generic per-sample-gradient rule.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import nn

_RULES: Dict[Type[nn.Module], Type["StructuredRule"]] = {}


class RuleDoesNotApply(RuntimeError):
    """A rule's hooked call does not look the way the rule describes (e.g. no batch axis first)."""


def register_rule(module_type: Type[nn.Module]):
    """Class decorator: use the decorated rule for modules of ``module_type``."""

    def decorate(rule_cls: Type["StructuredRule"]) -> Type["StructuredRule"]:
        _RULES[module_type] = rule_cls
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> Optional[Type["StructuredRule"]]:
    """The rule class registered for the module's exact type, or None."""
    return _RULES.get(type(module))


class StructuredRule:
    """NTK term of the selected parameters of one module.

    Args:
        module: the module.
        names: the module's selected parameters, local name -> full model name.
    """

    def __init__(self, module: nn.Module, names: Dict[str, str]):
        self.module = module
        self.names = names
        self.inputs: List[torch.Tensor] = []
        self.outputs: List[torch.Tensor] = []
        self._handle = None
        # (T, K, D) per example, as measured when the plan was verified
        self.measured_sizes: Tuple[int, int, int] = (1, 1, 1)

    # -- capture ---------------------------------------------------------------
    def attach(self) -> None:
        self.inputs, self.outputs = [], []
        self._handle = self.module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args, output):
        # No copy of the input is needed: a selected weight requires grad, so
        # autograd itself refuses any in-place change of it after the layer.
        self.inputs.append(args[0].detach())
        # The cotangent is taken with respect to this exact tensor; the clone that
        # flows on protects it from in-place operations that follow the layer.
        self.outputs.append(output)
        return output.clone()

    # -- the rule ----------------------------------------------------------------
    def operands(self, cotangents: List[torch.Tensor], n: int, materialise: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Operands ``a: [N, T, K]``, ``g: [N, T, O, D]`` of this module's NTK term.

        Args:
            cotangents: for each recorded call, ``∂f_o/∂y`` stacked over outputs,
                ``[O, *y.shape]``.
            n: number of examples in the batch.
            materialise: build the per-example gradient (T = 1) instead of the
                pairwise positions form.
        """
        raise NotImplementedError

    def per_example_gradients(self, a: torch.Tensor, g: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``Σ_o ∂f_o(x_i)/∂θ`` for each example i and parameter, from the pairwise operands.

        Compared with autograd on a few examples, this catches a module whose
        rows are not laid out batch-first or whose parameters are used outside
        the hooked call, so a rule is never trusted where it does not apply.
        Returns ``[n, *param.shape]`` per full parameter name.
        """
        raise NotImplementedError

    def directional(self, a: torch.Tensor, g: torch.Tensor, direction: Dict[str, torch.Tensor]
                    ) -> torch.Tensor:
        """``[n]``: ``⟨Σ_o ∂f_o(x_i)/∂θ, V⟩`` for each example, V given per full parameter name.

        The default contracts :meth:`per_example_gradients`; rules override it
        when the contraction is cheaper without building those gradients.
        """
        n = a.shape[0]
        total = a.new_zeros(n)
        for name, grad in self.per_example_gradients(a, g).items():
            total = total + grad.reshape(n, -1) @ direction[name].reshape(-1)
        return total

    def sizes(self) -> Tuple[int, int, int]:
        """(T, K, D) of the pairwise form for the calls recorded now, per example."""
        raise NotImplementedError


@register_rule(nn.Linear)
class LinearRule(StructuredRule):
    """``y_t = W a_t + b`` at every position t of inputs ``[N, *, d_in]``.

    Per-example weight gradient ``Σ_t g_t a_tᵀ`` and bias gradient ``Σ_t g_t``;
    the bias is folded in by appending a constant 1 to ``a``. A module called
    several times contributes every call's positions.
    """

    def _use(self) -> Tuple[bool, bool]:
        return "weight" in self.names, "bias" in self.names

    def _pairwise(self, cotangents: List[torch.Tensor], n: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        d_in = self.module.in_features
        d_out = self.module.out_features
        a_parts, g_parts = [], []
        for a, g in zip(self.inputs, cotangents):
            if a.dim() < 2 or a.shape[0] != n or g.shape[1] != n:
                raise RuleDoesNotApply(
                    f"lazykernel: a {type(self.module).__name__} saw a batch of {a.shape[0]} "
                    f"rows for {n} examples; its rule needs the batch axis first"
                )
            a_parts.append(a.reshape(n, -1, d_in))
            o = g.shape[0]
            g_parts.append(g.reshape(o, n, -1, d_out).permute(1, 2, 0, 3))
        a = torch.cat(a_parts, dim=1) if len(a_parts) > 1 else a_parts[0]
        g = torch.cat(g_parts, dim=1) if len(g_parts) > 1 else g_parts[0]
        return a, g

    def operands(self, cotangents, n, materialise):
        use_weight, use_bias = self._use()
        a, g = self._pairwise(cotangents, n)
        if not use_weight:
            # Only the bias: its gradient Σ_t g_t needs no positions.
            ones = a.new_ones(n, 1, 1)
            return ones, g.sum(dim=1, keepdim=True).contiguous()
        if use_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        if materialise and a.shape[1] > 1:
            per_example = torch.einsum("ntod,ntk->nodk", g, a)
            return a.new_ones(n, 1, 1), per_example.reshape(n, 1, g.shape[2], -1)
        return a.contiguous(), g.contiguous()

    def per_example_gradients(self, a, g):
        use_weight, use_bias = self._use()
        d_in = self.module.in_features
        total = torch.einsum("ntod,ntk->ndk", g, a)
        if not use_weight:
            return {self.names["bias"]: total[:, :, 0]}
        grads = {self.names["weight"]: total[:, :, :d_in]}
        if use_bias:
            grads[self.names["bias"]] = total[:, :, d_in]
        return grads

    def directional(self, a, g, direction):
        use_weight, use_bias = self._use()
        # ⟨Σ_t g_t a_tᵀ, V⟩ = Σ_t g_t · (V a_t): no per-example [D, K] gradient is formed
        d_in = self.module.in_features
        if use_weight:
            va = a[..., :d_in] @ direction[self.names["weight"]].t()
            if use_bias:
                va = va + a[..., d_in:] * direction[self.names["bias"]]
        else:
            va = a * direction[self.names["bias"]]
        return torch.einsum("ntod,ntd->n", g, va)

    def sizes(self):
        use_weight, use_bias = self._use()
        positions = sum(a[0].numel() // self.module.in_features for a in self.inputs)
        if not use_weight:
            return 1, 1, self.module.out_features
        return positions, self.module.in_features + int(use_bias), self.module.out_features
