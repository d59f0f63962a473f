"""The per-step exchange between a replica leader and one of its workers, defined once.

`step_exchange` lists, in order, every tensor the two sides exchange in one step: what the leader
sends the worker and what the worker sends back. Both sides build the list from the same values
(the layout, the network's shapes and the step's header) and `send` and `receive` walk it, so the
two sides cannot disagree on the order, shape or type of a message; a tensor that does not match its
description is an error on the sending side, before anything is sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from dtp.models import DTPNetwork
from dtp.optim import state_tensors
from dtp.parallel.layout import Layout, ProcessGroups

CMD_STEP, CMD_STOP, CMD_ABORT = 0, 1, 2  # ABORT: the leader stops on an error
# A worker's per-step timing message: compute, communication and waiting seconds, and its peak memory.
TIMING_FIELDS = ("compute_s", "comm_s", "wait_s", "peak_rss_mib")


@dataclass(frozen=True)
class Header:
    """What a replica leader broadcasts to its workers at the start of every step (and to stop them)."""

    command: int
    step: int = 0
    batch: int = 0
    with_state: bool = False  # the first step also ships the feedback weights and optimiser state to their owners

    def to_tensor(self, device: torch.device) -> Tensor:
        return torch.tensor([self.command, self.step, self.batch, int(self.with_state)], device=device)

    @classmethod
    def from_tensor(cls, tensor: Tensor) -> Header:
        command, step, batch, with_state = tensor.tolist()
        return cls(command, step, batch, bool(with_state))


def broadcast_header(header: Header | None, groups: ProcessGroups, device: torch.device) -> Header:
    """The leader passes its header, a worker None; both get the leader's header back."""
    tensor = header.to_tensor(device) if header else torch.zeros(4, dtype=torch.int64, device=device)
    dist.broadcast(tensor, groups.layout.replica_leader, group=groups.replica)
    return Header.from_tensor(tensor)


@dataclass(frozen=True)
class Message:
    """One tensor of the exchange: what it carries, for which feedback block, and its shape and type."""

    kind: str  # "state", "forward", "inputs", "result" (a block's mean loss and seconds) or "timing"
    block: int  # the feedback block; 0 for the worker's timing
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def key(self) -> tuple[str, int]:
        return self.kind, self.block


@dataclass(frozen=True)
class StepExchange:
    """Everything a replica leader and one worker exchange in one step, in the order it travels."""

    to_worker: tuple[Message, ...]
    to_leader: tuple[Message, ...]


def state_size(network: DTPNetwork, optimizer: torch.optim.Optimizer, i: int) -> int:
    """Feedback weights of block i and their optimiser state, flat."""
    return sum(t.numel() for t in [*network.feedback_blocks[i].parameters(), *state_tensors(optimizer)])


def step_exchange(network: DTPNetwork, optimizers: list[torch.optim.Optimizer], layout: Layout, worker: int,
                  header: Header) -> StepExchange:
    """The messages between this replica's leader and group-local rank `worker` in the step `header` starts.

    To the worker: on the first step the state of each block it trains, then for each block the
    forward weights and the worker's rows of the block's input. Back: the state of each block it is
    the primary owner of (its parts' states are identical) with that block's loss and seconds, then
    its timing.
    """
    blocks = layout.plan.blocks_of(worker)
    to_worker = [Message("state", i, (state_size(network, optimizers[i - 1], i),)) for i in blocks
                 ] if header.with_state else []
    for i in blocks:
        rows = layout.local_rows(i, worker, header.batch)
        to_worker.append(Message("forward", i, (sum(p.numel() for p in network.forward_blocks[i].parameters()),)))
        to_worker.append(Message("inputs", i, (rows.stop - rows.start, *network.block_input_shapes[i])))
    to_leader = []
    for i in blocks:
        if layout.plan.primary(i) == worker:
            to_leader.append(Message("state", i, (state_size(network, optimizers[i - 1], i),)))
            to_leader.append(Message("result", i, (2,), torch.float64))
    to_leader.append(Message("timing", 0, (len(TIMING_FIELDS),), torch.float64))
    return StepExchange(tuple(to_worker), tuple(to_leader))


def send(messages: tuple[Message, ...], tensor_for: Callable[[Message], Tensor], peer: int) -> list[dist.Work]:
    """Post the messages to `peer` in order; tensor_for gives each one's tensor, checked against it."""
    works = []
    for message in messages:
        tensor = tensor_for(message)
        if tuple(tensor.shape) != message.shape or tensor.dtype != message.dtype:
            raise RuntimeError(f"the '{message.kind}' message of block {message.block} is {tuple(tensor.shape)} "
                               f"{tensor.dtype}, but the exchange describes {message.shape} {message.dtype}")
        works.append(dist.isend(tensor.contiguous(), peer))
    return works


def receive(messages: tuple[Message, ...], peer: int,
            device: torch.device) -> tuple[dict[tuple[str, int], Tensor], list[dist.Work]]:
    """Post receives for the messages from `peer` in order; the buffers fill once the works complete."""
    buffers = {m.key: torch.empty(m.shape, dtype=m.dtype, device=device) for m in messages}
    return buffers, [dist.irecv(buffers[m.key], peer) for m in messages]


def state_vector(network: DTPNetwork, optimizer: torch.optim.Optimizer, i: int) -> Tensor:
    """Block i's feedback weights then its optimiser state (dtp.optim.state_tensors), on the weights' device."""
    params = list(network.feedback_blocks[i].parameters())
    device = params[0].device
    state = [t.reshape(-1).to(device) for t in state_tensors(optimizer)]
    return torch.cat([parameters_to_vector(params).detach(), *state])


def load_state_vector(network: DTPNetwork, optimizer: torch.optim.Optimizer, i: int, vec: Tensor) -> None:
    """The inverse of state_vector, copied into the existing tensors (Adam's step stays where Adam keeps it)."""
    offset = 0
    with torch.no_grad():
        for t in [*network.feedback_blocks[i].parameters(), *state_tensors(optimizer)]:
            t.copy_(vec[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def forward_vector(network: DTPNetwork, i: int) -> Tensor:
    return parameters_to_vector(network.forward_blocks[i].parameters()).detach()


def load_forward_vector(network: DTPNetwork, i: int, vec: Tensor) -> None:
    """Block i's forward weights copied into the existing tensors, where a captured feedback loop reads them."""
    offset = 0
    with torch.no_grad():
        for p in network.forward_blocks[i].parameters():
            p.copy_(vec[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
