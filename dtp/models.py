"""Forward networks as sequences of blocks, and feedback networks built by inverting them (docs/design.md §2–3).

Pooling indices are explicit values: a forward block returns them next to its output and a feedback
block takes them as an argument. Nothing is cached inside a module, so calling a block on a perturbed
input can never change which indices a later feedback call uses.

The forward networks of model.arch are built in dtp/archs.py. The feedback modules are the inverted
blocks G_0..G_N (INVERTED) unless the algorithm builds others (`FeedbackArchitecture`; DRL's direct maps,
dtp/drl.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtp.archs import build_forward, xavier_normal_init
from dtp.layers import ACTIVATIONS, BasicBlock, ForwardBlock, Indices, InvertedBasicBlock, transposed_conv
from dtp.seeding import global_cpu_rng_seeded

if TYPE_CHECKING:  # the config imports the models' algorithm
    from dtp.config import ModelConfig

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


def invert_layer(layer: nn.Module, in_shape: torch.Size) -> nn.Module:
    """The feedback counterpart of one forward layer, whose input has shape in_shape (no batch dim)."""
    if isinstance(layer, nn.Conv2d):
        return transposed_conv(layer, in_shape)
    if isinstance(layer, nn.MaxPool2d):
        return nn.MaxUnpool2d(layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, tuple(ACTIVATIONS.values())):
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


def invert_blocks(forward_blocks: list[ForwardBlock], input_shapes: list[torch.Size],
                  output_shapes: list[torch.Size]) -> list[nn.Module]:
    """G_0..G_N, each block inverted (INVERTED's builder; output shapes are not needed)."""
    return [invert_block(block, shape) for block, shape in zip(forward_blocks, input_shapes)]


FeedbackBuilder = Callable[[list[ForwardBlock], list[torch.Size], list[torch.Size]], list[nn.Module]]


@dataclass(frozen=True)
class FeedbackArchitecture:
    """How an algorithm's feedback modules are built from the forward blocks, and which of them learn."""

    build: FeedbackBuilder  # (forward blocks, their input shapes, their output shapes) → feedback modules
    first_trained: int  # modules before this one are built but never trained (G_0)
    inverts_forward: bool  # module i mirrors F_i layer by layer, so W against Bᵀ is defined


INVERTED = FeedbackArchitecture(invert_blocks, first_trained=1, inverts_forward=True)


class DTPNetwork(nn.Module):
    """The forward blocks F_0..F_N and their feedback modules: by default the inverted blocks G_0..G_N
    (G_0 is built but never trained), or those of another `FeedbackArchitecture`."""

    def __init__(self, model_cfg: ModelConfig, in_shape: tuple[int, int, int], n_classes: int, seed: int,
                 feedback: FeedbackArchitecture = INVERTED) -> None:
        super().__init__()
        xavier = model_cfg.init == "xavier_normal"
        with global_cpu_rng_seeded(seed):
            self.forward_blocks = nn.ModuleList(build_forward(model_cfg, in_shape, n_classes))
            if xavier:
                xavier_normal_init(self.forward_blocks)
        shapes = [torch.Size(in_shape)]
        x = torch.zeros((1, *in_shape))
        with torch.no_grad():
            for block in self.forward_blocks:
                x, _ = block(x)
                shapes.append(x.shape[1:])
        self.block_input_shapes = shapes[:-1]
        self.block_output_shapes = shapes[1:]
        self.feedback_architecture = feedback
        # Feedback weights get their own initialisation stream, independent of the forward weights.
        with global_cpu_rng_seeded(seed + 1):
            self.feedback_blocks = nn.ModuleList(
                feedback.build(list(self.forward_blocks), self.block_input_shapes, self.block_output_shapes))
            if xavier:
                xavier_normal_init(self.feedback_blocks)

    @torch.no_grad()
    def init_feedback_symmetric(self) -> None:
        """Start every feedback weight at its forward weight's transpose (feedback.init_symmetric)."""
        for forward, feedback in zip(self.forward_blocks, self.feedback_blocks):
            for w, b_t in weight_pairs(forward, feedback):
                b_t.copy_(w)

    @property
    def n_feedback(self) -> int:
        """Number of trainable feedback modules (G_1..G_N, or DRL's Q_0..Q_{N−1})."""
        return len(self.forward_blocks) - 1

    @property
    def trained_feedback(self) -> list[nn.Module]:
        """The feedback modules that learn, in the order of the per-block config lists."""
        return list(self.feedback_blocks)[self.feedback_architecture.first_trained:]

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
