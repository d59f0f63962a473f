"""train_parallel.py under torchrun (gloo, CPU): same weights as sequential, shared checkpoints, errors.

What a layout computes is checked on ranks forked with torchrun's environment (conftest.run_ranks,
without torch's import in an agent and in every rank); the errors, signals, restarts, timeouts and the
two-node rendezvous run under torchrun itself, and the last three check parity through it too."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    ROOT, SMOKE, assert_ok, error_lines, event_tags, expect_error, feedback_optimizer_state, free_port, load,
    max_relative_difference, optimizer_state, run_ranks, run_torchrun, script_env, script_in_process,
    train_in_process,
)

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
STEPS = "3"


@pytest.fixture(scope="module")
def smoke_npz(tiny_npz) -> list[str]:
    """smoke.yaml on the tiny npz: the parity runs neither generate nor evaluate the 10,000-image shapes set."""
    return ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "2"]


def sequential(out: Path, *args: str) -> dict:
    """train_sequential.py's run in this process (bitwise what the script computes on one thread)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        train_in_process(monkeypatch, *args, "--out", str(out))
    return load(out)


@pytest.fixture(scope="module")
def sequential_reference(tmp_path_factory, smoke_npz):
    """The sequential run's checkpoint after 3 steps of smoke_npz with the given extra flags (run once each)."""
    runs = {}

    def reference(*flags: str) -> dict:
        if flags not in runs:
            runs[flags] = sequential(tmp_path_factory.mktemp("seq"), *smoke_npz, "--max-steps", STEPS, *flags)
        return runs[flags]

    return reference


def assert_parity(reference, other):
    assert other["step"] == reference["step"]
    assert max_relative_difference(reference, other, "forward") <= TOLERANCE
    assert max_relative_difference(reference, other, "feedback") <= TOLERANCE
    for a, b in zip(feedback_optimizer_state(reference), feedback_optimizer_state(other), strict=True):
        assert float((a - b).abs().max()) <= TOLERANCE * max(float(a.abs().max()), 1e-3)


def assert_bitwise(reference, other):
    """Whole blocks: every rank computes what the sequential run computes, in the same order, on one thread."""
    assert other["step"] == reference["step"]
    for key in ("forward", "feedback"):
        for name, tensor in reference[key].items():
            assert torch.equal(tensor, other[key][name]), f"{key}.{name}"
    pairs = [*zip(feedback_optimizer_state(reference), feedback_optimizer_state(other), strict=True),
             *zip(optimizer_state(reference["forward_optimizer"]), optimizer_state(other["forward_optimizer"]),
                  strict=True)]
    assert all(torch.equal(a, b) for a, b in pairs)


# Every layout the README says equals sequential, pinned: ranks, layout flags (--split none keeps
# blocks whole whatever start-up timings say), flags both runs share, and the parts per block the run
# must report (smoke.yaml has 5 feedback blocks). Whole blocks on 3 ranks are the TP case's and the
# cross-script test's layout; 2 replicas of 1 rank are the cross-script and SIGUSR1 tests'.
WHOLE = ["--split", "none"]
SLOW_FORWARD = ["--set", "forward.lr=0.001"]
# Tiny ResNet-18 with the published feedback lrs: smoke.yaml's 1e-3 for stage 1 takes steps large enough to
# amplify the split's rounding tenfold in 3 steps (1.3e-5 against 2.8e-6 measured), too close to TOLERANCE.
RESNET18 = ["--set", "model.arch=resnet18", "--set", "model.channels=[4,4,8,8]", "--set", "model.activation=relu",
            "--set", "feedback.lr=[1.0e-4,3.5e-4,8.0e-3,8.0e-3,0.18]"]
# Tiny LeNet: 3 feedback blocks (conv 2, hidden, classifier) with overlapping 3/2 pools.
LENET = ["--set", "model.arch=lenet", "--set", "model.channels=[4,8]", "--set", "model.hidden=16",
         "--set", "feedback.iterations=[3,2,2]", "--set", "feedback.noise=[0.4,0.2,0.08]",
         "--set", "feedback.lr=[1.0e-3,8.0e-3,0.05]"]
PARALLEL_DTP = ["--algorithm", "parallel_dtp", "--set", "feedback.iterations=[1,1,1,1,1]",
                "--set", "feedback.samples=3", "--set", "feedback.optimizer=adam", "--set", "forward.optimizer=adam",
                "--set", "forward.lr=0.001"]
LAYOUTS = {
    "whole blocks, 1 rank": (1, WHOLE, [], [1, 1, 1, 1, 1]),
    "whole blocks, 2 ranks": (2, WHOLE, [], [1, 1, 1, 1, 1]),
    "whole blocks, 6 ranks": (6, WHOLE, [], [1, 1, 1, 1, 1]),
    "split 2,1,1,1,1 on 2 ranks": (2, ["--split", "2,1,1,1,1"], [], [2, 1, 1, 1, 1]),
    "split 2,2,1,1,1 on 3 ranks": (3, ["--split", "2,2,1,1,1"], [], [2, 2, 1, 1, 1]),
    # 16 rows per replica; block 1's gradient is summed over 4 ranks, 2 in each replica.
    "2 replicas of 2 ranks, block 1 split, batch 32": (
        4, ["--replicas", "2", "--split", "2,1,1,1,1"], ["--batch-size", "32"], [2, 1, 1, 1, 1]),
    # The reconstruction loss trains G's bias too, so a split block sums its gradient as well. Both
    # variants use the published forward lr 1e-3: smoke.yaml's 0.05 sends TP to NaN at step 1.
    "vanilla_dtp, split 2,1,1,1,1 on 2 ranks": (
        2, ["--split", "2,1,1,1,1"], ["--algorithm", "vanilla_dtp", *SLOW_FORWARD], [2, 1, 1, 1, 1]),
    "tp, whole blocks, 3 ranks": (3, WHOLE, ["--algorithm", "tp", *SLOW_FORWARD], [1, 1, 1, 1, 1]),
    # Adam's moments and step travel with the weights; one fused iteration with several noise samples.
    "parallel_dtp, split 2,1,1,1,1 on 2 ranks": (2, ["--split", "2,1,1,1,1"], PARALLEL_DTP, [2, 1, 1, 1, 1]),
    # ResNet-18 has 5 feedback blocks too (stages 1–4, classifier); stage 1's G is trained in the general
    # three-call form, its rows split across both ranks.
    "resnet18, stage 1 split, 2 ranks": (2, ["--split", "2,1,1,1,1"], RESNET18, [2, 1, 1, 1, 1]),
    "lenet, block 1 split, 2 ranks": (2, ["--split", "2,1,1"], LENET, [2, 1, 1]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_equals_sequential(tmp_path, sequential_reference, smoke_npz, layout):
    nproc, layout_flags, shared_flags, pieces = LAYOUTS[layout]
    out = tmp_path / "run"
    proc = run_ranks(nproc, *smoke_npz, "--max-steps", STEPS, *layout_flags, *shared_flags, "--out", str(out))
    assert_ok(proc)
    assert "rank 0 (leader)" in proc.stdout
    replicas = 2 if "--replicas" in layout_flags else 1
    if max(pieces) == 1 and replicas == 1:
        assert_bitwise(sequential_reference(*shared_flags), load(out))
    else:  # a gradient summed from parts rounds differently from one computed whole
        assert_parity(sequential_reference(*shared_flags), load(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "val_top1" in summary
    par = summary["parallel"]
    assert (par["world_size"], par["replicas"], par["block_pieces"]) == (nproc, replicas, pieces)
    assert 0.0 < par["efficiency"] <= 1.0 and par["speedup_bound"] > 0.0
    assert set(par) >= {"sec_per_step", "block_feedback_s", "leader_non_feedback_s", "speedup_estimate", "owners"}
    assert len(par["peak_rss_mib"]) == par["group_size"]  # every rank of replica 0 reports its memory
    tags = event_tags(out)
    assert "parallel/plan/text_summary" in tags and "parallel/rank0_wait_s" in tags
    assert all(f"parallel/rank{r}_{name}" in tags for r in range(1, par["group_size"])
               for name in ("compute_s", "comm_s", "wait_s", "peak_rss_mib"))
    if max(pieces) == 1:
        # No rank of a whole-block plan trains more than all the blocks (test_planning checks it for any
        # costs); the tolerance covers one rank summing all the blocks in another order than the estimate.
        assert par["speedup_bound"] >= 1.0 - 1e-9


def test_checkpoints_resume_across_scripts_and_world_sizes(tmp_path, tiny_npz):
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "2"]
    straight, mixed = tmp_path / "straight", tmp_path / "mixed"
    sequential(straight, *common)
    # Parallel with 3 ranks for 3 steps, sequential up to 5, then 2 replicas of 1 rank to the end
    # (the second replica's leader starts from the checkpoint rank 0 read).
    assert_ok(run_ranks(3, *common, *WHOLE, "--max-steps", "3", "--out", str(mixed)))
    sequential(mixed, "--resume", str(mixed), "--max-steps", "5")
    assert load(mixed)["step"] == 5
    assert_ok(run_ranks(2, "--resume", str(mixed), "--replicas", "2"))
    assert_parity(load(straight), load(mixed))


# One trainable feedback block, and batch 8 is one 8-row noise chunk: at most 2 ranks are useful.
ONE_BLOCK = ["--config", SMOKE, "--set", "model.channels=[4]", "--set", "feedback.iterations=[1]",
             "--set", "feedback.noise=[0.1]", "--set", "feedback.lr=[0.01]", "--batch-size", "8"]


# Rank 0 writes its `error:` line 2 s late (stderr wrapped in a sitecustomize module): the other ranks
# must not be able to exit, and torchrun terminate rank 0, before the line is out.
SLOW_RANK0_ERRORS = """
import os, sys, time
if os.environ.get("RANK") == "0":
    class SlowErrorLines:
        def __init__(self, stream):
            self.stream = stream
        def write(self, text):
            if text.startswith("error:"):
                time.sleep(2)
            return self.stream.write(text)
        def __getattr__(self, name):
            return getattr(self.stream, name)
    sys.stderr = SlowErrorLines(sys.stderr)
"""


def assert_every_rank_exited_with_the_error(proc: subprocess.CompletedProcess, nproc: int) -> None:
    """torchrun's report: the first rank to end exited 2; any other ended with 2 or with torchrun's SIGTERM,
    whichever rank ended first. Only rank 0 prints, and no rank has a traceback of its own."""
    assert proc.returncode != 0
    codes = [line.split(":")[1].split()[0] for line in proc.stderr.splitlines() if "exitcode  :" in line]
    root_cause = proc.stderr[proc.stderr.index("Root Cause"):]
    assert "exitcode  : 2" in root_cause, proc.stderr[-3000:]
    assert 1 <= len(codes) <= nproc + 1 and set(codes) <= {"2", "-15"}, codes
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr  # torchrun's own report
    assert "Connection closed" not in proc.stderr and "terminate called" not in proc.stderr


# Both errors rank 0 decides for every rank before training: a layout (each of check_layout's messages is
# pinned in tests/test_planning.py) and an algorithm with nothing to parallelise.
@pytest.mark.parametrize("nproc,flags,message", [
    (3, [], "at most 2 are useful"),
    (2, ["--algorithm", "bp"], "--algorithm bp has no feedback phase to parallelise; use train_sequential.py"),
])
def test_bad_layouts_are_errors(tmp_path, tiny_npz, nproc, flags, message):
    (tmp_path / "sitecustomize.py").write_text(SLOW_RANK0_ERRORS)
    env = {**script_env(1), "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train_parallel.py"), *ONE_BLOCK, "--dataset", "npz", "--data-dir", str(tiny_npz), *flags,
           "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert_every_rank_exited_with_the_error(proc, nproc)


def test_train_parallel_outside_torchrun_is_an_error(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    proc = script_in_process(monkeypatch, capsys, "train_parallel.py", "--config", SMOKE)
    expect_error(proc, "train_parallel.py must be started by torchrun", "--nproc_per_node")


def test_early_stopping_stops_every_replica_at_the_same_step(tmp_path, tiny_npz):
    """Only rank 0 evaluates; the other replica learns its decision and stops with it (see the
    sequential early-stopping test for why the run ends after 3 epochs)."""
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "10",
              "--set", "forward.lr=1.0e-12", "--set", "early_stopping.patience=2"]
    out = tmp_path / "run"
    assert_ok(run_ranks(2, *common, "--replicas", "2", "--out", str(out), timeout=120))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 12


def test_a_nan_loss_stops_every_rank_with_one_error_line(tmp_path, smoke_npz):
    proc = run_torchrun(3, *smoke_npz, *WHOLE, "--set", "feedback.lr=[1.0e+30,1.0e-3,1.0e-3,1.0e-3,1.0e-3]",
                        "--out", str(tmp_path / "r"))
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "not finite" in lines[0] and "feedback.lr" in lines[0], proc.stderr[-3000:]
    # The workers are released by the leader and exit quietly: no lost connection, no abort.
    assert_every_rank_exited_with_the_error(proc, 3)


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


def signal_rank_after_first_checkpoint(out: Path, *args: str, nproc: int = 3, rank: int = 1,
                                      sig: int = signal.SIGKILL, restarts: int = 0) -> tuple[int, str, str]:
    """Run `nproc` ranks into `out`, send `sig` to `rank` once a checkpoint exists; return (code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", str(ROOT / "train_parallel.py"), *args, "--out", str(out), "--timeout-s", "60"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    target = _rank_pid(proc.pid, rank)
    assert target is not None
    os.kill(target, sig)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_rank_that_stops_answering_fails_the_job_after_timeout_s_and_keeps_the_checkpoint(tmp_path, tiny_npz):
    """A worker frozen by SIGSTOP: the leader's wait for it ends with gloo's timeout after --timeout-s 5,
    not the default 30 minutes (the test itself would time out first), and the last checkpoint stays.
    A rank killed outright is the elastic-restart test's case: torchrun sees it at once."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_parallel.py"), "--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz),
           "--epochs", "1000", *WHOLE, "--timeout-s", "5", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    leader, worker = _rank_pid(proc.pid, 0), _rank_pid(proc.pid, 1)
    os.kill(worker, signal.SIGSTOP)
    while _running(leader) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(worker, signal.SIGCONT)  # let torchrun's SIGTERM end it
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Application timeout" in stderr, stderr[-3000:]
    assert load(out)["step"] % 4 == 0  # an epoch-end checkpoint, intact and loadable


def test_elastic_restart_after_a_dead_rank_finishes_like_an_uninterrupted_run(tmp_path, tiny_npz):
    """torchrun --max-restarts restarts the group; --resume auto continues from the last checkpoint."""
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "6"]
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    sequential(straight, *common)
    code, _, stderr = signal_rank_after_first_checkpoint(elastic, *common, *WHOLE, "--resume", "auto", nproc=2,
                                                         restarts=1)
    assert code == 0, stderr[-3000:]
    assert "exitcode: -9" in stderr  # the killed rank was seen, and the restarted group finished
    result = load(elastic)
    assert result["step"] == 24
    assert_parity(load(straight), result)


def test_two_simulated_nodes_with_a_replica_each_equal_one_process(tmp_path, sequential_reference, smoke_npz):
    """Two torchrun agents meet at a c10d rendezvous, as on two nodes; each node is one replica."""
    out = tmp_path / "nodes"
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=dtp-test",
           str(ROOT / "train_parallel.py"), *smoke_npz, "--max-steps", STEPS, "--replicas", "2", *WHOLE,
           "--out", str(out)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=script_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stderr[-3000:]
    assert any("2 replica(s) of 2 rank(s)" in stdout for stdout, _ in results)
    assert_parity(sequential_reference(), load(out))


def test_sigusr1_to_rank_0_stops_every_replica_at_one_step_and_resumes_exactly(tmp_path, tiny_npz):
    """The requeue path with replicas: only rank 0 gets the signal; all replicas stop together."""
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "1000"]
    out, straight = tmp_path / "run", tmp_path / "straight"
    code, stdout, stderr = signal_rank_after_first_checkpoint(out, *common, "--replicas", "2", nproc=2, rank=0,
                                                             sig=signal.SIGUSR1)
    assert code == 0, stderr[-3000:]
    assert "SIGUSR1 received: stopped at step" in stdout + stderr
    target = str(load(out)["step"] + 2)
    assert_ok(run_ranks(2, "--resume", str(out), "--replicas", "2", "--max-steps", target))
    sequential(straight, *common, "--max-steps", target)
    assert_parity(load(straight), load(out))
