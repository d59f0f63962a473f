"""The feedback phase of a step: training G_1..G_N on the step's activations (docs/design.md §4).

The training loop hands the block inputs to a FeedbackPhase and gets the trained feedback weights
back in its own modules; it does not know where the blocks were trained. LocalFeedback trains them
all in this process; dtp.parallel.feedback.DistributedFeedback spreads them over ranks. Both train a
block with the same `train_block`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from dtp.algorithm import VARIANTS, FeedbackLoss, train_feedback_block
from dtp.config import Config
from dtp.hooks import BlockShard
from dtp.models import DTPNetwork
from dtp.optim import make_optimizer
from dtp.runtime import Runtime
from dtp.graphs import BlockLoop, on_streams
from dtp.seeding import BlockNoise


class FeedbackPhase(Protocol):
    def train(self, block_inputs: list[Tensor], step: int, batch_total: int) -> list[Tensor]:
        """Train G_1..G_N on their inputs h_0..h_{N-1} (this process's rows of a batch of `batch_total`);
        return each block's mean feedback loss (its algorithm's, VARIANTS) over the full batch."""

    def describe(self) -> dict[str, Any]:
        """How the phase is spread over processes (world_size, replicas, group_size, the plan as text);
        empty in one process."""

    def step_figures(self) -> dict[str, float]:
        """This phase's own figures of its last step (per-rank timing), by TensorBoard tag."""

    def summary(self) -> dict[str, Any]:
        """Figures for summary.json."""

    def close(self) -> None:
        """Release workers, if any."""


def make_feedback_optimizers(network: DTPNetwork, cfg: Config, capturable: bool = False) -> list[torch.optim.Optimizer]:
    """One optimiser per trainable feedback module (list index i−1 for G_i, i for DRL's Q_i), with its own lr
    (feedback.*); `capturable` when the feedback loops are captured as CUDA graphs."""
    fb = cfg.feedback
    return [
        make_optimizer(module.parameters(), fb.optimizer, lr, fb.momentum, fb.weight_decay, fb.betas, fb.eps,
                       capturable)
        for module, lr in zip(network.trained_feedback, fb.lr, strict=True)
    ]


@dataclass(frozen=True)
class BlockSettings:
    """What the config says about training feedback block `block`, read in one place so that every
    trainer of a block (sequential, a parallel rank, the cost measurement, the benchmark) reads it alike."""

    block: int
    iterations: int
    sigma: float
    samples: int
    loss_fn: FeedbackLoss
    seed: int

    @classmethod
    def from_config(cls, cfg: Config, i: int) -> BlockSettings:
        fb = cfg.feedback
        return cls(i, fb.iterations[i - 1], fb.noise[i - 1], fb.samples, VARIANTS[cfg.algorithm].loss_fn, cfg.seed)


def train_block(
    network: DTPNetwork,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    step: int,
    settings: BlockSettings,
    runtime: Runtime,
    shard: BlockShard | None = None,
    loop: BlockLoop | None = None,
) -> Tensor:
    """Train feedback block `settings.block` on x, this process's rows (`shard`; default all of them) of
    the step's input; return its mean loss over the full batch.

    The noise depends only on (seed, block, step), so every trainer of a block draws the same. `loop`
    keeps the block's noise buffers (and its CUDA graph, if any) from step to step; a new one if not given.
    """
    shard = shard or BlockShard(slice(0, x.shape[0]))
    i = settings.block
    loop = loop or BlockLoop(runtime.device, graphed=False)
    loop.noise.start(settings.seed, i, step, shard.rows, shard.batch_total or x.shape[0])

    def iterations(inputs: Tensor, noise: BlockNoise) -> Tensor:
        return train_feedback_block(
            network.forward_blocks[i], network.feedback_blocks[i], optimizer, inputs,
            iterations=settings.iterations, sigma=settings.sigma, samples=settings.samples, noise=noise,
            autocast=runtime.autocast, batch_total=shard.batch_total, all_reduce=shard.all_reduce,
            loss_fn=settings.loss_fn,
        )

    return loop.run(iterations, x, collective=shard.all_reduce is not None)


def train_blocks(
    network: DTPNetwork,
    optimizers: list[torch.optim.Optimizer],
    cfg: Config,
    blocks: list[int],
    block_inputs: list[Tensor],
    step: int,
    runtime: Runtime,
    batch_total: int | None = None,
    loops: dict[int, BlockLoop] | None = None,
    streams: dict[int, torch.cuda.Stream] | None = None,
) -> dict[int, Tensor]:
    """Train the given feedback blocks (1-based), each on its whole input h_{i−1}, this process's rows of a
    batch of `batch_total` rows: one after the other, or on CUDA streams with runtime.cuda_graphs.
    `loops` and `streams` keep each block's loop and stream between calls."""
    loops = {} if loops is None else loops

    def run(i: int) -> Callable[[], Tensor]:
        x = block_inputs[i - 1]
        shard = BlockShard(slice(0, x.shape[0]), batch_total=batch_total)
        if i not in loops:  # built once per run, not on every step
            loops[i] = BlockLoop(runtime.device, runtime.cuda_graphs)
        loop = loops[i]
        return lambda: train_block(network, optimizers[i - 1], x, step, BlockSettings.from_config(cfg, i), runtime,
                                   shard, loop)

    runs = {i: run(i) for i in blocks}
    if runtime.cuda_graphs:
        return on_streams(runtime.device, runs, {} if streams is None else streams)
    return {i: go() for i, go in runs.items()}


class TrainsInThisProcess:
    """What a feedback phase that trains every block in this process reports: nothing of its own (no
    workers, no timing beyond the step's), and nothing to release."""

    def describe(self) -> dict[str, Any]:
        return {}

    def step_figures(self) -> dict[str, float]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@dataclass
class LocalFeedback(TrainsInThisProcess):
    """Trains every feedback block in this process; `order` exists to show that order does not matter."""

    network: DTPNetwork
    optimizers: list[torch.optim.Optimizer]
    cfg: Config
    runtime: Runtime
    order: list[int] | None = None
    loops: dict[int, BlockLoop] = field(default_factory=dict)
    streams: dict[int, torch.cuda.Stream] = field(default_factory=dict)

    def train(self, block_inputs: list[Tensor], step: int, batch_total: int) -> list[Tensor]:
        order = self.order or list(range(1, self.network.n_feedback + 1))
        losses = train_blocks(self.network, self.optimizers, self.cfg, order, block_inputs, step, self.runtime,
                              batch_total, self.loops, self.streams)
        return [losses[i] for i in sorted(losses)]
