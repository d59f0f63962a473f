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

import torch.distributed as dist
from accelerate.utils import set_seed

from dtp.cli import build_network, build_parser, exit_on_user_error, load_data, resolve_run
from dtp.config import to_yaml
from dtp.errors import UserError, report_error
from dtp.feedback import make_feedback_optimizers
from dtp.parallel.costs import measure_feedback_costs
from dtp.parallel.feedback import DistributedFeedback, run_worker
from dtp.parallel.layout import Layout, ProcessGroups, ReplicaGroup, decided_by_leader, init_distributed
from dtp.parallel.planning import check_layout, format_plan, plan_feedback
from dtp.runtime import Runtime, autocast_for
from dtp.trainer import FitResult, Trainer


def parse_split(value: str) -> str | list[int]:
    if value in ("auto", "none"):
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or part counts like 2,1,1,1,1, got {value!r}") from None


def parse_args() -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=1,
                        help="data-parallel copies of the layer-parallel group; WORLD_SIZE must be a multiple")
    parser.add_argument("--split", type=parse_split, default="auto",
                        help="split heavy feedback blocks' rows over several ranks: auto (by measured cost), none, "
                             "or parts per block within a group, e.g. 2,1,1,1,1")
    parser.add_argument("--timeout-s", type=float, default=1800.0,
                        help="seconds a rank waits on a peer before the job fails (collective timeout)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    ctx = init_distributed(args.timeout_s)
    run = data = network = None

    def resolve() -> tuple:
        """Rank 0 alone reads the config, the data and the checkpoint, and checks the layout."""
        nonlocal run, data, network
        run = resolve_run(args)
        data = load_data(run.cfg)
        network = build_network(run.cfg, data.input_shape, data.num_classes)
        if run.cfg["algorithm"] == "bp":
            raise UserError("--algorithm bp has no feedback phase to parallelise; use train_sequential.py")
        most = check_layout(run.cfg["batch_size"], network.n_feedback, ctx.world_size, args.replicas, args.split)
        return run.cfg, data.input_shape, data.num_classes, most

    cfg, input_shape, num_classes, most = decided_by_leader(ctx, resolve)
    if not ctx.is_leader:
        network = build_network(cfg, input_shape, num_classes)
    network.to(ctx.device)
    runtime = Runtime(device=ctx.device, autocast=autocast_for(ctx.device, cfg["mixed_precision"]))
    group_size = ctx.world_size // args.replicas
    costs = measure_feedback_costs(network, cfg, runtime, ctx, args.replicas, most)

    def choose_plan() -> tuple:
        plan = plan_feedback(costs, group_size, args.split)
        print(to_yaml(cfg), end="")
        print(f"{args.replicas} replica(s) of {group_size} rank(s)\n{format_plan(plan, costs, group_size)}", flush=True)
        # Other replica leaders start from the same state: they get the checkpoint, not the file.
        return plan, run.resume_state if args.replicas > 1 else None

    plan, resume_state = decided_by_leader(ctx, choose_plan)
    set_seed(cfg["seed"])
    layout = Layout(ctx.world_size, args.replicas, ctx.rank, plan)
    groups = ProcessGroups(layout)
    optimizers = make_feedback_optimizers(network, cfg)
    if layout.is_replica_leader:
        if not ctx.is_leader:
            data = load_data(cfg)
        else:
            resume_state = run.resume_state
        feedback = DistributedFeedback(network, optimizers, cfg, runtime, groups, costs)
        trainer = Trainer(cfg, network, optimizers, feedback, runtime, ReplicaGroup(groups))
        try:
            if resume_state is not None:
                trainer.load_state_dict(resume_state)
            result = trainer.fit(data, run.out_dir if ctx.is_leader else None, args.max_steps)
        except BaseException as exc:
            if isinstance(exc, UserError):
                report_error(exc, show=ctx.is_leader)  # before the workers are released and can exit
            feedback.close(failed=True)
            raise
        feedback.close()
        if ctx.is_leader:
            report(result, run.out_dir)
    else:
        # Only leaders act on SIGUSR1 (they checkpoint and then release the workers).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        run_worker(network, optimizers, cfg, runtime, groups)
    # On an error no teardown is attempted: torchrun ends the other ranks when this one exits non-zero.
    # Every rank is done communicating before any tears the group down, so no rank's gloo
    # connections close under a peer still using them.
    dist.barrier()
    dist.destroy_process_group()


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
