"""Forward networks as sequences of blocks, and feedback networks built by inverting them (DESIGN.md §1–2).

Pooling indices are explicit values: a forward block returns them next to its output and a feedback
block takes them as an argument. Nothing is cached inside a module, so calling a block on a perturbed
input can never change which indices a later feedback call uses.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtp.errors import ConfigError

Indices = list[Tensor]


class ForwardBlock(nn.Module):
    """F_i: a few layers; returns the output and the indices of each max-pool, in layer order."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Indices]:
        indices: Indices = []
        for layer in self.layers:
            if isinstance(layer, nn.MaxPool2d):
                x, idx = layer(x)
                indices.append(idx)
            else:
                x = layer(x)
        return x, indices


PARAMETRIC = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


class FeedbackBlock(nn.Module):
    """G_i: the layers of F_i inverted and reversed; unpooling consumes the indices it is given.

    G_i = tail ∘ head, where the head (unpool, activation) has no parameters and the tail is the one
    parametric layer plus reshapes, so it is affine. L-DRL only needs differences G(a) − G(b), which
    the tail maps linearly: `head` and `tail_difference` let the loss skip the bias and one of the
    three weight passes per iteration without changing the math.
    """

    def __init__(self, layers: list[nn.Module], output_sizes: list[torch.Size | None]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.output_sizes = output_sizes
        positions = [k for k, layer in enumerate(layers) if isinstance(layer, PARAMETRIC)]
        if len(positions) != 1 or not all(isinstance(l, nn.Unflatten) for l in layers[positions[0] + 1 :]):
            raise TypeError("a feedback block needs exactly one parametric layer, followed only by reshapes")
        self.tail_start = positions[0]

    def head(self, y: Tensor, indices: Indices) -> Tensor:
        """The parameter-free layers before the parametric one (unpooling with the given indices)."""
        remaining = list(indices)
        for layer, size in zip(self.layers[: self.tail_start], self.output_sizes):
            if isinstance(layer, nn.MaxUnpool2d):
                y = layer(y, remaining.pop(), output_size=size)
            else:
                y = layer(y)
        return y

    def tail_difference(self, delta: Tensor) -> Tensor:
        """tail(a) − tail(b) for delta = a − b: the parametric layer without its bias, then reshapes."""
        layer = self.layers[self.tail_start]
        if isinstance(layer, nn.ConvTranspose2d):
            out = F.conv_transpose2d(delta, layer.weight, None, layer.stride, layer.padding, layer.output_padding)
        else:
            out = F.linear(delta, layer.weight)
        for reshape in self.layers[self.tail_start + 1 :]:
            out = reshape(out)
        return out

    def forward(self, y: Tensor, indices: Indices) -> Tensor:
        y = self.head(y, indices)
        for layer in self.layers[self.tail_start :]:
            y = layer(y)
        return y


def invert_layer(layer: nn.Module, in_shape: torch.Size) -> nn.Module:
    """The feedback counterpart of one forward layer, whose output has shape in_shape (no batch dim)."""
    if isinstance(layer, nn.Conv2d):
        stride = layer.stride[0]
        return nn.ConvTranspose2d(
            layer.out_channels, layer.in_channels, layer.kernel_size, layer.stride, layer.padding,
            output_padding=stride - 1,
        )
    if isinstance(layer, nn.MaxPool2d):
        return nn.MaxUnpool2d(layer.kernel_size, layer.stride)
    if isinstance(layer, (nn.ELU, nn.ReLU)):
        return type(layer)()
    if isinstance(layer, nn.Flatten):
        return nn.Unflatten(1, tuple(in_shape))
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.out_features, layer.in_features)
    raise TypeError(f"no feedback inverse for layer {type(layer).__name__}")


def invert_block(block: ForwardBlock, in_shape: torch.Size) -> FeedbackBlock:
    """Reverse the block and invert each layer; record unpool output sizes so odd sizes round-trip."""
    shapes = [in_shape]
    x = torch.zeros((1, *in_shape))
    with torch.no_grad():
        for layer in block.layers:
            x = layer(x)[0] if isinstance(layer, nn.MaxPool2d) else layer(x)
            shapes.append(x.shape[1:])
    layers, sizes = [], []
    for layer, layer_in in zip(reversed(block.layers), reversed(shapes[:-1])):
        layers.append(invert_layer(layer, layer_in))
        sizes.append(layer_in[-2:] if isinstance(layer, nn.MaxPool2d) else None)
    return FeedbackBlock(layers, sizes)


def _activation(name: str) -> nn.Module:
    return nn.ELU() if name == "elu" else nn.ReLU()


def _conv_pool_blocks(
    in_shape: tuple[int, int, int], channels: list[int], kernel: int, activation: str, arch: str
) -> tuple[list[ForwardBlock], tuple[int, int, int]]:
    c, h, w = in_shape
    blocks = []
    for i, out in enumerate(channels):
        if h < 2 or w < 2:
            raise ConfigError(
                f"{arch} with {len(channels)} pooling blocks does not fit {in_shape[1]}x{in_shape[2]} inputs: "
                f"block {i} would pool a {h}x{w} map; use fewer model.channels entries "
                f"(at most {int(math.log2(min(in_shape[1:])))})"
            )
        blocks.append(ForwardBlock([
            nn.Conv2d(c, out, kernel, stride=1, padding=kernel // 2),
            _activation(activation),
            nn.MaxPool2d(2, 2, return_indices=True),
        ]))
        c, h, w = out, h // 2, w // 2
    return blocks, (c, h, w)


def build_forward(model_cfg: dict[str, Any], in_shape: tuple[int, int, int], n_classes: int) -> list[ForwardBlock]:
    """SimpleVGG: conv3x3-act-pool blocks then a linear classifier. LeNet: two conv5x5 blocks, a hidden
    linear block and the classifier."""
    arch, channels, act = model_cfg["arch"], list(model_cfg["channels"]), model_cfg["activation"]
    if arch == "simple_vgg":
        blocks, (c, h, w) = _conv_pool_blocks(in_shape, channels, 3, act, arch)
        blocks.append(ForwardBlock([nn.Flatten(), nn.Linear(c * h * w, n_classes)]))
        return blocks
    if len(channels) < 2:
        raise ConfigError("lenet needs model.channels = [conv channels..., hidden units], e.g. [32, 64, 512]")
    blocks, (c, h, w) = _conv_pool_blocks(in_shape, channels[:-1], 5, act, arch)
    blocks.append(ForwardBlock([nn.Flatten(), nn.Linear(c * h * w, channels[-1]), _activation(act)]))
    blocks.append(ForwardBlock([nn.Linear(channels[-1], n_classes)]))
    return blocks


class DTPNetwork(nn.Module):
    """The forward blocks F_0..F_N and their feedback blocks G_0..G_N (G_0 is built but never trained)."""

    def __init__(self, model_cfg: dict[str, Any], in_shape: tuple[int, int, int], n_classes: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.forward_blocks = nn.ModuleList(build_forward(model_cfg, in_shape, n_classes))
        shapes = [torch.Size(in_shape)]
        x = torch.zeros((1, *in_shape))
        with torch.no_grad():
            for block in self.forward_blocks:
                x, _ = block(x)
                shapes.append(x.shape[1:])
        self.block_input_shapes = shapes[:-1]
        self.block_output_shapes = shapes[1:]
        # Feedback weights get their own initialisation stream, independent of the forward weights.
        torch.manual_seed(seed + 1)
        self.feedback_blocks = nn.ModuleList(
            invert_block(block, shape) for block, shape in zip(self.forward_blocks, self.block_input_shapes)
        )

    @torch.no_grad()
    def init_feedback_symmetric(self) -> None:
        """Start every feedback weight at its forward weight's transpose (feedback.init_symmetric)."""
        for forward, feedback in zip(self.forward_blocks, self.feedback_blocks):
            for w, b_t in weight_pairs(forward, feedback):
                b_t.copy_(w)

    @property
    def n_feedback(self) -> int:
        """Number of trainable feedback blocks (G_1..G_N)."""
        return len(self.forward_blocks) - 1

    def forward(self, x: Tensor) -> Tensor:
        for block in self.forward_blocks:
            x, _ = block(x)
        return x


def parametric_layers(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.layers if isinstance(m, PARAMETRIC)]


def weight_pairs(forward_block: nn.Module, feedback_block: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(W, Bᵀ) for each parametric forward layer and its feedback twin, Bᵀ a view in W's layout.

    A ConvTranspose2d weight already has its Conv2d twin's layout; a Linear feedback weight is transposed.
    """
    pairs = []
    for f, g in zip(parametric_layers(forward_block), reversed(parametric_layers(feedback_block))):
        pairs.append((f.weight, g.weight.t() if isinstance(g, nn.Linear) else g.weight))
    return pairs
