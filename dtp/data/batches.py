"""Batching: per-batch augmentation and normalisation over the in-memory uint8 tensors.

Batch order and augmentation depend only on (seed, epoch, batch index), so a run resumed mid-epoch
sees exactly the batches it would have seen without the interruption. Nothing here knows where the
data came from, so changing batching never touches a dataset reader.
"""

from __future__ import annotations

import copy
import math
from typing import Iterator

import torch

from dtp.data.splits import DataError
from dtp.seeding import seeded_generator

PAD = 4  # pixels of edge padding before the random crop (docs/design.md §8; edge as in the published code)
# Leading words that keep the permutation and augmentation seed streams apart.
_PERM_STREAM = 0x5045524D
_AUG_STREAM = 0x41554721


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop from the image padded by PAD pixels of its edge, plus random horizontal flip, for a
    uint8 B×C×H×W batch (the published `RandomCrop(size, padding=4, padding_mode="edge")` and flip).

    Every dataset gets this same augmentation, the crop at the image's own size (28 for MNIST and
    Fashion-MNIST). The flip is kept for digits too, though they are not mirror-symmetric: the published
    transforms flip MNIST as well, and one behaviour for all data keeps the loader free of per-dataset cases.

    Done with one gather: per image, row and column index vectors into the batch, shifted by the crop
    offset and clamped to the image (which is what edge padding is), the column vector reversed for
    flipped images.
    """
    b, c, h, w = x.shape
    top = torch.randint(0, 2 * PAD + 1, (b,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * PAD + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = (top[:, None] - PAD + torch.arange(h, device=x.device)).clamp(0, h - 1)
    cols = (left[:, None] - PAD + torch.arange(w, device=x.device)).clamp(0, w - 1)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return x[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Deterministic, stateless-resumable batches over in-memory uint8 tensors."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        train: bool,
        seed: int,
        drop_last: bool | None = None,
        augmented: bool | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise DataError(f"BatchLoader needs uint8 N×C×H×W images, got {x.dtype} {tuple(x.shape)}")
        if len(x) != len(y):
            raise DataError(f"BatchLoader got {len(x)} images but {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and batch_size > len(x):
            raise DataError(
                f"batch size {batch_size} is larger than the {len(x)} available examples, so an epoch "
                "would have no full batch; lower the batch size or use more data"
            )
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.train = train
        self.augmented = train if augmented is None else augmented  # training batches are, unless told otherwise
        self.dtype = dtype
        self.seed = seed
        # (x/255 - mean)/std folded into one multiply-add.
        std = std.to(device=x.device, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(-1, 1, 1)
        self._shift = (mean.to(device=x.device, dtype=torch.float32) / std).view(-1, 1, 1)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (normalised images in self.dtype, int64 labels) for batches start, start+1, ... of `epoch`."""
        n = len(self.x)
        if self.train:
            order = torch.randperm(n, generator=seeded_generator(_PERM_STREAM, self.seed, epoch)).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.x[idx]
            if self.augmented:
                images = augment(images, seeded_generator(_AUG_STREAM, self.seed, epoch, b))
            yield (images.float() * self._scale - self._shift).to(self.dtype), self.y[idx]

    def with_seed(self, seed: int) -> BatchLoader:
        """The same data and settings, with the batch order and augmentation drawn from `seed`."""
        other = copy.copy(self)
        other.seed = seed
        return other
