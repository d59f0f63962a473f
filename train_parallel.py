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

from dtp.algorithm import NOISE_CHUNK_ROWS
from dtp.cli import build_network, build_parser, exit_on_user_error, load_data, resolve_run
from dtp.config import to_yaml
from dtp.errors import UserError
from dtp.models import DTPNetwork
from dtp.parallel import (
    DistributedFeedback, Layout, check_split, format_plan, init_distributed, max_pieces, measure_feedback_costs,
    plan_feedback, run_worker,
)
from dtp.trainer import Runtime, autocast_for, make_feedback_optimizers, run_training


def parse_split(value: str) -> str | list[int]:
    if value in ("auto", "none"):
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or part counts like 2,1,1,1,1, got {value!r}") from None


def check_layout(cfg: dict, n_feedback: int, world_size: int, replicas: int, split: str | list[int]) -> int:
    """Reject a run this trainer or this world size cannot serve; return the most parts a block can have."""
    if cfg["algorithm"] == "bp":
        raise UserError("--algorithm bp has no feedback phase to parallelise; use train_sequential.py")
    if replicas < 1 or world_size % replicas:
        raise UserError(f"--replicas {replicas} does not divide the {world_size} ranks started; "
                        f"start a multiple of {replicas} ranks (--nnodes × --nproc_per_node)")
    if replicas > -(-cfg["batch_size"] // NOISE_CHUNK_ROWS):
        raise UserError(f"--replicas {replicas} is more than a batch of {cfg['batch_size']} has "
                        f"{NOISE_CHUNK_ROWS}-row chunks to share; use fewer replicas or a larger batch")
    most = max_pieces(cfg["batch_size"], replicas, world_size // replicas)
    check_split(n_feedback, most, world_size // replicas, split)
    return most


def main() -> None:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=1,
                        help="data-parallel copies of the layer-parallel group; WORLD_SIZE must be a multiple")
    parser.add_argument("--split", type=parse_split, default="auto",
                        help="split heavy feedback blocks' rows over several ranks: auto (by measured cost), none, "
                             "or parts per block within a group, e.g. 2,1,1,1,1")
    parser.add_argument("--timeout-s", type=float, default=1800.0,
                        help="seconds a rank waits on a peer before the job fails (collective timeout)")
    args = parser.parse_args()
    ctx = init_distributed(args.timeout_s)
    # Rank 0 resolves everything (it alone reads checkpoints) and tells the other ranks; a setup error
    # is broadcast too, so they exit quietly instead of failing on a closed connection.
    setup: list = [None]
    if ctx.is_leader:
        try:
            run = resolve_run(args)
            data = load_data(run.cfg)
            network = build_network(run.cfg, data)
            most = check_layout(run.cfg, network.n_feedback, ctx.world_size, args.replicas, args.split)
        except UserError as exc:
            dist.broadcast_object_list([exc], src=0)
            raise
        setup = [(run.cfg, data.input_shape, data.num_classes, most)]
    dist.broadcast_object_list(setup, src=0)
    if isinstance(setup[0], UserError):
        raise setup[0]
    cfg, input_shape, num_classes, most = setup[0]
    if not ctx.is_leader:
        network = DTPNetwork(cfg["model"], input_shape, num_classes, cfg["seed"])
    network.to(ctx.device)
    runtime = Runtime(device=ctx.device, autocast=autocast_for(ctx.device, cfg["mixed_precision"]))
    group_size = ctx.world_size // args.replicas
    costs = measure_feedback_costs(network, cfg, runtime, ctx, args.replicas, most)
    plan_setup: list = [None]
    if ctx.is_leader:
        try:
            plan = plan_feedback(costs, group_size, args.split)
        except UserError as exc:
            dist.broadcast_object_list([exc], src=0)
            raise
        # Other replica leaders start from the same state: they get the checkpoint, not the file.
        plan_setup = [(plan, run.resume_state if args.replicas > 1 else None)]
        print(to_yaml(cfg), end="")
        print(f"{args.replicas} replica(s) of {group_size} rank(s)\n{format_plan(plan, costs, group_size)}", flush=True)
    dist.broadcast_object_list(plan_setup, src=0)
    if isinstance(plan_setup[0], UserError):
        raise plan_setup[0]
    plan, resume_state = plan_setup[0]
    set_seed(cfg["seed"])
    layout = Layout(ctx, args.replicas, plan)
    if layout.is_replica_leader and not ctx.is_leader:
        data = load_data(cfg)
    optimizers = make_feedback_optimizers(network, cfg)
    if not layout.is_replica_leader:
        # Only leaders act on SIGUSR1 (they checkpoint and then release the workers).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        run_worker(network, optimizers, cfg, runtime, layout)
    else:
        feedback = DistributedFeedback(network, optimizers, cfg, runtime, layout, costs)
        out_dir = None
        if ctx.is_leader:
            out_dir, resume_state = run.out_dir, run.resume_state
        try:
            summary = run_training(cfg, data, network, optimizers, feedback, runtime, out_dir, args.max_steps,
                                   resume_state, layout.data_replica())
        finally:
            feedback.close()
        if ctx.is_leader:
            report(summary, run.out_dir)
    # On an error no teardown is attempted: torchrun ends the other ranks when this one exits non-zero.
    # Every rank is done communicating before any tears the group down, so no rank's gloo
    # connections close under a peer still using them.
    dist.barrier()
    dist.destroy_process_group()


def report(summary: dict, out_dir) -> None:
    if "stopped_by" in summary:
        return
    par = summary["parallel"]
    timing = (f", {par['sec_per_step']:.3f} s/step, efficiency {par['efficiency']:.2f}, "
              f"cost-model speed-up bound {par['speedup_bound']:.2f}x" if "sec_per_step" in par else "")
    print(f"done: val top-1 {summary['val_top1']:.4f}, {summary['steps']} steps, "
          f"{summary['wall_time_s']:.1f} s{timing}; outputs in {out_dir}")


if __name__ == "__main__":
    exit_on_user_error(main, show=os.environ.get("RANK", "0") == "0")
    # Skip interpreter finalisation after a clean teardown: gloo's worker threads can still hold
    # AsyncWork objects whose tensors, freed during finalisation, abort the process (SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
