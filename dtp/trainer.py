"""The training loop shared by train_sequential.py and train_parallel.py.

`Trainer` reads top to bottom: restore (`load_state_dict`), then per epoch `train_epoch`,
`evaluate` and `save_checkpoint` (`state_dict`), then `finish`. The loop does not know how feedback
blocks are laid out over processes (it hands the block inputs to a FeedbackPhase) nor how data-
parallel copies map to ranks (a DataReplica).
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dtp import config as config_lib
from dtp.algorithm import VARIANTS, forward_losses, forward_pass, propagate_targets
from dtp.checkpoint import save_checkpoint, save_summary
from dtp.data import BatchLoader, DatasetSplits
from dtp.diagnostics import BackpropComparison, compare_to_backprop, weight_alignment, whole_tensor_angle
from dtp.errors import TrainingError, UserError
from dtp.feedback import FeedbackPhase
from dtp.metrics import AverageMeter, topk_correct
from dtp.models import DTPNetwork, weight_pairs
from dtp.optim import make_optimizer
from dtp.runtime import Runtime


class DataReplica(Protocol):
    """This process's share of every batch when the training loop runs as several data-parallel copies.

    The loop takes its rows of each batch, sums forward gradients and step statistics over the copies
    and leaves logging, evaluation and checkpoints to the main copy; how copies map to ranks is not
    its concern (dtp.parallel.layout.ReplicaGroup under torchrun).
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
    """One batch: feedback training, then targets and one forward optimiser step (DTP and its variants), or plain BP.

    x may be one data-parallel copy's rows of a batch of `batch_total` rows: the copies' forward
    gradients are summed before the step, so every copy takes the full-batch step.
    """
    batch_total = batch_total or x.shape[0]
    algorithm = cfg["algorithm"]
    if algorithm == "bp":
        with runtime.autocast():
            logits = network(x)
            loss = F.cross_entropy(at_least_fp32(logits), labels)
        forward_opt.zero_grad(set_to_none=True)
        loss.backward()
        forward_opt.step()
        return StepResult(logits.detach(), loss.detach())
    blocks = list(network.forward_blocks)
    with runtime.autocast():
        outputs, indices = forward_pass(blocks, x)
    assert feedback is not None
    # Feedback training gets at least fp32 inputs whatever the autocast, so every FeedbackPhase sees the same tensors.
    fb_losses = feedback.train([at_least_fp32(h.detach()) for h in outputs[:-1]], step, batch_total)
    with runtime.autocast():
        targets = propagate_targets(list(network.feedback_blocks), outputs, indices, labels, cfg["forward"]["beta"],
                                    VARIANTS[algorithm].difference_targets)
        block_losses = forward_losses(outputs, targets, batch_total)
    forward_opt.zero_grad(set_to_none=True)
    torch.stack(block_losses).sum().backward()
    replica.all_reduce([p.grad for p in network.forward_blocks.parameters() if p.grad is not None])
    forward_opt.step()
    logits = outputs[-1].detach()
    ce = F.cross_entropy(logits.float(), labels)
    return StepResult(logits, ce, [l.detach() for l in block_losses], fb_losses)


def at_least_fp32(t: Tensor) -> Tensor:
    """bf16 (autocast) values in fp32; fp32 and fp64 unchanged, so a float64 network computes in float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@torch.no_grad()
def evaluate_network(network: DTPNetwork, loader: BatchLoader, runtime: Runtime) -> dict[str, float]:
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
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The forward weights' optimiser (forward.optimizer) and its per-epoch schedule (forward.scheduler);
    feedback lrs have none."""
    fwd = cfg["forward"]
    opt = make_optimizer(network.forward_blocks.parameters(), fwd["optimizer"], fwd["lr"], fwd["momentum"],
                         fwd["weight_decay"])
    if fwd["scheduler"] == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=fwd["t_max"], eta_min=fwd["eta_min"])
    elif fwd["scheduler"] == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=fwd["step_size"], gamma=fwd["gamma"])
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    return opt, sched


@dataclass
class EarlyStopping:
    """Stop once val top-1 has not beaten its best by more than min_delta for `patience` evaluations."""

    patience: int
    min_delta: float
    best: float = -math.inf
    bad_evaluations: int = 0

    def update(self, top1: float) -> bool:
        """Record an evaluation; True when training should stop."""
        if top1 > self.best + self.min_delta:
            self.best, self.bad_evaluations = top1, 0
        else:
            self.bad_evaluations += 1
        return 0 < self.patience <= self.bad_evaluations


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


def _format_metrics(metrics: dict[str, float]) -> str:
    return f"val loss {metrics['loss']:.4f} top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f}"


class RunLog:
    """What the main copy writes while it trains: TensorBoard events under out_dir, and console lines."""

    def __init__(self, out_dir: Path, cfg: dict[str, Any], step: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.writer = SummaryWriter(log_dir=str(out_dir))
        self.writer.add_text("config", "```\n" + config_lib.to_yaml(cfg) + "\n```", step)
        self.last_alignment: dict[str, Any] = {}  # the latest figures, for summary.json
        self.last_bp_comparison: dict[str, Any] = {}

    def after_step(self, step: int, last: bool, result: StepResult, lr: float, images_per_s: float,
                   feedback: FeedbackPhase | None) -> None:
        """Scalars every log.every steps and at the last step."""
        w = self.writer
        if step % self.cfg["log"]["every"] == 0 or last:
            w.add_scalar("train/loss", float(result.ce_loss), step)
            w.add_scalar("train/top1", float(result.top1), step)
            w.add_scalar("train/forward_lr", lr, step)
            w.add_scalar("train/images_per_s", images_per_s, step)
            for i, l in enumerate(result.forward_losses):
                w.add_scalar(f"forward_loss/block{i}", float(l), step)
            for i, l in enumerate(result.feedback_losses, start=1):
                w.add_scalar(f"feedback_loss/block{i}", float(l), step)
            if feedback is not None:
                feedback.log(w, step)

    def alignment_due(self, step: int, last: bool) -> bool:
        """DTP and its variants compare themselves with backprop every log.angles_every steps and at the end."""
        return self.cfg["algorithm"] != "bp" and (step % self.cfg["log"]["angles_every"] == 0 or last)

    def alignment(self, step: int, network: DTPNetwork, comparison: BackpropComparison) -> None:
        """Per block: W against Bᵀ (per-filter angle, distance, whole-tensor angle) and the DTP update
        against the BP gradient; per parameter, the latter as the published callback logs it."""
        w, figures = self.writer, {}
        for i in range(1, network.n_feedback + 1):
            forward, feedback = network.forward_blocks[i], network.feedback_blocks[i]
            angle, distance = weight_alignment(forward, feedback)
            whole = whole_tensor_angle(weight_pairs(forward, feedback))
            w.add_scalar(f"alignment/angle_block{i}", angle, step)
            w.add_scalar(f"alignment/distance_block{i}", distance, step)
            w.add_scalar(f"alignment/whole_tensor_angle_block{i}", whole, step)
            figures[f"block{i}"] = {"angle": angle, "distance": distance, "whole_tensor_angle": whole}
        self.last_alignment = {"step": step, **figures}
        for i, (angle, distance) in enumerate(comparison.blocks):
            w.add_scalar(f"bp_comparison/angle_block{i}", angle, step)
            w.add_scalar(f"bp_comparison/distance_block{i}", distance, step)
        for name, (angle, distance) in comparison.parameters.items():
            w.add_scalar(f"bp_comparison/angle/{name}", angle, step)
            w.add_scalar(f"bp_comparison/distance/{name}", distance, step)
        self.last_bp_comparison = {"step": step, **{
            f"block{i}": {"angle": angle, "distance": distance} for i, (angle, distance) in enumerate(comparison.blocks)
        }}

    def evaluation(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"val/{key}", value, step)
        tqdm.write(f"{prefix}{_format_metrics(metrics)}")

    def close(self, final_metrics: dict[str, float] | None = None) -> None:
        if final_metrics is not None:
            self.writer.add_hparams(
                _flat_hparams(self.cfg),
                {"hparam/val_top1": final_metrics["top1"], "hparam/val_top5": final_metrics["top5"]},
                run_name=".",
            )
        self.writer.close()


class Trainer:
    """Trains one network with one feedback phase; only the main data-parallel copy evaluates and writes."""

    def __init__(self, cfg: dict[str, Any], network: DTPNetwork, feedback_optimizers: list[torch.optim.Optimizer],
                 feedback: FeedbackPhase | None, runtime: Runtime, replica: DataReplica = WholeBatch()) -> None:
        self.cfg, self.network, self.runtime, self.replica = cfg, network, runtime, replica
        self.feedback, self.feedback_optimizers = feedback, feedback_optimizers
        self.forward_opt, self.scheduler = build_forward_optimizer(network, cfg)
        self.step = 0
        self.steps_per_epoch = 1
        self.wall_before = 0.0  # seconds of the earlier runs this one resumes
        self.started = time.perf_counter()
        self.train_seconds, self.train_images = 0.0, 0
        self.stop = StopSignal()
        self.early_stopping = EarlyStopping(**cfg["early_stopping"])
        self.stopped_early = False
        self.log: RunLog | None = None

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds; `load_state_dict` continues from it exactly.

        Nothing draws from the global generator (dtp.seeding), so "rng" is not needed to continue; it is
        kept, and restored, so that checkpoints keep their keys and a resumed process starts from the
        global state the interrupted one had.
        """
        return {
            "forward": self.network.forward_blocks.state_dict(),
            "feedback": self.network.feedback_blocks.state_dict(),
            "forward_optimizer": self.forward_opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "feedback_optimizers": [opt.state_dict() for opt in self.feedback_optimizers],
            "rng": {"torch": torch.get_rng_state()},
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "wall_time_s": self.wall_before + time.perf_counter() - self.started,
            "early_stopping": {"best": self.early_stopping.best, "bad_evaluations": self.early_stopping.bad_evaluations},
            "config": self.cfg,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.network.forward_blocks.load_state_dict(state["forward"])
            self.network.feedback_blocks.load_state_dict(state["feedback"])
            self.forward_opt.load_state_dict(state["forward_optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            for i, (opt, opt_state) in enumerate(zip(self.feedback_optimizers, state["feedback_optimizers"])):
                opt.load_state_dict(opt_state)
                # Feedback lrs have no schedule: the resumed config's values apply, e.g. after --set feedback.lr.
                opt.param_groups[0]["lr"] = self.cfg["feedback"]["lr"][i]
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"--resume: the checkpoint does not match this model/config ({exc})") from None
        self.step, self.wall_before = state["step"], state.get("wall_time_s", 0.0)
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
        early = state.get("early_stopping", {})  # checkpoints from before early stopping have none
        self.early_stopping.best = early.get("best", -math.inf)
        self.early_stopping.bad_evaluations = early.get("bad_evaluations", 0)

    def fit(self, data: DatasetSplits, out_dir: Path | None, max_steps: int | None = None) -> dict[str, Any]:
        """Train until cfg['epochs'] (or max_steps steps in total); evaluate and checkpoint after each epoch.

        Every copy stops at the same step: at the end, on a signal, or on a NaN loss (an error).
        """
        cfg = self.cfg
        train_loader = BatchLoader(data.train_x, data.train_y, cfg["batch_size"], data.mean, data.std,
                                   train=True, seed=cfg["seed"])
        test_loader = BatchLoader(data.test_x, data.test_y, cfg["eval_batch_size"], data.mean, data.std,
                                  train=False, seed=cfg["seed"])
        self.steps_per_epoch = len(train_loader)
        total_steps = cfg["epochs"] * self.steps_per_epoch
        if max_steps is not None:
            total_steps = min(total_steps, max_steps)
        if self.replica.is_main:
            assert out_dir is not None
            self.log = RunLog(out_dir, cfg, self.step)
        self.stop.install()
        if self.log is not None:  # after install: whoever waits for this line may signal the run
            print(f"training from step {self.step}: SIGUSR1 or SIGTERM stops with a checkpoint", flush=True)
        self.started = time.perf_counter()
        metrics: dict[str, float] = {}
        evaluated_at, stopping, early = -1, False, False
        while self.step < total_steps and not stopping and not early:
            epoch = self.step // self.steps_per_epoch
            stopping, ce, top1 = self.train_epoch(train_loader, epoch, total_steps)
            if self.step % self.steps_per_epoch == 0:
                evaluated_at = self.step
                metrics, early = self.end_epoch(test_loader, out_dir,
                                                f"epoch {epoch}: train loss {ce:.4f} top1 {top1:.4f} | ")
        if stopping:
            return self.stopped(out_dir, checkpointed=evaluated_at == self.step)
        if self.log is None:
            return {"steps": self.step}
        if evaluated_at != self.step:
            metrics = self.evaluate(test_loader, f"step {self.step}: ")
            self.save_checkpoint(out_dir)
        return self.finish(out_dir, metrics)

    def train_epoch(self, loader: BatchLoader, epoch: int, total_steps: int) -> tuple[bool, float, float]:
        """Train the rest of `epoch` (or up to total_steps); return (stop requested, mean loss, mean top-1)."""
        first = self.step % self.steps_per_epoch
        n_batches = min(self.steps_per_epoch - first, total_steps - self.step)
        ce_meter, top1_meter = AverageMeter(), AverageMeter()
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=True,
                   disable=None if self.log is not None else True)
        batches = loader.epoch(epoch, start=first)
        stopping = False
        for _ in range(n_batches):
            t0 = time.perf_counter()
            x, y = next(batches)
            result, stopping = self.train_batch(x, y)
            dt = time.perf_counter() - t0
            batch_total = y.numel()
            self.train_seconds += dt
            self.train_images += batch_total
            ce_meter.update(float(result.ce_loss), batch_total)
            top1_meter.update(float(result.top1), batch_total)
            self.step += 1
            bar.set_postfix(loss=f"{ce_meter.avg:.3f}", top1=f"{top1_meter.avg:.3f}", img_s=f"{batch_total / dt:.0f}")
            bar.update()
            if self.log is not None:
                last = self.step == total_steps
                self.log.after_step(self.step, last, result, self.forward_opt.param_groups[0]["lr"],
                                    batch_total / dt, self.feedback)
                if self.log.alignment_due(self.step, last):
                    self.log.alignment(self.step, self.network, self.compare_to_backprop(x, y))
            if stopping:
                break
        bar.close()
        return stopping, ce_meter.avg, top1_meter.avg

    def train_batch(self, x: Tensor, y: Tensor) -> tuple[StepResult, bool]:
        """One step on this copy's rows of the batch; the figures come back for the full batch."""
        batch_total, rows = y.numel(), self.replica.rows(y.numel())
        x, y = x[rows].to(self.runtime.device, non_blocking=True), y[rows].to(self.runtime.device, non_blocking=True)
        result = train_step(self.network, self.forward_opt, self.feedback, x, y, self.cfg, self.step, self.runtime,
                            batch_total, self.replica)
        stopping = _full_batch_figures(result, y, batch_total, self.stop.received is not None, self.replica)
        _check_finite(result, self.step, self.cfg)
        return result, stopping

    def compare_to_backprop(self, x: Tensor, y: Tensor) -> BackpropComparison:
        """dtp.diagnostics.compare_to_backprop on this copy's rows of the batch just trained on."""
        rows = self.replica.rows(y.numel())
        x, y = x[rows].to(self.runtime.device), y[rows].to(self.runtime.device)
        return compare_to_backprop(self.network, x, y, VARIANTS[self.cfg["algorithm"]].difference_targets)

    def end_epoch(self, loader: BatchLoader, out_dir: Path | None, prefix: str) -> tuple[dict[str, float], bool]:
        """Step the lr schedule; the main copy evaluates and checkpoints; every copy learns whether to stop early."""
        self.scheduler.step()
        metrics, decision = {}, False
        if self.log is not None:
            metrics = self.evaluate(loader, prefix)
            decision = self.early_stopping.update(metrics["top1"])
        if self.early_stopping.patience:
            flag = torch.tensor([float(decision)], device=self.runtime.device)
            self.replica.all_reduce([flag])  # every copy stops at the same step
            self.stopped_early = bool(flag > 0)
        if self.log is not None:
            self.save_checkpoint(out_dir)
            if self.stopped_early:
                tqdm.write(f"early stopping: val top-1 has not beaten {self.early_stopping.best:.4f} for "
                           f"{self.early_stopping.patience} evaluation(s)")
        return metrics, self.stopped_early

    def evaluate(self, loader: BatchLoader, prefix: str) -> dict[str, float]:
        assert self.log is not None
        metrics = evaluate_network(self.network, loader, self.runtime)
        self.log.evaluation(self.step, metrics, prefix)
        return metrics

    def save_checkpoint(self, out_dir: Path) -> None:
        save_checkpoint(out_dir, self.state_dict())

    def stopped(self, out_dir: Path | None, checkpointed: bool) -> dict[str, Any]:
        """After a stop request: the main copy checkpoints (unless the epoch end just did) and says how to go on."""
        if self.log is not None:
            if not checkpointed:
                self.save_checkpoint(out_dir)
            self.log.close()
            tqdm.write(f"{self.stop.received or 'a stop signal'} received: stopped at step {self.step} with a "
                       f"checkpoint in {out_dir}; continue with --resume {out_dir}")
        return {"stopped_by": self.stop.received or "another copy", "steps": self.step}

    def finish(self, out_dir: Path, metrics: dict[str, float]) -> dict[str, Any]:
        """Write summary.json and the hyperparameters with the final validation figures."""
        summary = {
            "val_top1": metrics["top1"],
            "val_loss": metrics["loss"],
            "val_top5": metrics["top5"],
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "wall_time_s": self.wall_before + time.perf_counter() - self.started,
            "train_images_per_s": self.train_images / self.train_seconds if self.train_seconds else 0.0,
            "algorithm": self.cfg["algorithm"],
            "dataset": self.cfg["dataset"],
            "stopped_early": self.stopped_early,
            "best_val_top1": max(self.early_stopping.best, metrics["top1"]),
        }
        assert self.log is not None
        if self.log.last_alignment:
            summary["alignment"] = self.log.last_alignment
            summary["bp_comparison"] = self.log.last_bp_comparison
        if self.feedback is not None:
            summary.update(self.feedback.summary())
        self.log.close(metrics)
        save_summary(out_dir, summary)
        return summary
