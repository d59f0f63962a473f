"""Shared helpers: run the real scripts in subprocesses and compare the checkpoints they write."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtp.data import make_shapes

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")

# In-process tests compute on one thread, as the scripts the tests start do: tiny convolutions run no
# faster on more, and a loaded machine makes them far slower.
torch.set_num_threads(1)


def script_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    return env


def run_script(script: str, *args: str, threads: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=script_env(threads),
                          capture_output=True, text=True, timeout=timeout)


def run_torchrun(nproc: int, *args: str, timeout: int = 300, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           str(ROOT / "train_parallel.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=script_env(1), capture_output=True, text=True, timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def load(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def _event_accumulators(run_dir: Path) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulators = []
    for event_file in Path(run_dir).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        accumulators.append(acc)
    return accumulators


def event_tags(run_dir: Path) -> set[str]:
    """Every scalar and text tag in the TensorBoard event files of a run (text tags end in /text_summary)."""
    return {tag for acc in _event_accumulators(run_dir) for kind in ("scalars", "tensors") for tag in acc.Tags()[kind]}


def scalar_values(run_dir: Path, tag: str) -> dict[int, float]:
    """The logged values of one scalar tag of a run, by step."""
    return {event.step: event.value for acc in _event_accumulators(run_dir) if tag in acc.Tags()["scalars"]
            for event in acc.Scalars(tag)}


def max_relative_difference(a: dict, b: dict, key: str) -> float:
    """Largest |a − b| / max|a| over the tensors of one state dict in two checkpoints."""
    worst = 0.0
    for name, ta in a[key].items():
        tb = b[key][name]
        worst = max(worst, float((ta - tb).abs().max() / ta.abs().max().clamp_min(1e-12)))
    return worst


def optimizer_state(optimizer_state_dict: dict) -> list[torch.Tensor]:
    """Every state tensor of one optimizer's state dict (SGD's momentum, Adam's moments and step), in order."""
    return [t for s in optimizer_state_dict["state"].values() for _, t in sorted(s.items())]


def feedback_optimizer_state(ckpt: dict) -> list[torch.Tensor]:
    return [t for opt in ckpt["feedback_optimizers"] for t in optimizer_state(opt)]


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    """64 training and 32 test images in the npz format: 4 steps per epoch at batch size 16."""
    x_train, y_train, x_test, y_test = make_shapes(0, n_train=64, n_test=32)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path
