"""The DTP algorithm (docs/design.md §4–5): feedback losses, target propagation and the forward loss.

This is the only place the math lives (with DRL's own in dtp/drl.py); the sequential and the parallel
trainers both call it. Each algorithm is a Variant: its feedback architecture, the loss that trains it,
a target rule and a local loss; or plain backprop (VARIANTS).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtp.drl import DIRECT, direct_targets, drl_forward_losses, drl_loss, drl_update_per_beta
from dtp.hooks import AllReduce, Autocast
from dtp.models import INVERTED, FeedbackArchitecture, FeedbackBlock, ForwardBlock, Indices
from dtp.seeding import BlockNoise


def _sum_per_sample(t: Tensor) -> Tensor:
    return t.flatten(2).sum(-1)


def feedback_loss(
    forward_block: ForwardBlock,
    feedback_block: FeedbackBlock,
    x: Tensor,
    y: Tensor,
    indices: Indices,
    dx: Tensor,
    dy: Tensor,
    batch_total: int | None = None,
) -> Tensor:
    """L-DRL for one block with given noise dx (K×B×x-shape) and dy (K×B×y-shape), mean over K and batch.

    x may be some rows of a batch of `batch_total` rows (default: all of it): the loss is then this
    part's share of the full-batch mean, and the parts' gradients sum to the full-batch gradient.
    y = F(x) and its pooling indices are known from the forward pass and are not recomputed.

    Blocks whose G has an affine tail take the two-pass form, any other block (a ResNet stage, a
    block with several parametric layers) the three-call form; both are the math of docs/design.md §4.1–4.2.
    """
    form = general_feedback_loss if feedback_block.tail_start is None else affine_tail_feedback_loss
    return form(forward_block, feedback_block, x, y, indices, dx, dy, batch_total)


def _ldrl(dx: Tensor, dr: Tensor, dr_y: Tensor, rows: int) -> Tensor:
    """−2·Σ(dx ⊙ dr) + Σ(dr_y²) per noise sample and row, summed, over K × `rows` (the full batch's rows)."""
    loss = -2.0 * _sum_per_sample(dx * dr) + _sum_per_sample(dr_y.square())
    return loss.sum() / (dx.shape[0] * rows)


def affine_tail_feedback_loss(
    forward_block: ForwardBlock,
    feedback_block: FeedbackBlock,
    x: Tensor,
    y: Tensor,
    indices: Indices,
    dx: Tensor,
    dy: Tensor,
    batch_total: int | None = None,
) -> Tensor:
    """L-DRL for a G = affine tail ∘ parameter-free head, in two weight passes per iteration.

    Only the differences dr = G(F(x+dx)) − G(y) and dr_y = G(y+dy) − G(y) enter the loss, and the tail
    is affine, so each is one weight pass (without the bias, which cancels) on a difference of head
    activations: two passes instead of three, the same loss and the same gradient.
    """
    k, b = dx.shape[0], x.shape[0]
    with torch.no_grad():
        y_noisy, idx_noisy = forward_block((x.unsqueeze(0) + dx).flatten(0, 1))
        idx_k = [i.repeat(k, *([1] * (i.dim() - 1))) for i in indices]
        a = feedback_block.head(y, indices)
        a = a.repeat(k, *([1] * (a.dim() - 1)))
        delta_x = feedback_block.head(y_noisy, idx_noisy) - a  # unpool with the indices of F(x + dx)
        delta_y = feedback_block.head((y.unsqueeze(0) + dy).flatten(0, 1), idx_k) - a  # indices of F(x)
    dr = feedback_block.tail_difference(delta_x).unflatten(0, (k, b))
    dr_y = feedback_block.tail_difference(delta_y).unflatten(0, (k, b))
    return _ldrl(dx, dr, dr_y, batch_total or b)


def general_feedback_loss(
    forward_block: ForwardBlock,
    feedback_block: FeedbackBlock,
    x: Tensor,
    y: Tensor,
    indices: Indices,
    dx: Tensor,
    dy: Tensor,
    batch_total: int | None = None,
) -> Tensor:
    """L-DRL for any G, as docs/design.md §4.1 writes it: r = G(y), dr = G(y_n) − r, dr_y = G(y + dy) − r.

    The three calls are one G call on the stacked rows [y, y_n, y + dy] (rows do not interact without
    batch statistics), so the gradient flows through all three, r included. r is computed once per
    row and shared by the K noise samples.
    """
    k, b = dx.shape[0], x.shape[0]
    with torch.no_grad():
        y_noisy, idx_noisy = forward_block((x.unsqueeze(0) + dx).flatten(0, 1))
    stacked = torch.cat([y, y_noisy, (y.unsqueeze(0) + dy).flatten(0, 1)])
    # Unpooling uses the indices of F(x) for r and y + dy, those of F(x + dx) for y_n.
    stacked_indices = [torch.cat([i, i_noisy, i.repeat(k, *([1] * (i.dim() - 1)))])
                       for i, i_noisy in zip(indices, idx_noisy)]
    r, g_noisy, g_dy = feedback_block(stacked, stacked_indices).split([b, k * b, k * b])
    dr = g_noisy.unflatten(0, (k, b)) - r
    dr_y = g_dy.unflatten(0, (k, b)) - r
    return _ldrl(dx, dr, dr_y, batch_total or b)


def reconstruction_loss(
    forward_block: ForwardBlock,
    feedback_block: FeedbackBlock,
    x: Tensor,
    y: Tensor,
    indices: Indices,
    dx: Tensor,
    dy: Tensor,
    batch_total: int | None = None,
) -> Tensor:
    """The noisy reconstruction loss of vanilla DTP and TP (Lee et al. 2015, as in the published code):
    mean over K and batch of Σ ((x + dx) − G(F(x + dx)))², G unpooling with the indices of F(x + dx).

    Same signature as `feedback_loss`, so the trainers take either; y, indices and dy are unused.
    """
    k, b = dx.shape[0], x.shape[0]
    x_noisy = (x.unsqueeze(0) + dx).flatten(0, 1)
    with torch.no_grad():
        y_noisy, idx_noisy = forward_block(x_noisy)
    residual = (x_noisy - feedback_block(y_noisy, idx_noisy)).unflatten(0, (k, b))
    return _sum_per_sample(residual.square()).sum() / (k * (batch_total or b))


FeedbackLoss = Callable[..., Tensor]


def train_feedback_block(
    forward_block: ForwardBlock,
    feedback_block: FeedbackBlock,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    iterations: int,
    sigma: float,
    samples: int,
    noise: BlockNoise,
    autocast: Autocast = nullcontext,
    batch_total: int | None = None,
    all_reduce: AllReduce | None = None,
    loss_fn: FeedbackLoss = feedback_loss,
) -> Tensor:
    """k_i SGD steps on L_i for one block; returns the mean loss over the iterations (a tensor: no host sync).

    L_i is `loss_fn` (L-DRL unless given, e.g. a Variant's loss_fn).

    When x is this process's rows of a split batch, `all_reduce` sums the parts' gradients every
    iteration (and the loss at the end), so every part takes the full-batch step.
    """
    x = x.detach()
    with torch.no_grad(), autocast():
        y, indices = forward_block(x)
    total = torch.zeros((), device=x.device)
    params = [p for p in feedback_block.parameters() if p.requires_grad]
    for _ in range(iterations):
        dx, dy = noise.draw(samples, x, y, sigma)
        with autocast():
            loss = loss_fn(forward_block, feedback_block, x, y, indices, dx, dy, batch_total)
        # Freed, not zeroed: backward then writes fresh gradients (inside a captured graph, from its pool).
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if all_reduce is not None:
            all_reduce([p.grad for p in params if p.grad is not None])
        optimizer.step()
        total += loss.detach().float()
    if all_reduce is not None:
        all_reduce([total])
    return total / iterations


def forward_pass(forward_blocks: list[ForwardBlock], x: Tensor) -> tuple[list[Tensor], list[Indices]]:
    """h_0..h_N, each block fed a detached input so no gradient crosses a block boundary."""
    outputs, indices = [], []
    h = x
    for block in forward_blocks:
        h, idx = block(h.detach())
        outputs.append(h)
        indices.append(idx)
    return outputs, indices


def output_target(logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """t_N = h_N − β ∂CE_sum/∂h_N; the gradient of the summed cross-entropy is softmax − one-hot.

    Computed in at least fp32 (bf16 logits are promoted, fp64 ones keep their precision)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    grad = torch.softmax(logits.to(dtype), dim=1) - F.one_hot(labels, logits.shape[1]).to(dtype)
    return (logits.to(dtype) - beta * grad).to(logits.dtype)


@torch.no_grad()
def propagate_targets(
    feedback_blocks: list[FeedbackBlock],
    outputs: list[Tensor],
    indices: list[Indices],
    labels: Tensor,
    beta: float,
    difference: bool = True,
) -> list[Tensor]:
    """Targets t_0..t_N. DTP: t_{i−1} = h_{i−1} + G_i(t_i) − G_i(h_i); TP (difference=False): t_{i−1} = G_i(t_i).

    G_i unpools with the indices of the forward pass that produced h_i.
    """
    n = len(outputs) - 1
    targets: list[Tensor] = [None] * (n + 1)  # type: ignore[list-item]
    targets[n] = output_target(outputs[n].detach(), labels, beta)
    for i in range(n, 0, -1):
        t, h = targets[i], outputs[i].detach()
        if difference:
            both = feedback_blocks[i](torch.cat([t, h]), [torch.cat([j, j]) for j in indices[i]])
            g_t, g_h = both.chunk(2)
            targets[i - 1] = outputs[i - 1].detach() + g_t - g_h
        else:
            targets[i - 1] = feedback_blocks[i](t, indices[i])
    return targets


def forward_losses(outputs: list[Tensor], targets: list[Tensor], batch_total: int | None = None) -> list[Tensor]:
    """Per-block 0.5 · mean over batch of Σ (h_i − t_i)²; their sum is L_F.

    For some rows of a batch of `batch_total` rows, each is that part's share of the full-batch mean.
    """
    n = batch_total or outputs[0].shape[0]
    return [0.5 * (h - t).flatten(1).square().sum() / n for h, t in zip(outputs, targets)]


def difference_targets(feedback_blocks: Sequence[nn.Module], outputs: list[Tensor], indices: list[Indices],
                       labels: Tensor, beta: float) -> list[Tensor]:
    """DTP's chained rule: t_{i−1} = h_{i−1} + G_i(t_i) − G_i(h_i)."""
    return propagate_targets(list(feedback_blocks), outputs, indices, labels, beta, difference=True)


def plain_targets(feedback_blocks: Sequence[nn.Module], outputs: list[Tensor], indices: list[Indices],
                  labels: Tensor, beta: float) -> list[Tensor]:
    """TP's chained rule: t_{i−1} = G_i(t_i)."""
    return propagate_targets(list(feedback_blocks), outputs, indices, labels, beta, difference=False)


def drl_targets(feedback_maps: Sequence[nn.Module], outputs: list[Tensor], indices: list[Indices],
                labels: Tensor, beta: float) -> list[Tensor]:
    """DRL's direct rule, t_i = h_i + Q_i(t_L − h_L), from t_L = h_L − β ∂CE_mean/∂h_L (mean over the batch)."""
    return direct_targets(feedback_maps, outputs, output_target(outputs[-1].detach(), labels, beta / labels.numel()))


def unit_update_per_beta(batch: int) -> float:
    """DTP's output block update is β × BP's gradient of the mean cross-entropy (docs/design.md §5)."""
    return 1.0


TargetRule = Callable[[Sequence[nn.Module], list[Tensor], list[Indices], Tensor, float], list[Tensor]]
ForwardLoss = Callable[[list[Tensor], list[Tensor], int | None], list[Tensor]]


@dataclass(frozen=True)
class Variant:
    """A training algorithm: how its feedback modules are built (`feedback`) and trained (`loss_fn`), how
    targets come from them (`target_rule`) and each block's local loss (`forward_loss`); without a loss,
    plain backprop (its network keeps the inverted blocks, untrained)."""

    feedback: FeedbackArchitecture
    loss_fn: FeedbackLoss | None  # what trains a feedback module; None: backprop, no targets
    target_rule: TargetRule | None
    forward_loss: ForwardLoss = forward_losses
    update_per_beta: Callable[[int], float] = unit_update_per_beta  # batch rows → output update / (β · BP gradient)
    targets_before_feedback: bool = False  # DRL: targets from this batch's Q before its feedback step

    @property
    def trains_feedback(self) -> bool:
        """Whether the algorithm trains feedback weights and propagates targets (every one but backprop)."""
        return self.loss_fn is not None


VARIANTS = {
    "dtp": Variant(INVERTED, feedback_loss, difference_targets),  # L-DRL (this paper)
    "vanilla_dtp": Variant(INVERTED, reconstruction_loss, difference_targets),
    "tp": Variant(INVERTED, reconstruction_loss, plain_targets),
    # One fused L-DRL step per batch (feedback.iterations all 1, several noise samples), Adam in its configs.
    "parallel_dtp": Variant(INVERTED, feedback_loss, difference_targets),
    "bp": Variant(INVERTED, None, None),  # end-to-end backprop of the cross-entropy
    # Meulemans et al. (2020)'s DDTP-linear: direct maps Q_i, the DRL loss, direct targets (dtp/drl.py).
    "drl": Variant(DIRECT, drl_loss, drl_targets, drl_forward_losses, drl_update_per_beta,
                   targets_before_feedback=True),
}
