"""Which device and backend each rank of a node uses: pure functions, decided before any process group.

NCCL serves one process per GPU, so ranks that would share a GPU are refused with the layout that works
instead of failing inside NCCL: at most one rank per GPU on every node (docs/design.md §11). The blocks
one rank trains share its GPU; that is where concurrent streams belong, not extra processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dtp.errors import UserError


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda:<index>"
    backend: str  # "gloo" on CPU, "nccl" on GPUs


def place_rank(local_rank: int, ranks_per_node: int, gpus: int, replicas: int = 1) -> Placement:
    """The device of torchrun's LOCAL_RANK `local_rank` on a node running `ranks_per_node` ranks with `gpus`
    GPUs: the CPU with gloo when there are none, else GPU LOCAL_RANK % gpus with NCCL, one rank per GPU."""
    if gpus == 0:
        return Placement("cpu", "gloo")
    if ranks_per_node > gpus:
        raise UserError(
            f"{ranks_per_node} ranks on a node with {gpus} GPU(s) would share GPUs, and NCCL serves one process "
            f"per GPU; start {working_launch(gpus, replicas)} (a rank trains several feedback blocks on its GPU)"
        )
    return Placement(f"cuda:{local_rank % gpus}", "nccl")


def working_launch(gpus: int, replicas: int) -> str:
    """torchrun flags that give one rank per GPU and a world the replicas divide."""
    if gpus % replicas == 0:
        return f"--nproc_per_node={gpus}"
    if replicas < gpus:
        return f"--nproc_per_node={gpus - gpus % replicas}"
    nodes = replicas // math.gcd(replicas, gpus)
    return f"--nnodes={nodes} --nproc_per_node={gpus}"
