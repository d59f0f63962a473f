"""Datasets and deterministic batching for DTP training: the public names, and `load_dataset`.

Everything is held in memory as uint8 N×C×H×W tensors; augmentation and normalisation happen per
batch. Each on-disk format has its own module, so adding a dataset and changing batching touch
different files:

    splits    DatasetSplits, DataError, label checks and channel statistics shared by every format
    pickles   CIFAR-10 and ImageNet 32×32
    idx       MNIST and Fashion-MNIST
    npz       a user's own .npz archive
    shapes    the generated shapes dataset
    batches   augmentation and the resumable BatchLoader
"""

from __future__ import annotations

from pathlib import Path

from dtp.data.batches import PAD, BatchLoader, augment
from dtp.data.idx import IDX_DATASETS, IDX_SPLIT_FILES, load_idx_dataset
from dtp.data.npz import NPZ_KEYS, load_npz
from dtp.data.pickles import (
    CIFAR_FOLDER,
    CIFAR_TEST_FILE,
    CIFAR_TRAIN_FILES,
    IMAGENET32_TRAIN_FILES,
    IMAGENET32_VAL_FILE,
    load_cifar10,
    load_imagenet32,
)
from dtp.data.shapes import SHAPE_NAMES, load_shapes, make_shapes
from dtp.data.splits import DataError, DatasetSplits, channel_stats

__all__ = [
    "CIFAR_FOLDER", "CIFAR_TEST_FILE", "CIFAR_TRAIN_FILES", "DATASETS", "IDX_DATASETS", "IDX_SPLIT_FILES",
    "IMAGENET32_TRAIN_FILES", "IMAGENET32_VAL_FILE", "NPZ_KEYS", "PAD", "SHAPE_NAMES", "BatchLoader", "DataError",
    "DatasetSplits", "augment", "channel_stats", "load_dataset", "make_shapes",
]  # fmt: skip

DATASETS = ("shapes", "cifar10", "imagenet32", "mnist", "fashion_mnist", "npz")


def load_dataset(name: str, data_dir: str | None, download: bool = False, seed: int = 0) -> DatasetSplits:
    """Load a dataset by name; `seed` only matters for the generated `shapes` dataset."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "shapes":
        return load_shapes(seed)
    if data_dir is None:
        raise DataError(f"--data-dir is required for dataset {name!r}")
    if name == "cifar10":
        return load_cifar10(Path(data_dir), download)
    if name == "imagenet32":
        return load_imagenet32(Path(data_dir))
    if name in IDX_DATASETS:
        return load_idx_dataset(name, Path(data_dir), download)
    return load_npz(Path(data_dir))
