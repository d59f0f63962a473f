"""What a run reports while it trains, decided in one place and written to two sinks: TensorBoard
events and metrics.jsonl receive the same records, keyed by the same tags; and console lines.

Only the main data-parallel copy keeps a RunLog.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dtp import config as config_lib
from dtp.algorithm import VARIANTS
from dtp.diagnostics import BackpropComparison, aligned_blocks, weight_alignment, whole_tensor_angle
from dtp.feedback import FeedbackPhase
from dtp.metrics_file import METRICS, Checkpointed, MetricsFile
from dtp.models import DTPNetwork, weight_pairs
from dtp.step import StepResult


def epoch_prefix(epoch: int, ce: float, top1: float) -> str:
    """The start of the line an epoch's evaluation prints: the epoch's mean training figures."""
    return f"epoch {epoch}: train loss {ce:.4f} top1 {top1:.4f} | "


def step_prefix(step: int) -> str:
    """The start of the line the evaluation after a run's last, mid-epoch step prints."""
    return f"step {step}: "


class RunLog:
    """What the main copy writes while it trains, under out_dir.

    Records are "start" (each time the run starts or resumes: its algorithm, layout and config),
    "train" (every log.every steps and at the last step: training figures, timing, and the comparison
    with backprop when computed), "val" (each evaluation) and, for DRL's s-DDTP, "feedback_only" (its
    feedback-only batches' losses, with their count as "batch"). Each carries its step, epoch
    (step / steps per epoch) and wall_s, the seconds of training since the run first started, which a
    resumed run continues (`elapsed`). A resumed run's metrics.jsonl continues `history`'s.
    """

    def __init__(self, out_dir: Path, cfg: config_lib.Config, step: int, feedback: FeedbackPhase | None,
                 elapsed: Callable[[], float], steps_per_epoch: int, history: Path,
                 resumed: Checkpointed | None) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.out_dir, self.elapsed, self.steps_per_epoch = cfg, out_dir, elapsed, steps_per_epoch
        self.writer = SummaryWriter(log_dir=str(out_dir))
        self.metrics = MetricsFile(out_dir / METRICS, history / METRICS, resumed)
        self.writer.add_text("config", "```\n" + config_lib.to_yaml(cfg) + "\n```", step)
        layout = feedback.describe() if feedback is not None else {}
        if "plan" in layout:
            self.writer.add_text("parallel/plan", layout.pop("plan"), step)
        self.metrics.write({**self._stamp("start", step), "algorithm": cfg.algorithm, "dataset": cfg.dataset,
                            **layout, "config": cfg.to_dict()})
        self.last_alignment: dict[str, Any] = {}  # the latest figures, for summary.json
        self.last_bp_comparison: dict[str, Any] = {}

    def _stamp(self, kind: str, step: int) -> dict[str, Any]:
        return {"kind": kind, "step": step, "epoch": step / self.steps_per_epoch, "wall_s": self.elapsed()}

    def _emit(self, kind: str, step: int, scalars: dict[str, float], batch: int | None = None) -> None:
        """The one way a figure is logged: to TensorBoard (at `batch` for DRL's feedback-only batches, else at
        `step`) and, as one record, to metrics.jsonl."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step if batch is None else batch)
        self.metrics.write({**self._stamp(kind, step), **({} if batch is None else {"batch": batch}), **scalars})

    def training_from(self, step: int) -> None:
        """Printed once the stop signals are installed: whoever waits for this line may signal the run."""
        print(f"training from step {step}: SIGUSR1 or SIGTERM stops with a checkpoint", flush=True)

    def alignment_due(self, step: int, last: bool) -> bool:
        """DTP and its variants compare themselves with backprop every log.angles_every steps and at the end."""
        return VARIANTS[self.cfg.algorithm].trains_feedback and (step % self.cfg.log.angles_every == 0 or last)

    def after_step(self, step: int, last: bool, result: StepResult, lr: float, images_per_s: float,
                   feedback: FeedbackPhase | None, network: DTPNetwork,
                   comparison: BackpropComparison | None) -> None:
        """One "train" record: the training figures every log.every steps and at the last step, and the
        comparison with backprop when it was computed (`alignment_due`)."""
        scalars: dict[str, float] = {}
        if step % self.cfg.log.every == 0 or last:
            scalars.update({"train/loss": float(result.ce_loss), "train/top1": float(result.top1),
                            "train/forward_lr": lr, "train/images_per_s": images_per_s})
            scalars.update({f"forward_loss/block{i}": float(l) for i, l in enumerate(result.forward_losses)})
            scalars.update({f"feedback_loss/block{i}": float(l)
                            for i, l in enumerate(result.feedback_losses, start=1)})
            if feedback is not None:
                scalars.update(feedback.step_figures())
        if comparison is not None:
            scalars.update(self.alignment(step, network, comparison))
        if scalars:
            self._emit("train", step, scalars)

    def alignment(self, step: int, network: DTPNetwork, comparison: BackpropComparison) -> dict[str, float]:
        """Per block: W against Bᵀ (per-filter angle, distance, whole-tensor angle) and the DTP update
        against the BP gradient; per parameter, the latter as the published callback logs it."""
        scalars, figures = {}, {}
        for i in aligned_blocks(network):
            forward, feedback = network.forward_blocks[i], network.feedback_blocks[i]
            angle, distance = weight_alignment(forward, feedback)
            whole = whole_tensor_angle(weight_pairs(forward, feedback))
            scalars.update({f"alignment/angle_block{i}": angle, f"alignment/distance_block{i}": distance,
                            f"alignment/whole_tensor_angle_block{i}": whole})
            figures[f"block{i}"] = {"angle": angle, "distance": distance, "whole_tensor_angle": whole}
        self.last_alignment = {"step": step, **figures}
        for i, (angle, distance) in enumerate(comparison.blocks):
            scalars.update({f"bp_comparison/angle_block{i}": angle, f"bp_comparison/distance_block{i}": distance})
        for name, (angle, distance) in comparison.parameters.items():
            scalars.update({f"bp_comparison/angle/{name}": angle, f"bp_comparison/distance/{name}": distance})
        self.last_bp_comparison = {"step": step, **{
            f"block{i}": {"angle": angle, "distance": distance} for i, (angle, distance) in enumerate(comparison.blocks)
        }}
        return scalars

    def feedback_only(self, step: int, batch: int, losses: list[float]) -> None:
        """DRL's feedback-only losses per map after `batch` such batches in all, taken before training step `step`."""
        self._emit("feedback_only", step, {f"feedback_only/loss_block{i}": loss for i, loss in enumerate(losses)},
                   batch)

    def evaluation(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        self._emit("val", step, {f"val/{key}": value for key, value in metrics.items()})
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
        self.metrics.close()


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
