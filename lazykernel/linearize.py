"""The linearized network ``f_lin(x; θ) = f(x; θ0) + J(x; θ0)(θ − θ0)`` as a module.

Training ``f_lin`` is training the network in the lazy regime exactly: its
function-space dynamics under gradient descent are driven by the constant NTK
``Θ(θ0)`` (Lee et al., 2019, "Wide Neural Networks of Any Depth Evolve as
Linear Models Under Gradient Descent").
"""

from __future__ import annotations

import copy
from typing import Dict, List

import torch
from torch import nn

from lazykernel._model import ParamSelection, check_eval_mode, make_adapter
from lazykernel.products import jvp


class LinearizedModel(nn.Module):
    """``f_lin(x; θ) = f(x; θ0) + J(x; θ0)(θ − θ0)`` with trainable ``θ``.

    Build it with :func:`linearize`. Its parameters are the selected parameters θ
    of the network, initialised at θ0 and registered under the network's
    parameter names with ``.`` replaced by ``__``, and ``_`` appended where that
    name is taken by another parameter or an attribute of the module
    (``lin.parameters()`` goes to any torch optimizer); ``lin.theta()`` returns
    them by the network's names.
    θ0 and the network are a private copy taken at construction: later changes
    to the original network do not move the linearization point (for a
    functional model, its tensors, constants included, are copied; ``fn``
    itself is called as given). ``.to()``, ``.double()``, ``.cuda()`` and the
    like convert θ, θ0 and that copy together (a functional ``fn`` must then
    compute where its tensors are).

    ``forward(x)``: ``x: [N, *in]`` → ``[N, *out]``, one JVP (differentiable in θ).
    """

    def __init__(self, model, params: ParamSelection = None):
        super().__init__()
        if isinstance(model, nn.Module):
            check_eval_mode(model)
            frozen = copy.deepcopy(model)
            for p in frozen.parameters():
                p.requires_grad_(False)
            selected = list(make_adapter(model, params).params)
            # Held outside the module tree so that its tensors are neither
            # trained nor listed by lin.parameters().
            self.__dict__["_network"] = frozen
            self._fn = None
            self._constants: Dict[str, torch.Tensor] = {}
            theta0 = {name: p for name, p in frozen.named_parameters() if name in selected}
            for p in theta0.values():
                p.requires_grad_(True)
        else:
            adapter = make_adapter(model, params)
            self.__dict__["_network"] = None
            self._fn = model
            # copies, as θ0 is: a mask or an index tensor the caller later edits in
            # place must not move the linearization
            self._constants = {name: value.clone() for name, value in adapter._constants.items()}
            theta0 = {name: p.detach().clone() for name, p in adapter.params.items()}
        self._names: List[str] = list(theta0)
        self._theta0 = {name: value.detach().clone() for name, value in theta0.items()}
        self._keys: Dict[str, str] = {}
        for name, value in theta0.items():
            key = self._free_key(name)
            self._keys[name] = key
            self.register_parameter(key, nn.Parameter(value.detach().clone()))
        self._function_params = theta0

    def _apply(self, fn, recurse=True):
        # .to(), .double(), .cuda(), ...: the copy of the network, θ0 and the constants
        # live outside the module tree, and θ − θ0 and the JVP need them where θ is
        super()._apply(fn, recurse)
        with torch.no_grad():
            if self._network is not None:
                self._network._apply(fn)
            else:
                self._function_params = {name: fn(value) for name, value in self._function_params.items()}
                self._constants = {name: fn(value) for name, value in self._constants.items()}
            self._theta0 = {name: fn(value) for name, value in self._theta0.items()}
        return self

    def _free_key(self, name: str) -> str:
        """``name`` with ``.`` as ``__``, and ``_`` appended while another parameter or an
        attribute of the module (``theta``, ``training``, ...) already has that name."""
        key = name.replace(".", "__") or "_"
        while hasattr(self, key) or key in self._keys.values():
            key += "_"
        return key

    def theta(self) -> Dict[str, torch.Tensor]:
        """Current θ by the network's parameter names."""
        return {name: getattr(self, self._keys[name]) for name in self._names}

    def theta0(self) -> Dict[str, torch.Tensor]:
        """The linearization point θ0 by the network's parameter names (copies)."""
        return {name: value.clone() for name, value in self._theta0.items()}

    def _model_and_params(self):
        if self._network is not None:
            return self._network, self._names
        merged = dict(self._constants)
        merged.update(self._function_params)
        return self._fn, merged

    def forward(self, *inputs, **keywords) -> torch.Tensor:
        """``f(x; θ0) + J(x; θ0)(θ − θ0)``: ``[N, *out]``, called as the network is
        (``lin(x)``, or ``lin(ids, mask)`` / ``lin(ids=..., mask=...)`` for a network of
        several inputs; a functional ``fn(params, x)`` takes its ``x`` as one argument)."""
        x = _batch_of(inputs, keywords)
        delta = {name: value - self._theta0[name].to(value.device) for name, value in self.theta().items()}
        model, params = self._model_and_params()
        f0, change = jvp(model, x, delta, params=params, method="auto")
        return f0 + change

    def f0(self, *inputs, **keywords) -> torch.Tensor:
        """The network at θ0, ``f(x; θ0)``: ``[N, *out]``, called as `forward` is."""
        x = _batch_of(inputs, keywords)
        model, params = self._model_and_params()
        with torch.no_grad():
            zero = {name: torch.zeros_like(v) for name, v in self._theta0.items()}
            return jvp(model, x, zero, params=params)[0]


def _batch_of(inputs: tuple, keywords: dict):
    """The inputs of a call as the products take them: one tensor, a tuple, or a dict."""
    if inputs and keywords:
        raise ValueError("pass the inputs either all by position or all by keyword: the linearized model "
                         f"got {len(inputs)} positional and keywords {sorted(keywords)}")
    if keywords:
        return keywords
    if not inputs:
        raise ValueError("the linearized model needs the inputs, [N, *in]")
    return inputs[0] if len(inputs) == 1 else inputs


def linearize(model, params: ParamSelection = None) -> LinearizedModel:
    """First-order Taylor expansion of ``model`` in its parameters around their current values.

    Args:
        model: an ``nn.Module`` (in eval mode if it has BatchNorm/Dropout) or a
            torch.func-style ``fn(params, x)``.
        params: which parameters θ are, as in :func:`lazykernel.ntk` (for a
            functional model: the dict of all its tensors, required).

    Returns:
        A :class:`LinearizedModel` whose forward is
        ``f_lin(x; θ) = f(x; θ0) + J(x; θ0)(θ − θ0)`` (Lee et al., 2019), with θ
        trainable and initialised at θ0, so ``f_lin(θ0) = f(θ0)``.
    """
    return LinearizedModel(model, params)
