"""The CUDA layer on a GPU: graph replay equals eager, resume equals uninterrupted, batches on the device,
bf16 learns, and ranks that would share a GPU are refused. Every test here skips without CUDA (CI has none)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SMOKE, error_lines, load, script_env, train_in_process
from dtp.data import BatchLoader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_bitwise(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in ("forward", "feedback"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"


def run(monkeypatch, out, tiny_npz, *flags: str) -> dict:
    train_in_process(monkeypatch, "--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz),
                     "--epochs", "2", "--out", str(out), *flags)
    return load(out)


def test_graph_replay_equals_eager_after_several_steps(tmp_path, monkeypatch, tiny_npz):
    """Steps 0–1 run eagerly, step 2 captures, steps 2–5 replay; one process, so cuDNN picks alike."""
    eager = run(monkeypatch, tmp_path / "eager", tiny_npz, "--max-steps", "6", "--set", "feedback.cuda_graphs=off")
    graphed = run(monkeypatch, tmp_path / "graphs", tiny_npz, "--max-steps", "6", "--set", "feedback.cuda_graphs=on")
    assert_bitwise(eager, graphed)


def test_a_resumed_graphed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, tiny_npz):
    on = ("--set", "feedback.cuda_graphs=on")
    straight = run(monkeypatch, tmp_path / "straight", tiny_npz, "--max-steps", "7", *on)
    run(monkeypatch, tmp_path / "resumed", tiny_npz, "--max-steps", "3", *on)
    train_in_process(monkeypatch, "--resume", str(tmp_path / "resumed"), "--max-steps", "7")
    assert_bitwise(straight, load(tmp_path / "resumed"))


def test_batches_made_on_the_gpu_are_the_cpu_batches():
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (40,))
    mean, std = torch.tensor([120.0, 110.0, 100.0]), torch.tensor([60.0, 55.0, 50.0])
    cpu = BatchLoader(x, y, 16, mean, std, train=True, seed=3)
    gpu = BatchLoader(x.cuda(), y.cuda(), 16, mean, std, train=True, seed=3)
    for (xc, yc), (xg, yg) in zip(cpu.epoch(1), gpu.epoch(1), strict=True):
        assert xg.is_cuda and torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


def test_bf16_with_graphs_learns_on_shapes(tmp_path, monkeypatch):
    train_in_process(monkeypatch, "--config", str(ROOT / "configs" / "shapes.yaml"), "--epochs", "1",
                     "--mixed-precision", "bf16", "--set", "feedback.cuda_graphs=on", "--out", str(tmp_path / "r"))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["val_top1"] > 0.3  # chance is 0.1


@pytest.mark.slow
def test_more_ranks_than_gpus_stop_with_one_error_line(tmp_path, tiny_npz):
    ranks = torch.cuda.device_count() + 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "train_parallel.py"), "--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz),
           "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and f"--nproc_per_node={torch.cuda.device_count()}" in lines[0], proc.stderr[-3000:]
    assert "NCCL" not in proc.stderr.replace("NCCL serves", "")
