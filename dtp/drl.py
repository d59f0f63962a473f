"""DRL, the DDTP-linear of Meulemans et al. (2020), "A theoretical framework for target propagation":
direct linear feedback maps Q_i from the network output to every hidden block, trained with the DRL
loss, direct targets, and Meulemans' scalings of the local losses (docs/design.md §12).

Notation: h_0..h_L are the block outputs (h_L the logits, L = N), f_{i→L} runs blocks i+1..L, and
Q_i maps a difference of outputs to h_i's shape. Only differences Q_i(a) − Q_i(b) = Q_i·(a − b) are ever
used, so a bias on Q_i (Meulemans' fully connected maps have one) would cancel everywhere: the maps here
have none.
"""
from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from dtp.errors import ConfigError
from dtp.hooks import Autocast
from dtp.models import FeedbackArchitecture, ForwardBlock
from dtp.seeding import seeded_generator

if TYPE_CHECKING:  # the config imports the algorithms, this module among them
    from dtp.config import Config

DRL_NOISE_STREAM = 0x44524C  # the first key of every DRL noise generator ("DRL")
TRAINING_STEP, FEEDBACK_ONLY_STEP = 0, 1  # the two kinds of step Q is trained in, kept apart in the noise keys


class DirectFeedbackMap(nn.Module):
    """Q_i: a linear map from the output (n_outputs units) to h_i's shape (a conv block's maps too)."""

    def __init__(self, n_outputs: int, shape: torch.Size) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.linear = nn.Linear(n_outputs, prod(shape), bias=False)

    def forward(self, delta: Tensor) -> Tensor:
        """Q_i·delta, for delta a difference of outputs (B × n_outputs), shaped like h_i."""
        return self.linear(delta).unflatten(1, self.shape)


def direct_feedback_maps(forward_blocks: list[ForwardBlock], input_shapes: list[torch.Size],
                         output_shapes: list[torch.Size]) -> list[nn.Module]:
    """Q_0..Q_{L−1}: one map from the output to each hidden block's output; the output block has none."""
    n_outputs = prod(output_shapes[-1])
    return [DirectFeedbackMap(n_outputs, shape) for shape in output_shapes[:-1]]


DIRECT = FeedbackArchitecture(direct_feedback_maps, first_trained=0, inverts_forward=False)


def to_output(forward_blocks: Sequence[ForwardBlock], i: int, h: Tensor) -> Tensor:
    """f_{i→L}(h): a value of h_i carried through blocks i+1..L."""
    for block in forward_blocks[i + 1:]:
        h, _ = block(h)
    return h


def drl_loss(feedback_map: nn.Module, forward_blocks: Sequence[ForwardBlock], i: int, h: Tensor, h_out: Tensor,
             noise: Tensor, sigma: float) -> Tensor:
    """L_i = (1/σ²) · mean over batch and units of (Q_i(f_{i→L}(h_i + σε) − h_L) − σε)², with noise = σε.

    f_{i→L} runs without gradient: only Q_i learns. The minimiser over Q_i, for small σ, is the
    pseudo-inverse of f_{i→L}'s Jacobian J (Q_i J ≈ I in the least-squares sense), where L-DRL's is Jᵀ.
    """
    with torch.no_grad():
        r = to_output(forward_blocks, i, h + noise)
    return (feedback_map(r - h_out) - noise).square().mean() / sigma**2


def drl_noise_generator(seed: int, kind: int, block: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of Q_`block`'s noise at training step (or feedback-only batch) `step`: a function of these
    keys alone, so a resumed run draws what an uninterrupted one does."""
    return seeded_generator(DRL_NOISE_STREAM, seed, kind, block, step, device=device)


def train_feedback_map(feedback_map: nn.Module, optimizer: torch.optim.Optimizer,
                       forward_blocks: Sequence[ForwardBlock], i: int, h: Tensor, h_out: Tensor, iterations: int,
                       sigma: float, generator: torch.Generator, autocast: Autocast) -> Tensor:
    """`iterations` optimiser steps on L_i for Q_i, fresh noise each; returns the mean loss (a tensor: no host sync)."""
    h, h_out = h.detach(), h_out.detach()
    total = torch.zeros((), device=h.device)
    for _ in range(iterations):
        noise = sigma * torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
        with autocast():
            loss = drl_loss(feedback_map, forward_blocks, i, h, h_out, noise, sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach().float()
    return total / iterations


@torch.no_grad()
def direct_targets(feedback_maps: Sequence[nn.Module], outputs: list[Tensor], output_target: Tensor) -> list[Tensor]:
    """t_i = h_i + Q_i(t_L − h_L) for every hidden block (each from the output, not chained), then t_L."""
    delta = output_target - outputs[-1].detach()
    return [h.detach() + q(delta) for q, h in zip(feedback_maps, outputs[:-1])] + [output_target]


def drl_forward_losses(outputs: list[Tensor], targets: list[Tensor], batch_total: int | None = None) -> list[Tensor]:
    """Meulemans' local losses: the mean over every element of (h_i − t_i)² for a block with a spatial output
    (convolutional), (1/B) Σ ‖h_i − t_i‖² for a fully connected one."""
    n = batch_total or outputs[0].shape[0]
    losses = []
    for h, t in zip(outputs, targets):
        units = h[0].numel() if h.dim() > 2 else 1
        losses.append((h - t).square().sum() / (n * units))
    return losses


def drl_update_per_beta(batch: int) -> float:
    """The output block's update as a multiple of β × BP's gradient of the mean cross-entropy: with
    t_L = h_L − β ∂CE_mean/∂h_L and the loss (1/B) Σ ‖h_L − t_L‖², the update is (2β/B) × BP's gradient."""
    return 2.0 / batch


def check_drl_settings(cfg: Config) -> None:
    """What only DRL has (feedback-only epochs) and what it cannot have (settings of G's training): a
    ConfigError naming the key."""
    fb, drl = cfg.feedback, cfg.algorithm == "drl"
    problems = {
        f"feedback.fb_epochs and feedback.extra_fb_epochs are DRL's s-DDTP schedule, but the algorithm is "
        f"{cfg.algorithm}; set them to 0 or use --algorithm drl": not drl and (fb.fb_epochs or fb.extra_fb_epochs),
        "feedback.init_symmetric copies F's transposed weights into G, but DRL's feedback maps Q_i go from the "
        "output to block i and have no forward twin; set it to false": drl and fb.init_symmetric,
        f"DRL draws one noise sample per feedback step, but feedback.samples is {fb.samples}; set it to 1":
            drl and fb.samples != 1,
        "feedback.cuda_graphs captures G's feedback loops; DRL's maps Q_i train eagerly: set it to off or auto":
            drl and fb.cuda_graphs == "on",
    }
    for message, bad in problems.items():
        if bad:
            raise ConfigError(message)
