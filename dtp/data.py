"""Datasets and deterministic batching for DTP training.

Everything is held in memory as uint8 N×C×H×W tensors; augmentation and
normalisation happen per batch. Batch order and augmentation depend only on
(seed, epoch, batch index), so a run resumed mid-epoch sees exactly the
batches it would have seen without the interruption.
"""

from __future__ import annotations

import gzip
import math
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from dtp.errors import UserError
from dtp.seeding import seeded_generator

DATASETS = ("shapes", "cifar10", "imagenet32", "mnist", "fashion_mnist", "npz")

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
IMAGENET32_TRAIN_FILES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
IMAGENET32_VAL_FILE = "val_data"
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
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

PAD = 4  # pixels of edge padding before the random crop (docs/design.md §8; edge as in the published code)
_STATS_CHUNK_ELEMENTS = 1 << 23  # int64 values per chunk when computing mean/std (64 MiB)
# Leading words that keep the permutation and augmentation seed streams apart.
_PERM_STREAM = 0x5045524D
_AUG_STREAM = 0x41554721


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


def load_dataset(name: str, data_dir: str | None, download: bool = False, seed: int = 0) -> DatasetSplits:
    """Load a dataset by name; `seed` only matters for the generated `shapes` dataset."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "shapes":
        xtr, ytr, xte, yte = make_shapes(seed)
        return _make_splits(_hwc_to_chw(xtr), torch.from_numpy(ytr), _hwc_to_chw(xte), torch.from_numpy(yte), 10)
    if data_dir is None:
        raise DataError(f"--data-dir is required for dataset {name!r}")
    if name == "cifar10":
        return _load_cifar10(Path(data_dir), download)
    if name == "imagenet32":
        return _load_imagenet32(Path(data_dir))
    if name in IDX_DATASETS:
        return _load_idx_dataset(name, Path(data_dir), download)
    return _load_npz(Path(data_dir))


# ----------------------------------------------------------------------------- statistics and checks


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


def _make_splits(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> DatasetSplits:
    """Validate label ranges and attach train-split statistics."""
    _check_labels(train_y, num_classes, "train split")
    _check_labels(test_y, num_classes, "test split")
    mean, std = channel_stats(train_x)
    return DatasetSplits(train_x, train_y, test_x, test_y, num_classes, mean, std)


def _hwc_to_chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- pickled batches


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


def _load_cifar10(data_dir: Path, download: bool) -> DatasetSplits:
    if download:
        _download_cifar10(data_dir)
    folder = _cifar_folder(data_dir)
    train_x, train_y = _read_batches([folder / f for f in CIFAR_TRAIN_FILES])
    test_x, test_y = _read_batches([folder / CIFAR_TEST_FILE])
    return _make_splits(train_x, train_y, test_x, test_y, 10)


def _load_imagenet32(data_dir: Path) -> DatasetSplits:
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
    return _make_splits(train_x, train_y, test_x, test_y, 1000)


# ----------------------------------------------------------------------------- MNIST and Fashion-MNIST (idx files)


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


def _load_idx_dataset(name: str, data_dir: Path, download: bool) -> DatasetSplits:
    if download:
        _download_idx(name, data_dir)
    files = _find_idx_files(name, data_dir)
    train_x, train_y = _read_idx_split(files, "train")
    test_x, test_y = _read_idx_split(files, "test")
    return _make_splits(train_x, train_y, test_x, test_y, 10)


# ----------------------------------------------------------------------------- npz


def _load_npz(path: Path) -> DatasetSplits:
    fmt = "a .npz with x_train, x_test (uint8 N×H×W×C) and y_train, y_test (integer N)"
    if not path.is_file():
        raise DataError(f"npz dataset file {path} not found; --data-dir must point at {fmt}")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single array, not an .npz archive; expected {fmt}")
        with npz:
            arrays = {k: npz[k] for k in NPZ_KEYS if k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read as .npz ({e}); expected {fmt}") from e
    for key in NPZ_KEYS:
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r}; expected {fmt}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{path}: 'x_{split}' must be uint8 N×H×W×C, got {x.dtype} with shape {x.shape}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: 'y_{split}' must be a 1-D integer array, got {y.dtype} with shape {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{path}: 'x_{split}' has {len(x)} images but 'y_{split}' has {len(y)} labels")
        if y.size and y.min() < 0:
            raise DataError(f"{path}: 'y_{split}' has negative labels; labels must be 0..num_classes-1")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{path}: 'x_train' images are {arrays['x_train'].shape[1:]} but 'x_test' images are "
            f"{arrays['x_test'].shape[1:]}; both must be H×W×C of the same size"
        )
    if len(arrays["y_train"]) == 0:
        raise DataError(f"{path}: 'x_train' is empty")
    labels = [arrays["y_train"], arrays["y_test"]]
    num_classes = int(max(int(y.max()) for y in labels if y.size)) + 1
    return _make_splits(
        _hwc_to_chw(arrays["x_train"]),
        torch.from_numpy(arrays["y_train"].astype(np.int64)),
        _hwc_to_chw(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes,
    )


# ----------------------------------------------------------------------------- procedural shapes

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


# ----------------------------------------------------------------------------- batching


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
        self.seed = seed
        # (x/255 - mean)/std folded into one multiply-add.
        std = std.to(device=x.device, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(-1, 1, 1)
        self._shift = (mean.to(device=x.device, dtype=torch.float32) / std).view(-1, 1, 1)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (normalised float32 images, int64 labels) for batches start, start+1, ... of `epoch`."""
        n = len(self.x)
        if self.train:
            order = torch.randperm(n, generator=seeded_generator(_PERM_STREAM, self.seed, epoch)).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.x[idx]
            if self.train:
                images = augment(images, seeded_generator(_AUG_STREAM, self.seed, epoch, b))
            yield images.float() * self._scale - self._shift, self.y[idx]
