"""One training step and one evaluation, as plain functions: what the training loop repeats.

`train_step` trains on this copy's rows of a batch; `full_batch_figures` turns its figures into the
full batch's and `FiniteWatch` stops on a NaN before it reaches a checkpoint; `evaluate_network`
measures the network on a held-out split. Nothing here reads a device value on the host during a step:
figures stay on the device until the training loop reads them at its logging interval.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dtp.algorithm import VARIANTS, Variant, forward_pass
from dtp.models import Indices
from dtp.config import Config
from dtp.data import BatchLoader
from dtp.errors import TrainingError
from dtp.feedback import FeedbackPhase
from dtp.metrics import topk_correct
from dtp.models import DTPNetwork
from dtp.replica import DataReplica, WholeBatch
from dtp.runtime import Runtime


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
    cfg: Config,
    step: int,
    runtime: Runtime,
    batch_total: int | None = None,
    replica: DataReplica = WholeBatch(),
) -> StepResult:
    """One batch: feedback training, then targets and one forward optimiser step (DTP and its variants; DRL takes its
    targets before the feedback step), or plain BP.

    x may be one data-parallel copy's rows of a batch of `batch_total` rows: the copies' forward
    gradients are summed before the step, so every copy takes the full-batch step.
    """
    batch_total = batch_total or x.shape[0]
    variant = VARIANTS[cfg.algorithm]
    if not variant.trains_feedback:
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
    if variant.targets_before_feedback:
        targets = step_targets(variant, network, outputs, indices, labels, cfg, runtime)
    # Feedback training gets at least fp32 inputs whatever the autocast, so every FeedbackPhase sees the same tensors.
    fb_losses = feedback.train([at_least_fp32(h.detach()) for h in outputs[:-1]], step, batch_total)
    if not variant.targets_before_feedback:
        targets = step_targets(variant, network, outputs, indices, labels, cfg, runtime)
    with runtime.autocast():
        block_losses = variant.forward_loss(outputs, targets, batch_total)
    forward_opt.zero_grad(set_to_none=True)
    torch.stack(block_losses).sum().backward()
    replica.all_reduce([p.grad for p in network.forward_blocks.parameters() if p.grad is not None])
    forward_opt.step()
    logits = outputs[-1].detach()
    ce = F.cross_entropy(logits.float(), labels)
    return StepResult(logits, ce, [l.detach() for l in block_losses], fb_losses)


def step_targets(variant: Variant, network: DTPNetwork, outputs: list[Tensor], indices: list[Indices],
                 labels: Tensor, cfg: Config, runtime: Runtime) -> list[Tensor]:
    """t_0..t_N by the variant's rule, from the feedback weights as they are now."""
    assert variant.target_rule is not None
    with runtime.autocast():
        return variant.target_rule(list(network.feedback_blocks), outputs, indices, labels, cfg.forward.beta)


def at_least_fp32(t: Tensor) -> Tensor:
    """bf16 (autocast) values in fp32; fp32 and fp64 unchanged, so a float64 network computes in float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def full_batch_figures(result: StepResult, labels: Tensor, batch_total: int, stop_requested: bool,
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
    # One copy knows its own stop request; several agree on it, which reads the reduced flag.
    return stop_requested if replica.copies == 1 else bool(stats[2] > 0)


class FiniteWatch:
    """NaN/inf in a step's losses, watched on the device: `update` after every step reads nothing on the
    host; `check`, at the logging interval and before any checkpoint, reads it and stops the run with the
    first bad step, so a bad update never reaches a checkpoint."""

    def __init__(self) -> None:
        self.first_bad_step: Tensor | None = None  # −1 while every loss has been finite
        self.bad_at_first: Tensor | None = None  # which of (ce, forward losses, feedback losses) were bad then

    def update(self, result: StepResult, step: int) -> None:
        bad = ~torch.isfinite(torch.stack([result.ce_loss.float(), *[l.float() for l in result.forward_losses],
                                           *[l.float().to(result.ce_loss.device) for l in result.feedback_losses]]))
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self.bad_at_first = torch.zeros_like(bad)
        first = (self.first_bad_step < 0) & bad.any()
        self.bad_at_first = torch.where(first, bad, self.bad_at_first)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)

    def check(self, cfg: Config, n_feedback: int) -> None:
        if self.first_bad_step is None or int(self.first_bad_step) < 0:
            return
        flags = self.bad_at_first.tolist()
        first = VARIANTS[cfg.algorithm].feedback.first_trained  # G_1.. or DRL's Q_0..
        bad = [i + first for i, flag in enumerate(flags[len(flags) - n_feedback:]) if flag]
        if bad:
            lrs = [cfg.feedback.lr[i - first] for i in bad]
            hint = f"feedback loss of block(s) {bad} is not finite; lower feedback.lr for them (now {lrs})"
        else:
            hint = f"the forward loss is not finite; lower forward.lr (now {cfg.forward.lr}) or forward.beta"
        raise TrainingError(f"NaN/inf loss at step {int(self.first_bad_step)}: {hint}. "
                            "The last checkpoint was left intact.")


@torch.no_grad()
def evaluate_network(network: DTPNetwork, loader: BatchLoader, runtime: Runtime) -> dict[str, float]:
    """Mean loss, top-1 and top-5 over every example of the loader, summed exactly before dividing."""
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
