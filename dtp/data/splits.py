"""The in-memory form every dataset loader produces, and the checks and statistics that go with it.

Each format module (pickles, idx, npz, shapes) ends by handing uint8 N×C×H×W tensors to `make_splits`,
so label checks and normalisation statistics are computed one way for all of them, and a new format
only has to read its files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dtp.errors import UserError

_STATS_CHUNK_ELEMENTS = 1 << 23  # int64 values per chunk when computing mean/std (64 MiB)


class DataError(UserError):
    """Bad or missing dataset input; message names the expected files/where and how to fix."""


@dataclass
class DatasetSplits:
    """Train and test splits as uint8 tensors plus train-split normalisation statistics."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image, which the model builder needs."""
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of x/255 for uint8 N×C×H×W x.

    Sums are exact int64 over chunks, so the result does not depend on chunking
    and no full-size float copy of a large dataset is ever made.
    """
    n, c, h, w = x.shape
    if n == 0:
        raise DataError("the training split is empty")
    total = torch.zeros(c, dtype=torch.int64)
    total_sq = torch.zeros(c, dtype=torch.int64)
    rows = max(1, _STATS_CHUNK_ELEMENTS // (c * h * w))
    for start in range(0, n, rows):
        chunk = x[start : start + rows].to(torch.int64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += (chunk * chunk).sum(dim=(0, 2, 3))
    count = n * h * w
    mean = total.double() / count
    var = (total_sq.double() / count - mean * mean).clamp_min(0.0)
    return (mean / 255.0).float(), (var.sqrt() / 255.0).float()


def _check_labels(y: torch.Tensor, num_classes: int, where: str) -> None:
    """Reject labels outside [0, num_classes) before they reach a loss function."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"{where}: labels must lie in [0, {num_classes}), found range [{int(y.min())}, {int(y.max())}]"
        )


def make_splits(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> DatasetSplits:
    """Validate label ranges and attach train-split statistics."""
    _check_labels(train_y, num_classes, "train split")
    _check_labels(test_y, num_classes, "test split")
    mean, std = channel_stats(train_x)
    return DatasetSplits(train_x, train_y, test_x, test_y, num_classes, mean, std)


def hwc_to_chw(x: np.ndarray) -> torch.Tensor:
    """N×H×W×C numpy images (how npz files and the shapes generator store them) as N×C×H×W."""
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
