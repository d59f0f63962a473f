"""The feedback phase of a step: training G_1..G_N on the step's activations (docs/design.md §4).

The training loop hands the block inputs to a FeedbackPhase and gets the trained feedback weights
back in its own modules; it does not know where the blocks were trained. LocalFeedback trains them
all in this process; dtp.parallel.feedback.DistributedFeedback spreads them over ranks. Both train a
block with the same `train_blocks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from dtp.algorithm import VARIANTS, train_feedback_block
from dtp.hooks import BlockShard
from dtp.models import DTPNetwork
from dtp.optim import make_optimizer
from dtp.runtime import Runtime
from dtp.seeding import BlockNoise


class FeedbackPhase(Protocol):
    def train(self, block_inputs: list[Tensor], step: int, batch_total: int) -> list[Tensor]:
        """Train G_1..G_N on their inputs h_0..h_{N-1} (this process's rows of a batch of `batch_total`);
        return each block's mean feedback loss (its algorithm's, VARIANTS) over the full batch."""

    def log(self, writer: SummaryWriter, step: int) -> None:
        """Write this phase's own per-step figures (timings) to TensorBoard."""

    def summary(self) -> dict[str, Any]:
        """Figures for summary.json."""

    def close(self) -> None:
        """Release workers, if any."""


def make_feedback_optimizers(network: DTPNetwork, cfg: dict[str, Any]) -> list[torch.optim.Optimizer]:
    """One optimiser per trainable feedback block (list index i−1 for G_i), with its own lr (feedback.*)."""
    fb = cfg["feedback"]
    return [
        make_optimizer(network.feedback_blocks[i].parameters(), fb["optimizer"], fb["lr"][i - 1], fb["momentum"],
                       fb["weight_decay"])
        for i in range(1, network.n_feedback + 1)
    ]


def train_blocks(
    network: DTPNetwork,
    optimizers: list[torch.optim.Optimizer],
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
            loss_fn=VARIANTS[cfg["algorithm"]].feedback_loss,
        )
    return losses


@dataclass
class LocalFeedback:
    """Trains every feedback block in this process; `order` exists to show that order does not matter."""

    network: DTPNetwork
    optimizers: list[torch.optim.Optimizer]
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
