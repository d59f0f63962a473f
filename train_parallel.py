"""Layer-parallel DTP under torchrun: feedback blocks trained on several ranks, same result as sequential.

    torchrun --standalone --nproc_per_node=3 train_parallel.py --config configs/smoke.yaml --out runs/smoke-p3
    torchrun --nproc_per_node=6 train_parallel.py --dataset cifar10
"""
from __future__ import annotations

import os
import signal
import sys

import torch.distributed as dist
from accelerate.utils import set_seed

from dtp.cli import build_network, build_parser, exit_on_user_error, load_data, resolve_run
from dtp.config import to_yaml
from dtp.errors import UserError
from dtp.models import DTPNetwork
from dtp.parallel import (
    DistributedFeedback, assign_blocks, format_assignment, init_distributed, measure_feedback_costs, run_worker,
)
from dtp.trainer import Runtime, autocast_for, make_feedback_optimizers, run_training


def main() -> None:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--timeout-s", type=float, default=1800.0,
                        help="seconds a rank waits on a peer before the job fails (collective timeout)")
    args = parser.parse_args()
    ctx = init_distributed(args.timeout_s)
    # The leader resolves everything (it alone reads checkpoints and data) and tells the workers.
    # A setup error is broadcast too, so workers exit quietly instead of failing on a closed connection.
    setup: list = [None]
    if ctx.is_leader:
        try:
            run = resolve_run(args)
            if run.cfg["algorithm"] == "bp":
                raise UserError("--algorithm bp has no feedback phase to parallelise; use train_sequential.py")
            data = load_data(run.cfg)
            network = build_network(run.cfg, data)
            costs = measure_feedback_costs(network, run.cfg, ctx.device)
            owners = assign_blocks(costs, ctx.world_size)
        except UserError as exc:
            dist.broadcast_object_list([exc], src=0)
            raise
        setup = [(run.cfg, data.input_shape, data.num_classes, owners)]
        print(to_yaml(run.cfg), end="")
        print(format_assignment(owners, costs, ctx.world_size), flush=True)
    dist.broadcast_object_list(setup, src=0)
    if isinstance(setup[0], UserError):
        raise setup[0]
    cfg, input_shape, num_classes, owners = setup[0]
    set_seed(cfg["seed"])
    runtime = Runtime(device=ctx.device, autocast=autocast_for(ctx.device, cfg["mixed_precision"]))
    if not ctx.is_leader:
        network = DTPNetwork(cfg["model"], input_shape, num_classes, cfg["seed"])
    network.to(ctx.device)
    optimizers = make_feedback_optimizers(network, cfg)
    if not ctx.is_leader:
        # Only the leader acts on SIGUSR1 (it checkpoints and then releases the workers).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        run_worker(network, optimizers, cfg, runtime, ctx, owners)
    else:
        feedback = DistributedFeedback(network, optimizers, cfg, runtime, ctx, owners, costs)
        try:
            summary = run_training(
                cfg, data, network, optimizers, feedback, runtime, run.out_dir, run.max_steps, run.resume_state
            )
        finally:
            feedback.close()
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
