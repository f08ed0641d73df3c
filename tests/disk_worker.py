"""One process of an ntk_to_disk run, for the tests that kill and relaunch processes.

    python disk_worker.py OUT SECONDS_PER_FORWARD

Builds the same small seeded MLP and inputs every time, joins the gloo process
group the environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
when WORLD_SIZE > 1, and computes the symmetric trace kernel of 40 inputs in
tiles of 6 into OUT. SECONDS_PER_FORWARD > 0 slows every forward pass so that a
test can kill the process while it is between tiles.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import lazykernel


class SlowMLP(nn.Module):
    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.layers = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        if self.delay:
            time.sleep(self.delay)
        return self.layers(x)


def main() -> None:
    out, delay = sys.argv[1], float(sys.argv[2])
    torch.set_num_threads(1)  # the same arithmetic in every process
    torch.manual_seed(0)
    model = SlowMLP(delay)
    x = torch.randn(40, 5)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    try:
        # a budget that holds one tile and no more, so that every tile needs a
        # forward pass of its own and a slowed run writes tiles one by one
        lazykernel.ntk_to_disk(model, x, out=out, batch_size=6, memory_budget=32_000, progress=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
