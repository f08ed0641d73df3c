"""The few collective steps `ntk_to_disk` needs from ``torch.distributed``.

A run launched with ``torchrun`` has one process per rank; every function here
also works in a plain single process, where it does nothing and rank 0 of 1 is
the only one. Nothing is sent between ranks but small Python objects: each
rank writes its own tiles straight into the shared file.
"""

from __future__ import annotations

import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _launched_world() -> int:
    """torchrun's ``WORLD_SIZE``: 1 where it is unset or empty."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    if not value:
        return 1
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} in the environment is not an integer; torchrun sets it to "
                         "the number of processes of the job: launch with torchrun, or unset WORLD_SIZE "
                         "to run as one process") from None


def _check_launched_rank(world: int) -> None:
    # a rank outside 0..world-1 would wait for the others of a rendezvous that never completes
    value = os.environ.get("RANK")
    try:
        valid = value is not None and 0 <= int(value) < world
    except ValueError:
        valid = False
    if not valid:
        shown = "unset" if value is None else repr(value)
        raise ValueError(f"the environment has WORLD_SIZE={world} but RANK={shown}, which is not a rank of that "
                         f"job (an integer from 0 to {world - 1}); launch with torchrun, which sets both, or "
                         "unset WORLD_SIZE to run as one process")


def init_from_environment(device: torch.device) -> bool:
    """Join the process group torchrun describes in the environment, if any.

    Uses NCCL for a CUDA ``device`` and gloo otherwise. Returns True when this
    call created the group (the caller then destroys it with `shutdown`).

    Raises:
        ValueError: ``WORLD_SIZE`` is not an integer, or it is above 1 and ``RANK``
            is not an integer from 0 to ``WORLD_SIZE - 1``.
    """
    world = _launched_world()
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    _check_launched_rank(world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    # NCCL moves only CUDA tensors; the object collectives pickle into one.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def gather_all(value: Any) -> List[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    world = rank_and_world()[1]
    if world == 1:
        return [value]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if rank_and_world()[1] > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def processes_on_this_host() -> int:
    """How many ranks of the job share this machine: torchrun's ``LOCAL_WORLD_SIZE``, or,
    where that is not set, the whole world (the cautious guess for their shared memory)."""
    world = rank_and_world()[1]
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ""))
    except ValueError:
        return world
    return local if 1 <= local <= world else world


def launched_without_group() -> int:
    """The ``WORLD_SIZE`` of a launch (torchrun's environment) that this process has not
    joined as a process group, or 0: then it runs as rank 0 of 1, beside the others."""
    try:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0
    return launched if launched > 1 and rank_and_world()[1] == 1 else 0
