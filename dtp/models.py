"""Forward networks as sequences of blocks, and feedback networks built by inverting them (docs/design.md §2–3).

Pooling indices are explicit values: a forward block returns them next to its output and a feedback
block takes them as an argument. Nothing is cached inside a module, so calling a block on a perturbed
input can never change which indices a later feedback call uses.

Architectures (model.arch), with the layer shapes of the published code (ernoult/scalingDTP):
- simple_vgg: conv3x3 → act → maxpool 2/2 per entry of model.channels, then flatten → linear.
- lenet: conv5x5 → act → maxpool 3/2 (padding 1) per entry of model.channels, then a hidden block
  flatten → linear(model.hidden) → act and the classifier block linear(n_classes).
- resnet18 / resnet34: the CIFAR ResNet (3x3 stem, four stages of basic blocks, average pool, linear),
  one DTP block per top-level part: stem, stage 1–4, classifier. No batch norm, as published by default:
  a batch statistic would couple the rows that split blocks and data-parallel replicas train apart.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtp.errors import ConfigError
from dtp.seeding import global_cpu_rng_seeded

if TYPE_CHECKING:  # the config imports the models' algorithm
    from dtp.config import ModelConfig

Indices = list[Tensor]

RESNET_STAGE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
RESNET_STAGE_STRIDES = (1, 2, 2, 2)
RESNET_MIN_SIZE = 8  # stages 2–4 halve the map: 8x8 inputs end at 1x1
SIMPLE_VGG_POOL = (2, 2, 0)  # kernel, stride, padding
LENET_POOL = (3, 2, 1)


def _activation(name: str) -> nn.Module:
    return nn.ELU() if name == "elu" else nn.ReLU()


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
        self.activation = _activation(activation)

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


AFFINE = (nn.ConvTranspose2d, nn.Linear)
LINEAR_PARAMETER_FREE = (nn.Unflatten, nn.AdaptiveAvgPool2d)  # reshapes and the classifier's un-pooling


def _has_parameters(layer: nn.Module) -> bool:
    return any(True for _ in layer.parameters())


def affine_tail_start(layers: list[nn.Module]) -> int | None:
    """Where G's affine tail starts, or None when G is not parameter-free layers, then one affine layer,
    then parameter-free linear layers (a LeNet or SimpleVGG block is; a ResNet stage is not)."""
    parametric = [k for k, layer in enumerate(layers) if _has_parameters(layer)]
    if len(parametric) != 1:
        return None
    start = parametric[0]
    if not isinstance(layers[start], AFFINE):
        return None
    if not all(isinstance(layer, LINEAR_PARAMETER_FREE) for layer in layers[start + 1 :]):
        return None
    return start


class FeedbackBlock(nn.Module):
    """G_i: the layers of F_i inverted and reversed; unpooling consumes the indices it is given.

    When G_i = tail ∘ head, with a parameter-free head (unpool, activation) and an affine tail (one
    parametric layer, then reshapes), `tail_start` marks the tail. L-DRL only needs differences
    G(a) − G(b), which the tail maps linearly: `head` and `tail_difference` let the loss skip the bias
    and one of the three weight passes per iteration without changing the math. Other blocks have
    tail_start None and are only called whole.
    """

    def __init__(self, layers: list[nn.Module], output_sizes: list[torch.Size | None]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.output_sizes = output_sizes
        self.tail_start = affine_tail_start(layers)

    def _run(self, y: Tensor, indices: Indices, stop: int) -> Tensor:
        remaining = list(indices)
        for layer, size in zip(self.layers[:stop], self.output_sizes):
            if isinstance(layer, nn.MaxUnpool2d):
                y = layer(y, remaining.pop(), output_size=size)
            else:
                y = layer(y)
        return y

    def head(self, y: Tensor, indices: Indices) -> Tensor:
        """The parameter-free layers before the affine tail (unpooling with the given indices)."""
        if self.tail_start is None:
            raise TypeError("this feedback block has no affine tail; call it whole")
        return self._run(y, indices, self.tail_start)

    def tail_difference(self, delta: Tensor) -> Tensor:
        """tail(a) − tail(b) for delta = a − b: the affine layer without its bias, then the linear layers after."""
        if self.tail_start is None:
            raise TypeError("this feedback block has no affine tail; call it whole")
        layer = self.layers[self.tail_start]
        if isinstance(layer, nn.ConvTranspose2d):
            out = F.conv_transpose2d(delta, layer.weight, None, layer.stride, layer.padding, layer.output_padding)
        else:
            out = F.linear(delta, layer.weight)
        for linear in self.layers[self.tail_start + 1 :]:
            out = linear(out)
        return out

    def forward(self, y: Tensor, indices: Indices) -> Tensor:
        return self._run(y, indices, len(self.layers))


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


def invert_layer(layer: nn.Module, in_shape: torch.Size) -> nn.Module:
    """The feedback counterpart of one forward layer, whose input has shape in_shape (no batch dim)."""
    if isinstance(layer, nn.Conv2d):
        return transposed_conv(layer, in_shape)
    if isinstance(layer, nn.MaxPool2d):
        return nn.MaxUnpool2d(layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, (nn.ELU, nn.ReLU)):
        return type(layer)()
    if isinstance(layer, nn.Flatten):
        return nn.Unflatten(1, tuple(in_shape))
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.out_features, layer.in_features)
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool2d(tuple(in_shape[-2:]))  # as published: spreads each value back over the map
    if isinstance(layer, BasicBlock):
        return InvertedBasicBlock(layer, in_shape)
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


def _pooled_size(size: int, pool: tuple[int, int, int]) -> int:
    kernel, stride, padding = pool
    return (size + 2 * padding - kernel) // stride + 1


def _conv_pool_blocks(
    in_shape: tuple[int, int, int], channels: list[int], kernel: int, pool: tuple[int, int, int], activation: str,
    arch: str,
) -> tuple[list[ForwardBlock], tuple[int, int, int]]:
    c, h, w = in_shape
    blocks = []
    for i, out in enumerate(channels):
        if h < 2 or w < 2:
            fitting, size = 0, min(in_shape[1:])
            while size >= 2:
                size, fitting = _pooled_size(size, pool), fitting + 1
            raise ConfigError(
                f"{arch} with {len(channels)} pooling blocks does not fit {in_shape[1]}x{in_shape[2]} inputs: "
                f"block {i} would pool a {h}x{w} map; use fewer model.channels entries (at most {fitting})"
            )
        blocks.append(ForwardBlock([
            nn.Conv2d(c, out, kernel, stride=1, padding=kernel // 2),
            _activation(activation),
            nn.MaxPool2d(*pool, return_indices=True),
        ]))
        c, h, w = out, _pooled_size(h, pool), _pooled_size(w, pool)
    return blocks, (c, h, w)


def _resnet_blocks(
    in_shape: tuple[int, int, int], widths: list[int], arch: str, activation: str, n_classes: int
) -> list[ForwardBlock]:
    if len(widths) != 4:
        raise ConfigError(f"{arch} needs exactly 4 model.channels entries, the widths of its four stages (the "
                          f"stem takes the first), e.g. [64, 128, 256, 512]; got {widths}")
    c, h, w = in_shape
    if min(h, w) < RESNET_MIN_SIZE:
        raise ConfigError(f"{arch} halves the feature map in stages 2, 3 and 4, so it needs inputs of at least "
                          f"{RESNET_MIN_SIZE}x{RESNET_MIN_SIZE}, not {h}x{w}; use simple_vgg or lenet for these inputs")
    blocks = [ForwardBlock([nn.Conv2d(c, widths[0], 3, stride=1, padding=1, bias=False), _activation(activation)])]
    in_planes = widths[0]
    for planes, count, stride in zip(widths, RESNET_STAGE_BLOCKS[arch], RESNET_STAGE_STRIDES):
        stage = []
        for s in [stride] + [1] * (count - 1):
            stage.append(BasicBlock(in_planes, planes, s, activation))
            in_planes = planes
        blocks.append(ForwardBlock(stage))
    blocks.append(ForwardBlock([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_planes, n_classes)]))
    return blocks


def build_forward(model_cfg: ModelConfig, in_shape: tuple[int, int, int], n_classes: int) -> list[ForwardBlock]:
    """The forward blocks of model.arch (see the module docstring for the layer shapes)."""
    arch, channels, act = model_cfg.arch, list(model_cfg.channels), model_cfg.activation
    if arch in RESNET_STAGE_BLOCKS:
        return _resnet_blocks(in_shape, channels, arch, act, n_classes)
    if arch == "simple_vgg":
        blocks, (c, h, w) = _conv_pool_blocks(in_shape, channels, 3, SIMPLE_VGG_POOL, act, arch)
        blocks.append(ForwardBlock([nn.Flatten(), nn.Linear(c * h * w, n_classes)]))
        return blocks
    if arch == "lenet":
        hidden = model_cfg.hidden
        blocks, (c, h, w) = _conv_pool_blocks(in_shape, channels, 5, LENET_POOL, act, arch)
        blocks.append(ForwardBlock([nn.Flatten(), nn.Linear(c * h * w, hidden), _activation(act)]))
        blocks.append(ForwardBlock([nn.Linear(hidden, n_classes)]))
        return blocks
    raise ConfigError(f"model.arch {arch!r} is not a network; choose simple_vgg, lenet, resnet18 or resnet34")


class DTPNetwork(nn.Module):
    """The forward blocks F_0..F_N and their feedback blocks G_0..G_N (G_0 is built but never trained)."""

    def __init__(self, model_cfg: ModelConfig, in_shape: tuple[int, int, int], n_classes: int, seed: int) -> None:
        super().__init__()
        with global_cpu_rng_seeded(seed):
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
        with global_cpu_rng_seeded(seed + 1):
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


def _layer_weight_pairs(forward: nn.Module | None, feedback: nn.Module | None) -> list[tuple[Tensor, Tensor]]:
    if isinstance(forward, BasicBlock):
        return [pair for name in ("conv1", "conv2", "shortcut")
                for pair in _layer_weight_pairs(getattr(forward, name), getattr(feedback, name))]
    if isinstance(forward, nn.Linear):
        return [(forward.weight, feedback.weight.t())]
    if isinstance(forward, nn.Conv2d):
        return [(forward.weight, feedback.weight)]
    return []


def weight_pairs(forward_block: nn.Module, feedback_block: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(W, Bᵀ) for each parametric forward layer and its feedback twin, in forward order, Bᵀ a view in W's layout.

    A feedback block's layers are its forward block's inverted in reverse order, and a residual block's
    convolutions (shortcut included) pair with their own transposes. A ConvTranspose2d weight already
    has its Conv2d twin's layout; a Linear feedback weight is transposed.
    """
    return [pair for f, g in zip(forward_block.layers, reversed(feedback_block.layers))
            for pair in _layer_weight_pairs(f, g)]
