"""The forward networks of model.arch, block by block, and the optional Xavier-normal initialisation.

Architectures (model.arch), with the layer shapes of the published code (ernoult/scalingDTP):
- simple_vgg: conv3x3 → act → maxpool 2/2 per entry of model.channels, then flatten → linear.
- lenet: conv5x5 → act → maxpool 3/2 (padding 1) per entry of model.channels, then a hidden block
  flatten → linear(model.hidden) → act and the classifier block linear(n_classes).
- resnet18 / resnet34: the CIFAR ResNet (3x3 stem, four stages of basic blocks, average pool, linear),
  one DTP block per top-level part: stem, stage 1–4, classifier. No batch norm, as published by default:
  a batch statistic would couple the rows that split blocks and data-parallel replicas train apart.
- mlp: flatten, then linear → act per entry of model.channels, then linear(n_classes); model.bias says
  which linear layers have a bias (Meulemans et al. 2020's MNIST network drops the last hidden one's).
"""
from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from torch import nn

from dtp.errors import ConfigError
from dtp.layers import BasicBlock, ForwardBlock, make_activation

if TYPE_CHECKING:  # the config imports the models' algorithm
    from dtp.config import ModelConfig

RESNET_STAGE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
RESNET_STAGE_STRIDES = (1, 2, 2, 2)
RESNET_MIN_SIZE = 8  # stages 2–4 halve the map: 8x8 inputs end at 1x1
SIMPLE_VGG_POOL = (2, 2, 0)  # kernel, stride, padding
LENET_POOL = (3, 2, 1)


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
            make_activation(activation),
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
    stem = nn.Conv2d(c, widths[0], 3, stride=1, padding=1, bias=False)
    blocks = [ForwardBlock([stem, make_activation(activation)])]
    in_planes = widths[0]
    for planes, count, stride in zip(widths, RESNET_STAGE_BLOCKS[arch], RESNET_STAGE_STRIDES):
        stage = []
        for s in [stride] + [1] * (count - 1):
            stage.append(BasicBlock(in_planes, planes, s, activation))
            in_planes = planes
        blocks.append(ForwardBlock(stage))
    blocks.append(ForwardBlock([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_planes, n_classes)]))
    return blocks


def _mlp_blocks(in_shape: tuple[int, int, int], widths: list[int], biases: list[bool], activation: str,
                n_classes: int) -> list[ForwardBlock]:
    """One block per hidden layer (linear → act; the first flattens), then the classifier."""
    if biases and len(biases) != len(widths) + 1:
        raise ConfigError(f"model.bias has {len(biases)} entries but the mlp has {len(widths) + 1} linear layers "
                          f"(one per model.channels entry, then the classifier); give one true/false per layer")
    biases = biases or [True] * (len(widths) + 1)
    sizes = [prod(in_shape), *widths]
    blocks = []
    for i, (n_in, n_out) in enumerate(zip(sizes, widths)):
        flatten = [nn.Flatten()] if i == 0 else []
        blocks.append(ForwardBlock([*flatten, nn.Linear(n_in, n_out, bias=biases[i]), make_activation(activation)]))
    blocks.append(ForwardBlock([nn.Linear(sizes[-1], n_classes, bias=biases[-1])]))
    return blocks


def xavier_normal_init(modules: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every linear and (transposed) convolution, as Meulemans et al.
    (2020) initialise (model.init: xavier_normal)."""
    for module in modules.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


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
        blocks.append(ForwardBlock([nn.Flatten(), nn.Linear(c * h * w, hidden), make_activation(act)]))
        blocks.append(ForwardBlock([nn.Linear(hidden, n_classes)]))
        return blocks
    if arch == "mlp":
        return _mlp_blocks(in_shape, channels, list(model_cfg.bias), act, n_classes)
    raise ConfigError(f"model.arch {arch!r} is not a network; choose simple_vgg, lenet, resnet18, resnet34 or mlp")
