"""Learning evidence that fails by its threshold, not by crashing.

1. The paper's claim: trained feedback weights turn the DTP update of the hidden blocks towards the BP
   gradient. With untrained (random) feedback the angle stays near 90°; a flipped target sign points it
   near 180°; random lower targets leave it near 90°.
2. A short run learns well above chance, with DTP and with the BP baseline.
Both run train_sequential.py's main in this process on `shapes` data written as npz.
"""
import json
from pathlib import Path

import pytest

from conftest import ROOT, shapes_npz, train_in_process

SHAPES = str(ROOT / "configs" / "shapes.yaml")
SHAPES_PARALLEL_DTP = str(ROOT / "configs" / "shapes_parallel_dtp.yaml")


@pytest.fixture(scope="module")
def shapes_subset(tmp_path_factory) -> Path:
    """2,048 training and 512 test images of `shapes` (seed 0)."""
    return shapes_npz(tmp_path_factory.mktemp("shapes"), n_train=2048, n_test=512)


def run_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Path, *args: str) -> dict:
    out = tmp_path / "run"
    train_in_process(monkeypatch, "--dataset", "npz", "--data-dir", str(data), *args, "--out", str(out))
    return json.loads((out / "summary.json").read_text())


# The network of configs/shapes.yaml at a quarter of its width ([8, 16, 16]), batch 32. The angle is the
# last step's DTP update against the BP gradient in each hidden block (the output block's is 0° by
# construction), measured on this project's 2-core CPU for seeds 0, 1, 2 (data and weights):
# - dtp after 20 steps: blocks 0/1/2 at 34.2/29.4/15.7°, 24.1/27.9/18.1°, 34.7/25.2/16.5°;
# - parallel_dtp after 50 steps, with Adam lr 0.01 for the feedback weights (configs/shapes_parallel_dtp.yaml's
#   1e-3 needs hundreds of steps): 45.0/43.0/22.7°, 30.2/22.9/20.8°, 32.4/20.7/17.2°.
# Breaks, seed 0, dtp / parallel_dtp: feedback never trained (lr 1e-30) 77.7/89.7/89.8°, 87.9/80.3/89.7°;
# random lower targets of the right size 88.2/85.6/81.1°, 104.0/87.0/83.4°; a flipped target sign
# 120.7/140.5/157.8°, 124.5/134.3/158.5°; no forward loss below the output block 90° everywhere. Each bound
# sits 15–20° above the worst block of any seed and 15° or more below the best block of any break.
ANGLE_RUNS = {
    "dtp": (["--config", SHAPES, "--max-steps", "20"], 50.0),
    "parallel_dtp": (["--config", SHAPES_PARALLEL_DTP, "--max-steps", "50", "--set", "feedback.lr=[0.01,0.01,0.01]"],
                     65.0),
}
QUARTER_WIDTH = ["--set", "model.channels=[8,16,16]", "--set", "log.angles_every=1000"]
NARROW = [*QUARTER_WIDTH, "--set", "batch_size=32"]


@pytest.mark.parametrize("algorithm", ANGLE_RUNS)
def test_trained_feedback_turns_the_dtp_update_towards_the_bp_gradient(tmp_path, monkeypatch, shapes_subset,
                                                                       algorithm):
    args, bound = ANGLE_RUNS[algorithm]
    summary = run_summary(tmp_path, monkeypatch, shapes_subset, *args, *NARROW)
    angles = [summary["bp_comparison"][f"block{i}"]["angle"] for i in range(3)]
    assert max(angles) < bound, angles


@pytest.fixture(scope="module")
def shapes_full(tmp_path_factory) -> Path:
    """The whole `shapes` dataset of seed 0: what --dataset shapes generates."""
    return shapes_npz(tmp_path_factory.mktemp("shapes_full"))


# Validation top-1 of short runs of configs/shapes.yaml's network at a quarter of its width ([8, 16, 16]),
# one thread, measured on this project's 2-core CPU for seeds 0, 1, 2 (the seed also draws the data):
# - DTP, 100 steps with forward lr 0.1 (the config's 0.03 needs 200 steps: 0.282 for seed 0): 0.2775,
#   0.288, 0.2535; with no forward loss in the hidden blocks (only the classifier learns) 0.143 (seed 0);
# - BP, 200 steps at the config's lr 0.03: 0.359, 0.404, 0.355.
# The test runs seed 0. Rounding differences between machines perturb a run the way a seed change does,
# so each threshold is the lowest seed's result less 0.05, rounded down to a multiple of 0.05, not seed
# 0's. Chance is 0.10, with a standard deviation of 0.007 on the 2,000 test images.
SHORT_RUNS = {  # steps, flags, threshold
    "dtp": (100, ["--set", "forward.lr=0.1"], 0.20),
    "bp": (200, [], 0.30),
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", SHORT_RUNS)
def test_short_shapes_run_learns_well_above_chance(tmp_path, monkeypatch, shapes_full, algorithm):
    steps, flags, min_top1 = SHORT_RUNS[algorithm]
    summary = run_summary(tmp_path, monkeypatch, shapes_full, "--config", SHAPES, "--algorithm", algorithm,
                          "--max-steps", str(steps), *flags, *QUARTER_WIDTH)
    assert summary["steps"] == steps
    assert summary["val_top1"] > min_top1, summary
