"""Layer-parallel feedback training under torchrun (DESIGN.md §6): placement and communication only.

The world is R data-parallel replicas of a G-rank layer-parallel group. Each group's leader runs the
ordinary training loop on its replica's rows with a DistributedFeedback as its feedback phase; rank 0
is also the main replica, which evaluates and writes. Every other rank runs `run_worker`: per step it
receives the forward weights and input rows of the blocks it trains, trains them with the same
`train_blocks` the sequential trainer uses, and its primary for each block sends the feedback weights
and momentum buffers back point-to-point as flat tensors. A block may be split over several ranks
(block splitting inside a group, and always across replicas): they take equal parts of the rows, draw
their rows of the full-batch noise and sum gradients every iteration, so every part takes the
full-batch step. The leaders therefore always hold the complete state: checkpoints, resume and a
change of world size need nothing extra.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import resource
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.tensorboard import SummaryWriter

from dtp.algorithm import NOISE_CHUNK_ROWS, AllReduce, BlockNoise, train_feedback_block
from dtp.errors import UserError
from dtp.models import DTPNetwork
from dtp.trainer import BlockShard, Runtime, train_blocks

CMD_STEP, CMD_STOP = 0, 1
LEADER = 0
EXHAUSTIVE_PLANS = 40_000
# Among plans whose estimates are this close to the fastest, the one with the fewest parts wins: split
# parts ran 4–6% slower in runs than their start-up measurement (CIFAR-10, 2 ranks on 2 CPU cores),
# and whole blocks were then the faster choice.
SPLIT_MARGIN = 0.05


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


def split_rows(rows: slice, parts: int, index: int) -> slice:
    """Part `index` of `parts` of the batch rows `rows`, cut on noise-chunk boundaries (see BlockNoise)."""
    chunks = math.ceil((rows.stop - rows.start) / NOISE_CHUNK_ROWS)
    first, last = index * chunks // parts, (index + 1) * chunks // parts
    return slice(rows.start + first * NOISE_CHUNK_ROWS, min(rows.start + last * NOISE_CHUNK_ROWS, rows.stop))


def max_pieces(batch_size: int, replicas: int, group_size: int) -> int:
    """How many parts a block's rows can be split into within one replica: non-empty, whole noise chunks."""
    return max(1, min(group_size, math.ceil(batch_size / NOISE_CHUNK_ROWS) // replicas))


def time_feedback_iteration(network: DTPNetwork, cfg: dict[str, Any], i: int, rows: slice, runtime: Runtime,
                            reduce: AllReduce | None = None, warmup: int = 2, repeats: int = 3) -> float:
    """Seconds one feedback iteration of block i takes on `rows` of a batch (summing gradients with `reduce`).

    Timed on copies of the blocks with random input and lr 0: the run's weights and noise streams are
    untouched.
    """
    forward_block = copy.deepcopy(network.forward_blocks[i]).to(runtime.device)
    feedback_block = copy.deepcopy(network.feedback_blocks[i]).to(runtime.device)
    optimizer = torch.optim.SGD(feedback_block.parameters(), lr=0.0)
    x = torch.randn((rows.stop - rows.start, *network.block_input_shapes[i]), device=runtime.device)
    noise = BlockNoise(0, i, 0, rows, runtime.device)
    fb = cfg["feedback"]

    def run(iterations: int) -> None:
        train_feedback_block(forward_block, feedback_block, optimizer, x, iterations, fb["noise"][i - 1],
                             fb["samples"], noise, runtime.autocast, cfg["batch_size"], reduce)
        _sync(runtime.device)

    run(warmup)  # allocator and kernel selection
    t0 = time.perf_counter()
    run(repeats)
    return (time.perf_counter() - t0) / repeats


def measure_feedback_costs(network: DTPNetwork, cfg: dict[str, Any], runtime: Runtime, ctx: DistContext,
                           replicas: int, pieces: int) -> dict[int, list[float]]:
    """Seconds one batch of feedback training takes per block when its rows are split m ways, m = 1..pieces.

    Collective: every rank calls it. For each block and m, the ranks of every replica form teams of m
    that each train a part of the replica's rows at once, summing gradients as in a run, so a cost
    includes the gradient sums, the wait for the slowest part and the contention of busy neighbours.
    costs[m][i−1] is k_i × rank 0's time per iteration, the same on every rank.
    """
    group_size = ctx.world_size // replicas
    replica, local = divmod(ctx.rank, group_size)
    replica_rows = split_rows(slice(0, cfg["batch_size"]), replicas, replica)
    teams: dict[int, tuple[int, dist.ProcessGroup | None] | None] = {}
    for m in range(1, pieces + 1):
        teams[m] = None
        for t in range(group_size // m):
            ranks = [r * group_size + t * m + j for r in range(replicas) for j in range(m)]
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if ctx.rank in ranks:
                teams[m] = (t, group)
    costs: dict[int, list[float]] = {m: [] for m in teams}
    for i in range(1, network.n_feedback + 1):
        for m, team in teams.items():
            seconds = torch.zeros(1, dtype=torch.float64, device=runtime.device)
            dist.barrier()
            if team is not None:
                t, group = team
                reduce = None if group is None else partial(_all_reduce_flat, group=group)
                rows = split_rows(replica_rows, m, local - t * m)
                seconds[0] = time_feedback_iteration(network, cfg, i, rows, runtime, reduce)
            dist.broadcast(seconds, LEADER)
            costs[m].append(cfg["feedback"]["iterations"][i - 1] * float(seconds))
    for team in teams.values():
        if team is not None and team[1] is not None:
            dist.destroy_process_group(team[1])
    return costs


@dataclass(frozen=True)
class FeedbackPlan:
    """Which ranks of a layer-parallel group train which part of each feedback block, and in what order.

    owners[i−1] lists the group-local ranks training block i; with several, each takes an equal part of
    the rows (split_rows) and they sum gradients every iteration. Every rank trains its blocks in
    `order`, so ranks sharing a block always meet at the same block and never wait on each other in a
    cycle.
    """

    owners: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]
    makespan: float

    @property
    def pieces(self) -> list[int]:
        return [len(o) for o in self.owners]

    def blocks_of(self, local_rank: int) -> list[int]:
        return [i for i in self.order if local_rank in self.owners[i - 1]]

    def feedback_time(self, part_s: list[float]) -> float:
        """This plan's feedback seconds per step if each part of block i takes part_s[i−1] seconds."""
        ready: dict[int, float] = {}
        for i in self.order:
            finish = max(ready.get(r, 0.0) for r in self.owners[i - 1]) + part_s[i - 1]
            ready.update((r, finish) for r in self.owners[i - 1])
        return max(ready.values())


def schedule(pieces: list[int], costs: dict[int, list[float]], group_size: int) -> FeedbackPlan:
    """Place each block's parts on the least busy ranks, most expensive block first; estimate the time.

    A split block starts when all of its ranks are free (they step together); on a tie a worker is
    preferred, leaving the leader free for communication.
    """
    order = sorted(range(1, len(pieces) + 1), key=lambda i: (-costs[1][i - 1], i))
    ready = [0.0] * group_size
    owners: list[tuple[int, ...]] = [()] * len(pieces)
    for i in order:
        m = pieces[i - 1]
        ranks = sorted(sorted(range(group_size), key=lambda r: (ready[r], r == LEADER, r))[:m])
        finish = max(ready[r] for r in ranks) + costs[m][i - 1]
        for r in ranks:
            ready[r] = finish
        owners[i - 1] = tuple(ranks)
    return FeedbackPlan(tuple(owners), tuple(order), max(ready))


def _idle_workers(plan: FeedbackPlan, group_size: int) -> int:
    return sum(1 for r in range(1, group_size) if not plan.blocks_of(r))


def check_split(n: int, most: int, group_size: int, split: str | list[int]) -> None:
    """Reject, before anything is measured, a group size or --split that cannot work for n blocks."""
    if split == "none" and group_size > n + 1:
        raise UserError(f"{group_size} ranks per layer-parallel group but only {n} trainable feedback blocks, so "
                        f"without splitting at most {n + 1} ranks are useful; use --split auto or fewer ranks")
    if group_size > n * most + 1:
        raise UserError(f"{group_size} ranks per layer-parallel group but at most {n * most + 1} are useful (a "
                        f"leader and {most} parts for each of the {n} feedback blocks, as a part needs at least one "
                        f"{NOISE_CHUNK_ROWS}-row noise chunk of the batch); use fewer ranks, more --replicas or a "
                        f"larger batch")
    if isinstance(split, list) and (len(split) != n or not all(1 <= m <= most for m in split)):
        raise UserError(f"--split needs {n} part counts, one per feedback block, each from 1 to {most}; "
                        f"got {','.join(map(str, split))}")


def plan_feedback(costs: dict[int, list[float]], group_size: int, split: str | list[int]) -> FeedbackPlan:
    """The plan for a group of `group_size` ranks: `split` is 'auto', 'none' or the parts per block.

    'auto' tries every combination of part counts when there are at most EXHAUSTIVE_PLANS, and takes
    the one with the fewest parts among those within SPLIT_MARGIN of the fastest estimate. With more,
    it starts from whole blocks and repeatedly takes the single change of one block's part count that
    shortens the estimate most, while that gains more than SPLIT_MARGIN. Plans that leave a worker
    idle come last.
    """
    n, most = len(costs[1]), min(max(costs), group_size)  # a block has at most one part per rank
    check_split(n, most, group_size, split)
    if isinstance(split, list):
        plan = schedule(split, costs, group_size)
        if _idle_workers(plan, group_size):
            raise UserError(f"--split {','.join(map(str, split))} leaves {_idle_workers(plan, group_size)} of the "
                            f"{group_size - 1} workers idle; give more parts or use fewer ranks")
        return plan
    plan = schedule([1] * n, costs, group_size)
    if split == "none":
        return plan
    if most**n <= EXHAUSTIVE_PLANS:
        plans = [schedule(list(p), costs, group_size) for p in itertools.product(range(1, most + 1), repeat=n)]
        useful = [p for p in plans if not _idle_workers(p, group_size)]
        fastest = min(p.makespan for p in useful)
        close = (p for p in useful if p.makespan <= (1 + SPLIT_MARGIN) * fastest)
        return min(close, key=lambda p: (sum(p.pieces), p.makespan))
    while True:
        changes = [plan.pieces[:i] + [m] + plan.pieces[i + 1 :] for i in range(n) for m in range(1, most + 1)]
        best = min((schedule(p, costs, group_size) for p in changes),
                   key=lambda c: (_idle_workers(c, group_size), c.makespan))
        gain_needed = (1 - SPLIT_MARGIN) * plan.makespan
        if (_idle_workers(best, group_size), best.makespan) >= (_idle_workers(plan, group_size), gain_needed):
            return plan
        plan = best


def format_plan(plan: FeedbackPlan, costs: dict[int, list[float]], group_size: int) -> str:
    total = sum(costs[1]) or 1.0
    lines = []
    for rank in range(group_size):
        parts = [f"{i}" if len(plan.owners[i - 1]) == 1
                 else f"{i} (part {plan.owners[i - 1].index(rank) + 1}/{len(plan.owners[i - 1])})"
                 for i in plan.blocks_of(rank)]
        load = sum(costs[len(plan.owners[i - 1])][i - 1] for i in plan.blocks_of(rank))
        role = "leader" if rank == LEADER else "worker"
        lines.append(f"rank {rank} ({role}): blocks {', '.join(parts) or '-'}; {load:.3f} s per step, "
                     f"{load / total:.0%} of one process's feedback time")
    lines.append(f"estimated feedback time per step {plan.makespan:.3f} s against {total:.3f} s in one process")
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


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_reduce_flat(tensors: list[Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum tensors in place over `group` with one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


@dataclass
class Layout:
    """Where this rank sits: R replicas of a G-rank layer-parallel group, rank = replica · G + local rank.

    Replica r trains rows split_rows(batch, R, r) of every batch; inside it, block i is trained by the
    group-local ranks plan.owners[i−1], each on an equal part of the replica's rows. The ranks training
    block i in all replicas sum its gradients every iteration; the replica leaders sum forward
    gradients. Process groups are created here, by every rank, in the same order.
    """

    ctx: DistContext
    replicas: int
    plan: FeedbackPlan

    def __post_init__(self) -> None:
        self.group_size = g = self.ctx.world_size // self.replicas
        self.replica, self.local_rank = divmod(self.ctx.rank, g)
        self.leader = self.replica * g
        self.replica_group = self.leaders_group = None  # None: the default group, i.e. everyone
        if self.replicas > 1:
            for r in range(self.replicas):
                group = dist.new_group(list(range(r * g, (r + 1) * g)))
                if r == self.replica:
                    self.replica_group = group
            self.leaders_group = dist.new_group([r * g for r in range(self.replicas)])
        self.block_groups: dict[int, dist.ProcessGroup] = {}
        for i, owners in enumerate(self.plan.owners, start=1):
            ranks = [r * g + o for r in range(self.replicas) for o in owners]
            if len(ranks) > 1:
                group = dist.new_group(ranks)
                if self.ctx.rank in ranks:
                    self.block_groups[i] = group

    @property
    def is_replica_leader(self) -> bool:
        return self.local_rank == LEADER

    def replica_rows(self, batch: int) -> slice:
        return split_rows(slice(0, batch), self.replicas, self.replica)

    def shard(self, i: int, local_rank: int, batch: int) -> BlockShard:
        """The rows (of the full batch) that `local_rank` of this replica trains block i on."""
        owners = self.plan.owners[i - 1]
        rows = split_rows(self.replica_rows(batch), len(owners), owners.index(local_rank))
        group = self.block_groups.get(i)
        return BlockShard(rows, None if group is None else partial(_all_reduce_flat, group=group))

    def local_rows(self, i: int, local_rank: int, batch: int) -> slice:
        """The same rows, indexed within this replica's share of the batch."""
        rows, start = self.shard(i, local_rank, batch).rows, self.replica_rows(batch).start
        return slice(rows.start - start, rows.stop - start)

    def primary(self, i: int) -> int:
        """The rank of this replica that reports block i's trained state to the replica leader."""
        return min(self.plan.owners[i - 1])

    def workers(self) -> list[int]:
        return list(range(1, self.group_size))

    def data_replica(self) -> ReplicaGroup:
        return ReplicaGroup(self)


@dataclass
class ReplicaGroup:
    """The training loop's view of the replicas (trainer.DataReplica): its rows, and sums over leaders."""

    layout: Layout

    @property
    def is_main(self) -> bool:
        return self.layout.ctx.rank == LEADER

    def rows(self, batch: int) -> slice:
        return self.layout.replica_rows(batch)

    def all_reduce(self, tensors: list[Tensor]) -> None:
        if self.layout.replicas > 1 and tensors:
            _all_reduce_flat(tensors, self.layout.leaders_group)


def _train_timed(network: DTPNetwork, optimizers: list[torch.optim.SGD], cfg: dict[str, Any], i: int,
                 x: Tensor, step: int, runtime: Runtime, batch_total: int, shard: BlockShard) -> tuple[Tensor, float]:
    """Train this rank's part of feedback block i as the sequential trainer does; return its loss and seconds."""
    t0 = time.perf_counter()
    inputs = [x if j == i else torch.empty(0) for j in range(1, network.n_feedback + 1)]
    loss = train_blocks(network, optimizers, cfg, [i], inputs, step, runtime, batch_total, {i: shard})[i]
    _sync(runtime.device)
    return loss, time.perf_counter() - t0


# Per-step report a worker sends back: compute, communication and waiting seconds, and its peak memory.
TIMING_FIELDS = ("compute_s", "comm_s", "wait_s", "peak_rss_mib")
# Appended to each block's state vector: its mean loss and its training seconds.
BLOCK_EXTRA = 2


@dataclass
class StepTiming:
    """What one step of the feedback phase cost, as seen by a replica leader."""

    block_s: list[float]
    leader_wait: float
    worker_busy: float
    phase: float
    wall: float | None = None  # entry to entry, known when the next step starts
    ranks: dict[int, list[float]] = field(default_factory=dict)


@dataclass
class DistributedFeedback:
    """A replica leader's feedback phase: ship block inputs out, train its own parts, collect the rest."""

    network: DTPNetwork
    optimizers: list[torch.optim.SGD]
    cfg: dict[str, Any]
    runtime: Runtime
    layout: Layout
    costs: dict[int, list[float]]
    started: bool = False
    history: list[tuple[float, StepTiming]] = field(default_factory=list)

    def _send_initial_state(self) -> None:
        for r in self.layout.workers():
            for i in self.layout.plan.blocks_of(r):
                vec = _state_vector(self.network, self.optimizers[i - 1], i).contiguous()
                dist.send(vec, self.layout.leader + r)

    def train(self, block_inputs: list[Tensor], step: int, batch_total: int) -> list[Tensor]:
        entry = time.perf_counter()
        if self.history:
            self.history[-1][1].wall = entry - self.history[-1][0]
        layout, device, plan = self.layout, self.runtime.device, self.layout.plan
        control = torch.tensor([CMD_STEP, step, batch_total], device=device)
        dist.broadcast(control, layout.leader, group=layout.replica_group)
        if not self.started:
            self._send_initial_state()
            self.started = True
        pending = []
        for r in layout.workers():
            for i in plan.blocks_of(r):
                fwd = parameters_to_vector(self.network.forward_blocks[i].parameters()).detach()
                rows = layout.local_rows(i, r, batch_total)
                pending.append(dist.isend(fwd, layout.leader + r))
                pending.append(dist.isend(block_inputs[i - 1][rows].contiguous(), layout.leader + r))
        reported = [i for i in plan.order if layout.primary(i) != LEADER]
        states = {i: torch.empty(_state_size(self.network, i) + BLOCK_EXTRA, device=device) for i in reported}
        timings = {r: torch.empty(len(TIMING_FIELDS), dtype=torch.float64, device=device) for r in layout.workers()}
        for i in reported:
            pending.append(dist.irecv(states[i], layout.leader + layout.primary(i)))
        for r, t in timings.items():
            pending.append(dist.irecv(t, layout.leader + r))
        losses: dict[int, Tensor] = {}
        block_s = [0.0] * self.network.n_feedback
        for i in plan.blocks_of(LEADER):
            x = block_inputs[i - 1][layout.local_rows(i, LEADER, batch_total)]
            losses[i], block_s[i - 1] = _train_timed(self.network, self.optimizers, self.cfg, i, x, step,
                                                     self.runtime, batch_total, layout.shard(i, LEADER, batch_total))
        wait0 = time.perf_counter()
        for work in pending:
            work.wait()
        wait = time.perf_counter() - wait0
        for i in reported:
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
            writer.add_text("parallel/plan", format_plan(self.layout.plan, self.costs, self.layout.group_size), step)
        last = self.history[-1][1]
        writer.add_scalar("parallel/rank0_wait_s", last.leader_wait, step)
        for r, values in last.ranks.items():
            for name, value in zip(TIMING_FIELDS, values):
                writer.add_scalar(f"parallel/rank{r}_{name}", value, step)

    def summary(self) -> dict[str, Any]:
        """Parallel efficiency and the cost-model bound (DESIGN.md §6) of one layer-parallel group.

        Per-block times are measured in the run; a split block's part time is scaled to a whole block
        with the start-up measurement's ratio. The bound is this plan's feedback time with the measured
        part times, plus the leader's non-feedback time. Averages skip the first step (warm-up) and need the wall time of a
        step, known when the next step starts; with fewer than three steps every timed step is used.
        """
        timed = [t for _, t in self.history if t.wall is not None]
        steps = timed[1:] or timed
        layout, plan = self.layout, self.layout.plan
        result: dict[str, Any] = {
            "world_size": layout.ctx.world_size, "replicas": layout.replicas, "group_size": layout.group_size,
            "owners": {f"block{i}": list(o) for i, o in enumerate(plan.owners, start=1)},
        }
        if not steps:
            return {"parallel": result}
        n = len(steps)
        wall = sum(t.wall for t in steps) / n
        part_s = [sum(t.block_s[i] for t in steps) / n for i in range(self.network.n_feedback)]
        whole_s = [p * self.costs[1][i] / self.costs[m][i] for i, (p, m) in enumerate(zip(part_s, plan.pieces))]
        rest = max(wall - sum(t.phase for t in steps) / n, 0.0)  # forward pass, targets, update, data, logging
        sequential_estimate = sum(whole_s) + rest
        leader_busy = wall - sum(t.leader_wait for t in steps) / n
        busy = leader_busy + sum(t.worker_busy for t in steps) / n
        result.update({
            "sec_per_step": wall,
            "block_feedback_s": part_s,
            "block_pieces": plan.pieces,
            "leader_non_feedback_s": rest,
            "efficiency": busy / (layout.group_size * wall),
            "speedup_bound": sequential_estimate / (plan.feedback_time(part_s) + rest),
            "speedup_estimate": sequential_estimate / wall,
            "peak_rss_mib": {str(layout.ctx.rank): peak_rss_mib(),
                             **{str(layout.leader + r): v[3] for r, v in steps[-1].ranks.items()}},
        })
        return {"parallel": result}

    def close(self) -> None:
        stop = torch.tensor([CMD_STOP, 0, 0], device=self.runtime.device)
        dist.broadcast(stop, self.layout.leader, group=self.layout.replica_group)


def run_worker(network: DTPNetwork, optimizers: list[torch.optim.SGD], cfg: dict[str, Any], runtime: Runtime,
               layout: Layout) -> None:
    """A non-leader rank: train its parts of its feedback blocks each step until its leader says stop."""
    device, me, leader = runtime.device, layout.local_rank, layout.leader
    mine = layout.plan.blocks_of(me)
    control = torch.zeros(3, dtype=torch.int64, device=device)
    started = False
    while True:
        t0 = time.perf_counter()
        dist.broadcast(control, leader, group=layout.replica_group)
        cmd, step, batch = control.tolist()
        if cmd == CMD_STOP:
            return
        if not started:
            for i in mine:
                vec = torch.empty(_state_size(network, i), device=device)
                dist.recv(vec, leader)
                _load_state_vector(network, optimizers[i - 1], i, vec)
            started = True
        inputs, fwd_vecs, pending = {}, {}, []
        for i in mine:
            rows = layout.local_rows(i, me, batch)
            fwd_vecs[i] = torch.empty(sum(p.numel() for p in network.forward_blocks[i].parameters()), device=device)
            inputs[i] = torch.empty((rows.stop - rows.start, *network.block_input_shapes[i]), device=device)
            pending.append(dist.irecv(fwd_vecs[i], leader))
            pending.append(dist.irecv(inputs[i], leader))
        for work in pending:
            work.wait()
        wait = time.perf_counter() - t0
        compute0 = time.perf_counter()
        outgoing = []
        for i in mine:
            with torch.no_grad():
                vector_to_parameters(fwd_vecs[i], list(network.forward_blocks[i].parameters()))
            loss, seconds = _train_timed(network, optimizers, cfg, i, inputs[i], step, runtime, batch,
                                         layout.shard(i, me, batch))
            if layout.primary(i) == me:
                extra = torch.tensor([loss.item(), seconds], device=device)
                outgoing.append(torch.cat([_state_vector(network, optimizers[i - 1], i), extra]))
        compute = time.perf_counter() - compute0
        comm0 = time.perf_counter()
        sends = [dist.isend(vec, leader) for vec in outgoing]
        for work in sends:
            work.wait()
        comm = time.perf_counter() - comm0
        timing = torch.tensor([compute, comm, wait, peak_rss_mib()], dtype=torch.float64, device=device)
        dist.send(timing, leader)
