"""The training loop shared by train_sequential.py and train_parallel.py.

`Trainer` reads top to bottom: restore (`load_state_dict`), then per epoch `train_epoch`,
`evaluate` and `save_checkpoint` (`state_dict`), then `finish`. The loop does not know how feedback
blocks are laid out over processes (it hands the block inputs to a FeedbackPhase) nor how data-
parallel copies map to ranks (a DataReplica). One step's work is dtp.step; what is logged, dtp.runlog.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dtp.algorithm import VARIANTS
from dtp.checkpoint import save_checkpoint, save_summary
from dtp.config import Config
from dtp.data import BatchLoader, DatasetSplits
from dtp.diagnostics import BackpropComparison, compare_to_backprop
from dtp.drl_training import feedback_only_epochs
from dtp.errors import UserError
from dtp.feedback import FeedbackPhase
from dtp.metrics import AverageMeter
from dtp.models import DTPNetwork
from dtp.optim import build_forward_optimizer
from dtp.replica import DataReplica, WholeBatch
from dtp.runlog import RunLog, epoch_prefix, progress_bar, step_prefix
from dtp.runtime import Runtime
from dtp.step import FiniteWatch, StepResult, evaluate_network, full_batch_figures, train_step
from dtp.stopping import EarlyStopping, StopSignal


@dataclass(frozen=True)
class FitResult:
    """How `fit` ended, the same shape on every copy and for every ending.

    stopped_by names the signal (or "another copy") when a stop request ended the run early;
    summary is summary.json's contents, on the main copy of a run that reached its end, else None.
    """

    steps: int
    stopped_by: str | None = None
    summary: dict[str, Any] | None = None


class Trainer:
    """Trains one network with one feedback phase; only the main data-parallel copy evaluates and writes."""

    def __init__(self, cfg: Config, network: DTPNetwork, feedback_optimizers: list[torch.optim.Optimizer],
                 feedback: FeedbackPhase | None, runtime: Runtime, replica: DataReplica = WholeBatch()) -> None:
        self.cfg, self.network, self.runtime, self.replica = cfg, network, runtime, replica
        self.feedback, self.feedback_optimizers = feedback, feedback_optimizers
        self.forward_opt, self.scheduler = build_forward_optimizer(network, cfg.forward)
        self.step = 0
        self.steps_per_epoch = 1
        self.wall_before = 0.0  # seconds of the earlier runs this one resumes
        self.started = time.perf_counter()
        self.train_seconds, self.train_images = 0.0, 0
        self.stop = StopSignal()
        self.early_stopping = EarlyStopping(cfg.early_stopping.patience, cfg.early_stopping.min_delta)
        self.finite = FiniteWatch()
        self.stopped_early = False
        self._log: RunLog | None = None
        self.feedback_only = feedback_only_epochs(cfg, network, feedback)  # DRL's s-DDTP passes, or None

    @property
    def log(self) -> RunLog:
        """The main copy's RunLog, which `fit` opens before the first step."""
        assert self._log is not None, "only the main copy logs, and only once fit has started"
        return self._log

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
            "feedback_only_batches": self.feedback_only.done if self.feedback_only else 0,  # drl's s-DDTP passes
            "config": self.cfg.to_dict(),
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
                opt.param_groups[0]["lr"] = self.cfg.feedback.lr[i]
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"--resume: the checkpoint does not match this model/config ({exc})") from None
        self.step, self.wall_before = state["step"], state.get("wall_time_s", 0.0)
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
        early = state.get("early_stopping", {})  # checkpoints from before early stopping have none
        self.early_stopping.best = early.get("best", -math.inf)
        self.early_stopping.bad_evaluations = early.get("bad_evaluations", 0)
        if self.feedback_only is not None:
            self.feedback_only.done = state.get("feedback_only_batches", 0)

    def fit(self, data: DatasetSplits, out_dir: Path | None, max_steps: int | None = None) -> FitResult:
        """Train until cfg.epochs (or max_steps steps in total); evaluate and checkpoint after each epoch.

        Every copy stops at the same step: at the end, on a signal, or on a NaN loss (an error).
        """
        train_loader, test_loader = _loaders(data, self.cfg, self.runtime.device)
        self.steps_per_epoch = len(train_loader)
        total_steps = self.cfg.epochs * self.steps_per_epoch
        if max_steps is not None:
            total_steps = min(total_steps, max_steps)
        self.start(out_dir)
        metrics: dict[str, float] = {}
        evaluated_at, stopping, early = -1, False, False
        while self.step < total_steps and not stopping and not early:
            epoch = self.step // self.steps_per_epoch
            writer = self._log.writer if self._log else None
            if self.feedback_only and self.feedback_only.run(train_loader, epoch, self.stop, writer):
                return self.stopped(out_dir, checkpointed=False)
            stopping, ce, top1 = self.train_epoch(train_loader, epoch, total_steps)
            if self.step % self.steps_per_epoch == 0:
                evaluated_at = self.step
                metrics, early = self.end_epoch(test_loader, out_dir, epoch_prefix(epoch, ce, top1))
        if stopping:
            return self.stopped(out_dir, checkpointed=evaluated_at == self.step)
        if not self.replica.is_main:
            return FitResult(self.step)
        if evaluated_at != self.step:
            metrics = self.evaluate(test_loader, step_prefix(self.step))
            self.save_checkpoint(out_dir)
        return FitResult(self.step, summary=self.finish(out_dir, metrics))

    def start(self, out_dir: Path | None) -> None:
        """Open the main copy's log and listen for stop signals; the clock starts here."""
        if self.replica.is_main:
            assert out_dir is not None
            self._log = RunLog(out_dir, self.cfg, self.step)
        self.stop.install()
        if self.replica.is_main:
            self.log.training_from(self.step)
        self.started = time.perf_counter()

    def train_epoch(self, loader: BatchLoader, epoch: int, total_steps: int) -> tuple[bool, float, float]:
        """Train the rest of `epoch` (or up to total_steps); return (stop requested, mean loss, mean top-1)."""
        first = self.step % self.steps_per_epoch
        n_batches = min(self.steps_per_epoch - first, total_steps - self.step)
        ce_meter, top1_meter = AverageMeter(), AverageMeter()
        bar = progress_bar(n_batches, epoch, show=self.replica.is_main)
        batches = loader.epoch(epoch, start=first)
        stopping = False
        for b in range(n_batches):
            t0 = time.perf_counter()
            x, y = next(batches)
            result, stopping = self.train_batch(x, y)
            dt = time.perf_counter() - t0
            batch_total = y.numel()
            self.train_seconds += dt
            self.train_images += batch_total
            ce_meter.update(result.ce_loss, batch_total)
            top1_meter.update(result.top1, batch_total)
            self.step += 1
            if self.step % self.cfg.log.every == 0 or stopping or b == n_batches - 1:
                # Every copy reads its figures here, at the same steps: every log.every and before any checkpoint.
                self.finite.check(self.cfg, self.network.n_feedback)
                bar.set_postfix(loss=f"{ce_meter.avg:.3f}", top1=f"{top1_meter.avg:.3f}",
                                img_s=f"{batch_total / dt:.0f}")
            bar.update()
            if self.replica.is_main:
                self.log_step(x, y, result, batch_total / dt, last=self.step == total_steps)
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
        stopping = full_batch_figures(result, y, batch_total, self.stop.received is not None, self.replica)
        self.finite.update(result, self.step)
        return result, stopping

    def log_step(self, x: Tensor, y: Tensor, result: StepResult, images_per_s: float, last: bool) -> None:
        """The main copy's scalars after a step, and when due its comparison with backprop on the same batch."""
        self.log.after_step(self.step, last, result, self.forward_opt.param_groups[0]["lr"], images_per_s,
                            self.feedback)
        if self.log.alignment_due(self.step, last):
            self.log.alignment(self.step, self.network, self.compare_to_backprop(x, y))

    def compare_to_backprop(self, x: Tensor, y: Tensor) -> BackpropComparison:
        """dtp.diagnostics.compare_to_backprop on this copy's rows of the batch just trained on."""
        rows = self.replica.rows(y.numel())
        x, y = x[rows].to(self.runtime.device), y[rows].to(self.runtime.device)
        return compare_to_backprop(self.network, x, y, VARIANTS[self.cfg.algorithm])

    def end_epoch(self, loader: BatchLoader, out_dir: Path | None, prefix: str) -> tuple[dict[str, float], bool]:
        """Step the lr schedule; the main copy evaluates and checkpoints; every copy learns whether to stop early."""
        self.scheduler.step()
        metrics, decision = {}, False
        if self.replica.is_main:
            metrics = self.evaluate(loader, prefix)
            decision = self.early_stopping.update(metrics["top1"])
        if self.early_stopping.patience:
            flag = torch.tensor([float(decision)], device=self.runtime.device)
            self.replica.all_reduce([flag])  # every copy stops at the same step
            self.stopped_early = bool(flag > 0)
        if self.replica.is_main:
            self.save_checkpoint(out_dir)
            if self.stopped_early:
                self.log.early_stop(self.early_stopping.best, self.early_stopping.patience)
        return metrics, self.stopped_early

    def evaluate(self, loader: BatchLoader, prefix: str) -> dict[str, float]:
        metrics = evaluate_network(self.network, loader, self.runtime)
        self.log.evaluation(self.step, metrics, prefix)
        return metrics

    def save_checkpoint(self, out_dir: Path) -> None:
        self.finite.check(self.cfg, self.network.n_feedback)  # never a checkpoint of weights a NaN reached
        save_checkpoint(out_dir, self.state_dict())

    def stopped(self, out_dir: Path | None, checkpointed: bool) -> FitResult:
        """After a stop request: the main copy checkpoints (unless the epoch end just did) and says how to go on."""
        if self.replica.is_main:
            if not checkpointed:
                self.save_checkpoint(out_dir)
            self.log.stopped(self.step, self.stop.received)
        return FitResult(self.step, stopped_by=self.stop.received or "another copy")

    def finish(self, out_dir: Path, metrics: dict[str, float]) -> dict[str, Any]:
        """Write summary.json and the hyperparameters with the final validation figures; return the summary."""
        summary = {
            "val_top1": metrics["top1"],
            "val_loss": metrics["loss"],
            "val_top5": metrics["top5"],
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "wall_time_s": self.wall_before + time.perf_counter() - self.started,
            "train_images_per_s": self.train_images / self.train_seconds if self.train_seconds else 0.0,
            "algorithm": self.cfg.algorithm,
            "dataset": self.cfg.dataset,
            "stopped_early": self.stopped_early,
            "best_val_top1": max(self.early_stopping.best, metrics["top1"]),
        }
        if self.log.last_alignment:
            summary["alignment"] = self.log.last_alignment
            summary["bp_comparison"] = self.log.last_bp_comparison
        if self.feedback is not None:
            summary.update(self.feedback.summary())
        self.log.close(metrics)
        save_summary(out_dir, summary)
        return summary


def _loaders(data: DatasetSplits, cfg: Config, device: torch.device) -> tuple[BatchLoader, BatchLoader]:
    """The shuffled (and, with cfg.augment, augmented) training batches and the fixed-order evaluation batches,
    normalised per cfg.normalize, in cfg.precision, over the dataset moved to `device` once: batches are
    gathered, augmented and normalised there, with no per-step copies."""
    mean, std = data.mean, data.std
    if cfg.normalize == "half":
        mean, std = torch.full_like(mean, 0.5), torch.full_like(std, 0.5)
    dtype = getattr(torch, cfg.precision)
    train = BatchLoader(data.train_x.to(device), data.train_y.to(device), cfg.batch_size, mean, std, train=True,
                        seed=cfg.seed, augmented=cfg.augment, dtype=dtype)
    test = BatchLoader(data.test_x.to(device), data.test_y.to(device), cfg.eval_batch_size, mean, std, train=False,
                       seed=cfg.seed, dtype=dtype)
    return train, test
