"""The feedback phase spread over ranks: a replica leader's DistributedFeedback and the worker loop.

Each replica leader runs the ordinary training loop with a DistributedFeedback as its feedback
phase; every other rank runs `run_worker`. Per step the leader broadcasts a header, ships each
worker what `step_exchange` lists, trains its own parts meanwhile and loads what comes back. A
worker trains its parts with the same `train_block` the sequential trainer uses. The leaders
therefore always hold the complete state: checkpoints, resume and a change of world size need
nothing extra.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dtp.config import Config
from dtp.errors import UserError
from dtp.feedback import BlockSettings, train_block
from dtp.hooks import BlockShard
from dtp.metrics import peak_rss_mib
from dtp.models import DTPNetwork
from dtp.parallel.layout import ProcessGroups
from dtp.parallel.planning import LEADER, Costs, format_plan, speedup_bound
from dtp.parallel.protocol import (
    CMD_ABORT, CMD_STEP, CMD_STOP, TIMING_FIELDS, Header, Message, broadcast_header, forward_vector, load_forward_vector,
    load_state_vector, receive, send, state_vector, step_exchange,
)
from dtp.runtime import Runtime, synchronize
from dtp.graphs import BlockLoop


def train_timed(network: DTPNetwork, optimizer: torch.optim.Optimizer, x: Tensor, step: int,
                settings: BlockSettings, runtime: Runtime, shard: BlockShard,
                loops: dict[int, BlockLoop]) -> tuple[Tensor, float]:
    """Train this rank's part of a feedback block as the sequential trainer does; return its loss and seconds."""
    t0 = time.perf_counter()
    if settings.block not in loops:  # built once per run, not on every step
        loops[settings.block] = BlockLoop(runtime.device, runtime.cuda_graphs)
    loop = loops[settings.block]
    loss = train_block(network, optimizer, x, step, settings, runtime, shard, loop)
    synchronize(runtime.device)
    return loss, time.perf_counter() - t0


@dataclass
class StepTiming:
    """What one step of the feedback phase cost, as seen by a replica leader."""

    block_s: list[float]
    leader_compute: float
    leader_wait: float
    worker_busy: float
    phase: float
    wall: float | None = None  # entry to entry, known when the next step starts
    ranks: dict[int, list[float]] = field(default_factory=dict)


@dataclass
class DistributedFeedback:
    """A replica leader's feedback phase: ship block inputs out, train its own parts, collect the rest."""

    network: DTPNetwork
    optimizers: list[torch.optim.Optimizer]
    cfg: Config
    runtime: Runtime
    groups: ProcessGroups
    costs: Costs
    started: bool = False
    history: list[tuple[float, StepTiming]] = field(default_factory=list)
    loops: dict[int, BlockLoop] = field(default_factory=dict)  # this rank's blocks', kept between steps

    def _outgoing(self, message: Message, worker: int, block_inputs: list[Tensor], batch_total: int) -> Tensor:
        i = message.block
        if message.kind == "state":
            return state_vector(self.network, self.optimizers[i - 1], i)
        if message.kind == "forward":
            return forward_vector(self.network, i)
        return block_inputs[i - 1][self.groups.layout.local_rows(i, worker, batch_total)]

    def train(self, block_inputs: list[Tensor], step: int, batch_total: int) -> list[Tensor]:
        entry = time.perf_counter()
        if self.history:
            self.history[-1][1].wall = entry - self.history[-1][0]
        layout, device = self.groups.layout, self.runtime.device
        header = broadcast_header(Header(CMD_STEP, step, batch_total, with_state=not self.started), self.groups,
                                  device)
        self.started = True
        pending, exchanges, inbound = [], {}, {}
        for r in layout.workers():
            peer = layout.global_rank(layout.replica, r)
            exchanges[r] = step_exchange(self.network, self.optimizers, layout, r, header)
            pending += send(exchanges[r].to_worker, lambda m, r=r: self._outgoing(m, r, block_inputs, batch_total), peer)
            inbound[r], works = receive(exchanges[r].to_leader, peer, device)
            pending += works
        losses: dict[int, Tensor] = {}
        block_s = [0.0] * self.network.n_feedback
        leader_blocks = layout.plan.blocks_of(LEADER)
        for i in leader_blocks:
            x = block_inputs[i - 1][layout.local_rows(i, LEADER, batch_total)]
            shard = self.groups.shard(i, LEADER, batch_total)
            losses[i], block_s[i - 1] = train_timed(self.network, self.optimizers[i - 1], x, step,
                                                    BlockSettings.from_config(self.cfg, i), self.runtime, shard,
                                                    self.loops)
        leader_compute = sum(block_s[i - 1] for i in leader_blocks)
        wait0 = time.perf_counter()
        for work in pending:
            work.wait()
        wait = time.perf_counter() - wait0
        ranks = {}
        for r, exchange in exchanges.items():
            for message in exchange.to_leader:
                tensor = inbound[r][message.key]
                if message.kind == "state":
                    load_state_vector(self.network, self.optimizers[message.block - 1], message.block, tensor)
                elif message.kind == "result":
                    losses[message.block], block_s[message.block - 1] = tensor[0].float(), float(tensor[1])
                else:
                    ranks[r] = tensor.tolist()
        busy = sum(t[0] + t[1] for t in ranks.values())
        timing = StepTiming(block_s, leader_compute, wait, busy, time.perf_counter() - entry, ranks=ranks)
        self.history.append((entry, timing))
        return [losses[i] for i in range(1, self.network.n_feedback + 1)]

    def describe(self) -> dict[str, Any]:
        layout = self.groups.layout
        return {"world_size": layout.world_size, "replicas": layout.replicas, "group_size": layout.group_size,
                "plan": format_plan(layout.plan, self.costs, layout.group_size)}

    def step_figures(self) -> dict[str, float]:
        """The last step's timing: the leader's own feedback training and wait, each worker's report."""
        last = self.history[-1][1]
        figures = {"parallel/rank0_compute_s": last.leader_compute, "parallel/rank0_wait_s": last.leader_wait}
        for r, values in last.ranks.items():
            figures.update({f"parallel/rank{r}_{name}": value for name, value in zip(TIMING_FIELDS, values)})
        return figures

    def summary(self) -> dict[str, Any]:
        """Parallel efficiency and the cost-model bound (docs/design.md §10) of one layer-parallel group.

        Per-block times are measured in the run; a split block's part time is scaled to a whole block
        with the start-up measurement's ratio. The bound is this plan's feedback time with the measured
        part times, plus the leader's non-feedback time. Averages skip the first step (warm-up) and need
        the wall time of a step, known when the next step starts; with fewer than three steps every
        timed step is used.
        """
        timed = [t for _, t in self.history if t.wall is not None]
        steps = timed[1:] or timed
        layout = self.groups.layout
        plan = layout.plan
        described = self.describe()
        result: dict[str, Any] = {
            **{key: described[key] for key in ("world_size", "replicas", "group_size")},
            "owners": {f"block{i}": list(o) for i, o in enumerate(plan.owners, start=1)},
        }
        if not steps:
            return {"parallel": result}
        n = len(steps)
        wall = sum(t.wall for t in steps) / n
        part_s = [sum(t.block_s[i] for t in steps) / n for i in range(self.network.n_feedback)]
        whole_s = [p * self.costs[1][i] / self.costs[m][i] for i, (p, m) in enumerate(zip(part_s, plan.pieces))]
        rest = max(wall - sum(t.phase for t in steps) / n, 0.0)  # forward pass, targets, update, data, logging
        leader_busy = wall - sum(t.leader_wait for t in steps) / n
        busy = leader_busy + sum(t.worker_busy for t in steps) / n
        result.update({
            "sec_per_step": wall,
            "block_feedback_s": part_s,
            "block_pieces": plan.pieces,
            "leader_non_feedback_s": rest,
            "efficiency": busy / (layout.group_size * wall),
            "speedup_bound": speedup_bound(plan, part_s, whole_s, rest),
            "speedup_estimate": (sum(whole_s) + rest) / wall,
            "peak_rss_mib": {str(layout.rank): peak_rss_mib(),
                             **{str(layout.global_rank(layout.replica, r)): v[3] for r, v in steps[-1].ranks.items()}},
        })
        return {"parallel": result}

    def close(self, failed: bool = False) -> None:
        """Release the workers; after an error they exit without waiting on the leader's teardown."""
        broadcast_header(Header(CMD_ABORT if failed else CMD_STOP), self.groups, self.runtime.device)


def run_worker(network: DTPNetwork, optimizers: list[torch.optim.Optimizer], cfg: Config, runtime: Runtime,
               groups: ProcessGroups) -> None:
    """A non-leader rank: train its parts of its feedback blocks each step until its leader says stop.

    Timing: wait_s is the time spent waiting for the leader's header (its forward pass, targets and
    update), comm_s the time spent receiving the step's inputs plus finishing the previous step's
    sends, compute_s the feedback training.
    """
    layout, device = groups.layout, runtime.device
    me, leader = layout.group_rank, layout.replica_leader
    sending: list = []
    loops: dict[int, BlockLoop] = {}
    while True:
        t0 = time.perf_counter()
        for work in sending:  # the previous step's results reach the leader before it starts the next step
            work.wait()
        t1 = time.perf_counter()
        header = broadcast_header(None, groups, device)
        if header.command == CMD_STOP:
            return
        if header.command == CMD_ABORT:
            raise UserError("the leader stopped with an error; its message says why")
        t2 = time.perf_counter()
        exchange = step_exchange(network, optimizers, layout, me, header)
        inbound, works = receive(exchange.to_worker, leader, device)
        for work in works:
            work.wait()
        t3 = time.perf_counter()
        outgoing: dict[tuple[str, int], Tensor] = {}
        for i in layout.plan.blocks_of(me):
            if header.with_state:
                load_state_vector(network, optimizers[i - 1], i, inbound[("state", i)])
            load_forward_vector(network, i, inbound[("forward", i)])
            loss, seconds = train_timed(network, optimizers[i - 1], inbound[("inputs", i)], header.step,
                                        BlockSettings.from_config(cfg, i), runtime, groups.shard(i, me, header.batch),
                                        loops)
            if layout.plan.primary(i) == me:
                outgoing[("state", i)] = state_vector(network, optimizers[i - 1], i)
                outgoing[("result", i)] = torch.tensor([loss.item(), seconds], dtype=torch.float64, device=device)
        t4 = time.perf_counter()
        outgoing[("timing", 0)] = torch.tensor([t4 - t3, (t1 - t0) + (t3 - t2), t2 - t1, peak_rss_mib()],
                                               dtype=torch.float64, device=device)
        sending = send(exchange.to_leader, lambda m: outgoing[m.key], leader)
