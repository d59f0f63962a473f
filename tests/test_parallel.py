"""train_parallel.py under torchrun (gloo, CPU): same weights as sequential, shared checkpoints, errors."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    ROOT, SMOKE, assert_ok, load, max_relative_difference, momentum_buffers, run_script, run_torchrun, script_env,
)
from dtp.errors import UserError
from dtp.parallel import assign_blocks

TOLERANCE = 1e-4
STEPS = "3"


@pytest.fixture(scope="module")
def sequential_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    assert_ok(run_script("train_sequential.py", "--config", SMOKE, "--max-steps", STEPS, "--out", str(out)))
    return load(out)


def assert_parity(reference, other):
    assert other["step"] == reference["step"]
    assert max_relative_difference(reference, other, "forward") <= TOLERANCE
    assert max_relative_difference(reference, other, "feedback") <= TOLERANCE
    for a, b in zip(momentum_buffers(reference), momentum_buffers(other)):
        assert float((a - b).abs().max()) <= TOLERANCE * max(float(a.abs().max()), 1e-3)


@pytest.mark.parametrize("nproc", [1, 2, 3, 6])
def test_parallel_equals_sequential(tmp_path, sequential_reference, nproc):
    out = tmp_path / f"p{nproc}"
    proc = run_torchrun(nproc, "--config", SMOKE, "--max-steps", STEPS, "--out", str(out))
    assert_ok(proc)
    assert "rank 0 (leader)" in proc.stdout
    assert_parity(sequential_reference, load(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "val_top1" in summary
    par = summary["parallel"]
    assert par["world_size"] == nproc and 0.0 < par["efficiency"] <= 1.0 and par["speedup_bound"] >= 1.0
    assert list(out.glob("events.out.tfevents.*"))


def test_checkpoints_resume_across_scripts_and_world_sizes(tmp_path, tiny_npz):
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "2"]
    straight, mixed = tmp_path / "straight", tmp_path / "mixed"
    assert_ok(run_script("train_sequential.py", *common, "--out", str(straight)))
    # Parallel with 3 ranks for 3 steps, sequential up to 5, parallel with 2 ranks to the end.
    assert_ok(run_torchrun(3, *common, "--max-steps", "3", "--out", str(mixed)))
    assert_ok(run_script("train_sequential.py", "--resume", str(mixed), "--max-steps", "5"))
    assert load(mixed)["step"] == 5
    assert_ok(run_torchrun(2, "--resume", str(mixed)))
    assert_parity(load(straight), load(mixed))


def test_more_ranks_than_blocks_is_an_error(tmp_path):
    # channels [4, 8] gives 3 blocks, so 2 trainable feedback blocks and at most 3 useful ranks.
    proc = run_torchrun(4, "--config", SMOKE, "--set", "model.channels=[4,8]", "--set", "feedback.iterations=[1,1]",
                        "--set", "feedback.noise=[0.1,0.1]", "--set", "feedback.lr=[0.01,0.01]",
                        "--out", str(tmp_path / "r"))
    assert proc.returncode != 0
    assert "at most 3 ranks are useful" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error:")[0][-2000:]


def test_assignment_balances_estimated_cost():
    # The CIFAR-10 profile of DESIGN.md §6: block 1 alone is the largest share.
    costs = [6.5, 4.4, 1.9, 2.1, 0.02]
    assert assign_blocks(costs, 1) == [0] * 5
    for world in (2, 3):
        owners = assign_blocks(costs, world)
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        best = min(max(sum(c for c, o in zip(costs, split) if o == r) for r in range(world))
                   for split in itertools.product(range(world), repeat=len(costs)))
        assert max(loads) == pytest.approx(best)  # LPT is optimal on this profile
    assert sorted(assign_blocks(costs, 6)) == [1, 2, 3, 4, 5]  # the leader keeps none
    with pytest.raises(UserError, match="at most 6 ranks"):
        assign_blocks(costs, 7)


def _rank_pid(parent: int, rank: int) -> int | None:
    """PID of the child of the torchrun process `parent` whose environment has RANK=rank."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().split(") ")[1].split()[1]) != parent:
                continue
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


def kill_rank_after_first_checkpoint(out: Path, *args: str, restarts: int = 0) -> tuple[int, str]:
    """Run 3 ranks into `out`, SIGKILL rank 1 once a checkpoint exists; return (exit code, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           f"--max-restarts={restarts}", str(ROOT / "train_parallel.py"), *args, "--out", str(out), "--timeout-s", "60"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def test_a_dead_rank_ends_the_job_without_a_hang_and_keeps_the_checkpoint(tmp_path, tiny_npz):
    out = tmp_path / "run"
    code, stderr = kill_rank_after_first_checkpoint(
        out, "--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "1000")
    assert code != 0
    assert "train_parallel.py FAILED" in stderr
    assert load(out)["step"] % 4 == 0  # an epoch-end checkpoint, intact and loadable


def test_elastic_restart_after_a_dead_rank_finishes_like_an_uninterrupted_run(tmp_path, tiny_npz):
    """torchrun --max-restarts restarts the group; --resume auto continues from the last checkpoint."""
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "6"]
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    assert_ok(run_script("train_sequential.py", *common, "--out", str(straight)))
    code, stderr = kill_rank_after_first_checkpoint(elastic, *common, "--resume", "auto", restarts=1)
    assert code == 0, stderr[-3000:]
    assert "exitcode: -9" in stderr  # the killed rank was seen, and the restarted group finished
    result = load(elastic)
    assert result["step"] == 24
    assert_parity(load(straight), result)
