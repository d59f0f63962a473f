"""Tests for dtp.data: on-disk formats, the shapes generator and deterministic batching."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import expect_error, script_in_process, train_in_process

from dtp import data
from dtp.data import (
    DATASETS,
    BatchLoader,
    DataError,
    DatasetSplits,
    augment,
    channel_stats,
    load_dataset,
    make_shapes,
)

# ----------------------------------------------------------------------------- helpers


def _pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _write_pickle(path: Path, batch: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def _py2_pickle(pixels: np.ndarray, labels: list[int]) -> bytes:
    """A {'data', 'labels'} dict pickled the way python 2 wrote CIFAR-10, opcode by opcode.

    Python 2 stored str keys and the raw pixel buffer as 8-bit strings, which
    python 3 only reads with encoding="latin1"; python 3 cannot emit this itself.
    """

    def py2_str(text: bytes) -> bytes:
        if len(text) < 256:
            return b"U" + bytes([len(text)]) + text  # SHORT_BINSTRING
        return b"T" + struct.pack("<i", len(text)) + text  # BINSTRING

    def py_int(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)  # BININT

    # dtype('u1', 0, 1) followed by BUILD with its state tuple.
    dtype = b"cnumpy\ndtype\n" + py2_str(b"u1") + py_int(0) + py_int(1) + b"\x87R"
    dtype += b"(" + py_int(3) + py2_str(b"|") + b"NNN" + py_int(-1) + py_int(-1) + py_int(0) + b"tb"
    # _reconstruct(ndarray, (0,), 'b') followed by BUILD with (1, shape, dtype, False, raw bytes).
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + py_int(0) + b"\x85" + py2_str(b"b") + b"\x87R"
    array += b"(" + py_int(1) + py_int(pixels.shape[0]) + py_int(pixels.shape[1]) + b"\x86" + dtype
    array += b"\x89" + py2_str(pixels.tobytes()) + b"tb"
    label_list = b"](" + b"".join(py_int(v) for v in labels) + b"e"
    return b"\x80\x02}(" + py2_str(b"data") + array + py2_str(b"labels") + label_list + b"u."


def _write_cifar(folder: Path, n_per_batch: int = 3, n_test: int = 2) -> tuple[np.ndarray, list[int]]:
    """Write cifar-10-batches-py: python 2 pickles for training, bytes keys in test_batch."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in data.CIFAR_TRAIN_FILES:
        x, y = _pixels(rng, n_per_batch), [int(v) for v in rng.integers(0, 10, n_per_batch)]
        (folder / name).write_bytes(_py2_pickle(x, y))
        xs.append(x)
        ys.extend(y)
    x, y = _pixels(rng, n_test), [int(v) for v in rng.integers(0, 10, n_test)]
    _write_pickle(folder / data.CIFAR_TEST_FILE, {b"data": x, b"labels": y, b"batch_label": b"testing batch 1 of 1"})
    return np.concatenate(xs + [x]), ys + y


def _write_imagenet32(folder: Path, n_per_batch: int = 2, n_val: int = 3) -> None:
    rng = np.random.default_rng(2)
    for name in data.IMAGENET32_TRAIN_FILES:
        _write_pickle(folder / name, {"data": _pixels(rng, n_per_batch), "labels": [1, 1000][:n_per_batch]})
    _write_pickle(folder / data.IMAGENET32_VAL_FILE, {"data": _pixels(rng, n_val), "labels": [5] * n_val})


def _npz_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "x_train": rng.integers(0, 256, (6, 5, 4, 2), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_test": rng.integers(0, 256, (2, 5, 4, 2), dtype=np.uint8),
        "y_test": np.array([3, 0], dtype=np.int32),
    }


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """An idx file of uint8 `array`: big-endian magic word and dimensions, then the bytes; gzipped for .gz."""
    magic = 0x0800 + array.ndim if magic is None else magic
    payload = struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _write_mnist(folder: Path, gz: bool, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    """The four idx files with random pixels and labels 0..9; returns what was written, by split."""
    rng = np.random.default_rng(4)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        image_stem, label_stem = data.IDX_SPLIT_FILES[split]
        suffix = ".gz" if gz else ""
        _write_idx(folder / f"{image_stem}{suffix}", x)
        _write_idx(folder / f"{label_stem}{suffix}", y)
        written[f"x_{split}"], written[f"y_{split}"] = x, y
    return written


def _tiny_loader(train: bool, n: int = 10, batch_size: int = 4, seed: int = 0) -> BatchLoader:
    x = torch.arange(n * 3 * 6 * 5, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, 3, 6, 5)
    y = torch.arange(n)
    return BatchLoader(x, y, batch_size, torch.zeros(3), torch.ones(3), train=train, seed=seed)


def _assert_batches_equal(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("point_at_inner", [False, True])
def test_cifar10_reads_channel_major_pixels_and_labels(tmp_path: Path, point_at_inner: bool) -> None:
    inner = tmp_path / data.CIFAR_FOLDER
    raw, labels = _write_cifar(inner)
    splits = load_dataset("cifar10", str(inner if point_at_inner else tmp_path))

    assert splits.train_x.shape == (15, 3, 32, 32) and splits.train_x.dtype == torch.uint8
    assert splits.test_x.shape == (2, 3, 32, 32)
    assert splits.train_y.dtype == torch.int64 and splits.train_y.tolist() == labels[:15]
    assert splits.test_y.tolist() == labels[15:]
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    assert splits.train_x.is_contiguous()
    # Channel c, row r, column w of image n sits at c*1024 + r*32 + w of its row in `data`.
    for n, c, r, w in [(0, 0, 0, 0), (4, 1, 7, 30), (14, 2, 31, 5)]:
        assert int(splits.train_x[n, c, r, w]) == raw[n, c * 1024 + r * 32 + w]
    assert int(splits.test_x[1, 2, 3, 4]) == raw[16, 2 * 1024 + 3 * 32 + 4]


def test_cifar10_missing_files_names_them_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", str(tmp_path))
    message = str(err.value)
    assert "data_batch_1" in message and "test_batch" in message and data.CIFAR_FOLDER in message
    assert "--download" in message and "--data-dir" in message


def test_cifar10_download_uses_torchvision_then_own_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    calls = []

    def fake_cifar10(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        _write_cifar(Path(root) / data.CIFAR_FOLDER)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    splits = load_dataset("cifar10", str(tmp_path), download=True)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert len(splits.train_y) == 15


def test_cifar10_label_out_of_range(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    _write_pickle(tmp_path / "test_batch", {"data": _pixels(np.random.default_rng(0), 1), "labels": [10]})
    with pytest.raises(DataError, match=r"\[0, 10\)"):
        load_dataset("cifar10", str(tmp_path))


# ----------------------------------------------------------------------------- ImageNet 32x32


def test_imagenet32_shifts_labels_to_zero_based(tmp_path: Path) -> None:
    _write_imagenet32(tmp_path)
    splits = load_dataset("imagenet32", str(tmp_path))
    assert splits.num_classes == 1000
    assert splits.train_x.shape == (20, 3, 32, 32)
    assert splits.train_y.tolist() == [0, 999] * 10
    assert splits.test_y.tolist() == [4, 4, 4]
    with open(tmp_path / "train_data_batch_10", "rb") as f:
        last = pickle.load(f)["data"]
    assert int(splits.train_x[19, 1, 2, 3]) == last[1, 1024 + 2 * 32 + 3]


def test_imagenet32_missing_files_names_them_and_the_source(tmp_path: Path) -> None:
    _write_imagenet32(tmp_path)
    (tmp_path / "train_data_batch_7").unlink()
    (tmp_path / "val_data").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("imagenet32", str(tmp_path))
    message = str(err.value)
    assert "train_data_batch_7" in message and "val_data" in message
    assert "Imagenet32_train" in message and "Imagenet32_val" in message


def test_imagenet32_rejects_zero_based_labels(tmp_path: Path) -> None:
    _write_imagenet32(tmp_path)
    _write_pickle(tmp_path / "val_data", {"data": _pixels(np.random.default_rng(0), 1), "labels": [0]})
    with pytest.raises(DataError, match="1-based"):
        load_dataset("imagenet32", str(tmp_path))


def test_pickle_with_wrong_data_shape(tmp_path: Path) -> None:
    _write_imagenet32(tmp_path)
    _write_pickle(tmp_path / "val_data", {"data": np.zeros((2, 100), np.uint8), "labels": [1, 1]})
    with pytest.raises(DataError, match="val_data.*N×3072"):
        load_dataset("imagenet32", str(tmp_path))


# ----------------------------------------------------------------------------- MNIST and Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("name", "nested"), [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                                              ("mnist", "")])
def test_mnist_reads_exact_pixels_and_labels(tmp_path: Path, name: str, nested: str, gz: bool) -> None:
    written = _write_mnist(tmp_path / nested, gz)
    splits = load_dataset(name, str(tmp_path))
    assert splits.train_x.shape == (12, 1, 28, 28) and splits.test_x.shape == (5, 1, 28, 28)
    assert splits.train_x.dtype == torch.uint8 and splits.train_x.is_contiguous()
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.mean.shape == (1,) and splits.std.shape == (1,)
    for split in ("train", "test"):
        x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        np.testing.assert_array_equal(x[:, 0].numpy(), written[f"x_{split}"])
        assert y.dtype == torch.int64 and y.tolist() == written[f"y_{split}"].tolist()


def test_mnist_prefers_plain_files_and_the_torchvision_folder(tmp_path: Path) -> None:
    """torchvision leaves each .gz beside its unpacked copy in raw/; the unpacked one is read (no gunzip)."""
    raw = tmp_path / "MNIST" / "raw"
    written = _write_mnist(raw, gz=False)
    _write_mnist(raw, gz=True, n_train=10)  # a different .gz beside the plain files: the plain ones win
    _write_mnist(tmp_path, gz=False, n_train=20)  # files directly in data-dir: the torchvision folder wins
    splits = load_dataset("mnist", str(tmp_path))
    np.testing.assert_array_equal(splits.train_x[:, 0].numpy(), written["x_train"])


def test_mnist_missing_files_name_them_and_the_fix(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)  # the other dataset's files do not count
    with pytest.raises(DataError) as err:
        load_dataset("mnist", str(tmp_path))
    message = str(err.value)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert str(tmp_path / "MNIST" / "raw" / stem) + "[.gz]" in message
    assert message.startswith("MNIST not found") and "--download" in message and "--data-dir" in message


def test_mnist_download_uses_torchvision_then_own_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    calls = []

    def fake_fashion_mnist(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        _write_mnist(Path(root) / "FashionMNIST" / "raw", gz=True)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fashion_mnist)
    splits = load_dataset("fashion_mnist", str(tmp_path), download=True)
    assert calls == [(str(tmp_path), True, True)]
    assert len(splits.train_y) == 12 and len(splits.test_y) == 5


def _truncate_test_images(folder: Path) -> None:
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda f: _write_idx(f / "train-labels-idx1-ubyte", np.zeros(12, np.uint8), magic=0x0803),
         r"train-labels-idx1-ubyte: not an idx labels file \(magic number 0x00000803"),
        (lambda f: _write_idx(f / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8)),
         r"t10k-images-idx3-ubyte holds 5 images but .*t10k-labels-idx1-ubyte holds 4 labels"),
        (_truncate_test_images, r"t10k-images-idx3-ubyte: the header promises dimensions \(5, 28, 28\)"),
        (lambda f: _write_idx(f / "train-images-idx3-ubyte", np.zeros((12, 32, 32), np.uint8)),
         "32x32, expected 28x28"),
        (lambda f: (f / "train-images-idx3-ubyte").write_bytes(gzip.compress(b"x")), "rename it to .*ubyte.gz"),
        (lambda f: _write_idx(f / "t10k-labels-idx1-ubyte", np.full(5, 10, np.uint8)), r"test split.*\[0, 10\)"),
    ],
)
def test_mnist_bad_files_are_named_with_the_problem(tmp_path: Path, change, expected: str) -> None:
    _write_mnist(tmp_path, gz=False)
    change(tmp_path)
    with pytest.raises(DataError, match=expected):
        load_dataset("mnist", str(tmp_path))


def test_mnist_unreadable_gzip_is_a_data_error(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        load_dataset("mnist", str(tmp_path))


def test_mnist_one_training_step_from_the_command_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """The shipped configs/mnist.yaml, narrowed, runs one step on 28x28 grey images; missing files exit cleanly."""
    _write_mnist(tmp_path / "data" / "MNIST" / "raw", gz=True, n_train=16, n_test=8)
    out = tmp_path / "run"
    small = ("--set", "batch_size=8", "--set", "eval_batch_size=8", "--set", "model.channels=[4,4,4,4]",
             "--set", "feedback.iterations=[1,1,1,1]")
    train_in_process(monkeypatch, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--max-steps", "1",
                     *small, "--out", str(out))
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["config"]["dataset"] == "mnist"
    assert ckpt["config"]["feedback"]["lr"] == [1.0e-4, 3.5e-4, 8.0e-3, 0.18]  # from configs/mnist.yaml
    assert ckpt["forward"]["0.layers.0.weight"].shape == (4, 1, 3, 3)  # one input channel
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", "--dataset", "fashion_mnist",
                             "--data-dir", str(tmp_path / "data"), "--max-steps", "1", *small,
                             "--out", str(tmp_path / "run2"))
    expect_error(proc, "Fashion-MNIST not found", "FashionMNIST")


# ----------------------------------------------------------------------------- npz


def test_npz_converts_hwc_to_chw(tmp_path: Path) -> None:
    arrays = _npz_arrays()
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    splits = load_dataset("npz", str(path))
    assert splits.train_x.shape == (6, 2, 5, 4) and splits.input_shape == (2, 5, 4)
    assert torch.equal(splits.train_x, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert torch.equal(splits.test_x, torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2))
    assert splits.test_y.dtype == torch.int64 and splits.test_y.tolist() == [3, 0]
    assert splits.num_classes == 4  # max label over both splits + 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda a: a.pop("y_test"), "y_test"),
        (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "x_train.*uint8"),
        (lambda a: a.update(x_test=a["x_test"][:, :, :, 0]), "x_test.*uint8 N×H×W×C"),
        (lambda a: a.update(y_train=a["y_train"][:5]), "6 images.*5 labels"),
        (lambda a: a.update(y_train=np.array([0, 1, -1, 0, 1, 2])), "y_train.*negative"),
        (lambda a: a.update(y_test=np.array([0.0, 1.0])), "y_test.*integer"),
        (lambda a: a.update(x_test=np.zeros((2, 4, 4, 2), np.uint8)), "same size"),
    ],
)
def test_npz_errors_name_the_key(tmp_path: Path, change, expected: str) -> None:
    arrays = _npz_arrays()
    change(arrays)
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=expected):
        load_dataset("npz", str(path))


def test_npz_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset("npz", str(tmp_path / "absent.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("npz", str(tmp_path / "junk.npz"))
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_dataset("npz", str(tmp_path / "single.npy"))


# ----------------------------------------------------------------------------- dispatch and statistics


@pytest.mark.parametrize("name", ["cifar10", "imagenet32", "mnist", "fashion_mnist", "npz"])
def test_data_dir_required(name: str) -> None:
    with pytest.raises(DataError, match="--data-dir is required"):
        load_dataset(name, None)


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(DataError) as err:
        load_dataset("svhn", None)
    assert all(name in str(err.value) for name in DATASETS)


def test_channel_stats_match_float_reference() -> None:
    x = torch.randint(0, 256, (5000, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(x)
    ref = x.double() / 255
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    torch.testing.assert_close(mean, ref.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(std, ref.std(dim=(0, 2, 3), unbiased=False).float())


# ----------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def small_shapes() -> tuple[np.ndarray, ...]:
    return make_shapes(seed=7, n_train=1000, n_test=200)


def test_shapes_format_and_balance(small_shapes: tuple[np.ndarray, ...]) -> None:
    x_train, y_train, x_test, y_test = small_shapes
    assert x_train.shape == (1000, 32, 32, 3) and x_train.dtype == np.uint8
    assert x_test.shape == (200, 32, 32, 3)
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert np.bincount(y_train, minlength=10).tolist() == [100] * 10
    assert np.bincount(y_test, minlength=10).tolist() == [20] * 10
    assert x_train.std() > 40  # images are not blank


def test_shapes_deterministic_per_seed(small_shapes: tuple[np.ndarray, ...]) -> None:
    again = make_shapes(seed=7, n_train=1000, n_test=200)
    for a, b in zip(small_shapes, again):
        np.testing.assert_array_equal(a, b)
    other = make_shapes(seed=8, n_train=1000, n_test=200)
    assert not np.array_equal(small_shapes[0], other[0])


def test_shapes_test_split_is_independent_of_train_size(small_shapes: tuple[np.ndarray, ...]) -> None:
    _, _, x_test, y_test = make_shapes(seed=7, n_train=10, n_test=200)
    np.testing.assert_array_equal(x_test, small_shapes[2])
    np.testing.assert_array_equal(y_test, small_shapes[3])
    assert not np.array_equal(small_shapes[0][:200], small_shapes[2])


def test_shapes_classes_differ_on_average(small_shapes: tuple[np.ndarray, ...]) -> None:
    """Mean foreground masks per class must differ, a cheap sign the classes carry signal."""
    x_train, y_train = small_shapes[0].astype(np.float32), small_shapes[1]
    grey = x_train.mean(axis=3)
    # Pixels far from the image's median colour approximate the shape mask.
    fg = np.abs(grey - np.median(grey, axis=(1, 2), keepdims=True)) > 40
    profiles = np.stack([fg[y_train == c].mean(axis=0) for c in range(10)])
    distances = np.abs(profiles[:, None] - profiles[None]).sum(axis=(2, 3))
    assert distances[~np.eye(10, dtype=bool)].min() > 5


def test_load_shapes_ignores_data_dir(monkeypatch) -> None:
    made = []  # what the loader generated (make_shapes is deterministic: tested above), so it is drawn once

    def recorded(*args, **kwargs):
        made.append((args, kwargs, make_shapes(*args, **kwargs)))
        return made[-1][2]

    monkeypatch.setattr(data.shapes, "make_shapes", recorded)
    splits = load_dataset("shapes", "/nonexistent", seed=3)
    assert isinstance(splits, DatasetSplits)
    assert splits.train_x.shape == (10000, 3, 32, 32) and splits.train_x.is_contiguous()
    assert splits.test_x.shape == (2000, 3, 32, 32)
    assert splits.num_classes == 10
    assert splits.mean.shape == (3,) and splits.std.shape == (3,)
    [(args, kwargs, (x_train, y_train, x_test, _))] = made
    assert args == (3,) and not kwargs  # the seed, and the default sizes
    assert torch.equal(splits.train_x[5], torch.from_numpy(x_train[5]).permute(2, 0, 1))
    assert torch.equal(splits.test_x[7], torch.from_numpy(x_test[7]).permute(2, 0, 1))
    assert torch.equal(splits.train_y, torch.from_numpy(y_train))


# ----------------------------------------------------------------------------- BatchLoader


def test_train_loader_resume_equals_tail() -> None:
    loader = _tiny_loader(train=True, n=23, batch_size=4)
    assert len(loader) == 5  # drop_last by default for training
    for epoch in (0, 3):
        full = list(loader.epoch(epoch))
        assert len(full) == 5
        for start in (1, 4, 5):
            _assert_batches_equal(list(loader.epoch(epoch, start=start)), full[start:])
    _assert_batches_equal(list(_tiny_loader(train=True, n=23, batch_size=4).epoch(3)), list(loader.epoch(3)))


def test_train_loader_ignores_global_rng() -> None:
    loader = _tiny_loader(train=True)
    torch.manual_seed(0)
    first = list(loader.epoch(1))
    torch.manual_seed(123)
    torch.rand(10)
    _assert_batches_equal(list(loader.epoch(1)), first)


def test_train_loader_epochs_and_seeds_change_order() -> None:
    loader = _tiny_loader(train=True, n=40, batch_size=8)
    order = [torch.cat([y for _, y in loader.epoch(e)]) for e in range(2)]
    assert not torch.equal(order[0], order[1])
    assert sorted(order[0].tolist()) == list(range(40))  # a permutation: each example once
    other_seed = torch.cat([y for _, y in _tiny_loader(train=True, n=40, batch_size=8, seed=1).epoch(0)])
    assert not torch.equal(order[0], other_seed)


def test_eval_loader_keeps_order_last_batch_and_no_augmentation() -> None:
    loader = _tiny_loader(train=False, n=10, batch_size=4)
    batches = list(loader.epoch(0))
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    images = torch.cat([x for x, _ in batches])
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, loader.x.float() / 255)  # mean 0, std 1: plain scaling


def test_normalisation_uses_mean_and_std() -> None:
    x = torch.full((2, 3, 2, 2), 51, dtype=torch.uint8)
    mean, std = torch.tensor([0.2, 0.1, 0.3]), torch.tensor([0.5, 0.25, 1.0])
    images, _ = next(BatchLoader(x, torch.zeros(2, dtype=torch.int64), 2, mean, std, False, 0).epoch(0))
    expected = ((0.2 - mean) / std).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    torch.testing.assert_close(images, expected)


@pytest.mark.parametrize("shape", [(3, 8, 7), (1, 28, 28)])  # odd sizes; MNIST's grey 28x28
def test_augmentation_is_a_crop_of_the_edge_padded_image_possibly_flipped(shape: tuple[int, int, int]) -> None:
    """Every dataset, MNIST's included, gets the edge-padded crop at its own size and the flip."""
    c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, c, h, w), dtype=torch.uint8, generator=gen)
    out = augment(x, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="replicate").to(torch.uint8)
    seen_flip, seen_plain, seen_shift = False, False, False
    for i in range(len(x)):
        matches = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.equal(out[i].flip(2) if flip else out[i], padded[i, :, top : top + h, left : left + w])
        ]
        assert matches, f"image {i} is not a crop of its padded original"
        top, left, flip = matches[0]
        seen_flip |= flip
        seen_plain |= not flip
        seen_shift |= (top, left) != (4, 4)
    assert seen_flip and seen_plain and seen_shift
    assert out.dtype == torch.uint8 and not (out == 0).any()  # edge padding brings in no zeros


def test_train_batches_are_augmented_but_same_examples() -> None:
    loader = _tiny_loader(train=True, n=16, batch_size=16)
    images, labels = next(loader.epoch(0))
    plain = loader.x[labels].float() / 255
    assert images.shape == plain.shape
    assert not torch.equal(images, plain)


def test_batch_larger_than_dataset() -> None:
    with pytest.raises(DataError, match="batch size 11"):
        _tiny_loader(train=True, n=10, batch_size=11)
    assert len(_tiny_loader(train=False, n=10, batch_size=11)) == 1
