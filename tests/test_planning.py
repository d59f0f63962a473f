"""Plans, layouts and the per-step exchange: pure functions and values, no processes started."""
import itertools
import random

import pytest
import torch

from conftest import SMOKE, model_config
from dtp import config as config_lib
from dtp.errors import UserError
from dtp.feedback import make_feedback_optimizers
from dtp.models import DTPNetwork
from dtp.parallel.layout import Layout
from dtp.parallel.planning import check_layout, plan_feedback, speedup_bound, split_rows
from dtp.parallel.protocol import CMD_STEP, Header, Message, send, step_exchange

# The CIFAR-10 profile of docs/design.md §10 (seconds of feedback training per step, blocks 1–5).
CIFAR10_PROFILE = [6.5, 4.4, 1.9, 2.1, 0.02]


def ideal_costs(whole: list[float], most: int) -> dict[int, list[float]]:
    """Costs as if splitting a block m ways took exactly 1/m of its time."""
    return {m: [c / m for c in whole] for m in range(1, most + 1)}


def test_plan_without_splitting_balances_whole_blocks_optimally():
    costs = ideal_costs(CIFAR10_PROFILE, 1)
    assert plan_feedback(costs, 1, "none").owners == ((0,),) * 5
    for world in (2, 3):
        plan = plan_feedback(costs, world, "none")
        best = min(max(sum(c for c, o in zip(CIFAR10_PROFILE, owners) if o == r) for r in range(world))
                   for owners in itertools.product(range(world), repeat=len(CIFAR10_PROFILE)))
        assert plan.makespan == pytest.approx(best)  # LPT is optimal on this profile
    assert sorted(o for (o,) in plan_feedback(costs, 6, "none").owners) == [1, 2, 3, 4, 5]  # the leader keeps none


def test_plan_splits_the_heavy_block_when_whole_blocks_cannot_balance():
    costs = ideal_costs(CIFAR10_PROFILE, 6)
    plan = plan_feedback(costs, 6, "auto")
    assert plan.pieces[0] > 1  # block 1 alone caps whole-block plans at 6.5 s
    assert plan.makespan < 0.8 * plan_feedback(costs, 6, "none").makespan
    assert plan.makespan >= sum(CIFAR10_PROFILE) / 6 - 1e-9
    assert plan.feedback_time([costs[m][i] for i, m in enumerate(plan.pieces)]) == pytest.approx(plan.makespan)
    two = plan_feedback(costs, 2, "auto")  # costs for up to 6 parts, but a block has one part per rank at most
    assert max(two.pieces) <= 2 and two.makespan >= sum(CIFAR10_PROFILE) / 2 - 1e-9
    # Splitting that does not pay (a part costs as much as the whole block) is not chosen.
    flat = {m: CIFAR10_PROFILE for m in range(1, 3)}
    assert plan_feedback(flat, 2, "auto").pieces == [1] * 5
    with pytest.raises(UserError, match="at most 11 are useful"):
        plan_feedback(ideal_costs(CIFAR10_PROFILE, 2), 12, "auto")


def test_a_fixed_split_is_kept_and_its_parts_sit_on_distinct_ranks():
    costs = ideal_costs(CIFAR10_PROFILE, 2)
    plan = plan_feedback(costs, 3, [2, 2, 1, 1, 1])
    assert plan.pieces == [2, 2, 1, 1, 1]
    assert all(len(set(o)) == len(o) for o in plan.owners)
    assert sorted(plan.order) == [1, 2, 3, 4, 5]
    with pytest.raises(UserError, match="--split needs 5 part counts"):
        plan_feedback(costs, 3, [2, 1, 1])
    with pytest.raises(UserError, match="leaves 1 of the 3 workers idle"):
        plan_feedback({1: [1.0, 1.0], 2: [0.5, 0.5]}, 4, [1, 1])


@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_the_bound_of_a_whole_block_plan_is_at_least_one(world):
    """No rank trains more than all the blocks, so a whole-block plan can only shorten the step."""
    rng = random.Random(world)
    for _ in range(200):
        whole = [rng.uniform(0.001, 10.0) for _ in range(5)]
        plan = plan_feedback({1: whole}, world, "none")
        bound = speedup_bound(plan, whole, whole, rest_s=rng.uniform(0.0, 2.0))
        assert bound >= 1.0
    plan = plan_feedback({1: CIFAR10_PROFILE}, 1, "none")
    assert speedup_bound(plan, CIFAR10_PROFILE, CIFAR10_PROFILE, 1.0) == pytest.approx(1.0)


def test_layout_errors_name_the_fix():
    with pytest.raises(UserError, match="--replicas 2 does not divide the 3 ranks"):
        check_layout(16, 5, 3, 2, "auto")
    # 2 feedback blocks, batch 16 (two 8-row noise chunks): a leader and 2 parts per block at most.
    with pytest.raises(UserError, match="6 ranks per layer-parallel group but at most 5 are useful"):
        check_layout(16, 2, 6, 1, "auto")
    with pytest.raises(UserError, match="without splitting at most 3 ranks are useful"):
        check_layout(16, 2, 4, 1, "none")
    with pytest.raises(UserError, match="--split needs 2 part counts"):
        check_layout(16, 2, 3, 1, [1, 1, 1])
    with pytest.raises(UserError, match="more than a batch of 16 has 8-row chunks"):
        check_layout(16, 5, 3, 3, "auto")
    with pytest.raises(UserError, match="without splitting at most 6 ranks are useful"):
        check_layout(128, 5, 7, 1, "none")
    assert check_layout(32, 5, 6, 2, [2, 1, 1, 1, 1]) == 2  # 16 rows per replica: two 8-row chunks


def test_rows_are_split_on_noise_chunks_and_cover_the_batch():
    batch = slice(0, 100)  # 13 chunks of 8 rows, the last one 4 rows
    replicas = [split_rows(batch, 2, r) for r in range(2)]
    assert replicas == [slice(0, 48), slice(48, 100)]
    parts = [split_rows(replicas[1], 3, j) for j in range(3)]
    assert parts[0].start == 48 and parts[-1].stop == 100
    assert all(p.start % 8 == 0 and p.stop > p.start for p in parts)
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))


def two_replicas_of_three():
    """2 replicas × 3 ranks, block 1 split over two ranks of each group, at batch 32."""
    plan = plan_feedback(ideal_costs(CIFAR10_PROFILE, 2), 3, [2, 1, 1, 1, 1])
    return [Layout(6, 2, rank, plan) for rank in range(6)], plan


def test_every_row_of_a_block_is_trained_once_over_replicas_and_parts():
    layouts, plan = two_replicas_of_three()
    for i in range(1, 6):
        rows = sorted((l.rows(i, l.group_rank, 32).start, l.rows(i, l.group_rank, 32).stop)
                      for l in layouts if i in plan.blocks_of(l.group_rank))
        assert rows[0][0] == 0 and rows[-1][1] == 32
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        assert layouts[0].block_ranks(i) == [o for r in range(2) for o in (3 * r + j for j in plan.owners[i - 1])]
    assert [l.replica_leader for l in layouts] == [0, 0, 0, 3, 3, 3]
    assert layouts[4].local_rows(1, 1, 32) == slice(layouts[4].rows(1, 1, 32).start - 16,
                                                    layouts[4].rows(1, 1, 32).stop - 16)


def smoke_network():
    return DTPNetwork(model_config("simple_vgg", [4, 4, 8, 8, 8], "elu"), (3, 32, 32), 10, 0)


def test_the_exchange_ships_each_worker_its_rows_and_brings_back_each_block_once():
    network = smoke_network()
    optimizers = make_feedback_optimizers(network, config_lib.resolve(str(SMOKE), {}, []))
    layouts, plan = two_replicas_of_three()
    layout = layouts[0]
    first, later = Header(CMD_STEP, 0, 32, with_state=True), Header(CMD_STEP, 1, 32)
    returned = []
    for worker in layout.workers():
        exchange = step_exchange(network, optimizers, layout, worker, first)
        blocks = plan.blocks_of(worker)
        assert [m.block for m in exchange.to_worker if m.kind == "state"] == blocks
        for m in exchange.to_worker:
            if m.kind == "inputs":
                rows = layout.local_rows(m.block, worker, 32)
                assert m.shape == (rows.stop - rows.start, *network.block_input_shapes[m.block])
        assert exchange.to_leader[-1].kind == "timing"
        returned += [m.block for m in exchange.to_leader if m.kind == "state"]
        assert [m for m in step_exchange(network, optimizers, layout, worker, later).to_worker if m.kind == "state"] == []
    owned_by_workers = [i for i in range(1, 6) if plan.primary(i) != 0]
    assert sorted(returned) == owned_by_workers


def test_a_tensor_that_does_not_match_its_message_is_refused_before_sending():
    message = Message("inputs", 1, (8, 4, 16, 16))
    with pytest.raises(RuntimeError, match="exchange describes"):
        send((message,), lambda m: torch.zeros(16, 4, 16, 16), peer=1)
    with pytest.raises(RuntimeError, match="exchange describes"):
        send((message,), lambda m: torch.zeros(8, 4, 16, 16, dtype=torch.float64), peer=1)
