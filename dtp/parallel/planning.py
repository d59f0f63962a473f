"""Which rank trains which part of which feedback block: pure functions, no processes involved.

A plan is computed from per-block costs (seconds of feedback training per step when a block's rows
are split m ways, m = 1, 2, ...), measured at start-up by dtp.parallel.costs, or given by the tests.
"""
from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass

from dtp.errors import UserError

LEADER = 0
# Parts of a split batch are cut on multiples of this many rows: a smaller part saves less compute than
# its per-iteration overhead and gradient sum cost.
CHUNK_ROWS = 8
EXHAUSTIVE_PLANS = 40_000
# Among plans whose estimates are this close to the fastest, the one with the fewest parts wins: split
# parts ran 4–6% slower in runs than their start-up measurement (CIFAR-10, 2 ranks on 2 CPU cores),
# and whole blocks were then the faster choice.
SPLIT_MARGIN = 0.05

Costs = dict[int, list[float]]  # costs[m][i−1]: seconds per step of one of m parts of block i


def split_rows(rows: slice, parts: int, index: int) -> slice:
    """Part `index` of `parts` of the batch rows `rows`, cut on CHUNK_ROWS boundaries."""
    chunks = math.ceil((rows.stop - rows.start) / CHUNK_ROWS)
    first, last = index * chunks // parts, (index + 1) * chunks // parts
    return slice(rows.start + first * CHUNK_ROWS, min(rows.start + last * CHUNK_ROWS, rows.stop))


def max_pieces_for(batch_size: int, replicas: int, group_size: int) -> int:
    """How many parts a block's rows can be split into within one replica: non-empty, whole chunks."""
    return max(1, min(group_size, math.ceil(batch_size / CHUNK_ROWS) // replicas))


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

    def blocks_of(self, group_rank: int) -> list[int]:
        return [i for i in self.order if group_rank in self.owners[i - 1]]

    def primary(self, i: int) -> int:
        """The rank that reports block i's trained state to the leader (the lowest of its owners)."""
        return min(self.owners[i - 1])

    def idle_workers(self, group_size: int) -> int:
        return sum(1 for r in range(1, group_size) if not self.blocks_of(r))

    def feedback_time(self, part_s: list[float]) -> float:
        """This plan's feedback seconds per step if each part of block i takes part_s[i−1] seconds."""
        ready: dict[int, float] = {}
        for i in self.order:
            finish = max(ready.get(r, 0.0) for r in self.owners[i - 1]) + part_s[i - 1]
            ready.update((r, finish) for r in self.owners[i - 1])
        return max(ready.values())


def schedule(pieces: list[int], costs: Costs, group_size: int) -> FeedbackPlan:
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


def parse_split(value: str) -> str | list[int]:
    """--split as the planner takes it: 'auto', 'none' or the parts per block (an argparse type)."""
    if value in ("auto", "none"):
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or part counts like 2,1,1,1,1, got {value!r}") from None


def check_split(n: int, max_pieces: int, group_size: int, split: str | list[int]) -> None:
    """Reject, before anything is measured, a group size or --split that cannot work for n blocks of at most
    `max_pieces` parts each."""
    if split == "none" and group_size > n + 1:
        raise UserError(f"{group_size} ranks per layer-parallel group but only {n} trainable feedback blocks, so "
                        f"without splitting at most {n + 1} ranks are useful; use --split auto or fewer ranks")
    if group_size > n * max_pieces + 1:
        raise UserError(f"{group_size} ranks per layer-parallel group but at most {n * max_pieces + 1} are useful "
                        f"(a leader and {max_pieces} parts for each of the {n} feedback blocks, as a part needs at "
                        f"least one {CHUNK_ROWS}-row chunk of the batch); use fewer ranks, more --replicas "
                        f"or a larger batch")
    if isinstance(split, list) and (len(split) != n or not all(1 <= m <= max_pieces for m in split)):
        raise UserError(f"--split needs {n} part counts, one per feedback block, each from 1 to {max_pieces}; "
                        f"got {','.join(map(str, split))}")


def check_layout(batch_size: int, n_feedback: int, world_size: int, replicas: int, split: str | list[int]) -> int:
    """Reject a world size, replica count or --split that cannot work; return max_pieces."""
    if replicas < 1 or world_size % replicas:
        raise UserError(f"--replicas {replicas} does not divide the {world_size} ranks started; "
                        f"start a multiple of {replicas} ranks (--nnodes × --nproc_per_node)")
    if replicas > -(-batch_size // CHUNK_ROWS):
        raise UserError(f"--replicas {replicas} is more than a batch of {batch_size} has "
                        f"{CHUNK_ROWS}-row chunks to share; use fewer replicas or a larger batch")
    max_pieces = max_pieces_for(batch_size, replicas, world_size // replicas)
    check_split(n_feedback, max_pieces, world_size // replicas, split)
    return max_pieces


def plan_feedback(costs: Costs, group_size: int, split: str | list[int]) -> FeedbackPlan:
    """The plan for a group of `group_size` ranks: `split` is 'auto', 'none' or the parts per block.

    'auto' tries every combination of part counts when there are at most EXHAUSTIVE_PLANS, and takes
    the one with the fewest parts among those within SPLIT_MARGIN of the fastest estimate. With more,
    it starts from whole blocks and repeatedly takes the single change of one block's part count that
    shortens the estimate most, while that gains more than SPLIT_MARGIN. Plans that leave a worker
    idle come last.
    """
    n, max_pieces = len(costs[1]), min(max(costs), group_size)  # a block has at most one part per rank
    check_split(n, max_pieces, group_size, split)
    if isinstance(split, list):
        plan = schedule(split, costs, group_size)
        if plan.idle_workers(group_size):
            raise UserError(f"--split {','.join(map(str, split))} leaves {plan.idle_workers(group_size)} of the "
                            f"{group_size - 1} workers idle; give more parts or use fewer ranks")
        return plan
    plan = schedule([1] * n, costs, group_size)
    if split == "none":
        return plan
    if max_pieces**n <= EXHAUSTIVE_PLANS:
        combinations = itertools.product(range(1, max_pieces + 1), repeat=n)
        plans = [schedule(list(p), costs, group_size) for p in combinations]
        useful = [p for p in plans if not p.idle_workers(group_size)]
        fastest = min(p.makespan for p in useful)
        close = (p for p in useful if p.makespan <= (1 + SPLIT_MARGIN) * fastest)
        return min(close, key=lambda p: (sum(p.pieces), p.makespan))
    while True:
        changes = [plan.pieces[:i] + [m] + plan.pieces[i + 1 :]
                   for i in range(n) for m in range(1, max_pieces + 1)]
        best = min((schedule(p, costs, group_size) for p in changes),
                   key=lambda c: (c.idle_workers(group_size), c.makespan))
        gain_needed = (1 - SPLIT_MARGIN) * plan.makespan
        if (best.idle_workers(group_size), best.makespan) >= (plan.idle_workers(group_size), gain_needed):
            return plan
        plan = best


def speedup_bound(plan: FeedbackPlan, part_s: list[float], whole_s: list[float], rest_s: float) -> float:
    """The cost-model bound of docs/design.md §10 for this plan: sequential time over the plan's time.

    part_s[i−1] is what one part of block i takes under the plan, whole_s[i−1] what the whole block
    takes in one process, rest_s the leader's time outside the feedback phase. With whole blocks
    (part_s == whole_s) the bound is at least 1, as no rank trains more than all the blocks.
    """
    return (sum(whole_s) + rest_s) / (plan.feedback_time(part_s) + rest_s)


def format_plan(plan: FeedbackPlan, costs: Costs, group_size: int) -> str:
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
