"""The embedded `shapes` dataset: 32×32 RGB images of ten shapes, generated from a seed in seconds.

It needs no download, so tests and smoke runs use it; generating it is drawing code (masks, colours,
noise) that has nothing to do with reading files, hence its own module.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from dtp.data.splits import DatasetSplits, hwc_to_chw, make_splits

SHAPE_NAMES = (
    "disk", "square", "triangle", "ring", "plus", "cross", "horizontal bar", "vertical bar", "diamond",
    "hollow square",
)  # fmt: skip
_SIZE = 32
_NOISE_STD = 12.0  # pixel noise in 0..255 units
_MIN_CONTRAST = 90.0  # minimum RGB distance between foreground and background colours


def _mask_disk(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return u * u + v * v <= r * r


def _mask_square(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r


def _mask_triangle(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Apex at v = -r, base at v = 0.7 r with half-width r.
    return (v >= -r) & (v <= 0.7 * r) & (np.abs(u) <= (v + r) / 1.7)


def _mask_ring(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    d2 = u * u + v * v
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)


def _bar_width(r: np.ndarray) -> np.ndarray:
    return np.maximum(1.0, 0.25 * r)


def _mask_plus(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    t = _bar_width(r)
    return ((np.abs(u) <= t) & (np.abs(v) <= r)) | ((np.abs(v) <= t) & (np.abs(u) <= r))


def _mask_cross(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _mask_plus((u + v) / math.sqrt(2.0), (u - v) / math.sqrt(2.0), r)


def _mask_hbar(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= r) & (np.abs(v) <= _bar_width(r))


def _mask_vbar(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _mask_hbar(v, u, r)


def _mask_diamond(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= r


def _mask_hollow_square(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    m = np.maximum(np.abs(u), np.abs(v))
    return (m <= 0.8 * r) & (m >= 0.8 * r - _bar_width(r))


_MASKS: tuple[Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], ...] = (
    _mask_disk, _mask_square, _mask_triangle, _mask_ring, _mask_plus, _mask_cross, _mask_hbar, _mask_vbar,
    _mask_diamond, _mask_hollow_square,
)  # fmt: skip


def _contrasting_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random background/foreground RGB pairs, redrawn until they differ enough to be seen through noise."""
    bg = rng.uniform(0, 255, (n, 3))
    fg = rng.uniform(0, 255, (n, 3))
    weak = np.linalg.norm(fg - bg, axis=1) < _MIN_CONTRAST
    while weak.any():
        fg[weak] = rng.uniform(0, 255, (int(weak.sum()), 3))
        weak = np.linalg.norm(fg - bg, axis=1) < _MIN_CONTRAST
    return bg, fg


def _render_shapes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw n images with exactly balanced classes (in random order), all randomness from rng."""
    y = rng.permutation(np.arange(n) % len(_MASKS)).astype(np.int64)
    radius = rng.uniform(6.0, 12.0, n)
    # Keep most of the shape inside the frame, allowing slight clipping at the border.
    cx = rng.uniform(radius * 0.8, _SIZE - 1 - radius * 0.8)
    cy = rng.uniform(radius * 0.8, _SIZE - 1 - radius * 0.8)
    angle = rng.uniform(-math.pi / 9, math.pi / 9, n)  # ±20°: small enough not to turn plus into cross
    bg, fg = _contrasting_colours(rng, n)
    noise = rng.standard_normal((n, _SIZE, _SIZE, 3), dtype=np.float32) * np.float32(_NOISE_STD)

    grid = np.arange(_SIZE, dtype=np.float32)
    dx = grid[None, None, :] - cx[:, None, None].astype(np.float32)
    dy = grid[None, :, None] - cy[:, None, None].astype(np.float32)
    cos = np.cos(angle).astype(np.float32)[:, None, None]
    sin = np.sin(angle).astype(np.float32)[:, None, None]
    u = cos * dx + sin * dy
    v = cos * dy - sin * dx
    r = radius.astype(np.float32)[:, None, None]
    mask = np.zeros((n, _SIZE, _SIZE), dtype=bool)
    for label, shape_mask in enumerate(_MASKS):
        sel = y == label
        mask[sel] = shape_mask(u[sel], v[sel], r[sel])

    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :]).astype(np.float32)
    img += noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), y


def make_shapes(
    seed: int, n_train: int = 10000, n_test: int = 2000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate the embedded 10-class shapes dataset: (x_train, y_train, x_test, y_test), x uint8 N×32×32×3.

    Train and test come from independent child streams of `seed`, so the test
    set does not change with n_train.
    """
    train_seq, test_seq = np.random.SeedSequence(seed).spawn(2)
    x_train, y_train = _render_shapes(np.random.default_rng(train_seq), n_train)
    x_test, y_test = _render_shapes(np.random.default_rng(test_seq), n_test)
    return x_train, y_train, x_test, y_test



def load_shapes(seed: int) -> DatasetSplits:
    """The shapes dataset of `seed` in the N×C×H×W form every loader returns."""
    x_train, y_train, x_test, y_test = make_shapes(seed)
    return make_splits(
        hwc_to_chw(x_train), torch.from_numpy(y_train), hwc_to_chw(x_test), torch.from_numpy(y_test), 10
    )
