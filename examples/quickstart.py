"""Quick start: the empirical NTK of an MLP, three ways, and how it moves in training.

Run: python examples/quickstart.py
"""

import time

import torch
from torch import nn

import lazykernel

torch.manual_seed(0)
print(lazykernel.backend(), "\n")

model = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
x = torch.randn(128, 8)

for output in ("trace", "diagonal", "full"):
    kernel = lazykernel.ntk(model, x, output=output)
    print(f"output={output!r:11} -> shape {tuple(kernel.shape)}")

# Every method computes the same kernel; the structured one is the fast one.
reference = lazykernel.ntk(model.double(), x[:16].double(), method="jacobian")
for method in ("structured", "jacobian", "ntvp"):
    start = time.perf_counter()
    kernel = lazykernel.ntk(model, x[:16].double(), method=method)
    elapsed = time.perf_counter() - start
    error = ((kernel - reference).abs().max() / reference.abs().max()).item()
    print(f"method={method!r:13} {elapsed * 1e3:7.1f} ms   max relative difference {error:.1e}")
model = model.float()

# How far does the kernel move when the network trains? (1 - alignment of K0 and K1)
probe, targets = x[:64], torch.randn(64, 10)
k0 = lazykernel.ntk(model, probe)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(200):
    optimizer.zero_grad()
    loss = ((model(probe) - targets) ** 2).mean()
    loss.backward()
    optimizer.step()
k1 = lazykernel.ntk(model, probe)
distance = 1 - (k0 * k1).sum() / (k0.norm() * k1.norm())
print(f"\nafter 200 SGD steps: loss {loss.item():.3f}, kernel distance {distance.item():.4f}, "
      f"relative kernel change {((k1 - k0).norm() / k0.norm()).item():.3f}")
