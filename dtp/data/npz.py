"""A user's own dataset as one .npz archive of four arrays.

This is the open door for data the project does not know by name, so its checks are the most thorough:
every array's type, shape and agreement is verified and the number of classes is inferred from the labels.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from dtp.data.splits import DataError, DatasetSplits, hwc_to_chw, make_splits

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: Path) -> DatasetSplits:
    """Read and check x_train, x_test (uint8 N×H×W×C) and y_train, y_test; classes are max label + 1."""
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
    return make_splits(
        hwc_to_chw(arrays["x_train"]),
        torch.from_numpy(arrays["y_train"].astype(np.int64)),
        hwc_to_chw(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes,
    )
