"""CIFAR-10 and ImageNet 32×32, which share one on-disk form: pickled dicts of N×3072 uint8 rows.

Kept apart from the other formats because pickles need their own care (latin1 for python2 files, str
or bytes keys, a trusted source) and because these are the two large datasets, read with bounded
peak memory.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtp.data.splits import DataError, DatasetSplits, make_splits

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
IMAGENET32_TRAIN_FILES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
IMAGENET32_VAL_FILE = "val_data"


def _field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """Look up `key` whether the dict was pickled with str keys or bytes keys."""
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise DataError(f"{path}: expected a pickled dict with a {key!r} entry")


def _read_pickled_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR/ImageNet32-style pickle: `data` N×3072 uint8 channel-major, `labels` ints.

    latin1 decoding reads python2 pickles (CIFAR) and python3 ones alike. Like
    any pickle, the files must come from a trusted source.
    """
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: cannot read pickled batch ({e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict with 'data' and 'labels'")
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, "labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 of shape N×3072, got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_batches(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read several pickled batches into one uint8 tensor.

    The output is allocated once and each batch is dropped right after it is
    copied in; as large allocations are committed page by page on write, peak
    memory stays near one copy of the data plus one batch.
    """
    parts = [_read_pickled_batch(p) for p in paths]
    total = sum(len(y) for _, y in parts)
    x = torch.empty((total, 3, 32, 32), dtype=torch.uint8)
    y = torch.empty(total, dtype=torch.int64)
    filled = 0
    parts.reverse()  # pop() from the end then yields the batches in file order
    while parts:
        bx, by = parts.pop()
        x[filled : filled + len(by)] = torch.from_numpy(bx)
        y[filled : filled + len(by)] = torch.from_numpy(by)
        filled += len(by)
        del bx, by
    return x, y


def _missing(paths: list[Path]) -> list[Path]:
    return [p for p in paths if not p.is_file()]


def _cifar_folder(data_dir: Path) -> Path:
    """Accept either the folder holding cifar-10-batches-py or that folder itself."""
    for folder in (data_dir / CIFAR_FOLDER, data_dir):
        if not _missing([folder / f for f in CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,)]):
            return folder
    expected = "\n  ".join(str(data_dir / CIFAR_FOLDER / f) for f in CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,))
    raise DataError(
        f"CIFAR-10 not found; expected the files\n  {expected}\n"
        f"pass --download to fetch CIFAR-10 into {data_dir}, "
        f"or point --data-dir at the folder that holds {CIFAR_FOLDER}"
    )


def _download_cifar10(data_dir: Path) -> None:
    """Fetch CIFAR-10 with torchvision; only its download is used, reading is ours."""
    import torchvision  # deferred: only needed when the user asks for a download

    try:
        for train in (True, False):
            torchvision.datasets.CIFAR10(root=str(data_dir), train=train, download=True)
    except (OSError, RuntimeError) as e:
        raise DataError(f"downloading CIFAR-10 into {data_dir} failed: {e}") from e


def load_cifar10(data_dir: Path, download: bool) -> DatasetSplits:
    """CIFAR-10 from <data_dir>/cifar-10-batches-py or data_dir itself, fetched first if `download`."""
    if download:
        _download_cifar10(data_dir)
    folder = _cifar_folder(data_dir)
    train_x, train_y = _read_batches([folder / f for f in CIFAR_TRAIN_FILES])
    test_x, test_y = _read_batches([folder / CIFAR_TEST_FILE])
    return make_splits(train_x, train_y, test_x, test_y, 10)


def load_imagenet32(data_dir: Path) -> DatasetSplits:
    """ImageNet 32×32 from the unpacked official archives; its 1-based labels are shifted to 0-based."""
    train_paths = [data_dir / f for f in IMAGENET32_TRAIN_FILES]
    val_path = data_dir / IMAGENET32_VAL_FILE
    missing = _missing(train_paths + [val_path])
    if missing:
        listed = "\n  ".join(str(p) for p in missing)
        raise DataError(
            f"ImageNet 32x32 not found; missing files\n  {listed}\n"
            f"expected {IMAGENET32_TRAIN_FILES[0]} ... {IMAGENET32_TRAIN_FILES[-1]} and {IMAGENET32_VAL_FILE} "
            f"directly in {data_dir}. They come from the official downsampled ImageNet page "
            "(Imagenet32_train and Imagenet32_val archives, unpacked into one folder); there is no download option"
        )
    train_x, train_y = _read_batches(train_paths)
    test_x, test_y = _read_batches([val_path])
    for y, where in ((train_y, "ImageNet32 train"), (test_y, "ImageNet32 val")):
        if y.numel() and int(y.min()) < 1:
            raise DataError(f"{where}: labels must be 1-based (1..1000), found {int(y.min())}")
        y -= 1
    return make_splits(train_x, train_y, test_x, test_y, 1000)
