"""The batch files under a real SLURM: munged, slurmctld and slurmd run for this module, with this
machine as one CPU-only node, and the jobs go in through sbatch as a user's would.

The jobs are submitted once, together, and each test reads the outcome of the ones it is about: a
job costs seconds of start-up, and the node runs two at a time. What needs GPUs or several nodes
stays with the stub tests in tests/test_launch.py.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SMOKE, free_port, load, max_relative_difference

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SEARCH_PATH = os.pathsep.join(filter(None, [os.environ.get("PATH"), "/usr/sbin", "/sbin"]))  # daemons live in sbin
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")
MISSING = [name for name in PROGRAMS if shutil.which(name, path=SEARCH_PATH) is None]

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"no {', '.join(MISSING)}: apt-get install slurm-wlm munge"),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd must run as root to start jobs"),
]

# 15 epochs of 4 steps on tiny_npz. SIGUSR1 is sent once the first epoch's checkpoint exists, so
# the run must last long enough past it for the signal to land mid-run on a busy machine too.
STEPS = 60
TRAIN_FLAGS = ("--dataset", "npz", "--epochs", str(STEPS // 4), "--set", "log.angles_every=1000")
WAIT_S = 600  # for anything Slurm or a job does; a loaded 2-core machine can be slow
TOLERANCE = 1e-4  # the parity tests' bound (tests/test_parallel.py); whole blocks come out bitwise equal
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Variables that would change what the scripts do if they leaked in from the developer's shell.
LAUNCH_VARIABLES = ("NPROC", "RDZV_PORT", "REPLICAS", "OUT", "CONFIG", "DATA_DIR", "VENV", "MAX_RESTARTS",
                    "OMP_NUM_THREADS")


def wait_until(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.5)  # each look runs a Slurm client: not too often on a 2-core machine
    return result


@dataclass
class Cluster:
    """Client side of the private cluster: its commands read SLURM_CONF from `env`; the daemons write
    their logs in `folder`."""

    env: dict[str, str]
    folder: Path

    def run(self, *cmd: str, cwd: Path = ROOT, extra: dict[str, str] | None = None) -> str:
        proc = subprocess.run(cmd, cwd=cwd, env={**self.env, **(extra or {})}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout


def slurm_conf(folder: Path, munge: Path, node: str, host: str) -> str:
    """One node (the machine as slurmd -C sees it), one partition, no cgroups (tests may run in a container),
    and ended jobs kept in scontrol's view for an hour, as there is no accounting to ask afterwards."""
    return "\n".join([
        "ClusterName=dtptest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge / 'socket'}",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "SchedulerType=sched/builtin", "MpiDefault=none", "ReturnToService=2",
        "MinJobAge=3600", "KillWait=5", "MessageTimeout=30", "MailProg=/bin/true",
        f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", "",
    ])


def start_daemons(folder: Path, munge: Path, env: dict[str, str]) -> list[subprocess.Popen]:
    """munged with its own key and socket, then slurmctld and slurmd, all in the foreground (-F, -D)."""
    key = munge / "key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    commands = [
        ["munged", "-F", f"--socket={munge / 'socket'}", f"--key-file={key}",
         f"--pid-file={folder / 'munged.pid'}", f"--seed-file={folder / 'munged.seed'}",
         f"--log-file={folder / 'munged.log'}"],
        ["slurmctld", "-D"],
        ["slurmd", "-D"],
    ]
    daemons = []
    for cmd in commands:
        with open(folder / f"{cmd[0]}.stderr", "w") as err:
            daemons.append(subprocess.Popen(cmd, env=env, stdout=err, stderr=subprocess.STDOUT))
        if cmd[0] == "munged":
            wait_until(lambda: (munge / "socket").exists() or daemons[0].poll() is not None, "munged")
    return daemons


def stop(cluster: Cluster, daemons: list[subprocess.Popen]) -> None:
    """Cancel every job of this cluster and wait for them to go, then stop the daemons, newest first."""
    try:
        if daemons and all(d.poll() is None for d in daemons):
            cluster.run("scancel", f"--user={os.getuid()}")
            wait_until(lambda: not cluster.run("squeue", "--noheader").strip(), "the jobs to end", 120)
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def node_is_idle(cluster: Cluster, host: str, daemons: list[subprocess.Popen], folder: Path) -> bool:
    dead = [d.args[0] for d in daemons if d.poll() is not None]
    if dead:
        logs = "".join(f"\n{p.name}:\n{p.read_text()[-2000:]}" for p in sorted(folder.glob("*.log"))
                       + sorted(folder.glob("*.stderr")))
        raise AssertionError(f"{', '.join(dead)} exited{logs}")
    return "State=IDLE" in cluster.run("scontrol", "show", "node", "-o", host)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    node = next(line for line in subprocess.run(["slurmd", "-C"], capture_output=True, text=True,
                                                env={"PATH": SEARCH_PATH}).stdout.splitlines()
                if line.startswith("NodeName="))
    host = node.split()[0].removeprefix("NodeName=")
    # munged wants every folder above its socket open to all (pytest's are not), and a short path.
    munge = Path(tempfile.mkdtemp(prefix="dtp-munge-"))
    munge.chmod(0o755)
    (folder / "slurm.conf").write_text(slurm_conf(folder, munge, node, host))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k not in LAUNCH_VARIABLES}
    env.update(PATH=SEARCH_PATH, SLURM_CONF=str(folder / "slurm.conf"), TQDM_DISABLE="1")
    client = Cluster(env, folder)
    daemons = []
    try:
        daemons = start_daemons(folder, munge, env)
        wait_until(lambda: node_is_idle(client, host, daemons, folder), "the node to come up idle", 120)
        yield client
    finally:
        stop(client, daemons)
        shutil.rmtree(munge)


@dataclass
class Job:
    cluster: Cluster
    id: int
    log: Path  # where Slurm writes the job's output
    out: Path  # the run directory, OUT

    def info(self) -> dict[str, str]:
        """scontrol's fields of the job, e.g. JobState, ExitCode, Restarts."""
        line = self.cluster.run("scontrol", "show", "job", "-o", str(self.id))
        return dict(field.partition("=")[::2] for field in line.split())

    def ended(self) -> bool:
        return self.info()["JobState"] in ENDED

    def requeued(self) -> bool:
        info = self.info()
        return info["JobState"] == "PENDING" and int(info["Restarts"]) > 0

    def outcome(self) -> tuple[str, str]:
        info = self.info()
        return info["JobState"], info["ExitCode"]

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def story(self) -> str:
        """The job's log and what slurmctld and slurmd logged about it: enough to tell why a job failed
        after the temporary folders are gone (a job that fails before its script prints leaves only those)."""
        own = re.compile(rf"(JobId={self.id}\b|job_?id[ =:]?{self.id}\b|job {self.id}\b|\[{self.id}\.)", re.I)
        parts = [f"scontrol: {self.info()}", f"{self.log.name}:", *self.lines()[-40:]]
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.cluster.folder / name
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            parts += [f"{name} on job {self.id}:", *[line for line in lines if own.search(line)][-60:]]
        return "\n".join(parts)


def submit(cluster: Cluster, script: str, folder: Path, name: str, *sbatch: str, cwd: Path = ROOT,
           **variables: str) -> Job:
    """sbatch with the CPU-only recipe of launch/README.md on 1 CPU; the log goes to `folder` unless
    the submit folder `cwd` is not the repository (then the script's own --output is left to work)."""
    out = folder / name
    log_option = [f"--output={folder}/{name}-%j.out"] if cwd == ROOT else []
    env = dict(CONFIG=SMOKE, OUT=str(out), VENV=sys.prefix, **variables)
    job_id = cluster.run("sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", *log_option, *sbatch,
                         str(LAUNCH / script), *TRAIN_FLAGS, cwd=cwd, extra=env)
    job_id = int(job_id.strip().split(";")[0])
    job_name = "dtp-" + script.removeprefix("slurm_").removesuffix(".sbatch")
    log = folder / f"{name}-{job_id}.out" if log_option else cwd / f"{job_name}-{job_id}.out"
    return Job(cluster, job_id, log, out)


def signal_mid_run_then_restart(job: Job, beside: Job) -> str:
    """SIGUSR1 to the batch script once the first checkpoint exists, as --signal=B:USR1@120 sends it
    before a time limit; once requeued, the job is let start in 2 s rather than after Slurm's usual
    two-minute hold. Not at once: slurmd refuses a launch credential made in the same second as the
    requeue revoked the old one (it compares whole seconds), and the job then fails without a line of
    output. Returns the state of the `beside` job at the time of the signal."""
    wait_until(lambda: (job.out / "checkpoint.pt").exists() or job.ended(), "the first checkpoint")
    beside_state = beside.info()["JobState"]
    if job.ended():  # it failed; its test says how
        return beside_state
    job.cluster.run("scancel", "--signal=USR1", "--batch", str(job.id))
    wait_until(lambda: job.ended() or job.requeued(), "the requeue")
    if not job.ended():
        job.cluster.run("scontrol", "update", f"JobId={job.id}", "StartTime=now+2")
    return beside_state


@dataclass
class Jobs:
    sequential: Job
    parallel: Job  # NPROC=2 on a CPU-only node
    no_nproc: Job  # the parallel file on a CPU-only node without NPROC
    requeued: Job  # multi-node file on one node, SIGUSR1 mid-run
    beside: Job  # multi-node file on one node, running at the same time as `requeued`
    elsewhere: Job  # submitted from a folder that is neither the repository nor holds logs/
    beside_when_signalled: str


@pytest.fixture(scope="module")
def jobs(cluster, tiny_npz, tmp_path_factory) -> Jobs:
    folder = tmp_path_factory.mktemp("jobs")
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    data = {"DATA_DIR": str(tiny_npz)}
    # Slurm starts them in this order, two at a time: the two that stop at once, then the two
    # multi-node jobs together, then the longest (two ranks on one CPU) in the first free place.
    submitted = dict(
        no_nproc=submit(cluster, "slurm_parallel.sbatch", folder, "no_nproc", **data),
        elsewhere=submit(cluster, "slurm_sequential.sbatch", folder, "elsewhere", cwd=elsewhere, **data),
        requeued=submit(cluster, "slurm_multinode.sbatch", folder, "requeued", "--nodes=1", NPROC="1", **data),
        beside=submit(cluster, "slurm_multinode.sbatch", folder, "beside", "--nodes=1", NPROC="1", **data),
        parallel=submit(cluster, "slurm_parallel.sbatch", folder, "parallel", NPROC="2", **data),
        sequential=submit(cluster, "slurm_sequential.sbatch", folder, "sequential", **data),
    )
    beside_state = signal_mid_run_then_restart(submitted["requeued"], submitted["beside"])
    wait_until(lambda: not cluster.run("squeue", "--noheader").strip(), "every job to end")
    return Jobs(**submitted, beside_when_signalled=beside_state)


def assert_completed(job: Job) -> None:
    assert job.outcome() == ("COMPLETED", "0:0"), job.story()


def assert_same_weights(job: Job, reference: Job) -> None:
    a, b = load(reference.out), load(job.out)
    assert a["step"] == b["step"] == STEPS
    for key in ("forward", "feedback"):
        assert max_relative_difference(a, b, key) < TOLERANCE, key


def launch_command(job: Job, program: str) -> str:
    return next(line for line in job.lines() if line.startswith(f"launch: {program}"))


def rendezvous_endpoint(job: Job) -> str:
    return re.search(r"--rdzv_endpoint=(\S+)", launch_command(job, "srun")).group(1)


def test_sequential_file(jobs, tiny_npz):
    job = jobs.sequential
    assert_completed(job)
    assert (f"launch: {sys.prefix}/bin/python train_sequential.py --config {SMOKE} --data-dir {tiny_npz} "
            f"--out {job.out} --resume auto {' '.join(TRAIN_FLAGS)}") in job.lines()
    assert load(job.out)["step"] == STEPS


def test_parallel_file_on_a_cpu_node_runs_the_ranks_it_states_and_equals_sequential(jobs):
    job = jobs.parallel
    assert_completed(job)
    assert "launch: 2 rank(s) per node (NPROC)" in job.lines()
    assert "1 replica(s) of 2 rank(s)" in job.lines()  # the trainer's own count
    assert_same_weights(job, jobs.sequential)


def test_parallel_file_on_a_cpu_node_without_nproc_stops_and_says_why(jobs):
    job = jobs.no_nproc
    assert job.outcome() == ("FAILED", "2:0")
    assert job.lines() == ["launch: no GPU on this node: set NPROC, the ranks per node "
                           "(e.g. NPROC=2 sbatch --gpus-per-node=0 ...)"]


def test_multinode_file_on_one_node_equals_sequential(jobs, cluster):
    job = jobs.beside
    assert_completed(job)
    assert "launch: 1 rank(s) per node (NPROC)" in job.lines()
    host = cluster.run("scontrol", "show", "hostnames", job.info()["NodeList"]).strip()
    assert rendezvous_endpoint(job) == f"{host}:{10000 + job.id % 20000}"
    assert_same_weights(job, jobs.sequential)


def test_usr1_requeues_and_the_resumed_job_equals_an_uninterrupted_one(jobs):
    job = jobs.requeued
    assert_completed(job)
    assert job.info()["Restarts"] == "1"
    log = "\n".join(job.lines())
    stopped_at = int(re.search(r"SIGUSR1 received: stopped at step (\d+)", log).group(1))
    assert 4 <= stopped_at < STEPS
    before, after = log.split(f"launch: trainer exited (0); requeueing job {job.id} to resume from {job.out}")
    assert "epoch 0:" in before and "epoch 0:" not in after  # the second start resumed, it did not start over
    assert_same_weights(job, jobs.sequential)


def test_two_multinode_jobs_on_one_node_both_complete(jobs):
    assert jobs.beside_when_signalled == "RUNNING"  # they ran at the same time
    assert_completed(jobs.requeued)
    assert_completed(jobs.beside)
    assert rendezvous_endpoint(jobs.requeued) != rendezvous_endpoint(jobs.beside)


def test_a_job_submitted_outside_the_repository_says_so_in_a_log_beside_it(jobs):
    """The log needs no folder that might be missing, so the reason a job stopped reaches the user."""
    job = jobs.elsewhere
    assert job.outcome() == ("FAILED", "2:0")
    assert job.lines() == [f"launch: submit from the repository root, not {job.log.parent}"]
