"""The training loop shared by train_sequential.py and train_parallel.py.

The loop does not know how feedback blocks are laid out over processes: it hands the block inputs to
a FeedbackPhase (LocalFeedback here, dtp.parallel.DistributedFeedback under torchrun) and gets the
trained feedback weights back in its own modules.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dtp import config as config_lib
from dtp.algorithm import (
    AllReduce,
    Autocast,
    BlockNoise,
    forward_losses,
    forward_pass,
    propagate_targets,
    train_feedback_block,
    weight_alignment,
)
from dtp.checkpoint import save_checkpoint, save_summary
from dtp.data import BatchLoader, DatasetSplits
from dtp.errors import TrainingError, UserError
from dtp.metrics import AverageMeter, topk_correct
from dtp.models import DTPNetwork


@dataclass
class Runtime:
    """Where this process computes and how: device and the autocast context (bf16 or none)."""

    device: torch.device
    autocast: Autocast = nullcontext


def autocast_for(device: torch.device, mixed_precision: str) -> Autocast:
    """bf16 autocast on `device`, or none; what Accelerate provides to the sequential script."""
    if mixed_precision == "bf16":
        return partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return nullcontext


class FeedbackPhase(Protocol):
    def train(self, block_inputs: list[Tensor], step: int, batch_total: int) -> list[Tensor]:
        """Train G_1..G_N on their inputs h_0..h_{N-1} (this process's rows of a batch of `batch_total`);
        return each block's mean L-DRL loss over the full batch."""

    def log(self, writer: SummaryWriter, step: int) -> None:
        """Write this phase's own per-step figures (timings) to TensorBoard."""

    def summary(self) -> dict[str, Any]:
        """Figures for summary.json."""

    def close(self) -> None:
        """Release workers, if any."""


class DataReplica(Protocol):
    """This process's share of every batch when the training loop runs as several data-parallel copies.

    The loop takes its rows of each batch, sums forward gradients and step statistics over the copies
    and leaves logging, evaluation and checkpoints to the main copy; how copies map to ranks is not
    its concern (dtp.parallel.ReplicaGroup under torchrun).
    """

    is_main: bool

    def rows(self, batch: int) -> slice:
        """The rows of a batch of `batch` rows this copy trains on."""

    def all_reduce(self, tensors: list[Tensor]) -> None:
        """Sum the tensors in place over all copies."""


class WholeBatch:
    """The one and only copy: all rows, nothing to sum."""

    is_main = True

    def rows(self, batch: int) -> slice:
        return slice(0, batch)

    def all_reduce(self, tensors: list[Tensor]) -> None:
        pass


@dataclass(frozen=True)
class BlockShard:
    """The rows of the full batch a process trains one feedback block on, and the sum over the parts."""

    rows: slice
    all_reduce: AllReduce | None


def make_feedback_optimizers(network: DTPNetwork, cfg: dict[str, Any]) -> list[torch.optim.SGD]:
    """One SGD per trainable feedback block (list index i−1 for G_i), momentum buffers created as zeros.

    Zero buffers behave exactly like SGD's lazily created ones and make the state flat-serialisable
    from the first step, which the parallel trainer relies on.
    """
    optimizers = []
    for i in range(1, network.n_feedback + 1):
        params = list(network.feedback_blocks[i].parameters())
        opt = torch.optim.SGD(params, lr=cfg["feedback"]["lr"][i - 1], momentum=cfg["feedback"]["momentum"])
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        optimizers.append(opt)
    return optimizers


def train_blocks(
    network: DTPNetwork,
    optimizers: list[torch.optim.SGD],
    cfg: dict[str, Any],
    blocks: list[int],
    block_inputs: list[Tensor],
    step: int,
    runtime: Runtime,
    batch_total: int | None = None,
    shards: dict[int, BlockShard] | None = None,
) -> dict[int, Tensor]:
    """Train the given feedback blocks (1-based) one after the other; used by every FeedbackPhase.

    A block listed in `shards` is trained on those rows of a batch of `batch_total` rows, its
    gradients summed with the other parts every iteration; any other block on its whole input.
    """
    fb = cfg["feedback"]
    losses = {}
    for i in blocks:
        x = block_inputs[i - 1]
        shard = (shards or {}).get(i, BlockShard(slice(0, x.shape[0]), None))
        losses[i] = train_feedback_block(
            network.forward_blocks[i],
            network.feedback_blocks[i],
            optimizers[i - 1],
            x,
            iterations=fb["iterations"][i - 1],
            sigma=fb["noise"][i - 1],
            samples=fb["samples"],
            noise=BlockNoise(cfg["seed"], i, step, shard.rows, runtime.device),
            autocast=runtime.autocast,
            batch_total=batch_total,
            all_reduce=shard.all_reduce,
        )
    return losses


@dataclass
class LocalFeedback:
    """Trains every feedback block in this process; `order` exists to show that order does not matter."""

    network: DTPNetwork
    optimizers: list[torch.optim.SGD]
    cfg: dict[str, Any]
    runtime: Runtime
    order: list[int] | None = None

    def train(self, block_inputs: list[Tensor], step: int, batch_total: int) -> list[Tensor]:
        order = self.order or list(range(1, self.network.n_feedback + 1))
        losses = train_blocks(self.network, self.optimizers, self.cfg, order, block_inputs, step, self.runtime,
                              batch_total)
        return [losses[i] for i in sorted(losses)]

    def log(self, writer: SummaryWriter, step: int) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class StopSignal:
    """SIGUSR1 or SIGTERM (e.g. a cluster's warning before its time limit) asks the loop to stop.

    The loop finishes the current step, checkpoints and returns, so `--resume` continues exactly.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name


@dataclass
class StepResult:
    logits: Tensor
    ce_loss: Tensor
    forward_losses: list[Tensor] = field(default_factory=list)
    feedback_losses: list[Tensor] = field(default_factory=list)
    top1: Tensor | None = None  # fraction correct in the full batch, once figures are reduced


def train_step(
    network: DTPNetwork,
    forward_opt: torch.optim.Optimizer,
    feedback: FeedbackPhase | None,
    x: Tensor,
    labels: Tensor,
    cfg: dict[str, Any],
    step: int,
    runtime: Runtime,
    batch_total: int | None = None,
    replica: DataReplica = WholeBatch(),
) -> StepResult:
    """One batch: feedback training, then targets and one forward SGD step (DTP/TP), or plain BP.

    x may be one data-parallel copy's rows of a batch of `batch_total` rows: the copies' forward
    gradients are summed before the step, so every copy takes the full-batch step.
    """
    batch_total = batch_total or x.shape[0]
    algorithm = cfg["algorithm"]
    if algorithm == "bp":
        with runtime.autocast():
            logits = network(x)
            loss = F.cross_entropy(logits.float(), labels)
        forward_opt.zero_grad(set_to_none=True)
        loss.backward()
        forward_opt.step()
        return StepResult(logits.detach(), loss.detach())
    blocks = list(network.forward_blocks)
    with runtime.autocast():
        outputs, indices = forward_pass(blocks, x)
    assert feedback is not None
    # Feedback training gets fp32 inputs whatever the autocast, so every FeedbackPhase sees the same tensors.
    fb_losses = feedback.train([h.detach().float() for h in outputs[:-1]], step, batch_total)
    with runtime.autocast():
        targets = propagate_targets(
            list(network.feedback_blocks), outputs, indices, labels, cfg["forward"]["beta"], algorithm
        )
        block_losses = forward_losses(outputs, targets, batch_total)
    forward_opt.zero_grad(set_to_none=True)
    torch.stack(block_losses).sum().backward()
    replica.all_reduce([p.grad for p in network.forward_blocks.parameters() if p.grad is not None])
    forward_opt.step()
    logits = outputs[-1].detach()
    ce = F.cross_entropy(logits.float(), labels)
    return StepResult(logits, ce, [l.detach() for l in block_losses], fb_losses)


@torch.no_grad()
def evaluate(network: DTPNetwork, loader: BatchLoader, runtime: Runtime) -> dict[str, float]:
    network.eval()
    loss, top1, top5, n = torch.zeros(()), torch.zeros(()), torch.zeros(()), 0
    for x, y in loader.epoch(0):
        x, y = x.to(runtime.device), y.to(runtime.device)
        with runtime.autocast():
            logits = network(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").cpu()
        c1, c5 = topk_correct(logits, y)
        top1 += c1.cpu()
        top5 += c5.cpu()
        n += y.numel()
    network.train()
    return {"loss": float(loss) / n, "top1": float(top1) / n, "top5": float(top5) / n}


def build_forward_optimizer(
    network: DTPNetwork, cfg: dict[str, Any]
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
    fwd = cfg["forward"]
    opt = torch.optim.SGD(
        network.forward_blocks.parameters(), lr=fwd["lr"], momentum=fwd["momentum"], weight_decay=fwd["weight_decay"]
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=fwd["t_max"], eta_min=fwd["eta_min"])
    return opt, sched


def _flat_hparams(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _full_batch_figures(result: StepResult, labels: Tensor, batch_total: int, stop_requested: bool,
                        replica: DataReplica) -> bool:
    """Turn one copy's step figures into the full batch's, in place, and agree on stopping: one collective.

    Every copy then sees the same losses (so a NaN stops all of them) and stops at the same step.
    """
    (correct,) = topk_correct(result.logits, labels, (1,))
    share = labels.numel() / batch_total
    stats = torch.stack([
        result.ce_loss.float() * share,
        correct.float() / batch_total,
        torch.tensor(float(stop_requested), device=labels.device),
        *[l.float() for l in result.forward_losses],
    ])
    replica.all_reduce([stats])
    result.ce_loss, result.top1 = stats[0], stats[1]
    result.forward_losses = list(stats[3:])
    return bool(stats[2] > 0)


def _check_finite(result: StepResult, step: int, cfg: dict[str, Any]) -> None:
    """One host sync per step: stop on NaN/inf before a bad update reaches a checkpoint."""
    values = torch.stack([result.ce_loss.float(), *[l.float() for l in result.forward_losses + result.feedback_losses]])
    if bool(torch.isfinite(values).all()):
        return
    bad = [i + 1 for i, l in enumerate(result.feedback_losses) if not math.isfinite(float(l))]
    if bad:
        lrs = [cfg["feedback"]["lr"][i - 1] for i in bad]
        hint = f"feedback loss of block(s) {bad} is not finite; lower feedback.lr for them (now {lrs})"
    else:
        hint = f"the forward loss is not finite; lower forward.lr (now {cfg['forward']['lr']}) or forward.beta"
    raise TrainingError(f"NaN/inf loss at step {step}: {hint}. The last checkpoint was left intact.")


def run_training(
    cfg: dict[str, Any],
    data: DatasetSplits,
    network: DTPNetwork,
    feedback_optimizers: list[torch.optim.SGD],
    feedback: FeedbackPhase | None,
    runtime: Runtime,
    out_dir: Path,
    max_steps: int | None = None,
    resume_state: dict[str, Any] | None = None,
    replica: DataReplica = WholeBatch(),
) -> dict[str, Any]:
    """Train until cfg['epochs'] (or max_steps total steps); write TensorBoard, checkpoints, summary.

    Only the main data-parallel copy evaluates and writes; every copy stops at the same step.
    """
    main = replica.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    train_loader = BatchLoader(data.train_x, data.train_y, cfg["batch_size"], data.mean, data.std,
                               train=True, seed=cfg["seed"])
    test_loader = BatchLoader(data.test_x, data.test_y, cfg["eval_batch_size"], data.mean, data.std,
                              train=False, seed=cfg["seed"])
    forward_opt, scheduler = build_forward_optimizer(network, cfg)
    step, wall_before = 0, 0.0
    if resume_state is not None:
        try:
            network.forward_blocks.load_state_dict(resume_state["forward"])
            network.feedback_blocks.load_state_dict(resume_state["feedback"])
            forward_opt.load_state_dict(resume_state["forward_optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            for i, (opt, state) in enumerate(zip(feedback_optimizers, resume_state["feedback_optimizers"])):
                opt.load_state_dict(state)
                # Feedback lrs have no schedule: the resumed config's values apply, e.g. after --set feedback.lr.
                opt.param_groups[0]["lr"] = cfg["feedback"]["lr"][i]
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"--resume: the checkpoint does not match this model/config ({exc})") from None
        step, wall_before = resume_state["step"], resume_state.get("wall_time_s", 0.0)
    steps_per_epoch = len(train_loader)
    total_steps = cfg["epochs"] * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)

    stop = StopSignal()
    stop.install()
    stopping = False
    writer = SummaryWriter(log_dir=str(out_dir)) if main else None
    if main:
        writer.add_text("config", "```\n" + config_lib.to_yaml(cfg) + "\n```", step)
    log_every, angles_every = cfg["log"]["every"], cfg["log"]["angles_every"]
    n_fb = network.n_feedback

    def checkpoint() -> None:
        save_checkpoint(out_dir, {
            "forward": network.forward_blocks.state_dict(),
            "feedback": network.feedback_blocks.state_dict(),
            "forward_optimizer": forward_opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "feedback_optimizers": [opt.state_dict() for opt in feedback_optimizers],
            "rng": {"torch": torch.get_rng_state()},
            "step": step,
            "epoch": step // steps_per_epoch,
            "wall_time_s": wall_before + time.perf_counter() - start_wall,
            "config": cfg,
        })

    start_wall = time.perf_counter()
    train_time, train_images = 0.0, 0
    metrics: dict[str, float] = {}
    evaluated_at = -1
    while step < total_steps and not stopping:
        epoch = step // steps_per_epoch
        first = step % steps_per_epoch
        n_batches = min(steps_per_epoch - first, total_steps - step)
        ce_meter, top1_meter = AverageMeter(), AverageMeter()
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=True,
                   disable=None if main else True)
        batches = train_loader.epoch(epoch, start=first)
        for _ in range(n_batches):
            t0 = time.perf_counter()
            x, y = next(batches)
            batch_total, rows = y.numel(), replica.rows(y.numel())
            x, y = x[rows].to(runtime.device, non_blocking=True), y[rows].to(runtime.device, non_blocking=True)
            result = train_step(network, forward_opt, feedback, x, y, cfg, step, runtime, batch_total, replica)
            stopping = _full_batch_figures(result, y, batch_total, stop.received is not None, replica)
            _check_finite(result, step, cfg)
            ce, acc = float(result.ce_loss), float(result.top1)
            dt = time.perf_counter() - t0
            train_time += dt
            train_images += batch_total
            ce_meter.update(ce, batch_total)
            top1_meter.update(acc, batch_total)
            step += 1
            bar.set_postfix(loss=f"{ce_meter.avg:.3f}", top1=f"{top1_meter.avg:.3f}", img_s=f"{batch_total / dt:.0f}")
            bar.update()
            if main and (step % log_every == 0 or step == total_steps):
                writer.add_scalar("train/loss", ce, step)
                writer.add_scalar("train/top1", acc, step)
                writer.add_scalar("train/forward_lr", forward_opt.param_groups[0]["lr"], step)
                writer.add_scalar("train/images_per_s", batch_total / dt, step)
                for i, l in enumerate(result.forward_losses):
                    writer.add_scalar(f"forward_loss/block{i}", float(l), step)
                for i, l in enumerate(result.feedback_losses, start=1):
                    writer.add_scalar(f"feedback_loss/block{i}", float(l), step)
                if feedback is not None:
                    feedback.log(writer, step)
            if main and cfg["algorithm"] != "bp" and (step % angles_every == 0 or step == total_steps):
                for i in range(1, n_fb + 1):
                    angle, dist = weight_alignment(network.forward_blocks[i], network.feedback_blocks[i])
                    writer.add_scalar(f"alignment/angle_block{i}", angle, step)
                    writer.add_scalar(f"alignment/distance_block{i}", dist, step)
            if stopping:
                break
        bar.close()
        if step % steps_per_epoch == 0:
            scheduler.step()
            evaluated_at = step
            if not main:
                continue
            metrics = evaluate(network, test_loader, runtime)
            for key, value in metrics.items():
                writer.add_scalar(f"val/{key}", value, step)
            tqdm.write(
                f"epoch {epoch}: train loss {ce_meter.avg:.4f} top1 {top1_meter.avg:.4f} | "
                f"val loss {metrics['loss']:.4f} top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f}"
            )
            checkpoint()
    if stopping:
        if main:
            if evaluated_at != step:
                checkpoint()
            writer.close()
            tqdm.write(f"{stop.received or 'a stop signal'} received: stopped at step {step} with a checkpoint in "
                       f"{out_dir}; continue with --resume {out_dir}")
        return {"stopped_by": stop.received or "another copy", "steps": step}
    if not main:
        return {"steps": step}
    if evaluated_at != step:
        metrics = evaluate(network, test_loader, runtime)
        for key, value in metrics.items():
            writer.add_scalar(f"val/{key}", value, step)
        tqdm.write(f"step {step}: val loss {metrics['loss']:.4f} top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f}")
        checkpoint()
    wall = wall_before + time.perf_counter() - start_wall
    summary = {
        "val_top1": metrics["top1"],
        "val_loss": metrics["loss"],
        "val_top5": metrics["top5"],
        "steps": step,
        "epochs": step / steps_per_epoch,
        "wall_time_s": wall,
        "train_images_per_s": train_images / train_time if train_time else 0.0,
        "algorithm": cfg["algorithm"],
        "dataset": cfg["dataset"],
    }
    if feedback is not None:
        summary.update(feedback.summary())
    writer.add_hparams(
        _flat_hparams(cfg),
        {"hparam/val_top1": metrics["top1"], "hparam/val_top5": metrics["top5"]},
        run_name=".",
    )
    writer.close()
    save_summary(out_dir, summary)
    return summary
