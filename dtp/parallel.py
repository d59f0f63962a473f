"""Layer-parallel feedback training under torchrun (DESIGN.md §6): placement and communication only.

Rank 0 (the leader) runs the ordinary training loop with a DistributedFeedback as its feedback phase.
Every other rank runs `run_worker`: per step it receives the forward weights and input activations of
the blocks it owns, trains them with the same `train_blocks` the sequential trainer uses, and sends the
feedback weights and momentum buffers back point-to-point as flat tensors. The leader therefore always
holds the complete state, so checkpoints, resume and a change of world size need nothing extra.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.tensorboard import SummaryWriter

from dtp.algorithm import train_feedback_block
from dtp.errors import UserError
from dtp.models import DTPNetwork
from dtp.trainer import Runtime, train_blocks

CMD_STEP, CMD_STOP = 0, 1
LEADER = 0


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_leader(self) -> bool:
        return self.rank == LEADER


def init_distributed(timeout_s: float) -> DistContext:
    """Join the torchrun group: NCCL and GPU LOCAL_RANK % device_count on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        raise UserError("train_parallel.py must be started by torchrun, e.g. "
                        "torchrun --standalone --nproc_per_node=3 train_parallel.py --config configs/smoke.yaml")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # Keys are namespaced per torchrun restart: after an elastic restart the agent's store still holds
    # the previous attempt's gloo addresses, and reading those makes the new group fail to connect.
    timeout = timedelta(seconds=timeout_s)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == LEADER and not agent_store, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"dtp/attempt_{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout, device_id=device if backend == "nccl" else None)
    return DistContext(rank, world, local_rank, device, backend)


def measure_feedback_costs(network: DTPNetwork, cfg: dict[str, Any], device: torch.device,
                           repeats: int = 2) -> list[float]:
    """Seconds one batch of feedback training takes per block: k_i × one timed iteration.

    Timed on copies of the blocks with random input and lr 0, so the run's weights and noise streams
    are untouched. Measuring beats counting FLOPs: memory-bound layers and small late blocks cost more
    than their FLOPs suggest.
    """
    fb = cfg["feedback"]
    costs = []
    for i in range(1, network.n_feedback + 1):
        forward_block = copy.deepcopy(network.forward_blocks[i]).to(device)
        feedback_block = copy.deepcopy(network.feedback_blocks[i]).to(device)
        optimizer = torch.optim.SGD(feedback_block.parameters(), lr=0.0)
        x = torch.randn((cfg["batch_size"], *network.block_input_shapes[i]), device=device)
        generator = torch.Generator(device=device).manual_seed(0)

        def run(iterations: int) -> None:
            train_feedback_block(forward_block, feedback_block, optimizer, x, iterations, fb["noise"][i - 1],
                                 fb["samples"], generator)
            _sync(device)

        run(1)  # warm-up: allocator and kernel selection
        t0 = time.perf_counter()
        run(repeats)
        costs.append(fb["iterations"][i - 1] * (time.perf_counter() - t0) / repeats)
    return costs


def assign_blocks(costs: list[float], world_size: int) -> list[int]:
    """Owner rank of each feedback block (list index i−1 for G_i), balancing estimated cost.

    Longest-processing-time first: the most expensive unassigned block goes to the least loaded rank;
    on a tie a worker is preferred, leaving the leader free for communication.
    """
    n = len(costs)
    if world_size > n + 1:
        raise UserError(
            f"{world_size} ranks were started but this network has only {n} trainable feedback blocks, so at "
            f"most {n + 1} ranks are useful (a leader and one rank per block); use --nproc_per_node={n + 1} or fewer"
        )
    loads = [0.0] * world_size
    owners = [0] * n
    for i in sorted(range(n), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (loads[r], r == LEADER, r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def format_assignment(owners: list[int], costs: list[float], world_size: int) -> str:
    total = sum(costs) or 1.0
    lines = []
    for rank in range(world_size):
        blocks = [i + 1 for i, r in enumerate(owners) if r == rank]
        load = sum(costs[i - 1] for i in blocks)
        role = "leader" if rank == LEADER else "worker"
        lines.append(f"rank {rank} ({role}): blocks {blocks or '-'}, {load / total:.0%} of the measured "
                     f"feedback cost ({load:.3f} s per step)")
    return "\n".join(lines)


def _state_vector(network: DTPNetwork, optimizer: torch.optim.SGD, i: int) -> Tensor:
    params = list(network.feedback_blocks[i].parameters())
    momentum = [optimizer.state[p]["momentum_buffer"] for p in params]
    return torch.cat([parameters_to_vector(params), parameters_to_vector(momentum)])


def _load_state_vector(network: DTPNetwork, optimizer: torch.optim.SGD, i: int, vec: Tensor) -> None:
    params = list(network.feedback_blocks[i].parameters())
    n = sum(p.numel() for p in params)
    with torch.no_grad():
        vector_to_parameters(vec[:n], params)
        vector_to_parameters(vec[n : 2 * n], [optimizer.state[p]["momentum_buffer"] for p in params])


def _state_size(network: DTPNetwork, i: int) -> int:
    return 2 * sum(p.numel() for p in network.feedback_blocks[i].parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_timed(network: DTPNetwork, optimizers: list[torch.optim.SGD], cfg: dict[str, Any], i: int,
                 block_inputs: list[Tensor], step: int, runtime: Runtime) -> tuple[Tensor, float]:
    """Train feedback block i as the sequential trainer does; return its mean loss and its seconds."""
    t0 = time.perf_counter()
    loss = train_blocks(network, optimizers, cfg, [i], block_inputs, step, runtime)[i]
    _sync(runtime.device)
    return loss, time.perf_counter() - t0


# Per-step report a worker sends back: compute, communication and waiting seconds.
TIMING_FIELDS = ("compute", "comm", "wait")
# Appended to each block's state vector: its mean loss and its training seconds.
BLOCK_EXTRA = 2


@dataclass
class StepTiming:
    """What one step of the feedback phase cost, as seen by the leader."""

    block_s: list[float]
    leader_wait: float
    worker_busy: float
    phase: float
    wall: float | None = None  # entry to entry, known when the next step starts
    ranks: dict[int, list[float]] = field(default_factory=dict)


@dataclass
class DistributedFeedback:
    """The leader's feedback phase: ship block inputs out, train its own blocks, collect the rest."""

    network: DTPNetwork
    optimizers: list[torch.optim.SGD]
    cfg: dict[str, Any]
    runtime: Runtime
    ctx: DistContext
    owners: list[int]
    costs: list[float]
    started: bool = False
    history: list[tuple[float, StepTiming]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.network.n_feedback
        self.worker_blocks = [i for i in range(1, n + 1) if self.owners[i - 1] != LEADER]
        self.own_blocks = [i for i in range(1, n + 1) if self.owners[i - 1] == LEADER]
        self.workers = sorted({self.owners[i - 1] for i in self.worker_blocks})

    def _send_initial_state(self) -> None:
        for i in self.worker_blocks:
            dist.send(_state_vector(self.network, self.optimizers[i - 1], i).contiguous(), self.owners[i - 1])

    def train(self, block_inputs: list[Tensor], step: int) -> list[Tensor]:
        entry = time.perf_counter()
        if self.history:
            self.history[-1][1].wall = entry - self.history[-1][0]
        device = self.ctx.device
        dist.broadcast(torch.tensor([CMD_STEP, step, block_inputs[0].shape[0]], device=device), LEADER)
        if not self.started:
            self._send_initial_state()
            self.started = True
        pending = []
        for i in self.worker_blocks:
            owner = self.owners[i - 1]
            fwd = parameters_to_vector(self.network.forward_blocks[i].parameters()).detach()
            pending.append(dist.isend(fwd, owner))
            pending.append(dist.isend(block_inputs[i - 1].contiguous(), owner))
        states = {i: torch.empty(_state_size(self.network, i) + BLOCK_EXTRA, device=device) for i in self.worker_blocks}
        timings = {r: torch.empty(len(TIMING_FIELDS), dtype=torch.float64, device=device) for r in self.workers}
        for i in self.worker_blocks:
            pending.append(dist.irecv(states[i], self.owners[i - 1]))
        for r in self.workers:
            pending.append(dist.irecv(timings[r], r))
        losses: dict[int, Tensor] = {}
        block_s = [0.0] * self.network.n_feedback
        for i in self.own_blocks:
            losses[i], block_s[i - 1] = _train_timed(self.network, self.optimizers, self.cfg, i, block_inputs, step,
                                                     self.runtime)
        wait0 = time.perf_counter()
        for work in pending:
            work.wait()
        wait = time.perf_counter() - wait0
        for i in self.worker_blocks:
            vec = states[i]
            _load_state_vector(self.network, self.optimizers[i - 1], i, vec[:-BLOCK_EXTRA])
            losses[i] = vec[-2]
            block_s[i - 1] = float(vec[-1])
        ranks = {r: t.tolist() for r, t in timings.items()}
        busy = sum(t[0] + t[1] for t in ranks.values())
        self.history.append((entry, StepTiming(block_s, wait, busy, time.perf_counter() - entry, ranks=ranks)))
        return [losses[i] for i in range(1, self.network.n_feedback + 1)]

    def log(self, writer: SummaryWriter, step: int) -> None:
        if step <= self.cfg["log"]["every"]:
            writer.add_text("parallel/assignment", format_assignment(self.owners, self.costs, self.ctx.world_size), step)
        last = self.history[-1][1]
        writer.add_scalar("parallel/rank0_wait_s", last.leader_wait, step)
        for r, values in last.ranks.items():
            for name, value in zip(TIMING_FIELDS, values):
                writer.add_scalar(f"parallel/rank{r}_{name}_s", value, step)

    def summary(self) -> dict[str, Any]:
        """Parallel efficiency and the cost-model bound (DESIGN.md §6) from measured per-block times.

        Averages skip the first step (warm-up) and need the wall time of a step, known when the next
        step starts; with fewer than three steps every step with a known wall time is used.
        """
        timed = [t for _, t in self.history if t.wall is not None]
        steps = timed[1:] or timed
        world = self.ctx.world_size
        result: dict[str, Any] = {"world_size": world,
                                  "owners": {f"block{i + 1}": r for i, r in enumerate(self.owners)}}
        if not steps:
            return {"parallel": result}
        n = len(steps)
        wall = sum(t.wall for t in steps) / n
        block_s = [sum(t.block_s[i] for t in steps) / n for i in range(self.network.n_feedback)]
        rest = max(wall - sum(t.phase for t in steps) / n, 0.0)  # forward pass, targets, update, data, logging
        rank_load = [sum(b for b, owner in zip(block_s, self.owners) if owner == r) for r in range(world)]
        sequential_estimate = sum(block_s) + rest
        leader_busy = wall - sum(t.leader_wait for t in steps) / n
        busy = leader_busy + sum(t.worker_busy for t in steps) / n
        result.update({
            "sec_per_step": wall,
            "block_feedback_s": block_s,
            "leader_non_feedback_s": rest,
            "efficiency": busy / (world * wall),
            "speedup_bound": sequential_estimate / (max(rank_load) + rest),
            "speedup_estimate": sequential_estimate / wall,
        })
        return {"parallel": result}

    def close(self) -> None:
        dist.broadcast(torch.tensor([CMD_STOP, 0, 0], device=self.ctx.device), LEADER)


def run_worker(network: DTPNetwork, optimizers: list[torch.optim.SGD], cfg: dict[str, Any], runtime: Runtime,
               ctx: DistContext, owners: list[int]) -> None:
    """A non-leader rank: train the owned feedback blocks each step until the leader says stop."""
    device = ctx.device
    mine = [i for i in range(1, network.n_feedback + 1) if owners[i - 1] == ctx.rank]
    control = torch.zeros(3, dtype=torch.int64, device=device)
    started = False
    while True:
        t0 = time.perf_counter()
        dist.broadcast(control, LEADER)
        cmd, step, batch = control.tolist()
        if cmd == CMD_STOP:
            return
        if not started:
            for i in mine:
                vec = torch.empty(_state_size(network, i), device=device)
                dist.recv(vec, LEADER)
                _load_state_vector(network, optimizers[i - 1], i, vec)
            started = True
        inputs: list[Tensor] = [torch.empty(0, device=device)] * network.n_feedback
        fwd_vecs = {}
        pending = []
        for i in mine:
            fwd_vecs[i] = torch.empty(sum(p.numel() for p in network.forward_blocks[i].parameters()), device=device)
            inputs[i - 1] = torch.empty((batch, *network.block_input_shapes[i]), device=device)
            pending.append(dist.irecv(fwd_vecs[i], LEADER))
            pending.append(dist.irecv(inputs[i - 1], LEADER))
        for work in pending:
            work.wait()
        wait = time.perf_counter() - t0
        compute0 = time.perf_counter()
        outgoing = []
        for i in mine:
            with torch.no_grad():
                vector_to_parameters(fwd_vecs[i], list(network.forward_blocks[i].parameters()))
            loss, seconds = _train_timed(network, optimizers, cfg, i, inputs, step, runtime)
            extra = torch.tensor([loss.item(), seconds], device=device)
            outgoing.append(torch.cat([_state_vector(network, optimizers[i - 1], i), extra]))
        compute = time.perf_counter() - compute0
        comm0 = time.perf_counter()
        sends = [dist.isend(vec, LEADER) for vec in outgoing]
        for work in sends:
            work.wait()
        comm = time.perf_counter() - comm0
        timing = torch.tensor([compute, comm, wait], dtype=torch.float64, device=device)
        dist.send(timing, LEADER)
