"""Shared helpers: run the scripts (in subprocesses, as ranks forked from a server that has imported torch,
or their main in this process) and compare the checkpoints they write.

This file imports torch, numpy and dtp only inside the helpers that use them: pytest-xdist's controller
loads it before it starts the workers, and torch's import there would add ~4 s to every run."""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from forked_rank import run_rank

if TYPE_CHECKING:
    import torch

    from dtp.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def model_config(arch: str, channels: list[int], activation: str, hidden: int = 512) -> ModelConfig:
    from dtp.config import ModelConfig

    return ModelConfig(arch, tuple(channels), activation, hidden)


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> None:
    """In-process tests compute on one thread, as the scripts the tests start do: tiny convolutions run no
    faster on more, and a loaded machine makes them far slower."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def in_process_unless_marked_slow(request, monkeypatch):
    """`make test-fast` runs every test not marked `slow`; such a test may not start a process."""
    if request.node.get_closest_marker("slow") is None:
        def refuse(*args, **kwargs):
            raise AssertionError("this test starts a process: mark it @pytest.mark.slow or run the code in-process")
        # Subprocesses, multiprocessing's processes, and the fork server run_ranks starts before them.
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
        monkeypatch.setattr(BaseProcess, "start", refuse)
        monkeypatch.setattr(multiprocessing.forkserver, "ensure_running", refuse)


# Test files whose tests share a module fixture that must not be built twice at once: test_slurm.py's one
# private cluster (two would number their jobs alike, and the multi-node file derives its port from the job ID).
RUN_TOGETHER = ("tests/test_slurm.py",)


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers: every test is its own unit of work, handed to whichever
    worker is free, except the files in RUN_TOGETHER, which go to one worker whole (and, as the largest
    unit, first). xdist's own --dist loadgroup cannot do this under pytest 9: it marks a group by
    rewriting a test's node ID, which pytest 9 no longer reads."""
    from xdist.scheduler import LoadScopeScheduling

    class OneByOneExceptSharedFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in RUN_TOGETHER else nodeid

    return OneByOneExceptSharedFixtures(config, log)


def train_in_process(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """Run train_sequential.py's main in this process, with these flags (no start-up cost, fast tier)."""
    import train_sequential

    monkeypatch.setattr(sys, "argv", ["train_sequential.py", *args])
    monkeypatch.setenv("TQDM_DISABLE", "1")
    train_sequential.main()


def script_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, script: str,
                      *args: str) -> subprocess.CompletedProcess:
    """What `python SCRIPT ARGS` does up to its exit, run in this process: its code, stdout and stderr."""
    import importlib

    from dtp.cli import exit_on_user_error

    module = importlib.import_module(script.removesuffix(".py"))
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setenv("TQDM_DISABLE", "1")
    capsys.readouterr()
    try:
        exit_on_user_error(module.main)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], code, out, err)


def free_port() -> int:
    """A TCP port the OS has just handed out, so that concurrent test runs never pick the same one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def expect_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """What every bad input gets: exit code 2, exactly one `error:` line naming the problem, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    message = proc.stderr[proc.stderr.index(lines[0]):]  # a message may list files on lines of its own
    for fragment in fragments:
        assert fragment in message, proc.stderr


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


def _rank_server() -> ForkServerContext:
    """The fork server run_ranks forks ranks from, started on first use (and again should it have died)
    with the environment and sys.path a torchrun rank starts with: script_env, the script's folder first.
    It imports torch, train_parallel's modules and torch._dynamo (torch.optim imports it on first use, a
    second per rank) and runs no torch op, so it has no threads when it forks."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["forked_rank", "train_parallel", "torch._dynamo"])
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in script_env(1).items():
            monkeypatch.setenv(name, value)
        monkeypatch.syspath_prepend(str(ROOT))
        multiprocessing.forkserver.ensure_running()
    return ctx


def run_ranks(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """train_parallel.py on `nproc` ranks forked from _rank_server, each with the variables torchrun sets
    on one node: no torch import per launch (under torchrun 3.5 s in the agent and in every rank).
    Rank 0 hosts the store (TORCHELASTIC_USE_AGENT_STORE=False; torchrun's ranks use its agent's). For tests
    of what a layout computes: torchrun's own part (errors, signals, restarts, timeouts, rendezvous) is
    tested through real torchrun. Outputs are joined in rank order; once a rank fails the others are
    killed and the code is the first failure's; past `timeout` all are killed and TimeoutExpired raised."""
    ctx = _rank_server()
    base = {**script_env(1), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc), "GROUP_WORLD_SIZE": "1", "GROUP_RANK": "0",
            "ROLE_NAME": "default", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "False"}
    script = str(ROOT / "train_parallel.py")
    with tempfile.TemporaryDirectory() as logs:
        outs = [Path(logs, f"{rank}.out") for rank in range(nproc)]
        errs = [Path(logs, f"{rank}.err") for rank in range(nproc)]
        ranks = []
        for rank in range(nproc):
            outs[rank].touch()  # empty, not missing, should a rank die before it opens them
            errs[rank].touch()
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank)}
            ranks.append(ctx.Process(target=run_rank, args=(script, list(args), env, str(ROOT), str(outs[rank]),
                                                            str(errs[rank]))))
        try:
            for rank in ranks:
                rank.start()
            code = _wait_for_ranks(ranks, time.monotonic() + timeout)
        finally:  # after a failure, at the timeout or on an interrupt: end the rest, as torchrun would
            for rank in ranks:
                if rank.is_alive():
                    rank.kill()
                    rank.join()
        stdout, stderr = "".join(p.read_text() for p in outs), "".join(p.read_text() for p in errs)
    if code is None:
        raise subprocess.TimeoutExpired([script, *args], timeout, stdout, stderr)
    return subprocess.CompletedProcess([script, *args], code, stdout, stderr)


def _wait_for_ranks(ranks: list[BaseProcess], deadline: float) -> int | None:
    """0 once every rank has exited 0, the exit code of the first rank to fail as soon as one does, None
    at the deadline."""
    running = list(ranks)
    while running:
        ended = multiprocessing.connection.wait([rank.sentinel for rank in running],
                                                max(deadline - time.monotonic(), 0.0))
        if not ended:
            return None
        for rank in [rank for rank in running if rank.sentinel in ended]:
            rank.join()
            running.remove(rank)
            if rank.exitcode != 0:
                return rank.exitcode
    return 0


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def load(run_dir: Path) -> dict:
    import torch

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


def shapes_npz(folder: Path, **sizes: int) -> Path:
    """The `shapes` images of seed 0 (make_shapes' n_train, n_test) written in the npz format."""
    import numpy as np

    from dtp.data import make_shapes

    x_train, y_train, x_test, y_test = make_shapes(0, **sizes)
    path = folder / "shapes.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    """64 training and 32 test images in the npz format: 4 steps per epoch at batch size 16."""
    return shapes_npz(tmp_path_factory.mktemp("data"), n_train=64, n_test=32)
