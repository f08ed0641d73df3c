#!/usr/bin/env python
"""What each structured rule buys: lazykernel.ntk with a layer's rule against the generic rule.

For each workload, one layer type is the point: its parameters take their
structured rule (as lazykernel does), or, with that rule unregistered for the
run, the generic per-example Jacobian (what they got before the rule existed).
The two are timed alternately, run for run, in one process, so both medians
come from the same minutes of a shared machine; the kernels are compared
(max |difference| over max |kernel|).

Workloads (float32, seed 0, eval mode, trace kernel Θ(x, x), O = 10 outputs):
  lstm           token-free sequences [N, 32, 16] through nn.LSTM(16, 128), last step, linear head; N = 128
  gru            the same with nn.GRU
  decoder        a DCGAN-shaped decoder: latent 32 → 32×4×4 → two nn.ConvTranspose2d (stride 2) → 8×16×16
                 → Conv2d to 3 channels → linear head; N = 128
  rmsnorm        a 2-block pre-norm transformer with nn.RMSNorm (d = 128, 4 heads, T = 32) on token ids; N = 64
  instancenorm   a CNN on 3×16×16 with affine nn.InstanceNorm2d after each of two 3×3 convolutions; N = 64
  conv3d         a 3-D CNN on 2×8×8×8 (two nn.Conv3d 3×3×3, 16 channels); N = 64
  sequence-first the benchmark transformer's layers in nn.TransformerEncoderLayer's default [T, N, E] layout
                 (d = 256, 4 heads, T = 32); the Linear and LayerNorm rules against the generic rule; N = 128

Example:
    python benchmarks/bench_rules.py --repeats 3 --json benchmarks/results/cpu_rules.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import lazykernel
from lazykernel import rules
from lazykernel.cli import _positive_int
from workloads import TokenTransformer


class _Recurrent(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.rnn = cls(16, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _PreNormBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attention = nn.MultiheadAttention(d, 4, batch_first=True)
        self.feedforward = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.feedforward(self.norm2(x))


class _RMSNormLM(nn.Module):
    def __init__(self, d: int = 128):
        super().__init__()
        self.tokens = nn.Embedding(1000, d)
        self.blocks = nn.Sequential(_PreNormBlock(d), _PreNormBlock(d))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.tokens(ids))).mean(1))


class _SequenceFirstTransformer(TokenTransformer):
    """`workloads.TokenTransformer` with its layers in the default sequence-first layout."""

    def __init__(self, **options):
        super().__init__(**options)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(options["d_model"], options["heads"], options["d_ff"], dropout=0.0)
            for _ in range(options["layers"]))

    def forward(self, ids):
        h = (self.tokens(ids) + self.positions).transpose(0, 1)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=0))


def workloads() -> Dict[str, Tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], Tuple[type, ...], str]]:
    """name -> (model builder, input builder, the layer types whose rules are measured, description)."""
    return {
        "lstm": (lambda: _Recurrent(nn.LSTM), lambda: torch.randn(128, 32, 16), (nn.LSTM,),
                 "nn.LSTM(16, 128) on [128, 32, 16]"),
        "gru": (lambda: _Recurrent(nn.GRU), lambda: torch.randn(128, 32, 16), (nn.GRU,),
                "nn.GRU(16, 128) on [128, 32, 16]"),
        "decoder": (lambda: nn.Sequential(
            nn.Linear(32, 32 * 4 * 4), nn.Unflatten(1, (32, 4, 4)), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16 * 16, 10)),
            lambda: torch.randn(128, 32), (nn.ConvTranspose2d,), "two ConvTranspose2d, latent 32 → 16×16"),
        "rmsnorm": (_RMSNormLM, lambda: torch.randint(0, 1000, (64, 32)), (nn.RMSNorm,),
                    "2 pre-norm blocks with nn.RMSNorm, d = 128, T = 32"),
        "instancenorm": (lambda: nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.InstanceNorm2d(32, affine=True), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.InstanceNorm2d(32, affine=True), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 16 * 16, 10)),
            lambda: torch.randn(64, 3, 16, 16), (nn.InstanceNorm2d,), "two conv + InstanceNorm2d on 3×16×16"),
        "conv3d": (lambda: nn.Sequential(
            nn.Conv3d(2, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 8 * 8 * 8, 10)),
            lambda: torch.randn(64, 2, 8, 8, 8), (nn.Conv3d,), "two Conv3d on 2×8×8×8"),
        "sequence-first": (lambda: _SequenceFirstTransformer(vocab=1000, d_model=256, heads=4, d_ff=1024, layers=2,
                                                             length=32, outputs=10),
                           lambda: torch.randint(0, 1000, (128, 32)), (nn.Linear, nn.LayerNorm),
                           "2 nn.TransformerEncoderLayer, [T, N, E], d = 256, T = 32"),
    }


def _without(types: Tuple[type, ...]):
    """Unregister the rules of ``types`` (for one run); returns a function that restores them."""
    saved = {t: rules._RULES.pop(t) for t in types}

    def restore():
        rules._RULES.update(saved)
    return restore


def measure(name: str, repeats: int) -> dict:
    build, inputs, types, description = workloads()[name]
    torch.manual_seed(0)
    model = build().eval()
    x = inputs()
    groups = lazykernel.plan(model, x).groups
    with_rule = [g.rule for g in groups]
    kernel = lazykernel.ntk(model, x)
    restore = _without(types)
    try:
        without_rule = [g.rule for g in lazykernel.plan(model, x).groups]
        generic = lazykernel.ntk(model, x)
    finally:
        restore()
    difference = float((kernel - generic).abs().max() / kernel.abs().max())
    times: Dict[str, List[float]] = {"rule": [], "generic": []}
    for _ in range(repeats):
        for variant in ("generic", "rule"):
            restore = _without(types) if variant == "generic" else (lambda: None)
            try:
                start = time.perf_counter()
                lazykernel.ntk(model, x)
                times[variant].append(time.perf_counter() - start)
            finally:
                restore()
    rule_s, generic_s = statistics.median(times["rule"]), statistics.median(times["generic"])
    return {"workload": name, "description": description, "n": int(x.shape[0]),
            "rules_with": with_rule, "rules_without": without_rule,
            "rule_s": rule_s, "generic_s": generic_s, "speedup": generic_s / rule_s,
            "max_rel_difference": difference, "times": times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(workloads()), default=list(workloads()))
    parser.add_argument("--repeats", type=_positive_int, default=3, help="timed runs of each variant")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args(argv)
    # torch.func's notes on ops it batches by looping (the generic rule's vmap over
    # fused recurrent kernels) would drown the table; the times show their cost
    warnings.filterwarnings("ignore", message="There is a performance drop")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}",
            "command": "python benchmarks/bench_rules.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    records = []
    print(f"{'workload':16} {'N':>5} {'with rule s':>12} {'generic s':>10} {'speedup':>8} {'max rel. diff.':>15}")
    for name in args.workloads:
        record = measure(name, args.repeats)
        records.append(record)
        print(f"{name:16} {record['n']:5d} {record['rule_s']:12.3f} {record['generic_s']:10.3f} "
              f"{record['speedup']:7.2f}x {record['max_rel_difference']:15.1e}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
