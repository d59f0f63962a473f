"""MNIST and Fashion-MNIST, read from their idx files (plain or gzipped).

The two datasets share a binary format with its own header checks and torchvision's folder layout, none
of which concerns the other formats, so they live here together.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from dtp.data.splits import DataError, DatasetSplits, make_splits

# Per idx dataset: the name in messages and torchvision's class, which also names its <root>/<class>/raw folder.
IDX_DATASETS = {"mnist": ("MNIST", "MNIST"), "fashion_mnist": ("Fashion-MNIST", "FashionMNIST")}
IDX_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N)
IDX_IMAGE_SIZE = 28
GZIP_MAGIC = b"\x1f\x8b"


def _idx_file(folder: Path, stem: str) -> Path | None:
    """The file `stem` or `stem.gz` in folder, preferring the plain one (torchvision leaves both)."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _find_idx_files(name: str, data_dir: Path) -> dict[str, Path]:
    """Path of each idx file by stem, all from torchvision's <data-dir>/<class>/raw or all from data_dir."""
    title, tv_class = IDX_DATASETS[name]
    stems = [stem for pair in IDX_SPLIT_FILES.values() for stem in pair]
    nested = data_dir / tv_class / "raw"
    for folder in (nested, data_dir):
        found = {stem: _idx_file(folder, stem) for stem in stems}
        if all(found.values()):
            return {stem: path for stem, path in found.items() if path is not None}
    expected = "\n  ".join(f"{nested / stem}[.gz]" for stem in stems)
    raise DataError(
        f"{title} not found; expected the files\n  {expected}\n"
        f"(plain or gzipped, or the same files directly in {data_dir}); "
        f"pass --download to fetch {title} into {data_dir}, or point --data-dir at the folder that holds them"
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one idx file of unsigned bytes: a big-endian magic word, one int32 per dimension, then the data.

    The magic word encodes the element type and the number of dimensions, so checking it and the data
    length against the dimensions catches a swapped, truncated or foreign file before it is used.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); fetch the file again (--download)") from e
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if raw[:2] == GZIP_MAGIC:
        raise DataError(f"{path}: is gzipped but its name lacks .gz; rename it to {path.name}.gz")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "images" if ndim == 3 else "labels"
        raise DataError(
            f"{path}: not an idx {kind} file (magic number 0x{found:08x} in a {len(raw)}-byte file, expected "
            f"0x{magic:08x}); it must be the original {path.name.removesuffix('.gz')} file, fetch it again (--download)"
        )
    if len(raw) < header:
        raise DataError(f"{path}: the idx header is cut short; the file is truncated, fetch it again (--download)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: the header promises dimensions {dims} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; it is truncated or corrupt, fetch it again (--download)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_idx_split(files: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as uint8 N×1×28×28 images and int64 labels, after checking that the two files agree."""
    image_path, label_path = (files[stem] for stem in IDX_SPLIT_FILES[split])
    images = _read_idx(image_path, IDX_IMAGES_MAGIC)
    labels = _read_idx(label_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (IDX_IMAGE_SIZE, IDX_IMAGE_SIZE):
        raise DataError(
            f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, expected "
            f"{IDX_IMAGE_SIZE}x{IDX_IMAGE_SIZE}; this is not an MNIST or Fashion-MNIST file"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
            "both files must come from the same download, fetch them again (--download)"
        )
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _download_idx(name: str, data_dir: Path) -> None:
    """Fetch the idx files with torchvision into <data_dir>/<class>/raw; only its download is used."""
    import torchvision  # deferred: only needed when the user asks for a download

    title, tv_class = IDX_DATASETS[name]
    try:
        # One construction downloads the files of both splits.
        getattr(torchvision.datasets, tv_class)(root=str(data_dir), train=True, download=True)
    except (OSError, RuntimeError) as e:
        raise DataError(f"downloading {title} into {data_dir} failed: {e}") from e


def load_idx_dataset(name: str, data_dir: Path, download: bool) -> DatasetSplits:
    """The idx dataset `name` (a key of IDX_DATASETS) from data_dir, fetched first if `download`."""
    if download:
        _download_idx(name, data_dir)
    files = _find_idx_files(name, data_dir)
    train_x, train_y = _read_idx_split(files, "train")
    test_x, test_y = _read_idx_split(files, "test")
    return make_splits(train_x, train_y, test_x, test_y, 10)
