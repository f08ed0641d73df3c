"""Structured rules for recurrent layers: ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` and their cells.

At every step t a recurrent layer applies two linear maps: ``W_ih x_t + b_ih``
to its input and ``W_hh h_{t-1} + b_hh`` to its previous hidden state. So each
weight is a linear map applied at T positions, and its NTK term is the Linear
rule's, ``Σ_{t,s} (a_t·a'_s)(g_t·g'_s)`` (the recurrent NTK of Alemohammad et
al., 2021, "The Recurrent Neural Tangent Kernel", computed exactly at finite
width). The fused kernels PyTorch runs hide the gates, so while a rule
captures, the layer runs an equivalent forward written with explicit products
(`recurrent_forward`) that records, per layer and direction, the inputs
``x_t``, the previous states ``h_{t-1}`` and the input gates
``G = X W_ihᵀ + b_ih`` as one tensor. The cotangent of ``G`` at step t is the
cotangent of the gates' pre-activation, which ``W_hh h_{t-1}`` also feeds: the
same for both maps, except for a GRU's new-gate block, where the hidden part is
scaled by the reset gate r first (``n = tanh(i_n + r ⊙ (W_hn h + b_hn))``), so
its cotangent is r times the input part's.

LSTMs with ``proj_size`` and packed sequences use the generic rule.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lazykernel.rules import (PAIRWISE, ExplicitForwardRule, RuleDoesNotApply, _linear_gradients, _linear_shape,
                              _linear_term, along_positions, register_rule)

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _cell_mode(cell: nn.Module) -> str:
    if isinstance(cell, nn.LSTMCell):
        return "LSTM"
    if isinstance(cell, nn.GRUCell):
        return "GRU"
    return "RNN_RELU" if cell.nonlinearity == "relu" else "RNN_TANH"


def _step(mode: str, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: Optional[torch.Tensor]
          ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One step from the input gates ``gi`` and hidden gates ``gh``: the new (h, c), and a
    GRU's reset gate r (which scales the hidden part of its new gate)."""
    if mode == "RNN_TANH":
        return torch.tanh(gi + gh), None, None
    if mode == "RNN_RELU":
        return torch.relu(gi + gh), None, None
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c, None
    ir, iz, i_n = gi.chunk(3, dim=-1)
    hr, hz, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(ir + hr)
    z = torch.sigmoid(iz + hz)
    new = torch.tanh(i_n + r * h_n)
    return (1 - z) * new + z * h, None, r


def recurrent_forward(m: nn.RNNBase, record, input, hx=None):
    """``m(input, hx)`` for an ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` (without ``proj_size``),
    computed step by step with explicit products for batched tensors (other calls run
    the module's own forward and record nothing); ``record(layer, direction, x, gi, h_prev,
    resets)`` sees each layer and direction's input ``[N, T, I]``, input gates ``[N, T, G·H]``,
    previous hidden states ``[N, T, H]`` and (GRU) reset gates, and returns the gates to use."""
    if isinstance(input, PackedSequence) or input.dim() != 3 or (m.training and m.dropout > 0
                                                                  and m.num_layers > 1):
        # a call the rule does not describe (packed or unbatched sequences, active dropout)
        # runs as it is, unrecorded: the plan's check finds its part of the gradient
        # missing and gives the parameters to the generic rule
        return type(m).forward(m, input, hx)
    mode = m.mode
    x = input if m.batch_first else input.transpose(0, 1)
    n, length = x.shape[0], x.shape[1]
    directions = 2 if m.bidirectional else 1
    hidden = m.hidden_size
    lstm = mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(m.num_layers * directions, n, hidden)
        c0 = h0 if lstm else None
    elif lstm:
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    for state in (h0, c0):
        if state is not None and tuple(state.shape) != (m.num_layers * directions, n, hidden):
            return type(m).forward(m, input, hx)
    layer_input = x
    last_h, last_c = [], []
    for layer in range(m.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = getattr(m, "weight_ih" + suffix), getattr(m, "weight_hh" + suffix)
            b_ih = getattr(m, "bias_ih" + suffix) if m.bias else None
            b_hh = getattr(m, "bias_hh" + suffix) if m.bias else None
            index = layer * directions + direction
            h, c = h0[index], (c0[index] if lstm else None)
            gi = F.linear(layer_input, w_ih, b_ih)
            steps = range(length - 1, -1, -1) if direction else range(length)
            # the gates are recorded before the steps read them: the recorded tensor is the one used
            previous, resets = [None] * length, [None] * length
            states = [None] * length
            gi = record(layer, direction, layer_input, gi, previous, resets)
            for t in steps:
                previous[t] = h
                h, c, r = _step(mode, gi[:, t], F.linear(h, w_hh, b_hh), h, c)
                resets[t] = r
                states[t] = h
            outputs.append(torch.stack(states, dim=1) if length else x.new_zeros(n, 0, hidden))
            last_h.append(h)
            last_c.append(c)
        layer_input = torch.cat(outputs, dim=-1) if directions > 1 else outputs[0]
    output = layer_input if m.batch_first else layer_input.transpose(0, 1)
    h_n = torch.stack(last_h)
    return output, ((h_n, torch.stack(last_c)) if lstm else h_n)


def cell_forward(m: nn.RNNCellBase, record, input, hx=None):
    """``m(input, hx)`` for an ``nn.RNNCell``, ``nn.GRUCell`` or ``nn.LSTMCell``, with explicit
    products; ``record`` as in `recurrent_forward`, with T = 1."""
    if input.dim() != 2 or (hx is not None and (hx[0] if isinstance(hx, tuple) else hx).dim() != 2):
        # unbatched: run as it is, unrecorded (see `recurrent_forward`)
        return type(m).forward(m, input, hx)
    mode = _cell_mode(m)
    lstm = mode == "LSTM"
    n = input.shape[0]
    if hx is None:
        h = input.new_zeros(n, m.hidden_size)
        c = h if lstm else None
    elif lstm:
        h, c = hx
    else:
        h, c = hx, None
    previous, resets = [h], [None]
    gi = record(0, 0, input.unsqueeze(1), F.linear(input, m.weight_ih, m.bias_ih).unsqueeze(1), previous, resets)
    h, c, r = _step(mode, gi[:, 0], F.linear(h, m.weight_hh, m.bias_hh), h, c)
    resets[0] = r
    return (h, c) if lstm else h


class _RecurrentRule(ExplicitForwardRule):
    """The input and hidden weights of every layer and direction as linear maps over the steps.

    Terms, in order: for each layer and direction with a selected parameter,
    the input map (``weight_ih``, ``bias_ih``) then the hidden map
    (``weight_hh``, ``bias_hh``), each over the steps of every call.
    """

    stepwise = True

    @classmethod
    def handled(cls, module):
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return {name: p for name, p in module.named_parameters(recurse=False) if name.startswith(kinds)}

    def clear(self):
        super().clear()
        # per record: (layer, direction), previous hidden states and reset gates per step
        self.tags: List[Tuple[int, int]] = []
        self.previous: List[list] = []
        self.resets: List[list] = []

    def _record(self, layer, direction, x, gi, previous, resets):
        self.tags.append((layer, direction))
        self.inputs.append(x.detach())
        self.previous.append(previous)
        self.resets.append(resets)
        self.outputs.append(gi)
        return gi

    def _mode(self) -> str:
        raise NotImplementedError

    def _suffixes(self) -> List[Tuple[Tuple[int, int], str]]:
        """(layer, direction) and the parameters' name suffix, in the module's order."""
        raise NotImplementedError

    def _maps(self) -> List[Tuple[Tuple[int, int], str, str, str]]:
        """Per term: (layer, direction), kind ``"ih"``/``"hh"``, and its weight's and bias's local names."""
        maps = []
        for tag, suffix in self._suffixes():
            for kind in ("ih", "hh"):
                weight, bias = f"weight_{kind}{suffix}", f"bias_{kind}{suffix}"
                if weight in self.names or bias in self.names:
                    maps.append((tag, kind, weight, bias))
        return maps

    def _use(self, weight: str, bias: str) -> Tuple[bool, bool]:
        return weight in self.names, bias in self.names

    def _width(self, weight: str) -> int:
        return getattr(self.module, weight).shape[1]

    def term_shapes(self):
        shapes = []
        for tag, kind, weight, bias in self._maps():
            steps = sum(x.shape[1] for x, t in zip(self.inputs, self.tags) if t == tag)
            rows = getattr(self.module, weight).shape[0]
            shapes.append(_linear_shape(steps, self._width(weight), rows, *self._use(weight, bias)))
        return shapes

    def _operands_of(self, tag, kind, weight, cotangents, n):
        """``a: [n, T, K]`` and ``g: [n, T, O, G·H]`` of one map over every call's steps."""
        a_parts, g_parts = [], []
        hidden = getattr(self.module, weight).shape[0] // _GATES[self._mode()]
        for record, (x, gi_bar) in enumerate(zip(self.inputs, cotangents)):
            if self.tags[record] != tag:
                continue
            if x.shape[0] != n or gi_bar.shape[1] != n:
                raise RuleDoesNotApply(f"lazykernel: a {type(self.module).__name__} saw a batch of {x.shape[0]} "
                                       f"rows for {n} examples; its rule needs the batch axis first")
            g = gi_bar.permute(1, 2, 0, 3)                                  # [n, T, O, G·H]
            if kind == "ih":
                a = x
            else:
                a = torch.stack([h.detach() for h in self.previous[record]], dim=1) if x.shape[1] \
                    else x.new_zeros(n, 0, self._width(weight))
                if self._mode() == "GRU" and x.shape[1]:
                    r = torch.stack([r.detach() for r in self.resets[record]], dim=1)    # [n, T, H]
                    g = torch.cat([g[..., :2 * hidden], g[..., 2 * hidden:] * r.unsqueeze(2)], dim=-1)
            a_parts.append(a)
            g_parts.append(g)
        return along_positions(a_parts, g_parts)

    def operands(self, cotangents, n, forms):
        terms = []
        for index, (tag, kind, weight, bias) in enumerate(self._maps()):
            a, g = self._operands_of(tag, kind, weight, cotangents, n)
            terms.append(_linear_term(a, g, *self._use(weight, bias), forms[index] if forms else PAIRWISE))
        return terms

    def per_example_gradients(self, terms):
        grads = {}
        for term, (tag, kind, weight, bias) in zip(terms, self._maps()):
            use_weight, use_bias = self._use(weight, bias)
            w, b = _linear_gradients(term, use_weight, use_bias, self._width(weight))
            if use_weight:
                grads[self.names[weight]] = w
            if use_bias:
                grads[self.names[bias]] = b
        return grads


class _RecurrentLayerRule(_RecurrentRule):
    @classmethod
    def supports(cls, module):
        return getattr(module, "proj_size", 0) == 0 and module.mode in _GATES

    def _forward(self, *args, **kwargs):
        return recurrent_forward(self.module, self._record, *args, **kwargs)

    def _mode(self):
        return self.module.mode

    def _suffixes(self):
        directions = 2 if self.module.bidirectional else 1
        return [((layer, d), f"_l{layer}" + ("_reverse" if d else ""))
                for layer in range(self.module.num_layers) for d in range(directions)]


@register_rule(nn.RNN)
class RNNRule(_RecurrentLayerRule):
    pass


@register_rule(nn.GRU)
class GRURule(_RecurrentLayerRule):
    pass


@register_rule(nn.LSTM)
class LSTMRule(_RecurrentLayerRule):
    pass


class _CellRule(_RecurrentRule):
    """A recurrent cell, called once per step: its calls are the steps."""

    def _forward(self, *args, **kwargs):
        return cell_forward(self.module, self._record, *args, **kwargs)

    def _mode(self):
        return _cell_mode(self.module)

    def _suffixes(self):
        return [((0, 0), "")]


@register_rule(nn.RNNCell)
class RNNCellRule(_CellRule):
    pass


@register_rule(nn.GRUCell)
class GRUCellRule(_CellRule):
    pass


@register_rule(nn.LSTMCell)
class LSTMCellRule(_CellRule):
    pass
