"""Start-up measurement of what each feedback block costs, whole and split, as the planner's input."""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist

from dtp.config import Config
from dtp.feedback import BlockSettings, train_block
from dtp.hooks import BlockShard
from dtp.models import DTPNetwork
from dtp.parallel.layout import MAIN_RANK, DistContext, Topology, all_reduce_flat
from dtp.parallel.planning import Costs, split_rows
from dtp.runtime import Runtime, synchronize
from dtp.graphs import BlockLoop


def time_feedback_iteration(network: DTPNetwork, settings: BlockSettings, shard: BlockShard, runtime: Runtime,
                            warmup: int = 2, repeats: int = 3) -> float:
    """Seconds one feedback iteration of block `settings.block` takes on `shard`'s rows of its batch.

    Timed on a copy of the network with random input, lr 0, seed 0 and step 0: the run's weights and
    noise streams are untouched.
    """
    copied = copy.deepcopy(network).to(runtime.device)
    optimizer = torch.optim.SGD(copied.feedback_blocks[settings.block].parameters(), lr=0.0)
    rows = shard.rows.stop - shard.rows.start
    x = torch.randn((rows, *network.block_input_shapes[settings.block]), device=runtime.device)

    loop = BlockLoop(runtime.device, graphed=False)  # timed eagerly: a graph is captured only after warm-up

    def run(iterations: int) -> None:
        train_block(copied, optimizer, x, 0, replace(settings, iterations=iterations, seed=0), runtime, shard, loop)
        synchronize(runtime.device)

    run(warmup)  # allocator and kernel selection
    t0 = time.perf_counter()
    run(repeats)
    return (time.perf_counter() - t0) / repeats


def measure_feedback_costs(network: DTPNetwork, cfg: Config, runtime: Runtime, ctx: DistContext,
                           replicas: int, max_pieces: int) -> Costs:
    """Seconds one batch of feedback training takes per block when its rows are split m ways,
    m = 1..max_pieces.

    Collective: every rank calls it. For each block and m, the ranks of every replica form teams of m
    that each train a part of the replica's rows at once, summing gradients as in a run, so a cost
    includes the gradient sums, the wait for the slowest part and the contention of busy neighbours.
    costs[m][i−1] is k_i × rank 0's time per iteration, the same on every rank.
    """
    where = Topology(ctx.world_size, replicas, ctx.rank)
    replica_rows = where.replica_rows(cfg.batch_size)
    teams: dict[int, tuple[int, dist.ProcessGroup | None] | None] = {}
    for m in range(1, max_pieces + 1):
        teams[m] = None
        for t in range(where.group_size // m):
            ranks = [where.global_rank(r, t * m + j) for r in range(replicas) for j in range(m)]
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if ctx.rank in ranks:
                teams[m] = (t, group)
    costs: Costs = {m: [] for m in teams}
    for i in range(1, network.n_feedback + 1):
        for m, team in teams.items():
            seconds = torch.zeros(1, dtype=torch.float64, device=runtime.device)
            dist.barrier()
            if team is not None:
                t, group = team
                reduce = None if group is None else partial(all_reduce_flat, group=group)
                shard = BlockShard(split_rows(replica_rows, m, where.group_rank - t * m), reduce, cfg.batch_size)
                seconds[0] = time_feedback_iteration(network, BlockSettings.from_config(cfg, i), shard, runtime)
            dist.broadcast(seconds, MAIN_RANK)
            costs[m].append(cfg.feedback.iterations[i - 1] * float(seconds))
    for team in teams.values():
        if team is not None and team[1] is not None:
            dist.destroy_process_group(team[1])
    return costs
