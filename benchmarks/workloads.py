"""The models and inputs the benchmarks time, shared by bench_ntk.py and its peers.

Each workload is a PyTorch model in eval mode plus a deterministic input batch,
so that a peer (neural-tangents) can rebuild the same function with the same
weights and be checked against lazykernel on the same examples, by
`relative_difference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
from torch import nn


def make_mlp(width: int, outputs: int, depth: int = 3, d_in: int = 128) -> nn.Sequential:
    """ReLU MLP: ``d_in → width`` (× ``depth`` hidden layers) ``→ outputs``."""
    layers: List[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def make_small_cnn(outputs: int = 10, channels: int = 32) -> nn.Sequential:
    """Two 3×3 convolutions (3 → c → c, padding 1) with ReLU, then a linear map of all pixels.

    Input ``[N, 3, 32, 32]``, output ``[N, outputs]``.
    """
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * 32 * 32, outputs),
    )


def make_myrtle5(width: int = 128, outputs: int = 10) -> nn.Sequential:
    """The 5-layer Myrtle CNN (Shankar et al., 2020, "Neural Kernels Without Tangents").

    conv 3→w, conv w→w, pool, conv w→w, pool, conv w→w, global pool, linear
    w→outputs; every conv is 3×3 with padding 1 and followed by ReLU, every
    pool is a 2×2 average. On ``[N, 3, 32, 32]`` the three stages see 32², 16²
    and 8² pixels; the paper's three final 2×2 pools of an 8×8 map equal one
    global average.
    """
    def conv(c_in: int) -> List[nn.Module]:
        return [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU()]

    return nn.Sequential(
        *conv(3), *conv(width), nn.AvgPool2d(2),
        *conv(width), nn.AvgPool2d(2),
        *conv(width), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(width, outputs),
    )


class TokenTransformer(nn.Module):
    """Token ids ``[N, T]`` → ``[N, outputs]``: embeddings plus learned positions,
    post-norm ``nn.TransformerEncoderLayer`` blocks (ReLU, no dropout), mean over
    positions, a linear head."""

    def __init__(self, vocab: int = 1000, d_model: int = 256, heads: int = 4, d_ff: int = 1024,
                 layers: int = 2, length: int = 32, outputs: int = 10):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.length = length
        self.positions = nn.Parameter(0.02 * torch.randn(length, d_model))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=0.0, batch_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d_model, outputs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # full-length inputs use the parameter whole, as lazykernel's broadcast rule expects
        positions = self.positions if ids.shape[1] == self.length else self.positions[: ids.shape[1]]
        h = self.tokens(ids) + positions
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


@dataclass
class Workload:
    """A named model and input batch; ``x`` is ``[n, *in]``."""

    name: str
    family: str
    description: str
    model: nn.Module
    x: torch.Tensor

    @property
    def n(self) -> int:
        return self.x.shape[0]


def _small_cnn(n: int, outputs: int, generator: torch.Generator) -> Workload:
    model = make_small_cnn(outputs)
    return Workload("cnn-3x32x32", "cnn", "conv 3→32→32 (3×3), ReLU, linear 32768→10",
                    model, torch.randn(n, 3, 32, 32, generator=generator))


def _myrtle(n: int, outputs: int, generator: torch.Generator, width: int = 128) -> Workload:
    model = make_myrtle5(width, outputs)
    return Workload(f"myrtle5-w{width}", "cnn", f"Myrtle-5 CNN, width {width}, 3×32×32",
                    model, torch.randn(n, 3, 32, 32, generator=generator))


def _transformer(n: int, outputs: int, generator: torch.Generator) -> Workload:
    model = TokenTransformer(outputs=outputs)
    ids = torch.randint(0, 1000, (n, 32), generator=generator)
    return Workload("transformer-2x256", "transformer",
                    "2 encoder layers, d 256, 4 heads, ff 1024, T 32, vocab 1000", model, ids)


BUILDERS: Dict[str, Callable[..., Workload]] = {
    "cnn-3x32x32": _small_cnn,
    "myrtle5-w128": _myrtle,
    "transformer-2x256": _transformer,
}

FAMILIES: Dict[str, List[str]] = {
    "cnn": ["cnn-3x32x32", "myrtle5-w128"],
    "transformer": ["transformer-2x256"],
}


def build(name: str, n: int, outputs: int = 10, seed: int = 0) -> Workload:
    """The workload ``name`` with ``n`` examples; weights and inputs depend only on ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    workload = BUILDERS[name](n, outputs, generator)
    workload.model.eval()
    return workload


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far kernel ``a`` is from kernel ``b``: ``max |a − b| / max |b|``, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
