"""Time DTP training steps on random 32×32 input, with the CIFAR-10 SimpleVGG settings (docs/design.md §7)
or another config's (--config).

    python benchmarks/step_time.py --steps 2 --threads 2 --json
    python benchmarks/step_time.py --steps 3 --threads 1 --parallel 2  # under torchrun, then sequential
    python benchmarks/step_time.py --steps 2 --threads 2 --bound-ranks 6  # adds bounds for 6 ranks

Sequential mode times this project's step and, in the same run, a naive baseline with the published
code's cost structure (forward block recomputed inside every feedback iteration to restore the pooling
indices, the three feedback passes run one by one, weight angle/distance computed every iteration),
and reports the speed-up. With --json the last line is a JSON object.

It imports dtp as an installed package: `make` installs the project into .venv (pip install -e .).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from dtp.diagnostics import weight_alignment
from dtp.config import CONFIG_DIR, Config, resolve
from dtp.models import DTPNetwork
from dtp.feedback import BlockSettings, make_feedback_optimizers, train_block, train_blocks
from dtp.hooks import BlockShard
from dtp.metrics import format_memory, peak_memory_mib, peak_rss_mib
from dtp.optim import build_forward_optimizer
from dtp.parallel.costs import measure_feedback_costs, time_feedback_iteration
from dtp.parallel.feedback import DistributedFeedback, run_worker
from dtp.parallel.layout import Layout, ProcessGroups, decided_on_main_rank, init_distributed
from dtp.parallel.planning import (
    FeedbackPlan, format_plan, max_pieces_for, parse_split, plan_feedback, split_rows,
)
from dtp.runtime import Runtime, autocast_for, synchronize
from dtp.graphs import EAGER_STEPS, BlockLoop
from dtp.seeding import block_noise_seed
from dtp.step import train_step


def part_costs(cfg: Config, max_pieces: int, runtime: Runtime) -> dict[int, list[float]]:
    """Seconds per step of each block trained on 1/m of the batch, m = 1..max_pieces, in this one process."""
    network = DTPNetwork(cfg.model, (3, 32, 32), 10, cfg.seed)
    batch = slice(0, cfg.batch_size)
    settings = [BlockSettings.from_config(cfg, i) for i in range(1, network.n_feedback + 1)]
    return {m: [s.iterations * time_feedback_iteration(network, s, BlockShard(split_rows(batch, m, 0)), runtime)
                for s in settings] for m in range(1, max_pieces + 1)}


def split_bounds(cfg: Config, ranks: int, non_feedback_s: float, runtime: Runtime) -> dict:
    """Cost-model speed-up bounds for `ranks` ranks with and without block splitting.

    From per-part costs measured in this one process: the gradient sums and the contention between
    ranks of a real run are not in them, so these are upper bounds.
    """
    costs = part_costs(cfg, max_pieces_for(cfg.batch_size, 1, ranks), runtime)
    sequential = sum(costs[1]) + non_feedback_s
    result = {"ranks": ranks, "block_cost_s_by_parts": {str(m): c for m, c in costs.items()}}
    for split in ("none", "auto"):
        plan = plan_feedback(costs, ranks, split)
        result[f"split_{split}"] = {"pieces": plan.pieces, "feedback_s": plan.makespan,
                                    "speedup_bound": sequential / (plan.makespan + non_feedback_s)}
    return result


def naive_train_block(network, optimizer, i, x, iterations, sigma, generator):
    """The published structure: recompute F_i(x) every iteration, three separate G_i calls, angle each time."""
    f, g = network.forward_blocks[i], network.feedback_blocks[i]
    for _ in range(iterations):
        dx = sigma * torch.randn(x.shape, generator=generator, device=x.device)
        with torch.no_grad():
            y, idx = f(x)
            y_noisy, idx_noisy = f(x + dx)
        dy = sigma * torch.randn(y.shape, generator=generator, device=y.device)
        r = g(y, idx)
        dr = g(y_noisy, idx_noisy) - r
        dr_y = g(y + dy, idx) - r
        loss = (-2 * (dx * dr).flatten(1).sum(1) + dr_y.square().flatten(1).sum(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weight_alignment(f, g)
        loss.item()


VARIANTS = ("naive", "eager", "graphs", "graphs+streams")  # the published structure, then ours three ways


class TimedFeedback:
    """A sequential feedback phase that records seconds per block, run as `variant` (VARIANTS); blocks on
    concurrent streams have no seconds of their own."""

    def __init__(self, network, optimizers, cfg: Config, runtime: Runtime, variant: str) -> None:
        self.network, self.optimizers, self.cfg, self.runtime, self.variant = network, optimizers, cfg, runtime, variant
        self.block_s = [0.0] * network.n_feedback
        graphed = variant in ("graphs", "graphs+streams")
        self.loops = {i: BlockLoop(runtime.device, graphed) for i in range(1, network.n_feedback + 1)}
        self.streams: dict = {}

    def train(self, block_inputs, step, batch_total):
        blocks = list(range(1, self.network.n_feedback + 1))
        if self.variant == "graphs+streams":
            losses = train_blocks(self.network, self.optimizers, self.cfg, blocks, block_inputs, step, self.runtime,
                                  batch_total, self.loops, self.streams)
            return [losses[i] for i in blocks]
        losses = []
        for i in blocks:
            settings, x = BlockSettings.from_config(self.cfg, i), block_inputs[i - 1]
            t0 = time.perf_counter()
            if self.variant == "naive":
                gen = torch.Generator(self.runtime.device).manual_seed(block_noise_seed(settings.seed, i, step))
                naive_train_block(self.network, self.optimizers[i - 1], i, x, settings.iterations, settings.sigma, gen)
                losses.append(torch.zeros(()))
            else:
                losses.append(train_block(self.network, self.optimizers[i - 1], x, step, settings, self.runtime,
                                          loop=self.loops[i]))
            synchronize(self.runtime.device)
            self.block_s[i - 1] += time.perf_counter() - t0
        return losses


def time_sequential(cfg: Config, device: torch.device, steps: int, warmup: int, variant: str,
                    channels_last: bool = False, bf16: bool = False) -> dict:
    """Seconds per training step of `variant` on random input; the first `warmup` steps are not timed
    (graphs are captured after dtp.graphs.EAGER_STEPS steps: give at least that many)."""
    graphed = variant in ("graphs", "graphs+streams")
    runtime = Runtime(device, autocast_for(device, "bf16" if bf16 else "no", cache_enabled=not graphed), graphed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    network = DTPNetwork(cfg.model, (3, 32, 32), 10, cfg.seed).to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    optimizers = make_feedback_optimizers(network, cfg, capturable=graphed)
    forward_opt, _ = build_forward_optimizer(network, cfg.forward)
    phase = TimedFeedback(network, optimizers, cfg, runtime, variant)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, 32, 32, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=gen).to(device)
    total = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            phase.block_s = [0.0] * network.n_feedback
        t0 = time.perf_counter()
        train_step(network, forward_opt, phase, x, y, cfg, step, runtime)
        synchronize(device)
        if step >= warmup:
            total += time.perf_counter() - t0
    sec = total / steps
    block_s = [b / steps for b in phase.block_s]
    return {"sec_per_step": sec, "ms_per_step": 1000 * sec, "images_per_s": cfg.batch_size / sec,
            "block_feedback_s": block_s, "forward_update_s": sec - sum(block_s) if any(block_s) else None,
            # RSS is the process's peak so far (a network timed after another includes it); CUDA's is this one's.
            "memory": peak_memory_mib(device)}


def parallel_worker(args: argparse.Namespace, cfg: Config) -> None:
    """One rank of `--parallel P`: the leader runs timed steps, the others run the ordinary worker loop."""
    ctx = init_distributed(600)
    runtime = Runtime(ctx.device)
    network = DTPNetwork(cfg.model, (3, 32, 32), 10, cfg.seed).to(ctx.device)
    optimizers = make_feedback_optimizers(network, cfg)
    costs = measure_feedback_costs(network, cfg, runtime, ctx, 1, max_pieces_for(cfg.batch_size, 1, ctx.world_size))

    def choose_plan() -> FeedbackPlan:  # from rank 0's measurements; every rank gets the leader's plan
        plan = plan_feedback(costs, ctx.world_size, args.split)
        print(format_plan(plan, costs, ctx.world_size), file=sys.stderr)
        return plan

    groups = ProcessGroups(Layout(ctx.world_size, 1, ctx.rank, decided_on_main_rank(ctx, choose_plan)))
    if not ctx.is_main:
        run_worker(network, optimizers, cfg, runtime, groups)
        print_rank_memory(ctx.rank, ctx.device)
        return
    forward_opt, _ = build_forward_optimizer(network, cfg.forward)
    phase = DistributedFeedback(network, optimizers, cfg, runtime, groups, costs)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, 32, 32, generator=gen).to(ctx.device)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=gen).to(ctx.device)
    # The phase times steps entry to entry and drops the first, so run one extra step.
    for step in range(args.warmup + args.steps + 1):
        train_step(network, forward_opt, phase, x, y, cfg, step, runtime)
    phase.close()
    par = phase.summary()["parallel"]
    par["peak_rss_mib_leader"] = peak_rss_mib()
    par["images_per_s"] = cfg.batch_size / par["sec_per_step"]
    print_rank_memory(ctx.rank, ctx.device)
    print_line(json.dumps(par))


RANK_MEMORY = "rank memory: "  # prefix of each rank's memory line on torchrun's shared stdout


def print_line(text: str) -> None:
    """One write per line: the ranks share stdout, and print() may write a line's text and its newline
    separately (unbuffered under torchrun), letting another rank's line land in between."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_rank_memory(rank: int, device: torch.device) -> None:
    print_line(RANK_MEMORY + json.dumps({"rank": rank, **peak_memory_mib(device)}))


def memory_by_rank(stdout: str) -> dict[str, dict[str, float]]:
    """Every rank's peak memory from the lines the ranks printed, in any order."""
    lines = [json.loads(line[len(RANK_MEMORY):]) for line in stdout.splitlines() if line.startswith(RANK_MEMORY)]
    return {str(m.pop("rank")): m for m in sorted(lines, key=lambda m: m["rank"])}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the sequential step runs (default: cuda where present); cuda adds graph variants")
    p.add_argument("--config", default=str(CONFIG_DIR / "cifar10_dtp.yaml"),
                   help="the network and feedback settings to time (default: the CIFAR-10 reference)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--parallel", type=int, default=0, help="run under torchrun with this many ranks")
    p.add_argument("--split", type=parse_split, default="auto",
                   help="with --parallel: auto, none or parts per block, e.g. 2,1,1,1,1")
    p.add_argument("--bound-ranks", type=int, default=0,
                   help="also report the cost-model bound for this many ranks with and without block splitting")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the naive baseline (with --parallel: the sequential run it is compared with)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the baseline runs in fp32)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def benchmark_parallel(args: argparse.Namespace, cfg: Config) -> dict:
    """`--parallel P`: P ranks under torchrun, and (unless --no-baseline) the sequential step to compare."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    split = ",".join(map(str, args.split)) if isinstance(args.split, list) else args.split
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.parallel}",
           __file__, "--rank-worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--config", args.config, "--batch-size", str(args.batch_size), "--split", split]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    result = json.loads([line for line in out.stdout.strip().splitlines() if line.startswith("{")][-1])
    result["memory_by_rank"] = memory_by_rank(out.stdout)
    print(f"parallel P={args.parallel}: {result['sec_per_step']:.3f} s/step, {result['images_per_s']:.1f} img/s, "
          f"efficiency {result['efficiency']:.2f}, cost-model bound {result['speedup_bound']:.2f}x, "
          f"estimated speed-up {result['speedup_estimate']:.2f}x")
    for rank, memory in result["memory_by_rank"].items():
        print(f"rank {rank}: {format_memory(memory)}")
    if not args.no_baseline:
        torch.set_num_threads(args.threads)
        seq = time_sequential(cfg, torch.device(args.device), args.steps, args.warmup, "eager")
        result["sequential_sec_per_step"] = seq["sec_per_step"]
        result["speedup_over_sequential"] = seq["sec_per_step"] / result["sec_per_step"]
        print(f"sequential, {args.threads} thread(s): {seq['sec_per_step']:.3f} s/step; parallel speed-up "
              f"{result['speedup_over_sequential']:.2f}x")
    return result


def benchmark_sequential(args: argparse.Namespace, cfg: Config) -> dict:
    """This project's step against the published structure (unless --no-baseline), and the split bounds.
    On CUDA it also times the step with graphs, with graphs and streams, and those in bf16."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ours = time_sequential(cfg, device, args.steps, args.warmup, "eager", args.channels_last, args.bf16)
    result = dict(ours, device=args.device, threads=args.threads, batch_size=args.batch_size)
    print(f"ours:     {ours['sec_per_step']:.3f} s/step, {ours['images_per_s']:.1f} img/s, feedback per block "
          + ", ".join(f"{b:.3f}" for b in ours["block_feedback_s"])
          + f" s, forward/update {ours['forward_update_s']:.3f} s")
    print(f"ours:     memory of its one rank: {format_memory(ours['memory'])}")
    if device.type == "cuda":
        result["variants"] = {f"{variant}{' bf16' if bf16 else ''}": time_sequential(
            cfg, device, args.steps, max(args.warmup, EAGER_STEPS + 1), variant, args.channels_last, bf16)
            for variant, bf16 in (("graphs", False), ("graphs+streams", False), ("graphs+streams", True))}
        for name, figures in result["variants"].items():
            print(f"{name}: {figures['ms_per_step']:.1f} ms/step, {figures['images_per_s']:.1f} img/s")
    if not args.no_baseline:
        base = time_sequential(cfg, device, args.steps, args.warmup, "naive", args.channels_last)
        print(f"baseline: {base['sec_per_step']:.3f} s/step, {base['images_per_s']:.1f} img/s, feedback per block "
              + ", ".join(f"{b:.3f}" for b in base["block_feedback_s"]) + " s")
        result["baseline_sec_per_step"] = base["sec_per_step"]
        result["speedup_over_baseline"] = base["sec_per_step"] / ours["sec_per_step"]
        print(f"speed-up over the published structure: {result['speedup_over_baseline']:.2f}x")
    if args.bound_ranks:
        bounds = split_bounds(cfg, args.bound_ranks, ours["forward_update_s"], Runtime(torch.device("cpu")))
        for split in ("none", "auto"):
            b = bounds[f"split_{split}"]
            print(f"bound for {args.bound_ranks} ranks, split {split}: parts per block {b['pieces']}, feedback "
                  f"{b['feedback_s']:.3f} s/step, speed-up bound {b['speedup_bound']:.2f}x")
        result["bounds"] = bounds
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device here")
    cfg = resolve(args.config, {"batch_size": args.batch_size}, [])
    if args.rank_worker:
        parallel_worker(args, cfg)
        return
    result = benchmark_parallel(args, cfg) if args.parallel else benchmark_sequential(args, cfg)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
