"""The launch scripts under stub srun/scontrol/torchrun/python, for what a one-node, CPU-only SLURM
cannot show: GPU counts, two nodes, and which process of a rank group SIGUSR1 reaches. No SLURM, GPU
or training involved; tests/test_slurm.py runs the scripts under a real SLURM."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SBATCH = ["slurm_parallel.sbatch", "slurm_multinode.sbatch", "slurm_sequential.sbatch"]
TRAIN_FLAGS = ["--config", "configs/cifar10_dtp.yaml", "--data-dir", "data", "--out", "runs/dtp-123",
               "--resume", "auto", "--epochs", "3"]

# Every stub appends its name and argv (shell-quoted) to $STUB_LOG, plus an "env:" line.
LOG_ARGV = """{ printf '%s' "${0##*/}"; printf ' %q' "$@"; echo
  echo "env:${0##*/} OMP_NUM_THREADS=${OMP_NUM_THREADS-} NCCL_DEBUG=${NCCL_DEBUG-}"; } >> "$STUB_LOG"
"""
STUBS = {
    # srun runs its command (the arguments after its own --options) right here.
    "srun": LOG_ARGV + 'while [[ $1 == -* ]]; do shift; done\nexec "$@"\n',
    "scontrol": LOG_ARGV + '[[ "$1 $2" == "show hostnames" ]] && printf "node-a\\nnode-b\\n"\nexit 0\n',
    # With STUB_TRAIN set, torchrun starts a leader (RANK=0) and a worker (RANK=1) and ends with the leader.
    "torchrun": LOG_ARGV + """[[ -n ${STUB_TRAIN-} ]] || exit 0
RANK=0 ROLE=leader bash "$STUB_DIR/fake_rank.sh" & leader=$!
RANK=1 ROLE=rank1 bash "$STUB_DIR/fake_rank.sh" &
wait "$leader"
""",
    "python": LOG_ARGV,
    "nvidia-smi": LOG_ARGV + 'printf "GPU 0: A\\nGPU 1: B\\nGPU 2: C\\n"\n',
}
# A stand-in trainer process: logs SIGUSR1 and exits; the leader has a data-loader-like child
# that inherits RANK=0. Each exits when its parent is gone, or after ~10 s at most.
FAKE_RANK = """trap 'echo "usr1 $ROLE" >> "$STUB_LOG"; exit 0' USR1
[[ $ROLE == leader ]] && { ROLE=loader bash "$0" & }
echo "ready $ROLE" >> "$STUB_LOG"
for _ in $(seq 200); do kill -0 "$PPID" 2>/dev/null || exit 0; sleep 0.05; done
"""


@pytest.fixture
def stub_env(tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    (stubs / "fake_rank.sh").write_text(FAKE_RANK)
    log = tmp_path / "stub.log"
    log.touch()
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_LOG": str(log),
        "STUB_DIR": str(stubs), "VENV": str(tmp_path / "no-venv"),
        "SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "dtp", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "node-[a-b]",
    }
    return env, log


def calls(log: Path) -> list[list[str]]:
    return [shlex.split(line) for line in log.read_text().splitlines()
            if line and not line.startswith(("env:", "ready", "usr1"))]


def env_of(log: Path, name: str) -> str:
    return next(line for line in log.read_text().splitlines() if line.startswith(f"env:{name} "))


def launch(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=30)


def repo_outputs() -> tuple:
    return (sorted(os.listdir(ROOT / "runs")) if (ROOT / "runs").exists() else None), sorted(ROOT.glob("*.out"))


@pytest.fixture(autouse=True)
def repo_untouched():
    """The scripts cd to the repository root; they must not create runs/ or logs there."""
    before = repo_outputs()
    yield
    assert repo_outputs() == before


@pytest.mark.parametrize("path", sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch")))
def test_syntax(path):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SBATCH)
def test_sbatch_header(script):
    lines = (LAUNCH / script).read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    header = [line.split("#", 2)[1].split()[1] for line in lines if line.startswith("#SBATCH")]
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])  # sbatch stops reading there
    for option in ("--job-name=", "--nodes=", "--gpus-per-node=", "--cpus-per-task=", "--time="):
        assert any(h.startswith(option) for h in header), option
    for option in ("--requeue", "--signal=B:USR1@120", "--output=%x-%j.out", "--open-mode=append"):
        assert option in header  # the log goes in the submit folder: Slurm would not create a folder for it


@pytest.mark.parametrize("nproc, ranks, threads, said", [
    (None, 4, 2, "launch: 4 rank(s) per node (one per GPU)"),
    ("2", 2, 4, "launch: 2 rank(s) per node (NPROC)"),
])
def test_slurm_parallel(stub_env, nproc, ranks, threads, said):
    env, log = stub_env
    if nproc:
        env["NPROC"] = nproc
    proc = launch("slurm_parallel.sbatch", env, "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    assert said in proc.stdout.splitlines()
    assert calls(log) == [["torchrun", "--standalone", f"--nproc_per_node={ranks}", "--max-restarts=3",
                           "train_parallel.py", *TRAIN_FLAGS]]
    assert env_of(log, "torchrun") == f"env:torchrun OMP_NUM_THREADS={threads} NCCL_DEBUG=WARN"


@pytest.mark.parametrize("nproc", ["0", "two", "-1"])
def test_nproc_must_be_a_count(stub_env, nproc):
    env, log = stub_env
    env["NPROC"] = nproc
    proc = launch("slurm_parallel.sbatch", env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"launch: NPROC must be a positive integer, got '{nproc}'"]
    assert calls(log) == []


@pytest.mark.parametrize("port, endpoint", [(None, "node-a:10123"), ("29600", "node-a:29600")])
def test_slurm_multinode(stub_env, port, endpoint):
    """Two nodes; the rendezvous port is 10000 + job id mod 20000 unless RDZV_PORT says otherwise."""
    env, log = stub_env
    if port:
        env["RDZV_PORT"] = port
    proc = launch("slurm_multinode.sbatch", env, "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    torchrun = ["torchrun", "--nnodes=2", "--nproc_per_node=4", "--max-restarts=3", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={endpoint}", "--rdzv_id=123", "train_parallel.py", *TRAIN_FLAGS[:-2],
                "--replicas", "2", *TRAIN_FLAGS[-2:]]
    assert calls(log) == [
        ["scontrol", "show", "hostnames", "node-[a-b]"],
        ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=8", "--kill-on-bad-exit=1", *torchrun],
        torchrun,
    ]


@pytest.mark.parametrize("script", ["slurm_parallel.sbatch", "slurm_multinode.sbatch"])
def test_usr1_reaches_only_the_leader_then_requeue(stub_env, script):
    """Rank 1 and the leader's own child must not get SIGUSR1, and the multi-node script looks on every node."""
    env, log = stub_env
    env["STUB_TRAIN"] = "1"
    roles = {"ready leader", "ready rank1", "ready loader"}
    proc = subprocess.Popen(["bash", str(LAUNCH / script)], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while not roles <= set(log.read_text().splitlines()):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what Slurm does 120 s before the time limit (B:USR1@120)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    lines = log.read_text().splitlines()
    assert [line for line in lines if line.startswith("usr1")] == ["usr1 leader"]
    assert calls(log)[-1] == ["scontrol", "requeue", "123"]
    if "multinode" in script:  # the leader is looked for on every node, in an overlapping step
        forward = ["srun", "--overlap", "--nodes=2", "--ntasks-per-node=1", "bash", "launch/signal_leader.sh"]
        assert forward in calls(log)


def test_local_gpus_from_cuda_visible_devices(stub_env):
    env, log = stub_env
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env["CUDA_VISIBLE_DEVICES"] = "0,1,2"
    proc = launch("local.sh", env, "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    [cmd] = calls(log)
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc_per_node=3", "train_parallel.py"]
    out = cmd[cmd.index("--out") + 1]
    assert re.fullmatch(r"runs/local-\d{8}-\d{6}", out), out
    assert cmd[4:] == [*TRAIN_FLAGS[:5], out, "--resume", "auto", "--epochs", "3"]


@pytest.mark.parametrize("extra, nproc", [({}, "3"), ({"CUDA_VISIBLE_DEVICES": ""}, "2"), ({"NPROC": "5"}, "5")])
def test_local_nproc(stub_env, tmp_path, extra, nproc):
    env, log = stub_env
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env.update(extra, OUT=str(tmp_path / "run"))
    proc = launch("local.sh", env)
    assert proc.returncode == 0, proc.stderr
    assert calls(log)[-1] == ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "train_parallel.py",
                              *TRAIN_FLAGS[:5], str(tmp_path / "run"), "--resume", "auto"]


def test_local_sequential(stub_env, tmp_path):
    env, log = stub_env
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env.update(NPROC="1", OUT=str(tmp_path / "run"))
    proc = launch("local.sh", env, "--algorithm", "bp")
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == [["python", "train_sequential.py", *TRAIN_FLAGS[:5], str(tmp_path / "run"),
                           "--resume", "auto", "--algorithm", "bp"]]
