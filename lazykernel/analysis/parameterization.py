"""MLPs and CNNs in standard, NTK and μP parameterization, and the α-scaled model.

Every parameterization here is written as *multipliers*: a weight ``w`` is stored with
entries of order one and used as ``c · w``, with the constant ``c`` held by a
parameter-free :class:`Scale` module. The network is then built from plain
``nn.Linear``/``nn.Conv2d`` layers, so ``lazykernel.ntk`` treats it with its structured
rules, and the NTK it computes is the NTK of the parameterization (gradients with
respect to ``w``, not ``c · w``).

Layer ``l`` with fan-in ``n_{l−1}`` computes ``h_l = σ_w c_l W_l φ(h_{l−1}) + σ_b b_l``:

============  ======================  =====================  ===================  ================
name          init of W, b            c_l, input layer       c_l, hidden/output    learning rate
============  ======================  =====================  ===================  ================
``standard``  N(0, σ_w²/fan_in), 0    1 (σ_w in the init)    1                    η / n
``ntk``       N(0, 1), N(0, 1)        1/√d                   1/√n                 η
``mup``       N(0, 1), N(0, 1)        1/√d                   hidden 1/√n,          η · n
                                                             output 1/n
============  ======================  =====================  ===================  ================

The learning rates are those of :func:`learning_rate`, the ones under which plain
gradient descent has the same dynamics at every width: the NTK of the standard
parameterization grows like n, so its largest stable learning rate falls like 1/n
(Yang & Hu, 2021), and with η / n it stays stable at every width, in the kernel regime.

Biases are used as ``σ_b b_l``, except the μP output bias, used as ``σ_b b / √n``:
with the learning rate η·n it then moves by O(1) per step as every μP bias does
(see ``_bias_multiplier``).

``ntk`` is the parameterization of Jacot et al. (2018); ``mup`` is the Maximal Update
Parameterization of Yang & Hu (2021, "Tensor Programs IV: Feature Learning in
Infinite-Width Neural Networks", Table 3) moved by their abc-symmetry
``(a, b, c) → (a + 1/2, b − 1/2, c − 1)`` so that all weights start at N(0, 1); for one
hidden layer it is the mean-field parameterization. Use :func:`learning_rate` for the
width-dependent learning rate.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.func import functional_call

__all__ = ["PARAMETERIZATIONS", "Scale", "mlp", "cnn", "reparameterize", "learning_rate", "AlphaScaled"]

PARAMETERIZATIONS = ("standard", "ntk", "mup")



class Erf(nn.Module):
    """``erf(x)``, the activation whose infinite-width kernels have closed forms (Williams, 1997)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


class Scale(nn.Module):
    """Multiply by a constant: the multiplier of a parameterization (no parameters)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.6g}"


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def _check_sigmas(sigma_w: float, sigma_b: float) -> None:
    # written so that NaN fails too; a σ_b < 0 would silently mean "no biases"
    if not (sigma_w > 0 and math.isfinite(sigma_w)) or not (sigma_b >= 0 and math.isfinite(sigma_b)):
        raise ValueError(f"need a finite sigma_w > 0 and a finite sigma_b ≥ 0 (0: no biases), got {sigma_w} "
                         f"and {sigma_b}")


_ACTIVATIONS = {"relu": nn.ReLU, "erf": Erf, "identity": nn.Identity, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {tuple(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def _multiplier(parameterization: str, fan_in: int, width: int, is_output: bool, is_input: bool) -> float:
    if parameterization == "standard":
        return 1.0
    if is_input:
        return 1.0 / math.sqrt(fan_in)
    if parameterization == "mup" and is_output:
        return 1.0 / width
    return 1.0 / math.sqrt(fan_in)


def _layer(make, fan_in: int, width: int, parameterization: str, sigma_w: float, sigma_b: float,
           is_input: bool, is_output: bool, generator: Optional[torch.Generator]) -> nn.Module:
    """One affine layer ``σ_w c W h + σ_b b`` as [Scale, layer, Scale] around a plain layer.

    ``σ_b c' (W (σ_w c / σ_b) h + b)`` equals ``σ_w c W h + σ_b b`` and keeps the NTK of
    both W and b right, since the outer constant multiplies both gradients.
    """
    bias = sigma_b > 0
    layer = make(bias)
    with torch.no_grad():
        if parameterization == "standard":
            layer.weight.normal_(0.0, sigma_w / math.sqrt(fan_in), generator=generator)
            if bias:
                layer.bias.zero_()
            return layer
        layer.weight.normal_(0.0, 1.0, generator=generator)
        if bias:
            layer.bias.normal_(0.0, 1.0, generator=generator)
    c = sigma_w * _multiplier(parameterization, fan_in, width, is_output, is_input)
    if not bias:
        return nn.Sequential(Scale(c), layer)
    outer = _bias_multiplier(parameterization, sigma_b, width, is_output)
    return nn.Sequential(Scale(c / outer), layer, Scale(outer))


def _bias_multiplier(parameterization: str, sigma_b: float, width: int, is_output: bool) -> float:
    """The multiplier of a bias stored with entries of order one.

    In μP every bias trains like an input weight, by O(1) per step (Yang et al., 2022,
    "Tensor Programs V", group biases with input weights). With the learning
    rate η·n of the form used here, a multiplier m moves the bias m²·η·n times its
    O(1) gradient: hidden biases, whose gradients are O(1/n), keep m = σ_b, and the
    output bias, whose gradient is O(1), takes m = σ_b/√n. It then starts at
    O(1/√n), which vanishes with width (a zero-initialised readout is also μP).
    """
    if parameterization == "mup" and is_output:
        return sigma_b / math.sqrt(width)
    return sigma_b


def mlp(in_features: int, width: int, out_features: int, *, depth: int = 1,
        parameterization: str = "ntk", activation: str = "relu", sigma_w: float = 1.0,
        sigma_b: float = 0.0, seed: Optional[int] = None) -> nn.Sequential:
    """A fully connected network ``[N, in_features] → [N, out_features]`` with ``depth``
    hidden layers of ``width`` units in the given parameterization (module docstring).

    Args:
        in_features: d, the input dimension. width: n, the hidden width.
        out_features: number of outputs. depth: number of hidden layers (≥ 1).
        parameterization: ``"standard"``, ``"ntk"`` (default) or ``"mup"``.
        activation: ``"relu"`` (default), ``"erf"``, ``"tanh"`` or ``"identity"``.
        sigma_w: weight standard deviation σ_w (default 1). sigma_b: bias σ_b (default 0:
            no biases).
        seed: seed of the initialization (default: the global generator).
    """
    _check_parameterization(parameterization)
    if depth < 1 or width < 1 or in_features < 1 or out_features < 1:
        raise ValueError(f"depth, width, in_features and out_features must be ≥ 1, got {depth}, {width}, "
                         f"{in_features}, {out_features}")
    _check_sigmas(sigma_w, sigma_b)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    layers = []
    fan_in = in_features
    for index in range(depth + 1):
        is_output = index == depth
        fan_out = out_features if is_output else width
        make = (lambda bias, a=fan_in, b=fan_out: nn.Linear(a, b, bias=bias))
        layers.append(_layer(make, fan_in, width, parameterization, sigma_w, sigma_b,
                             index == 0, is_output, generator))
        if not is_output:
            layers.append(_activation(activation))
        fan_in = fan_out
    return nn.Sequential(*layers)


def cnn(in_channels: int, width: int, out_features: int, *, depth: int = 2, kernel_size: int = 3,
        parameterization: str = "ntk", activation: str = "relu", sigma_w: float = 1.0,
        sigma_b: float = 0.0, seed: Optional[int] = None) -> nn.Sequential:
    """A convolutional network ``[N, in_channels, H, W] → [N, out_features]``: ``depth``
    'same'-padded convolutions with ``width`` channels, global average pooling and a
    linear read-out, in the given parameterization; the fan-in of a convolution is
    ``channels · kernel_size²``, and the width n is the number of channels.
    """
    _check_parameterization(parameterization)
    if depth < 1 or width < 1 or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"need depth ≥ 1, width ≥ 1 and an odd kernel_size, got {depth}, {width}, {kernel_size}")
    if in_channels < 1 or out_features < 1:
        raise ValueError(f"in_channels and out_features must be ≥ 1, got {in_channels} and {out_features}")
    _check_sigmas(sigma_w, sigma_b)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    layers = []
    channels = in_channels
    for index in range(depth):
        make = (lambda bias, a=channels: nn.Conv2d(a, width, kernel_size, padding=kernel_size // 2, bias=bias))
        layers.append(_layer(make, channels * kernel_size ** 2, width, parameterization, sigma_w, sigma_b,
                             index == 0, False, generator))
        layers.append(_activation(activation))
        channels = width
    layers.append(nn.AdaptiveAvgPool2d(1))
    layers.append(nn.Flatten())
    make = (lambda bias: nn.Linear(width, out_features, bias=bias))
    layers.append(_layer(make, width, width, parameterization, sigma_w, sigma_b, False, True, generator))
    return nn.Sequential(*layers)


def reparameterize(model: nn.Sequential, parameterization: str, *, sigma_w: float = 1.0,
                   sigma_b: float = 1.0) -> nn.Sequential:
    """The same function written in another parameterization.

    Each ``nn.Linear``/``nn.Conv2d`` of a standard ``nn.Sequential`` becomes
    [Scale, layer, Scale] with its weight divided by the multiplier ``σ_w c`` and its bias by
    ``σ_b`` (or ``σ_b / √n`` for a μP output layer), so the new model computes exactly
    the same outputs; what changes is the NTK and, with :func:`learning_rate`, the training
    dynamics. The first layer is the input layer, the last one the output layer, and the
    width n is the fan-out of the first layer.

    Args:
        model: an ``nn.Sequential`` of layers, activations and shape-only modules.
        parameterization: ``"ntk"`` or ``"mup"`` (``"standard"`` returns a copy).
        sigma_w, sigma_b: the σ_w, σ_b of the new parameterization (> 0).
    """
    _check_parameterization(parameterization)
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be an nn.Sequential, got {type(model).__name__}")
    if not all(value > 0 and math.isfinite(value) for value in (sigma_w, sigma_b)):
        raise ValueError(f"reparameterize needs finite sigma_w > 0 and sigma_b > 0, got {sigma_w} and {sigma_b}")
    if parameterization == "standard":
        return copy.deepcopy(model)
    positions = [i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not positions:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer to reparameterize")
    _check_reparameterizable(model, positions)
    model = copy.deepcopy(model)
    first = model[positions[0]]
    width = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    layers = list(model)
    for i in positions:
        layer = layers[i]
        fan_in = layer.weight[0].numel()
        c = sigma_w * _multiplier(parameterization, fan_in, width, i == positions[-1], i == positions[0])
        outer = _bias_multiplier(parameterization, sigma_b, width, i == positions[-1])
        with torch.no_grad():
            layer.weight.div_(c)
            if layer.bias is not None:
                layer.bias.div_(outer)
        if layer.bias is None:
            layers[i] = nn.Sequential(Scale(c), layer)
        else:
            layers[i] = nn.Sequential(Scale(c / outer), layer, Scale(outer))
    return nn.Sequential(*layers)


def _check_reparameterizable(model: nn.Sequential, positions: List[int]) -> None:
    """Refuse what the layer-by-layer rewrite would get wrong without a sign: parameters
    outside the top-level Linear/Conv2d layers (nested blocks, Conv1d, norms, embeddings,
    which would keep their scale and shift which layer counts as input and output), a
    layer listed twice (its weight would be divided twice), and computed weights."""
    counted = {id(model[i]) for i in positions}
    listed = [id(m) for m in model]
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) and id(module) not in counted:
            raise ValueError(
                f"reparameterize rewrites the nn.Linear/nn.Conv2d layers listed directly in the "
                f"nn.Sequential, but module {name!r} ({type(module).__name__}) also has parameters; "
                "flatten nested blocks into one nn.Sequential, or build the model with "
                "lazykernel.analysis.mlp / cnn")
    owners: Dict[int, int] = {}
    for i in positions:
        layer = model[i]
        for p in layer.parameters(recurse=False):
            if owners.setdefault(id(p), i) != i:
                raise ValueError(f"layers {owners[id(p)]} and {i} share a parameter: the rewrite would "
                                 "scale it once per layer")
        if listed.count(id(layer)) > 1:
            raise ValueError(f"layer {i} ({type(layer).__name__}) is listed more than once: its weight "
                             "is shared, and the rewrite would scale it once per use")
        if parametrize.is_parametrized(layer) or layer._forward_pre_hooks:
            raise ValueError(f"layer {i} ({type(layer).__name__}) computes its weight (a parametrization "
                             "or a pre-hook such as weight_norm); reparameterize needs plain weights")


def learning_rate(parameterization: str, base_lr: float, width: int) -> float:
    """The learning rate of plain (S)GD that gives width-independent dynamics in the
    parameterization: ``base_lr`` for NTK, ``base_lr · width`` for μP in the all-N(0, 1)
    form used here, and ``base_lr / width`` for standard, whose NTK grows like the width,
    so that a fixed learning rate diverges once the network is wide enough (Yang & Hu,
    2021: the standard parameterization is stable only with a learning rate O(1/width),
    and is then in the kernel regime).

    Args:
        parameterization: ``"standard"``, ``"ntk"`` or ``"mup"``.
        base_lr: the learning rate before the width scaling (finite, > 0).
        width: n, the hidden width (≥ 1).
    """
    _check_parameterization(parameterization)
    if not base_lr > 0 or not math.isfinite(base_lr) or not width >= 1:
        raise ValueError(f"need a finite base_lr > 0 and width ≥ 1, got {base_lr} and {width}")
    if parameterization == "mup":
        return base_lr * width
    if parameterization == "standard":
        return base_lr / width
    return base_lr


class AlphaScaled(nn.Module):
    """The α-scaled model ``f_α(x) = α (f(x; θ) − f(x; θ0))`` of Chizat, Oyallon & Bach
    (2019, "On Lazy Training in Differentiable Programming").

    Trained with learning rate ``η / α²`` (see :meth:`learning_rate`), its outputs move at
    a speed independent of α while θ moves like 1/α, so training becomes lazier (closer
    to its linearization) as α grows. θ0 is a frozen copy of ``model`` taken at
    construction; the trainable parameters are those of ``model``.

    Args:
        model: the network f, mapping ``[N, *in] → [N, *out]``.
        alpha: α > 0.
    """

    def __init__(self, model: nn.Module, alpha: float):
        super().__init__()
        if not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        self.model = model
        self.alpha = float(alpha)
        # Buffers, not parameters: θ0 must not be trained nor counted by ntk().
        self._initial: Dict[str, str] = {}
        for name, value in model.named_parameters():
            key = "theta0_" + name.replace(".", "_")
            self.register_buffer(key, value.detach().clone())
            self._initial[name] = key
        # and the model's buffers (BatchNorm statistics) at θ0, so that they follow .to()
        self._initial_buffers: Dict[str, str] = {}
        for name, value in model.named_buffers():
            key = "buffer0_" + name.replace(".", "_")
            self.register_buffer(key, value.detach().clone())
            self._initial_buffers[name] = key
        # An unregistered copy evaluates f(θ0): hooks that tools (ntk's structured rules)
        # put on the layers of ``model`` must not see this second call. Every tensor
        # it uses is passed in, so its own never matter.
        object.__setattr__(self, "_shadow", copy.deepcopy(model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # f(θ0) in the mode f is in, layer by layer (eval: f_α = 0 at θ0)
        for shadow, layer in zip(self._shadow.modules(), self.model.modules()):
            shadow.training = layer.training
        state = {name: getattr(self, key) for name, key in self._initial.items()}
        # copies, so that a BatchNorm in training mode does not update θ0's statistics
        state.update({name: getattr(self, key).clone() for name, key in self._initial_buffers.items()})
        with torch.no_grad():
            f0 = functional_call(self._shadow, state, (x,))
        return self.alpha * (self.model(x) - f0)

    def learning_rate(self, base_lr: float) -> float:
        """``base_lr / α²``, the learning rate that keeps the function-space speed fixed."""
        if not base_lr > 0 or not math.isfinite(base_lr):
            raise ValueError(f"base_lr must be a finite number > 0, got {base_lr}")
        return base_lr / self.alpha ** 2
