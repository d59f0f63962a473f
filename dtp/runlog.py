"""What a run reports while it trains, decided in one place: TensorBoard events and console lines.

Only the main data-parallel copy keeps a RunLog; the others show no progress bar.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dtp import config as config_lib
from dtp.algorithm import VARIANTS
from dtp.diagnostics import BackpropComparison, aligned_blocks, weight_alignment, whole_tensor_angle
from dtp.feedback import FeedbackPhase
from dtp.models import DTPNetwork, weight_pairs
from dtp.step import StepResult


def progress_bar(n_batches: int, epoch: int, show: bool) -> tqdm:
    """The per-epoch bar, in a terminal only (tqdm decides), and never on a copy that is not the main one."""
    return tqdm(total=n_batches, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=True,
                disable=None if show else True)


def epoch_prefix(epoch: int, ce: float, top1: float) -> str:
    """The start of the line an epoch's evaluation prints: the epoch's mean training figures."""
    return f"epoch {epoch}: train loss {ce:.4f} top1 {top1:.4f} | "


def step_prefix(step: int) -> str:
    """The start of the line the evaluation after a run's last, mid-epoch step prints."""
    return f"step {step}: "


class RunLog:
    """What the main copy writes while it trains: TensorBoard events under out_dir, and console lines."""

    def __init__(self, out_dir: Path, cfg: config_lib.Config, step: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.out_dir = cfg, out_dir
        self.writer = SummaryWriter(log_dir=str(out_dir))
        self.writer.add_text("config", "```\n" + config_lib.to_yaml(cfg) + "\n```", step)
        self.last_alignment: dict[str, Any] = {}  # the latest figures, for summary.json
        self.last_bp_comparison: dict[str, Any] = {}

    def training_from(self, step: int) -> None:
        """Printed once the stop signals are installed: whoever waits for this line may signal the run."""
        print(f"training from step {step}: SIGUSR1 or SIGTERM stops with a checkpoint", flush=True)

    def after_step(self, step: int, last: bool, result: StepResult, lr: float, images_per_s: float,
                   feedback: FeedbackPhase | None) -> None:
        """Scalars every log.every steps and at the last step."""
        w = self.writer
        if step % self.cfg.log.every == 0 or last:
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
        return VARIANTS[self.cfg.algorithm].trains_feedback and (step % self.cfg.log.angles_every == 0 or last)

    def alignment(self, step: int, network: DTPNetwork, comparison: BackpropComparison) -> None:
        """Per block: W against Bᵀ (per-filter angle, distance, whole-tensor angle) and the DTP update
        against the BP gradient; per parameter, the latter as the published callback logs it."""
        w, figures = self.writer, {}
        for i in aligned_blocks(network):
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

    def early_stop(self, best: float, patience: int) -> None:
        tqdm.write(f"early stopping: val top-1 has not beaten {best:.4f} for {patience} evaluation(s)")

    def stopped(self, step: int, received: str | None) -> None:
        """Close after a stop request and say how to go on."""
        self.close()
        tqdm.write(f"{received or 'a stop signal'} received: stopped at step {step} with a "
                   f"checkpoint in {self.out_dir}; continue with --resume {self.out_dir}")

    def close(self, final_metrics: dict[str, float] | None = None) -> None:
        """Write the hyperparameters with the final validation figures, when the run reached its end."""
        if final_metrics is not None:
            self.writer.add_hparams(
                _flat_hparams(self.cfg.to_dict()),
                {"hparam/val_top1": final_metrics["top1"], "hparam/val_top5": final_metrics["top5"]},
                run_name=".",
            )
        self.writer.close()


def _format_metrics(metrics: dict[str, float]) -> str:
    return f"val loss {metrics['loss']:.4f} top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f}"


def _flat_hparams(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested config as TensorBoard's hparams plugin takes it: dotted keys, plain values."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
