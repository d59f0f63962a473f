"""A short run on the embedded `shapes` dataset learns, with DTP and with the BP baseline."""
import json

import pytest

from conftest import ROOT, assert_ok, run_script

SHAPES = str(ROOT / "configs" / "shapes.yaml")


@pytest.mark.parametrize("algorithm", ["dtp", "bp"])
def test_short_shapes_run_learns_well_above_chance(tmp_path, algorithm):
    out = tmp_path / algorithm
    proc = run_script("train_sequential.py", "--config", SHAPES, "--algorithm", algorithm, "--max-steps", "200",
                      "--out", str(out), threads=2, timeout=600)
    assert_ok(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 200
    assert summary["val_top1"] > 0.3, summary  # chance is 0.1
