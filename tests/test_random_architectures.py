"""Every ntk method against the float64 reference on randomly drawn architectures.

Hypothesis draws a small, printable specification (`Arch`): a family of input
(feature vectors, float sequences, token ids, 1-d signals, images), a stack of
blocks built from the layers that have structured rules (Linear on [N, *, d],
Conv1d/Conv2d with every geometry option and their transposes, Embedding, the
norm affines of LayerNorm, RMSNorm, BatchNorm, GroupNorm and InstanceNorm,
MultiheadAttention, TransformerEncoderLayer, RNN/GRU/LSTM) mixed with what must fall back to
the generic rule or be handled around the rules (residual connections, a module
called twice, weights tied between two modules, extra free parameters, frozen
blocks, parameter selections), a head with 1 to 12 outputs, example counts and
an output mode. The model is built from the specification alone, so a failing
example prints everything needed to rebuild it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

import lazykernel
from conftest import METHODS, OUTPUTS, reference_ntk

# Float64 round-off: every kernel entry is a sum of at most a few thousand
# parameter products (or of T² ≤ 36 position pairs times layer widths ≤ 24), and
# each factor went through ≤ ~12 layers of forward and backward arithmetic, each
# step adding a few units of eps = 1.1e-16 relative to the magnitudes involved.
# A linear worst-case bound is ~1e4 · 1e2 · eps ≈ 1e-10 of the largest magnitude
# in the kernel; the tolerance below is that bound. A real mistake (a missing
# position pair, a term counted twice, a wrong mask or scale) moves entries by
# a sizeable fraction of the kernel, six or more orders above it.
RTOL = 1e-10
ATOL_PER_SCALE = 1e-10

ACTIVATIONS = ("tanh", "gelu", "silu", "relu", "identity", "prelu")


def _activation(name: str) -> nn.Module:
    if name == "prelu":
        # one slope shared by every channel, away from 1 so that it matters
        return nn.PReLU(init=0.3)
    return {"tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU,
            "identity": nn.Identity}[name]()


# -- the specification -------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One block of the trunk: a kind and its options (printed as ``kind(k=v, ...)``)."""

    kind: str
    options: Tuple[Tuple[str, object], ...]

    def __getitem__(self, key):
        return dict(self.options)[key]

    def __repr__(self) -> str:
        return f"{self.kind}(" + ", ".join(f"{k}={v!r}" for k, v in self.options) + ")"


def _block(kind: str, **options) -> Block:
    return Block(kind, tuple(options.items()))


@dataclass(frozen=True)
class Arch:
    """A model, its inputs and the parameters whose NTK is taken.

    ``family``: ``vector`` (x: [N, d]), ``sequence`` (x: [N, T, d]), ``tokens``
    (x: [N, T] int64 ids below ``vocab``), ``signal`` (x: [N, C, L]) or ``image``
    (x: [N, C, H, W]). ``in_shape`` is one example's shape. ``blocks`` build the
    trunk in order; ``head`` maps the flattened features to ``outputs`` values,
    shown to the caller with shape ``out_shape``. ``frozen``: blocks whose
    parameters get ``requires_grad=False``. ``select``: ``None``, ``("names",
    seed)`` (a seeded random subset of the parameter names) or ``("predicate",
    which)``.
    """

    family: str
    in_shape: Tuple[int, ...]
    vocab: int
    blocks: Tuple[Block, ...]
    head_bias: bool
    outputs: int
    out_shape: Tuple[int, ...]
    frozen: Tuple[int, ...]
    select: Optional[Tuple[str, object]]
    seed: int


# -- drawing a specification ----------------------------------------------------------

def _conv_geometry(draw, length: int, dims: int):
    """Kernel, stride, padding, dilation (ints or per-axis tuples); padding grows until the
    dilated kernel fits in ``length``."""
    def per_axis(values):
        if dims == 2 and draw(st.booleans()):
            return tuple(draw(st.sampled_from(values)) for _ in range(dims))
        v = draw(st.sampled_from(values))
        return (v,) * dims if dims == 2 else v

    def axes(v):
        return v if isinstance(v, tuple) else (v,) * dims

    k, s, d = per_axis((1, 2, 3)), per_axis((1, 1, 2)), per_axis((1, 1, 2))
    p = per_axis((0, 0, 1, 2))
    ks, ds, ps = axes(k), axes(d), list(axes(p))
    for axis in range(dims):
        span = ds[axis] * (ks[axis] - 1) + 1
        if length + 2 * ps[axis] < span:
            ps[axis] = (span - length + 1) // 2
    p = tuple(ps) if isinstance(p, tuple) else ps[0]
    return k, s, p, d


def _divisors(n: int):
    return [g for g in range(1, n + 1) if n % g == 0]


@st.composite
def _vector_blocks(draw, width: int):
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("linear", "linear", "residual_linear", "shared_linear",
                                     "tied_linear", "layernorm", "rmsnorm", "batchnorm1d", "free_scale")))
        act = draw(st.sampled_from(ACTIVATIONS))
        if kind == "linear":
            out = draw(st.integers(2, 8))
            blocks.append(_block("linear", features=(width, out), bias=draw(st.booleans()), act=act))
            width = out
        elif kind in ("residual_linear", "shared_linear", "tied_linear"):
            blocks.append(_block(kind, width=width, bias=draw(st.booleans()), act=act))
        elif kind == "layernorm":
            blocks.append(_block("layernorm", shape=(width,), affine=draw(st.booleans()),
                                 bias=draw(st.booleans())))
        elif kind == "rmsnorm":
            blocks.append(_block("rmsnorm", shape=(width,), affine=draw(st.booleans())))
        elif kind == "batchnorm1d":
            blocks.append(_block("batchnorm1d", channels=width, affine=draw(st.booleans())))
        else:
            blocks.append(_block("free_scale", shape=(width,)))
    return blocks


@st.composite
def _sequence_blocks(draw, width: int, length: int):
    """Blocks on [N, T, width]; attention needs width divisible by the head count."""
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("linear", "residual_linear", "shared_linear", "layernorm", "rmsnorm",
                                     "attention", "attention", "encoder_layer", "encoder_layer", "recurrent", "recurrent")))
        act = draw(st.sampled_from(ACTIVATIONS))
        if kind == "linear":
            out = draw(st.sampled_from((2, 3, 4, 6)))
            blocks.append(_block("linear", features=(width, out), bias=draw(st.booleans()), act=act))
            width = out
        elif kind in ("residual_linear", "shared_linear"):
            blocks.append(_block(kind, width=width, bias=draw(st.booleans()), act=act))
        elif kind == "layernorm":
            last_two = draw(st.booleans())
            blocks.append(_block("layernorm", shape=(length, width) if last_two else (width,),
                                 affine=draw(st.booleans()), bias=draw(st.booleans())))
        elif kind == "rmsnorm":
            last_two = draw(st.booleans())
            blocks.append(_block("rmsnorm", shape=(length, width) if last_two else (width,),
                                 affine=draw(st.booleans())))
        elif kind == "recurrent":
            hidden, both = draw(st.integers(2, 4)), draw(st.booleans())
            blocks.append(_block("recurrent", cell=draw(st.sampled_from(("rnn", "gru", "lstm"))),
                                 features=(width, hidden), layers=draw(st.integers(1, 2)), bidirectional=both,
                                 bias=draw(st.booleans()), batch_first=draw(st.booleans())))
            width = hidden * (2 if both else 1)
        elif kind == "attention":
            heads = draw(st.sampled_from([h for h in (1, 2, 3) if width % h == 0]))
            blocks.append(_block("attention", width=width, heads=heads, bias=draw(st.booleans()),
                                 batch_first=draw(st.booleans()),
                                 bias_kv=draw(st.sampled_from((False, False, False, True))),
                                 residual=draw(st.booleans())))
        else:
            heads = draw(st.sampled_from([h for h in (1, 2, 3) if width % h == 0]))
            blocks.append(_block("encoder_layer", width=width, heads=heads,
                                 feedforward=draw(st.integers(2, 8)),
                                 norm_first=draw(st.booleans()),
                                 activation=draw(st.sampled_from(("relu", "gelu")))))
    pool = draw(st.sampled_from(("mean", "flatten", "first")))
    blocks.append(_block("pool_positions", how=pool))
    return blocks


@st.composite
def _conv_blocks(draw, channels: int, length: int, dims: int):
    """Blocks on [N, C, L] (dims=1) or [N, C, L, L'] (dims=2); length tracks each axis."""
    lengths = [length] * dims
    blocks = []
    conv = f"conv{dims}d"
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from((conv, conv, conv, f"conv_transpose{dims}d", "residual_conv", "shared_conv",
                                     f"batchnorm{dims}d", "groupnorm", f"instancenorm{dims}d", "pool")))
        act = draw(st.sampled_from(ACTIVATIONS))
        if kind == conv:
            k, s, p, d = _conv_geometry(draw, min(lengths), dims)
            outs = _conv_output_lengths(k, s, p, d, lengths)
            if min(outs) < 1:
                continue
            groups = draw(st.sampled_from(_divisors(channels)))
            out = groups * draw(st.integers(1, 3))
            blocks.append(_block(conv, channels=(channels, out), kernel=k, stride=s, padding=p,
                                 dilation=d, groups=groups, bias=draw(st.booleans()), act=act))
            channels, lengths = out, outs
        elif kind == f"conv_transpose{dims}d":
            k, s, d = (draw(st.sampled_from(v)) for v in ((1, 2, 3), (1, 2), (1, 2)))
            p = draw(st.integers(0, d * (k - 1)))
            extra = draw(st.integers(0, max(s, d) - 1))
            outs = [(n - 1) * s - 2 * p + d * (k - 1) + extra + 1 for n in lengths]
            if not 1 <= min(outs) <= max(outs) <= 12:
                continue
            groups = draw(st.sampled_from(_divisors(channels)))
            out = groups * draw(st.integers(1, 3))
            blocks.append(_block(kind, channels=(channels, out), kernel=k, stride=s, padding=p, dilation=d,
                                 output_padding=extra, groups=groups, bias=draw(st.booleans()), act=act))
            channels, lengths = out, outs
        elif kind in ("residual_conv", "shared_conv"):
            # stride 1 and padding d·(k-1)/2 with odd k keep the shape
            k, d = draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 2)))
            groups = draw(st.sampled_from(_divisors(channels)))
            blocks.append(_block(kind, channels=channels, kernel=k, padding=d * (k - 1) // 2,
                                 dilation=d, groups=groups, bias=draw(st.booleans()), act=act))
        elif kind == f"batchnorm{dims}d":
            blocks.append(_block(kind, channels=channels, affine=draw(st.booleans())))
        elif kind == "groupnorm":
            blocks.append(_block("groupnorm", groups=draw(st.sampled_from(_divisors(channels))),
                                 channels=channels, affine=draw(st.booleans())))
        elif kind == f"instancenorm{dims}d":
            # per-example statistics need more than one position per channel
            if math.prod(lengths) < 2:
                continue
            blocks.append(_block(kind, channels=channels, affine=draw(st.booleans()),
                                 running=draw(st.booleans())))
        elif min(lengths) >= 2:
            how = draw(st.sampled_from(("avg", "max")))
            blocks.append(_block("pool", how=how, dims=dims))
            lengths = [n // 2 for n in lengths]
    blocks.append(_block("flatten"))
    return blocks


def _conv_output_lengths(k, s, p, d, lengths):
    def axes(v):
        return v if isinstance(v, tuple) else (v,) * len(lengths)
    return [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1
            for n, kk, ss, pp, dd in zip(lengths, axes(k), axes(s), axes(p), axes(d))]


@st.composite
def architectures(draw) -> Arch:
    family = draw(st.sampled_from(("vector", "sequence", "tokens", "signal", "image")))
    vocab = 0
    if family == "vector":
        in_shape = (draw(st.integers(2, 6)),)
        blocks = draw(_vector_blocks(in_shape[0]))
    elif family == "sequence":
        length, width = draw(st.integers(1, 6)), draw(st.integers(2, 5))
        in_shape = (length, width)
        model_width = draw(st.sampled_from((2, 4, 6)))
        first = [_block("linear", features=(width, model_width), bias=draw(st.booleans()),
                        act=draw(st.sampled_from(ACTIVATIONS)))]
        blocks = draw(_sequence_blocks(model_width, length))
        blocks = first + blocks
    elif family == "tokens":
        length, vocab = draw(st.integers(1, 6)), draw(st.integers(2, 8))
        in_shape = (length,)
        width = draw(st.sampled_from((2, 4, 6)))
        padding = draw(st.sampled_from((None, None, 0)))
        first = [_block("embedding", vocab=vocab, width=width, padding_idx=padding)]
        if draw(st.booleans()):
            first.append(_block("positions", shape=(length, width)))
        blocks = draw(_sequence_blocks(width, length))
        blocks = first + blocks
    elif family == "signal":
        channels, length = draw(st.integers(1, 3)), draw(st.integers(3, 8))
        in_shape = (channels, length)
        blocks = draw(_conv_blocks(channels, length, 1))
    else:
        channels, length = draw(st.integers(1, 2)), draw(st.integers(3, 6))
        in_shape = (channels, length, length)
        blocks = draw(_conv_blocks(channels, length, 2))
    # the reference costs one backward per (example, output): small counts are
    # drawn more often so that 12 outputs stay affordable
    outputs = draw(st.sampled_from((1, 1, 2, 2, 3, 3, 4, 5, 6, 8, 12)))
    shapes = [(outputs,)] + ([()] if outputs == 1 else []) \
        + [(a, outputs // a) for a in (2, 3) if outputs % a == 0 and outputs > a]
    out_shape = draw(st.sampled_from(shapes))
    with_params = [i for i, b in enumerate(blocks)
                   if b.kind not in ("pool_positions", "pool", "flatten")
                   and not (b.kind in ("layernorm", "batchnorm1d", "batchnorm2d", "groupnorm")
                            and not b["affine"])]
    frozen = tuple(sorted(draw(st.sets(st.sampled_from(with_params), max_size=2)))) if with_params \
        and draw(st.integers(0, 3)) == 0 else ()
    select = draw(st.sampled_from((None, None, "names", "predicate")))
    if select == "names":
        select = ("names", draw(st.integers(0, 2**16)))
    elif select == "predicate":
        select = ("predicate", draw(st.sampled_from(("weights_only", "no_head", "head_and_first"))))
    return Arch(family, in_shape, vocab, tuple(blocks), draw(st.booleans()), outputs, out_shape,
                frozen, select, draw(st.integers(0, 2**16)))


# -- building the model from a specification ------------------------------------------

class Residual(nn.Module):
    """``x + act(inner(x))``."""

    def __init__(self, inner: nn.Module, act: nn.Module):
        super().__init__()
        self.inner, self.act = inner, act

    def forward(self, x):
        return x + self.act(self.inner(x))


class CalledTwice(nn.Module):
    """``inner(act(inner(x)))``: one module, two calls, one set of parameters."""

    def __init__(self, inner: nn.Module, act: nn.Module):
        super().__init__()
        self.inner, self.act = inner, act

    def forward(self, x):
        return self.inner(self.act(self.inner(x)))


class TiedPair(nn.Module):
    """``second(act(first(x)))`` with ``second.weight`` the same Parameter as ``first.weight``."""

    def __init__(self, width: int, bias: bool, act: nn.Module):
        super().__init__()
        self.first, self.second = nn.Linear(width, width, bias=bias), nn.Linear(width, width, bias=bias)
        self.second.weight = self.first.weight
        self.act = act

    def forward(self, x):
        return self.second(self.act(self.first(x)))


class FreeScale(nn.Module):
    """A bare parameter outside any module with a rule: ``x * (1 + s)``."""

    def __init__(self, shape):
        super().__init__()
        self.scale = nn.Parameter(0.5 * torch.randn(shape))

    def forward(self, x):
        return x * (1 + self.scale)


class Positions(nn.Module):
    """A learned positional table added to [N, T, d] embeddings."""

    def __init__(self, shape):
        super().__init__()
        self.table = nn.Parameter(0.5 * torch.randn(shape))

    def forward(self, x):
        return x + self.table


class SelfAttention(nn.Module):
    """Self-attention on batch-first [N, T, d], transposing for a sequence-first module."""

    def __init__(self, attention: nn.MultiheadAttention, residual: bool):
        super().__init__()
        self.attention, self.residual = attention, residual

    def forward(self, x):
        h = x if self.attention.batch_first else x.transpose(0, 1)
        h = self.attention(h, h, h, need_weights=False)[0]
        h = h if self.attention.batch_first else h.transpose(0, 1)
        return x + h if self.residual else h


class Recurrent(nn.Module):
    """A recurrent layer on [N, T, d] returning its whole output sequence, batch-first or not."""

    def __init__(self, b: "Block"):
        super().__init__()
        cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[b["cell"]]
        self.batch_first = b["batch_first"]
        self.rnn = cls(*b["features"], num_layers=b["layers"], bidirectional=b["bidirectional"], bias=b["bias"],
                       batch_first=self.batch_first)

    def forward(self, x):
        if self.batch_first:
            return self.rnn(x)[0]
        return self.rnn(x.transpose(0, 1))[0].transpose(0, 1)


class PoolPositions(nn.Module):
    """[N, T, d] → [N, d] (mean or first position) or [N, T·d] (flatten)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "mean":
            return x.mean(1)
        if self.how == "first":
            return x[:, 0]
        return x.flatten(1)


class Head(nn.Module):
    """Flattened features → ``outputs`` values, shown as [N, *out_shape]."""

    def __init__(self, features: int, outputs: int, bias: bool, out_shape):
        super().__init__()
        self.linear = nn.Linear(features, outputs, bias=bias)
        self.out_shape = tuple(out_shape)

    def forward(self, x):
        return self.linear(x.flatten(1)).reshape(x.shape[0], *self.out_shape)


def _randomise_norm(norm: nn.Module) -> None:
    """Non-trivial affine values and running statistics, so every term matters."""
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.5 * torch.randn_like(norm.bias))
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(0.3 * torch.randn_like(norm.running_mean))
            norm.running_var.copy_(0.5 + torch.rand_like(norm.running_var))


def _conv(dims: int, b: Block, channels) -> nn.Module:
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    cin, cout = channels
    return cls(cin, cout, b["kernel"], stride=dict(b.options).get("stride", 1),
               padding=b["padding"], dilation=b["dilation"], groups=b["groups"], bias=b["bias"])


def _build_block(b: Block) -> nn.Module:
    kind = b.kind
    if kind == "linear":
        return nn.Sequential(nn.Linear(*b["features"], bias=b["bias"]), _activation(b["act"]))
    if kind == "residual_linear":
        return Residual(nn.Linear(b["width"], b["width"], bias=b["bias"]), _activation(b["act"]))
    if kind == "shared_linear":
        return CalledTwice(nn.Linear(b["width"], b["width"], bias=b["bias"]), _activation(b["act"]))
    if kind == "tied_linear":
        return TiedPair(b["width"], b["bias"], _activation(b["act"]))
    if kind == "free_scale":
        return FreeScale(b["shape"])
    if kind == "layernorm":
        norm = nn.LayerNorm(b["shape"], elementwise_affine=b["affine"], bias=b["bias"])
        _randomise_norm(norm)
        return norm
    if kind in ("batchnorm1d", "batchnorm2d"):
        norm = (nn.BatchNorm1d if kind == "batchnorm1d" else nn.BatchNorm2d)(b["channels"],
                                                                            affine=b["affine"])
        _randomise_norm(norm)
        return norm
    if kind == "groupnorm":
        norm = nn.GroupNorm(b["groups"], b["channels"], affine=b["affine"])
        _randomise_norm(norm)
        return norm
    if kind == "rmsnorm":
        norm = nn.RMSNorm(b["shape"], elementwise_affine=b["affine"])
        _randomise_norm(norm)
        return norm
    if kind in ("instancenorm1d", "instancenorm2d"):
        norm = (nn.InstanceNorm1d if kind == "instancenorm1d" else nn.InstanceNorm2d)(
            b["channels"], affine=b["affine"], track_running_stats=b["running"])
        _randomise_norm(norm)
        return norm
    if kind == "embedding":
        return nn.Embedding(b["vocab"], b["width"], padding_idx=b["padding_idx"])
    if kind == "positions":
        return Positions(b["shape"])
    if kind == "attention":
        mha = nn.MultiheadAttention(b["width"], b["heads"], bias=b["bias"], add_bias_kv=b["bias_kv"],
                                    batch_first=b["batch_first"])
        return SelfAttention(mha, b["residual"])
    if kind == "encoder_layer":
        return nn.TransformerEncoderLayer(b["width"], b["heads"], dim_feedforward=b["feedforward"],
                                          dropout=0.0, activation=b["activation"], batch_first=True,
                                          norm_first=b["norm_first"])
    if kind == "recurrent":
        return Recurrent(b)
    if kind == "pool_positions":
        return PoolPositions(b["how"])
    if kind in ("conv_transpose1d", "conv_transpose2d"):
        cls = nn.ConvTranspose1d if kind == "conv_transpose1d" else nn.ConvTranspose2d
        conv = cls(*b["channels"], b["kernel"], stride=b["stride"], padding=b["padding"],
                   output_padding=b["output_padding"], groups=b["groups"], bias=b["bias"], dilation=b["dilation"])
        return nn.Sequential(conv, _activation(b["act"]))
    if kind in ("conv1d", "conv2d"):
        dims = 1 if kind == "conv1d" else 2
        return nn.Sequential(_conv(dims, b, b["channels"]), _activation(b["act"]))
    if kind in ("residual_conv", "shared_conv"):
        conv = _conv(b["dims"], b, (b["channels"], b["channels"]))
        wrap = Residual if kind == "residual_conv" else CalledTwice
        return wrap(conv, _activation(b["act"]))
    if kind == "pool":
        if b["dims"] == 1:
            return nn.AvgPool1d(2) if b["how"] == "avg" else nn.MaxPool1d(2)
        return nn.AvgPool2d(2) if b["how"] == "avg" else nn.MaxPool2d(2)
    if kind == "flatten":
        return nn.Flatten()
    raise AssertionError(f"unknown block kind {kind!r}")


def _with_dims(arch: Arch):
    """Shape-keeping conv blocks do not know their dimensionality; the family does."""
    dims = 2 if arch.family == "image" else 1
    return tuple(Block(b.kind, b.options + (("dims", dims),)) if b.kind in ("residual_conv", "shared_conv")
                 else b for b in arch.blocks)


def build(arch: Arch) -> nn.Module:
    """The float64 model of ``arch`` in eval mode, its frozen blocks frozen."""
    torch.manual_seed(arch.seed)
    blocks = [_build_block(b) for b in _with_dims(arch)]
    trunk = nn.Sequential(*blocks).double().eval()
    with torch.no_grad():
        features = trunk(example_inputs(arch, 1, arch.seed)).flatten(1).shape[1]
    if tuple(arch.out_shape) == (arch.outputs,):
        # plain layers only: a trunk of them is a layer chain lazykernel differentiates itself
        head = nn.Sequential(nn.Flatten(), nn.Linear(features, arch.outputs, bias=arch.head_bias))
    else:
        head = Head(features, arch.outputs, arch.head_bias, arch.out_shape)
    model = nn.Sequential(trunk, head)
    for index in arch.frozen:
        for p in trunk[index].parameters():
            p.requires_grad_(False)
    return model.double().eval()


def example_inputs(arch: Arch, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if arch.family == "tokens":
        return torch.randint(0, arch.vocab, (n, *arch.in_shape), generator=gen)
    return torch.randn((n, *arch.in_shape), generator=gen, dtype=torch.float64)


class WeightsOnly:
    def __call__(self, name, param):
        return not name.endswith("bias")

    def __repr__(self):
        return "WeightsOnly()"


class NotHead:
    def __call__(self, name, param):
        return not name.startswith("1.")

    def __repr__(self):
        return "NotHead()"


class HeadAndFirstBlock:
    def __call__(self, name, param):
        return name.startswith("1.") or name.startswith("0.0.")

    def __repr__(self):
        return "HeadAndFirstBlock()"


def selection(arch: Arch, model: nn.Module):
    """The ``params=`` argument of ``arch``: None, a list of names or a predicate."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if arch.select is None:
        return None
    kind, value = arch.select
    if kind == "names":
        rng = random.Random(value)
        chosen = [n for n in trainable if rng.random() < 0.5] or [rng.choice(trainable)]
        return chosen
    return {"weights_only": WeightsOnly(), "no_head": NotHead(),
            "head_and_first": HeadAndFirstBlock()}[value]


def _selected(model: nn.Module, params) -> list:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return [n for n, _ in named]
    if callable(params):
        return [n for n, p in named if params(n, p)]
    return [n for n, _ in named if n in set(params)]


# -- the property -------------------------------------------------------------------

@st.composite
def calls(draw):
    n1 = draw(st.integers(1, 5))
    n2 = draw(st.sampled_from((None, None, 1, 2, 3, 4, 5)))
    return n1, n2, draw(st.sampled_from(OUTPUTS))


def _mismatch(result: torch.Tensor, ref: torch.Tensor) -> Optional[str]:
    if result.dtype != torch.float64:
        return f"dtype {result.dtype}"
    if tuple(result.shape) != tuple(ref.shape):
        return f"shape {tuple(result.shape)}, expected {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    err = (result - ref).abs()
    allowed = ATOL_PER_SCALE * scale + RTOL * ref.abs()
    if not torch.isfinite(result).all() or (err > allowed).any():
        return f"max abs error {err.max().item():.3e} (kernel scale {scale:.3e})"
    return None


@settings(max_examples=200, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(arch=architectures(), call=calls())
def test_every_method_matches_the_float64_reference_on_random_architectures(arch, call):
    n1, n2, output = call
    model = build(arch)
    params = selection(arch, model)
    names = _selected(model, params)
    assume(names)  # everything selected was frozen: ntk rightly refuses, tested elsewhere
    x1 = example_inputs(arch, n1, arch.seed + 1)
    x2 = None if n2 is None else example_inputs(arch, n2, arch.seed + 2)
    note(f"model:\n{model}")
    note(f"parameters in the kernel: {names}")
    ref = reference_ntk(model, x1, x2, output=output, params_selection=params)
    # A kernel that is exactly zero (every selected parameter cut off by ReLU or
    # max-pooling on these few examples) compares nothing.
    assume(ref.abs().max().item() > 0)
    failures = {}
    for method in METHODS:
        try:
            result = lazykernel.ntk(model, x1, x2, output=output, method=method, params=params)
        except Exception as error:  # every method must handle every architecture
            failures[method] = f"raised {type(error).__name__}: {error}"
            continue
        problem = _mismatch(result, ref)
        if problem:
            failures[method] = problem
    if failures:
        plan = lazykernel.plan(model, x1, x2, output=output, method="structured", params=params)
        note(f"structured plan:\n{plan}")
    assert not failures, f"methods disagreeing with the reference: {failures}"
