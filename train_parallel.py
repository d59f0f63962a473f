"""Layer-parallel DTP under torchrun: feedback blocks trained on several ranks, same result as sequential.

    torchrun --standalone --nproc_per_node=3 train_parallel.py --config configs/smoke.yaml --out runs/smoke-p3
    torchrun --nproc_per_node=6 train_parallel.py --dataset cifar10
    torchrun --nnodes=2 --nproc_per_node=6 ... train_parallel.py --dataset cifar10 --replicas 2
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import set_seed

from dtp.algorithm import VARIANTS
from dtp.cli import Run, add_parallel_flags, build_network, build_parser, exit_on_user_error, load_data, resolve_run
from dtp.config import Config, to_yaml
from dtp.data import DatasetSplits
from dtp.errors import UserError, report_error
from dtp.graphs import graphs_enabled
from dtp.feedback import make_feedback_optimizers
from dtp.models import DTPNetwork
from dtp.parallel.costs import measure_feedback_costs
from dtp.parallel.feedback import DistributedFeedback, run_worker
from dtp.parallel.layout import MAIN_RANK, Layout, ProcessGroups, ReplicaGroup, decided_on_main_rank, init_distributed
from dtp.parallel.planning import Costs, FeedbackPlan, check_layout, format_plan, plan_feedback
from dtp.runtime import Runtime, autocast_for
from dtp.trainer import FitResult, Trainer


def parse_args() -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    add_parallel_flags(parser)
    return parser.parse_args()


@dataclass
class RunStart:
    """What rank 0 decides before anything is built, from the config, the data and the checkpoint.

    Every rank receives the config, the data's shapes and the most parts a block can have. The run
    options, data and network stay on rank 0: they are not sent (pickling drops them), because every
    other rank builds its own network and replica leaders load their own data.
    """

    cfg: Config
    input_shape: tuple[int, int, int]
    num_classes: int
    max_pieces: int
    run: Run | None = None
    data: DatasetSplits | None = None
    network: DTPNetwork | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "run": None, "data": None, "network": None}


@dataclass
class RankSetup:
    """What every rank has built before it takes its role."""

    cfg: Config
    network: DTPNetwork
    optimizers: list[torch.optim.Optimizer]
    runtime: Runtime
    groups: ProcessGroups
    costs: Costs


def decide_start(args: argparse.Namespace, world_size: int) -> RunStart:
    """Rank 0 alone reads the config, the data and the checkpoint, and checks the layout."""
    run = resolve_run(args)
    if not VARIANTS[run.cfg.algorithm].feedback.inverts_forward:
        raise UserError(f"--algorithm {run.cfg.algorithm}: the loss of each feedback map Q_i runs every forward block "
                        f"after block i, so it does not split into independent per-block work; use train_sequential.py")
    if run.cfg.precision != "float32":
        raise UserError(f"precision {run.cfg.precision} is for train_sequential.py; train_parallel.py ships float32")
    data = load_data(run.cfg)
    network = build_network(run.cfg, data.input_shape, data.num_classes)
    if not VARIANTS[run.cfg.algorithm].trains_feedback:
        raise UserError(f"--algorithm {run.cfg.algorithm} has no feedback phase to parallelise; "
                        "use train_sequential.py")
    max_pieces = check_layout(run.cfg.batch_size, network.n_feedback, world_size, args.replicas, args.split)
    return RunStart(run.cfg, data.input_shape, data.num_classes, max_pieces, run, data, network)


def choose_plan(start: RunStart, costs: Costs, args: argparse.Namespace,
                group_size: int) -> tuple[FeedbackPlan, dict[str, Any] | None]:
    """Rank 0 plans the feedback phase, prints the config and plan, and picks the state replicas resume from."""
    plan = plan_feedback(costs, group_size, args.split)
    print(to_yaml(start.cfg), end="")
    print(f"{args.replicas} replica(s) of {group_size} rank(s)\n{format_plan(plan, costs, group_size)}", flush=True)
    # Other replica leaders start from the same state: they get the checkpoint, not the file.
    return plan, start.run.resume_state if args.replicas > 1 else None


def main() -> None:
    args = parse_args()
    ctx = init_distributed(args.timeout_s, args.replicas)
    start = decided_on_main_rank(ctx, partial(decide_start, args, ctx.world_size))
    cfg = start.cfg
    network = start.network if ctx.is_main else build_network(cfg, start.input_shape, start.num_classes)
    network.to(ctx.device)
    graphed = graphs_enabled(cfg.feedback.cuda_graphs, ctx.device)
    runtime = Runtime(ctx.device, autocast_for(ctx.device, cfg.mixed_precision, cache_enabled=not graphed), graphed)
    costs = measure_feedback_costs(network, cfg, runtime, ctx, args.replicas, start.max_pieces)
    group_size = ctx.world_size // args.replicas
    plan, resume_state = decided_on_main_rank(ctx, partial(choose_plan, start, costs, args, group_size))
    set_seed(cfg.seed)
    groups = ProcessGroups(Layout(ctx.world_size, args.replicas, ctx.rank, plan))
    setup = RankSetup(cfg, network, make_feedback_optimizers(network, cfg, runtime.cuda_graphs), runtime, groups,
                      costs)
    if ctx.is_main:
        run_main_rank(setup, start, args.max_steps)
    elif groups.layout.is_replica_leader:
        run_replica_leader(setup, resume_state, args.max_steps)
    else:
        run_worker_rank(setup)
    # On an error no teardown is attempted: torchrun ends the other ranks when this one exits non-zero.
    # Every rank is done communicating before any tears the group down, so no rank's gloo
    # connections close under a peer still using them.
    dist.barrier()
    dist.destroy_process_group()


def run_main_rank(setup: RankSetup, start: RunStart, max_steps: int | None) -> None:
    """The main rank (global rank 0): lead replica 0 on its own data and checkpoint, write the outputs, and report."""
    run = start.run
    result = lead_replica(setup, start.data, run.resume_state, run.out_dir, max_steps, history=run.resume_dir)
    report(result, run.out_dir)


def run_replica_leader(setup: RankSetup, resume_state: dict[str, Any] | None, max_steps: int | None) -> None:
    """The leader of another replica: train on its own rows of the same batches, writing no outputs."""
    lead_replica(setup, load_data(setup.cfg), resume_state, None, max_steps, history=None)


def run_worker_rank(setup: RankSetup) -> None:
    """Any other rank: train its parts of its feedback blocks until its leader says stop."""
    # Only leaders act on SIGUSR1 (they checkpoint and then release the workers).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    run_worker(setup.network, setup.optimizers, setup.cfg, setup.runtime, setup.groups)


def lead_replica(setup: RankSetup, data: DatasetSplits, resume_state: dict[str, Any] | None,
                 out_dir: Path | None, max_steps: int | None, history: Path | None) -> FitResult:
    """Run the training loop, with the replica's feedback blocks spread over its ranks; release them at the end.

    A UserError is printed (by rank 0 only) before the workers are released, since they exit then.
    """
    feedback = DistributedFeedback(setup.network, setup.optimizers, setup.cfg, setup.runtime, setup.groups,
                                   setup.costs)
    trainer = Trainer(setup.cfg, setup.network, setup.optimizers, feedback, setup.runtime, ReplicaGroup(setup.groups))
    try:
        if resume_state is not None:
            trainer.load_state_dict(resume_state)
        result = trainer.fit(data, out_dir, max_steps, history)
    except BaseException as exc:
        if isinstance(exc, UserError):
            report_error(exc, show=setup.groups.layout.rank == MAIN_RANK)
        feedback.close(failed=True)
        raise
    feedback.close()
    return result


def report(result: FitResult, out_dir) -> None:
    if result.summary is None:  # stopped by a signal, with a checkpoint to resume from
        return
    summary = result.summary
    par = summary["parallel"]
    timing = (f", {par['sec_per_step']:.3f} s/step, efficiency {par['efficiency']:.2f}, "
              f"cost-model speed-up bound {par['speedup_bound']:.2f}x" if "sec_per_step" in par else "")
    print(f"done: val top-1 {summary['val_top1']:.4f}, {summary['steps']} steps, "
          f"{summary['wall_time_s']:.1f} s{timing}; outputs in {out_dir}")


if __name__ == "__main__":
    try:
        exit_on_user_error(main, show=os.environ.get("RANK", "0") == "0")
        code = 0
    except SystemExit as exc:  # a reported UserError
        code = exc.code
    # Skip interpreter finalisation after a clean teardown or a reported error: gloo's worker threads
    # can still hold AsyncWork objects whose tensors, freed during finalisation, abort the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
