"""The pieces networks are built from: activations by name, the ResNet's residual block and its feedback
counterpart, the transposed convolution that inverts a conv, and the forward block F_i.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

Indices = list[Tensor]
ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "tanh": nn.Tanh}  # model.activation


def make_activation(name: str) -> nn.Module:
    """A new activation layer of model.activation's kind."""
    return ACTIVATIONS[name]()


class BasicBlock(nn.Module):
    """A residual block of the CIFAR ResNet: act(conv2(act(conv1(x))) + shortcut(x)), convolutions without bias.

    The shortcut is a strided 1x1 convolution where the shape changes, else the identity (None).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
                         if stride != 1 or in_planes != planes else None)
        self.activation = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.activation(self.conv1(x)))
        return self.activation(out + (x if self.shortcut is None else self.shortcut(x)))


class InvertedBasicBlock(nn.Module):
    """The published feedback counterpart of a BasicBlock: act → conv2ᵀ → act → conv1ᵀ, plus shortcutᵀ(act y).

    Its transposed convolutions have no bias, as the forward ones have none.
    """

    def __init__(self, block: BasicBlock, in_shape: torch.Size) -> None:
        super().__init__()
        with torch.no_grad():
            mid_shape = block.conv1(torch.zeros((1, *in_shape))).shape[1:]
        self.conv1 = transposed_conv(block.conv1, in_shape)
        self.conv2 = transposed_conv(block.conv2, mid_shape)
        self.shortcut = None if block.shortcut is None else transposed_conv(block.shortcut, in_shape)
        self.activation = type(block.activation)()

    def forward(self, y: Tensor) -> Tensor:
        y = self.activation(y)
        out = self.conv1(self.activation(self.conv2(y)))
        return out + (y if self.shortcut is None else self.shortcut(y))


def transposed_conv(conv: nn.Conv2d, in_shape: torch.Size) -> nn.ConvTranspose2d:
    """convᵀ mapping conv's output back to in_shape (no batch dim), with a bias only if conv has one.

    The output padding restores the exact input size: stride − 1 on even sizes (docs/design.md §3), less
    where the convolution rounded an odd size down.
    """
    output_padding = []
    for size, k, s, p in zip(in_shape[-2:], conv.kernel_size, conv.stride, conv.padding):
        out = (size + 2 * p - k) // s + 1
        output_padding.append(size - ((out - 1) * s - 2 * p + k))
    return nn.ConvTranspose2d(conv.out_channels, conv.in_channels, conv.kernel_size, conv.stride, conv.padding,
                              output_padding=tuple(output_padding), bias=conv.bias is not None)


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
