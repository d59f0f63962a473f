"""DRL's feedback phase and the s-DDTP schedule of feedback-only passes over the training set.

`DirectFeedback` trains Q_0..Q_{L−1} in this process on a step's activations (both protocols).
`FeedbackOnlyEpochs` adds s-DDTP's passes that train only the Q's: `feedback.fb_epochs` before the
first epoch and `feedback.extra_fb_epochs` before every later one. Without them (both 0) DRL runs as
p-DDTP: the Q's learn only alongside the forward weights, `feedback.iterations` steps per batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from dtp.config import Config
from dtp.data import BatchLoader
from dtp.drl import FEEDBACK_ONLY_STEP, TRAINING_STEP, drl_noise_generator, train_feedback_map
from dtp.errors import TrainingError
from dtp.feedback import FeedbackPhase, TrainsInThisProcess
from dtp.models import DTPNetwork
from dtp.runtime import Runtime
from dtp.seeding import derive_seed
from dtp.stopping import StopSignal

FEEDBACK_ONLY_ORDER_STREAM = 0x46424F  # keys the feedback-only passes' batch order apart from the epochs' ("FBO")
LossReport = Callable[[int, list[float]], None]  # (feedback-only batches so far, loss per map)


@dataclass
class DirectFeedback(TrainsInThisProcess):
    """Trains every Q_i in this process, each with its own optimiser. All have the same settings and every
    step updates each Q_i once (one step per batch in s-DDTP), so this is one Adam step over all the Q's
    together: Adam and its weight decay act on each weight alone."""

    network: DTPNetwork
    optimizers: list[torch.optim.Optimizer]
    cfg: Config
    runtime: Runtime

    def train(self, block_inputs: list[Tensor], step: int, batch_total: int) -> list[Tensor]:
        """Train Q_0..Q_{L−1} on h_0..h_{L−1} of training step `step` (whole batches only)."""
        if batch_total != block_inputs[0].shape[0]:
            raise ValueError("DRL's feedback maps train on whole batches only (train_sequential.py)")
        return self._train(block_inputs, TRAINING_STEP, step)

    def train_feedback_only(self, block_inputs: list[Tensor], batch_index: int) -> list[Tensor]:
        """The same on the `batch_index`-th batch of the feedback-only passes (counted over the run)."""
        return self._train(block_inputs, FEEDBACK_ONLY_STEP, batch_index)

    def _train(self, hidden: list[Tensor], kind: int, step: int) -> list[Tensor]:
        blocks = list(self.network.forward_blocks)
        with torch.no_grad(), self.runtime.autocast():
            h_out, _ = blocks[-1](hidden[-1])
        fb, losses = self.cfg.feedback, []
        for i, (q, optimizer) in enumerate(zip(self.network.trained_feedback, self.optimizers)):
            generator = drl_noise_generator(self.cfg.seed, kind, i, step, self.runtime.device)
            losses.append(train_feedback_map(q, optimizer, blocks, i, hidden[i], h_out, fb.iterations[i], fb.noise[i],
                                             generator, self.runtime.autocast))
        return losses


@dataclass
class FeedbackOnlyEpochs:
    """s-DDTP's feedback-only passes, due before each epoch: fb_epochs before epoch 0, extra_fb_epochs before
    every later one. (Meulemans et al. take the extra passes after each epoch; the one after the last epoch,
    which no forward update follows, is not taken here.)

    Progress is one count, `done` feedback-only batches, kept in the checkpoint: batch order, noise and
    weights depend only on it, so a run stopped inside a pass resumes there exactly.
    """

    cfg: Config
    network: DTPNetwork
    feedback: DirectFeedback
    done: int = 0
    losses: Tensor | None = None  # the latest batch's loss per map, on the device
    finite: Tensor | None = None  # on the device: whether every feedback-only loss so far was finite
    reported_at: int = -1  # `done` at the last report, so that a stop does not report the same batch twice

    def due(self, epoch: int, batches_per_pass: int) -> int:
        """Feedback-only batches to have taken before training epoch `epoch` starts."""
        fb = self.cfg.feedback
        return batches_per_pass * (fb.fb_epochs + epoch * fb.extra_fb_epochs)

    def run(self, loader: BatchLoader, epoch: int, stop: StopSignal, log: LossReport | None) -> bool:
        """Take the feedback-only batches due before `epoch`; True when a stop request ended them early.
        `log` (the main copy's RunLog) receives the losses read at each report."""
        passes = loader.with_seed(derive_seed(FEEDBACK_ONLY_ORDER_STREAM, self.cfg.seed))
        per_pass, target = len(loader), self.due(epoch, len(loader))
        values: list[float] = []
        while self.done < target:
            pass_index, first = divmod(self.done, per_pass)
            batches = passes.epoch(pass_index, start=first)
            for _ in range(min(per_pass - first, target - self.done)):
                if stop.received is not None:
                    if self.reported_at != self.done:
                        self.report(log)  # before the checkpoint the stop writes
                    return True
                x, _ = next(batches)
                self.take_batch(x.to(self.feedback.runtime.device))
                if self.done % self.cfg.log.every == 0 or self.done % per_pass == 0:
                    values = self.report(log)
            if self.done % per_pass == 0:
                tqdm.write(f"feedback-only pass {pass_index}: DRL loss per map {[round(v, 4) for v in values]}")
        return False

    def take_batch(self, x: Tensor) -> None:
        """One feedback-only batch: the forward pass without gradient, then each Q_i's steps on it; nothing is
        read on the host."""
        runtime = self.feedback.runtime
        with torch.no_grad(), runtime.autocast():
            hidden = []
            for block in list(self.network.forward_blocks)[:-1]:
                x, _ = block(x)
                hidden.append(x.to(torch.promote_types(x.dtype, torch.float32)))
        self.losses = torch.stack(self.feedback.train_feedback_only(hidden, self.done))
        finite = torch.isfinite(self.losses).all()
        self.finite = finite if self.finite is None else self.finite & finite
        self.done += 1

    def report(self, log: LossReport | None) -> list[float]:
        """Read the latest losses on the host (every log.every batches, at a pass's end and before a stop's
        checkpoint): stop on a NaN before it reaches a checkpoint, else log them and return them."""
        if self.losses is None:
            return []
        if not bool(self.finite):
            raise TrainingError(f"NaN/inf DRL loss in the feedback-only batches before batch {self.done}; lower "
                                f"feedback.lr (now {list(self.cfg.feedback.lr)}). The last checkpoint was left intact.")
        values = self.losses.tolist()
        if log is not None:
            log(self.done, values)
        self.reported_at = self.done
        return values


def feedback_only_epochs(cfg: Config, network: DTPNetwork, feedback: FeedbackPhase | None) -> FeedbackOnlyEpochs | None:
    """The run's s-DDTP passes, or None when it takes none (every algorithm but DRL, and DRL's p-DDTP)."""
    if not (cfg.feedback.fb_epochs or cfg.feedback.extra_fb_epochs):
        return None
    if not isinstance(feedback, DirectFeedback):
        raise TypeError("feedback-only epochs train DRL's direct feedback maps in this process only")
    return FeedbackOnlyEpochs(cfg, network, feedback)
