"""How close DTP is to backprop: the paper's evidence, computed as the published code computes it.

Two figures per block, both angles in degrees and distances relative:
- `weight_alignment`: forward weights W against the transposed feedback weights Bᵀ;
- `compare_to_backprop`: the DTP update of the forward weights, with targets nudged by a small β and
  scaled by 1/β, against the backprop gradient of the mean cross-entropy on the same batch (the
  published CompareToBackpropCallback, β = 0.005).
Angles are the published per-filter form: the mean, over the rows of each weight (a convolution's
filters, a linear layer's output units), of the angle between matching rows. The angle between whole
flattened tensors is a different figure and is reported only as `whole_tensor_angle`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dtp.algorithm import Variant, forward_pass
from dtp.models import DTPNetwork, ForwardBlock, FeedbackBlock, weight_pairs

BP_COMPARISON_BETA = 0.005  # the published callback's temporary β


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def angle_and_distance(pairs: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(a, b) tensor pairs → (mean per-row angle of a against b over every row of every pair,
    sqrt(Σ‖a − b‖² / Σ‖a‖²)); a 1-D tensor counts as one row. Both as published, for several tensors."""
    angles, squared_difference, squared_norm = [], 0.0, 0.0
    for a, b in pairs:
        a, b = _rows(a.detach().double()), _rows(b.detach().double())
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
        angles.append(torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0))))
        squared_difference += float((a - b).square().sum())
        squared_norm += float(a.square().sum())
    angle = float(torch.cat(angles).mean())
    return angle, math.sqrt(squared_difference / max(squared_norm, 1e-300))


def whole_tensor_angle(pairs: list[tuple[Tensor, Tensor]]) -> float:
    """The angle between the concatenations of all a's and all b's, each flattened whole."""
    a = torch.cat([p.detach().double().flatten() for p, _ in pairs])
    b = torch.cat([q.detach().double().flatten() for _, q in pairs])
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30)
    return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))


@torch.no_grad()
def weight_alignment(forward_block: ForwardBlock, feedback_block: FeedbackBlock) -> tuple[float, float]:
    """Per-filter angle (degrees) and relative distance ‖W − Bᵀ‖ / ‖W‖ of a block's weights, as published."""
    return angle_and_distance(weight_pairs(forward_block, feedback_block))


def aligned_blocks(network: DTPNetwork) -> range:
    """The blocks whose forward weights W have feedback twins Bᵀ to compare with: 1..N for inverted blocks,
    none for DRL's direct maps (Q_i goes from the output to block i, not from block i to i−1)."""
    return range(1, network.n_feedback + 1) if network.feedback_architecture.inverts_forward else range(0)


@dataclass
class BackpropComparison:
    """Angle and distance of the DTP update against the BP gradient, per block and per parameter."""

    blocks: list[tuple[float, float]]  # block i: over its weights (tensors of 2+ dims), as weight_alignment
    parameters: dict[str, tuple[float, float]]  # 'block{i}.{name}': each parameter alone, biases included


def compare_to_backprop(network: DTPNetwork, x: Tensor, labels: Tensor, variant: Variant,
                        beta: float = BP_COMPARISON_BETA) -> BackpropComparison:
    """The variant's update (its output target nudged as far as DTP's by β, the update scaled to BP's)
    against the BP gradient on one batch.

    With DTP's t_N = h_N − β ∂CE_sum/∂h_N and the batch-mean forward loss, the update of the last block
    is β × BP's gradient of the mean cross-entropy (angle 0); DRL's is 2β/B × it, so DRL's β is B/2 times
    larger here, which keeps its tiny target differences above float32 rounding. Every lower block
    measures how well the feedback weights carry the gradient down (DRL's carry a Gauss-Newton step
    instead). Nothing is stepped and no .grad is touched, and no random number is drawn: the run
    continues exactly as without it.
    """
    blocks = list(network.forward_blocks)
    named = [(i, name, p) for i, block in enumerate(blocks) for name, p in block.named_parameters()]
    params = [p for _, _, p in named]
    bp_grads = torch.autograd.grad(F.cross_entropy(network(x), labels), params)  # outside autocast: fp32
    outputs, indices = forward_pass(blocks, x)
    per_beta = variant.update_per_beta(labels.numel())
    nudge = beta / per_beta  # DTP's: β itself
    targets = variant.target_rule(list(network.feedback_blocks), outputs, indices, labels, nudge)
    dtp_grads = torch.autograd.grad(torch.stack(variant.forward_loss(outputs, targets, None)).sum(), params)
    # As published, the scaled DTP update comes first: distances are relative to it.
    pairs = [(d / (nudge * per_beta), g) for d, g in zip(dtp_grads, bp_grads)]
    per_block = [
        angle_and_distance([pair for (j, _, p), pair in zip(named, pairs) if j == i and p.dim() > 1])
        for i in range(len(blocks))
    ]
    per_parameter = {f"block{i}.{name}": angle_and_distance([pair]) for (i, name, _), pair in zip(named, pairs)}
    return BackpropComparison(per_block, per_parameter)
