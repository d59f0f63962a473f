"""Starting a sweep's runs: on this machine one (or N) at a time, or as one SLURM job array.

Both skip runs that have their summary.json and start the rest with `--resume auto`, so a sweep run
again resumes what was interrupted. A run that fails leaves its `error:` line where `sweep.py --report`
finds it (RUN_DIR/failed.txt locally, the task's log under SLURM) and the sweep goes on.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from dtp.errors import UserError
from dtp.sweep import ROOT, Sweep, SweepRun, summary_of

LOG = "train.log"  # a local run's output, appended to by every start
FAILED = "failed.txt"  # a local run's exit code and error line, while it has not finished
SLURM_FOLDER = "slurm"  # under the sweep's out: each submission's runs file and task logs
BATCH_FILES = {"train_sequential.py": "launch/slurm_sequential.sbatch",
               "train_parallel.py": "launch/slurm_parallel.sbatch"}

Execute = Callable[[list[str], Path], int]  # (command, log file) -> exit code


def command(sweep: Sweep, run: SweepRun) -> list[str]:
    """The command line that trains `run` on this machine."""
    if sweep.script == "train_parallel.py":
        starter = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sweep.nproc}"]
    else:
        starter = [sys.executable]
    return [*starter, os.path.relpath(ROOT / sweep.script), *run.script_args()]


def error_line(log: Path) -> str | None:
    """The last `error: ...` line of a log, if any."""
    if not log.is_file():
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error:")]
    return lines[-1] if lines else None


def execute_in_subprocess(cmd: list[str], log: Path) -> int:
    """Run one command with its output appended to `log` (no progress bars); its exit code."""
    env = dict(os.environ, TQDM_DISABLE="1")
    with log.open("a") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode


def unfinished(runs: list[SweepRun]) -> list[SweepRun]:
    return [run for run in runs if not summary_of(run).is_file()]


class Progress:
    """One line per run started and ended, with the count done and the time so far; safe across threads."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.lock = threading.Lock()

    def say(self, text: str, finished: bool = False) -> None:
        with self.lock:
            self.done += finished
            elapsed = time.monotonic() - self.start
            print(f"[{self.done}/{self.total} done, {elapsed:.0f} s] {text}", flush=True)


def run_one(sweep: Sweep, run: SweepRun, execute: Execute, progress: Progress) -> str:
    """Train one run: "finished", "stopped" (exit 0 without a summary: a signal made it checkpoint and
    stop, and the next sweep resumes it) or "failed" (its error line recorded in failed.txt)."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    (run.out_dir / FAILED).unlink(missing_ok=True)
    resumed = " (resuming)" if (run.out_dir / "checkpoint.pt").is_file() else ""
    progress.say(f"start {run.out_dir}{resumed}")
    code = execute(command(sweep, run), run.out_dir / LOG)
    if code == 0 and summary_of(run).is_file():
        top1 = json.loads(summary_of(run).read_text())["val_top1"]
        progress.say(f"finished {run.out_dir}: val top-1 {100 * top1:.1f}%", finished=True)
        return "finished"
    if code == 0:
        progress.say(f"stopped {run.out_dir} with a checkpoint; running the sweep again resumes it", finished=True)
        return "stopped"
    error = error_line(run.out_dir / LOG) or f"exit code {code}, no error line (see {run.out_dir / LOG})"
    (run.out_dir / FAILED).write_text(f"{code}\n{error}\n")
    progress.say(f"FAILED {run.out_dir}: {error}", finished=True)
    return "failed"


def run_local(sweep: Sweep, runs: list[SweepRun], parallel: int = 1,
              execute: Execute = execute_in_subprocess) -> int:
    """Train every unfinished run, `parallel` at a time; the number that failed."""
    todo = unfinished(runs)
    print(f"sweep {sweep.path}: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run",
          flush=True)
    progress = Progress(len(todo))
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        outcomes = list(pool.map(lambda run: run_one(sweep, run, execute, progress), todo))
    counts = {outcome: outcomes.count(outcome) for outcome in ("finished", "stopped", "failed")}
    print(f"sweep {sweep.path}: " + ", ".join(f"{n} {outcome}" for outcome, n in counts.items()), flush=True)
    return counts["failed"]


Submit = Callable[[list[str], dict[str, str]], str]  # (sbatch command, environment) -> sbatch's output


def submit_with_sbatch(cmd: list[str], env: dict[str, str]) -> str:
    """Run sbatch from the repository root (the batch files refuse any other folder)."""
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def runs_line(run: SweepRun) -> str:
    """A task's line of the runs file: its run directory, then its flags, shell-quoted (launch/common.sh)."""
    return shlex.join([str(run.out_dir.resolve()), *run.train_args])


def submit_slurm(sweep: Sweep, runs: list[SweepRun], sbatch_options: list[str], parallel: int | None = None,
                 submit: Submit = submit_with_sbatch) -> list[SweepRun]:
    """Submit the unfinished runs as one job array through launch/'s batch file; the runs submitted.

    Task N runs line N + 1 of a runs file (launch/common.sh reads it), so a requeued task resumes its
    own run directory. Logs go to OUT/slurm/<stamp>-<task>.out, where `--report` looks for error lines.
    """
    if Path.cwd().resolve() != ROOT:
        raise UserError(f"--launcher slurm: run sweep.py from the repository root ({ROOT}), as sbatch needs")
    todo = unfinished(runs)
    print(f"sweep {sweep.path}: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to submit")
    if not todo:
        return []
    folder = (sweep.out / SLURM_FOLDER).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_file = folder / f"{stamp}.runs"
    runs_file.write_text("".join(runs_line(run) + "\n" for run in todo))
    throttle = f"%{parallel}" if parallel else ""
    cmd = ["sbatch", f"--array=0-{len(todo) - 1}{throttle}", f"--job-name=sweep-{sweep.path.stem}",
           f"--output={folder}/{stamp}-%a.out", *sbatch_options, BATCH_FILES[sweep.script]]
    env = dict(os.environ, SWEEP_RUNS=str(runs_file))
    if sweep.script == "train_parallel.py":
        env["NPROC"] = str(sweep.nproc)
    print(shlex.join(cmd))
    print(submit(cmd, env))
    return todo


def slurm_errors(out: Path) -> dict[Path, str]:
    """Each run directory's error line from its latest SLURM task log, for the runs that have one."""
    errors: dict[Path, str] = {}
    folder = out / SLURM_FOLDER
    for runs_file in sorted(folder.glob("*.runs")):  # oldest first: a later submission's log wins
        for task, line in enumerate(runs_file.read_text().splitlines()):
            run_dir = Path(shlex.split(line)[0])
            error = error_line(folder / f"{runs_file.stem}-{task}.out")
            if error is not None:
                errors[run_dir] = error
            else:
                errors.pop(run_dir, None)
    return errors
