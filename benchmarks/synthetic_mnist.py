"""Write a synthetic MNIST-format dataset: the digits 0–9 drawn with Pillow's built-in font at random sizes,
angles, slants and places on a 28×28 canvas, with pixel noise, as the four idx files. For measuring the
MNIST networks and configs where the real MNIST cannot be downloaded; the images come from the seed alone.

    python benchmarks/synthetic_mnist.py OUT_DIR [--seed 0] [--train 10000] [--test 2000]
    python train_sequential.py --config configs/mnist_drl.yaml --data-dir OUT_DIR
"""
from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dtp.data.idx import IDX_IMAGE_SIZE, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, IDX_SPLIT_FILES

CANVAS = 2 * IDX_IMAGE_SIZE  # digits are drawn large, transformed, then reduced to 28×28
NOISE_STD = 20.0  # grey levels


def draw_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 28×28 image of `digit`: white on black, randomly sized, rotated, slanted, placed and noised."""
    font = ImageFont.load_default(size=float(rng.uniform(26, 42)))
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(canvas).text((CANVAS / 2, CANVAS / 2), str(digit), fill=255, font=font, anchor="mm",
                                stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
    slant = float(rng.uniform(-0.3, 0.3))
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, slant, -slant * CANVAS / 2, 0, 1, 0),
                              resample=Image.Resampling.BILINEAR)
    canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR,
                           translate=tuple(float(t) for t in rng.uniform(-6, 6, size=2)))
    small = np.asarray(canvas.resize((IDX_IMAGE_SIZE, IDX_IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    return np.clip(small + rng.normal(0, NOISE_STD, small.shape), 0, 255).round().astype(np.uint8)


def make_digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, size=n)
    return np.stack([draw_digit(int(d), rng) for d in labels]), labels.astype(np.uint8)


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    images_file, labels_file = IDX_SPLIT_FILES[split]
    header = struct.pack(">IIII", IDX_IMAGES_MAGIC, len(images), IDX_IMAGE_SIZE, IDX_IMAGE_SIZE)
    (folder / images_file).write_bytes(header + images.tobytes())
    (folder / labels_file).write_bytes(struct.pack(">II", IDX_LABELS_MAGIC, len(labels)) + labels.tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--test", type=int, default=2000)
    args = parser.parse_args()
    train_seq, test_seq = np.random.SeedSequence(args.seed).spawn(2)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_split(args.out_dir, "train", *make_digits(np.random.default_rng(train_seq), args.train))
    write_split(args.out_dir, "test", *make_digits(np.random.default_rng(test_seq), args.test))
    print(f"wrote {args.train} training and {args.test} test images to {args.out_dir}")


if __name__ == "__main__":
    main()
