"""Where each rank sits: joining the torchrun group, the Layout value, and the process groups it needs.

The world is R data-parallel replicas of a G-rank layer-parallel group, rank = replica · G + group
rank. Replica r trains rows split_rows(batch, R, r) of every batch; inside it, block i is trained by
the group-local ranks plan.owners[i−1], each on an equal part of the replica's rows. The ranks
training block i in all replicas sum its gradients every iteration; the replica leaders sum forward
gradients.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from dtp.errors import UserError, report_error
from dtp.hooks import BlockShard
from dtp.parallel.placement import Placement, place_rank
from dtp.parallel.planning import LEADER, FeedbackPlan, split_rows

MAIN_RANK = 0  # global rank 0: reads the config and data, decides, logs and checkpoints


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int  # torchrun's LOCAL_RANK: the rank on this node, which picks the GPU
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == MAIN_RANK


def init_distributed(timeout_s: float, replicas: int = 1) -> DistContext:
    """Join the torchrun group: NCCL with one GPU per rank on CUDA, gloo on CPU (placement.place_rank)."""
    if "RANK" not in os.environ:
        raise UserError("train_parallel.py must be started by torchrun, e.g. "
                        "torchrun --standalone --nproc_per_node=3 train_parallel.py --config configs/smoke.yaml")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    # Keys are namespaced per torchrun restart: after an elastic restart the agent's store still holds
    # the previous attempt's gloo addresses, and reading those makes the new group fail to connect.
    timeout = timedelta(seconds=timeout_s)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == MAIN_RANK and not agent_store, timeout=timeout)
    store = dist.PrefixStore(f"dtp/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    placement = agreed_placement(store, rank, world, partial(place_rank, local_rank, ranks_per_node, gpus, replicas))
    device = torch.device(placement.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(placement.backend, store=store, rank=rank, world_size=world, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return DistContext(rank, world, local_rank, device, placement.backend)


def agreed_placement(store: dist.Store, rank: int, world: int, place: Callable[[], Placement]) -> Placement:
    """This rank's placement, once every rank has placed itself; if any rank cannot, all stop with the
    first refusal, which rank 0 prints before any other rank may exit (there is no process group yet)."""
    try:
        placement, refusal = place(), ""
    except UserError as exc:
        placement, refusal = None, str(exc)
    store.set(f"placement/{rank}", refusal)
    refusals = [r for r in (store.get(f"placement/{other}").decode() for other in range(world)) if r]
    if not refusals:
        return placement
    error = UserError(refusals[0])
    if rank == MAIN_RANK:
        report_error(error)
        store.set("placement/reported", "1")
    else:
        store.wait(["placement/reported"])
        error.reported = True
    raise error


T = TypeVar("T")


def decided_on_main_rank(ctx: DistContext, decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 alone and give every rank its result.

    A UserError there reaches every rank too, so the others exit quietly with it instead of failing on
    a closed connection; rank 0 prints it before any other rank can learn of it and exit.
    """
    box: list = [None]
    if ctx.is_main:
        try:
            box = [decide()]
        except UserError as exc:
            report_error(exc)
            box = [exc]
    dist.broadcast_object_list(box, src=MAIN_RANK)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


@dataclass(frozen=True)
class Topology:
    """One rank's place among R replicas of a G-rank layer-parallel group: plain values, no processes.
    Every rank computation (which replica, which group rank, which rows) is one of its methods."""

    world_size: int
    replicas: int
    rank: int

    @property
    def group_size(self) -> int:
        return self.world_size // self.replicas

    @property
    def replica(self) -> int:
        return self.rank // self.group_size

    @property
    def group_rank(self) -> int:
        """This rank's place in its layer-parallel group; not torchrun's LOCAL_RANK, which counts per node."""
        return self.rank % self.group_size

    def global_rank(self, replica: int, group_rank: int) -> int:
        return replica * self.group_size + group_rank

    @property
    def replica_leader(self) -> int:
        """The global rank of this replica's leader (its group rank LEADER)."""
        return self.global_rank(self.replica, LEADER)

    @property
    def is_replica_leader(self) -> bool:
        return self.group_rank == LEADER

    def workers(self) -> list[int]:
        return list(range(1, self.group_size))

    def replica_rows(self, batch: int) -> slice:
        return split_rows(slice(0, batch), self.replicas, self.replica)


@dataclass(frozen=True)
class Layout(Topology):
    """A Topology and the feedback plan its groups run: who trains which rows of which block."""

    plan: FeedbackPlan

    def rows(self, i: int, group_rank: int, batch: int) -> slice:
        """The rows of the full batch that `group_rank` of this replica trains block i on."""
        owners = self.plan.owners[i - 1]
        return split_rows(self.replica_rows(batch), len(owners), owners.index(group_rank))

    def local_rows(self, i: int, group_rank: int, batch: int) -> slice:
        """The same rows, indexed within this replica's share of the batch."""
        rows, start = self.rows(i, group_rank, batch), self.replica_rows(batch).start
        return slice(rows.start - start, rows.stop - start)

    def block_ranks(self, i: int) -> list[int]:
        """The global ranks, in every replica, that train a part of block i and sum its gradients."""
        return [self.global_rank(r, o) for r in range(self.replicas) for o in self.plan.owners[i - 1]]


def all_reduce_flat(tensors: list[Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum tensors in place over `group` with one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class ProcessGroups:
    """The process groups a Layout needs. Collective: every rank creates them, in the same order."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        g = layout.group_size
        self.replica: dist.ProcessGroup | None = None  # None: the default group, i.e. everyone
        self.leaders: dist.ProcessGroup | None = None
        if layout.replicas > 1:
            for r in range(layout.replicas):
                group = dist.new_group([layout.global_rank(r, k) for k in range(g)])
                if r == layout.replica:
                    self.replica = group
            self.leaders = dist.new_group([layout.global_rank(r, LEADER) for r in range(layout.replicas)])
        self.blocks: dict[int, dist.ProcessGroup] = {}
        for i in range(1, len(layout.plan.owners) + 1):
            ranks = layout.block_ranks(i)
            if len(ranks) > 1:
                group = dist.new_group(ranks)
                if layout.rank in ranks:
                    self.blocks[i] = group

    def shard(self, i: int, group_rank: int, batch: int) -> BlockShard:
        """The rows `group_rank` of this replica trains block i on, and the gradient sum over its parts."""
        group = self.blocks.get(i)
        reduce = None if group is None else partial(all_reduce_flat, group=group)
        return BlockShard(self.layout.rows(i, group_rank, batch), reduce, batch)


@dataclass
class ReplicaGroup:
    """The training loop's view of the replicas (replica.DataReplica): its rows, and sums over leaders."""

    groups: ProcessGroups

    @property
    def is_main(self) -> bool:
        return self.groups.layout.rank == MAIN_RANK

    @property
    def copies(self) -> int:
        return self.groups.layout.replicas

    def rows(self, batch: int) -> slice:
        return self.groups.layout.replica_rows(batch)

    def all_reduce(self, tensors: list[Tensor]) -> None:
        if self.groups.layout.replicas > 1 and tensors:
            all_reduce_flat(tensors, self.groups.leaders)
