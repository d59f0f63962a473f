"""sweep.py: grid expansion and run names, dry run, the local launcher (in this process), the report's
means, rerun skips and resumes, failures recorded, the SLURM job array, and bad sweep files."""
from __future__ import annotations

import contextlib
import csv
import json
import shlex
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, SMOKE, expect_error, script_env, script_in_process
from dtp.cli import build_parser, exit_on_user_error, resolve_run
from dtp.sweep import MAX_NAME, expand, load_sweep, setting_name
from dtp.sweep_launch import FAILED, LOG, command, run_local, submit_slurm
from dtp.sweep_report import collect, report

GRID = {"forward.lr": [0.01, 0.05], "forward.beta": [0.5, 0.7]}


def write_sweep(folder: Path, data_path: Path, **changes) -> Path:
    sweep = {"script": "train_sequential.py", "grid": GRID, "seeds": [0, 1], "out": str(folder / "runs"),
             "args": ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(data_path), "--max-steps", "2"]}
    sweep.update(changes)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def train_here(cmd: list[str], log: Path) -> int:
    """The local launcher's Execute, in this process: train_sequential.py's main with the run's flags."""
    import train_sequential

    assert Path(cmd[1]).name == "train_sequential.py", cmd
    argv = sys.argv
    with log.open("a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        sys.argv = cmd[1:]
        try:
            exit_on_user_error(train_sequential.main)
            return 0
        except SystemExit as exc:
            return int(exc.code)
        finally:
            sys.argv = argv


def test_grid_expands_into_named_runs_whose_sets_reach_their_config(tmp_path, tiny_npz):
    sweep = load_sweep(write_sweep(tmp_path, tiny_npz, grid={**GRID, "feedback.lr": [[1e-3, 1e-3, 8e-3, 8e-3, 0.05]]}))
    runs = expand(sweep)
    assert len(runs) == 2 * 2 * 1 * 2
    assert len({run.out_dir for run in runs}) == len(runs)
    first = runs[0]
    name = "forward.lr=0.01,forward.beta=0.5,feedback.lr=0.001_0.001_0.008_0.008_0.05"
    assert first.out_dir == sweep.out / name / "seed0"
    for run in runs:
        cfg = resolve_run(build_parser("").parse_args(run.script_args())).cfg
        values = dict(run.values)
        assert (cfg.forward.lr, cfg.forward.beta, cfg.seed) == (values["forward.lr"], values["forward.beta"], run.seed)
        assert list(cfg.feedback.lr) == values["feedback.lr"]
        assert run.setting in str(run.out_dir) and f"seed{run.seed}" == run.out_dir.name


def test_long_names_get_a_hash_and_differ():
    values = tuple((f"feedback.{k}", [0.123456] * 5) for k in ("lr", "noise", "iterations"))
    other = (*values[:2], ("feedback.iterations", [0.123457] * 5))
    assert len(setting_name(values)) == MAX_NAME and setting_name(values).startswith("feedback.lr=0.123456_")
    assert setting_name(values) != setting_name(other)


def test_dry_run_prints_every_command_and_starts_nothing(tmp_path, tiny_npz, monkeypatch, capsys):
    path = write_sweep(tmp_path, tiny_npz)
    proc = script_in_process(monkeypatch, capsys, "sweep.py", str(path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    runs = expand(load_sweep(path))
    for run in runs:
        assert f"{run.out_dir} (to run)" in proc.stdout and shlex.join(command(load_sweep(path), run)) in proc.stdout
    assert "--resume auto" in proc.stdout and f"{len(runs)} runs" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_local_grid_reports_seed_means_skips_finished_runs_and_resumes_a_killed_one(tmp_path, tiny_npz, capsys,
                                                                                    monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    sweep = load_sweep(write_sweep(tmp_path, tiny_npz))
    runs = expand(sweep)
    assert run_local(sweep, runs, execute=train_here) == 0
    summaries = {run.out_dir: json.loads((run.out_dir / "summary.json").read_text()) for run in runs}
    results = report(sweep, runs)
    rows = {row["setting"]: row for row in csv.DictReader((sweep.out / "report.csv").open())}
    assert len(results) == len(rows) == 4
    for result in results:
        finals = [summaries[run.out_dir]["val_top1"] for run in runs if run.setting == result.setting]
        row = rows[result.setting]
        assert result.final_top1 == finals and row["finished"] == "2" and row["failed"] == "0"
        assert float(row["final_top1_mean"]) == pytest.approx(statistics.fmean(finals))
        assert float(row["final_top1_std"]) == pytest.approx(statistics.stdev(finals))
    assert "| forward.lr=0.01,forward.beta=0.5 |" in capsys.readouterr().out

    started = []
    assert run_local(sweep, runs, execute=lambda cmd, log: started.append(cmd) or 0) == 0
    assert started == []  # every run had finished

    killed = runs[3]
    uninterrupted = torch.load(killed.out_dir / "checkpoint.pt", weights_only=True)
    (killed.out_dir / "summary.json").unlink()
    assert train_here(command(sweep, killed)[:-4] + ["--out", str(killed.out_dir), "--max-steps", "1"],
                      tmp_path / "one-step.log") == 0
    (killed.out_dir / "summary.json").unlink()  # as a run killed after step 1: its checkpoint, no summary
    assert run_local(sweep, runs, execute=train_here) == 0
    assert "training from step 1" in (killed.out_dir / LOG).read_text().split("training from step 0")[-1]
    resumed = torch.load(killed.out_dir / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(resumed["forward"][k], v) for k, v in uninterrupted["forward"].items())


def test_a_failed_run_is_recorded_with_its_error_line_and_the_sweep_goes_on(tmp_path, tiny_npz, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    lists = {"feedback.lr": [[1e-3], [1e-3, 1e-3, 8e-3, 8e-3, 0.05]]}
    sweep = load_sweep(write_sweep(tmp_path, tiny_npz, grid=lists, seeds=[0]))
    runs = expand(sweep)
    assert run_local(sweep, runs, execute=train_here) == 1
    assert "feedback.lr has 1 entries" in (runs[0].out_dir / FAILED).read_text()
    assert (runs[1].out_dir / "summary.json").is_file()
    failed, finished = collect(sweep, runs)
    assert len(failed.errors) == 1 and "error: feedback.lr has 1 entries" in failed.errors[0]
    assert len(finished.final_top1) == 1 and not finished.errors
    assert "FAILED" in capsys.readouterr().out


def test_a_run_stopped_by_a_signal_is_left_to_resume_not_failed(tmp_path, tiny_npz, capsys):
    sweep = load_sweep(write_sweep(tmp_path, tiny_npz, seeds=[0]))
    runs = expand(sweep)
    assert run_local(sweep, runs, execute=lambda cmd, log: 0) == 0  # exit 0, no summary: SIGTERM's checkpoint
    assert not any((run.out_dir / FAILED).exists() for run in runs)
    assert "0 finished, 4 stopped, 0 failed" in capsys.readouterr().out
    assert all(not result.errors and not result.final_top1 for result in collect(sweep, runs))


def test_slurm_launcher_submits_one_array_with_a_line_per_unfinished_run(tmp_path, tiny_npz, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(write_sweep(tmp_path, tiny_npz))
    runs = expand(sweep)
    runs[0].out_dir.mkdir(parents=True)
    (runs[0].out_dir / "summary.json").write_text("{}")
    submitted = []
    todo = submit_slurm(sweep, runs, ["--gpus-per-node=0"], parallel=2,
                        submit=lambda cmd, env: submitted.append((cmd, env)) or "Submitted batch job 7")
    assert todo == runs[1:]
    (cmd, env), = submitted
    assert cmd[:2] == ["sbatch", f"--array=0-{len(runs) - 2}%2"] and "--gpus-per-node=0" in cmd
    assert cmd[-1] == "launch/slurm_sequential.sbatch"
    lines = Path(env["SWEEP_RUNS"]).read_text().splitlines()
    assert [shlex.split(line) for line in lines] == [[str(run.out_dir.resolve()), *run.train_args] for run in todo]


def test_bad_sweep_files_get_one_error_line_before_anything_runs(tmp_path, tiny_npz, monkeypatch, capsys):
    cases = [({"gird": GRID}, "unknown key 'gird' (did you mean 'grid'?)"),
             ({"grid": {"forward.lrr": [0.1]}}, "unknown config key 'forward.lrr' (did you mean 'forward.lr'?)"),
             ({"grid": {"forward.lr": [0.1, -1]}}, "forward.lr must be a positive number, got -1"),
             ({"grid": {"forward.lr": 0.1}}, "grid key 'forward.lr' must have a non-empty list"),
             ({"args": ["--max-steps", "0"]}, "--max-steps must be positive"),
             ({"args": ["--seed", "3"]}, "args must not give --seed")]
    for change, message in cases:
        proc = script_in_process(monkeypatch, capsys, "sweep.py", str(write_sweep(tmp_path, tiny_npz, **change)))
        expect_error(proc, message)
        assert not (tmp_path / "runs").exists()
    proc = script_in_process(monkeypatch, capsys, "sweep.py", str(write_sweep(tmp_path, tiny_npz)), "--parallel", "0")
    expect_error(proc, "--parallel must be a positive integer, got 0")


FAKE_SBATCH = """#!/bin/bash
# Runs the batch file once per array task, here, with its log where --output says.
for a in "$@"; do
  case $a in --array=*) range=${a#--array=}; range=${range%%%*};; --output=*) output=${a#--output=};; esac
done
for task in $(seq "${range%-*}" "${range#*-}"); do
  SLURM_ARRAY_TASK_ID=$task SLURM_JOB_ID=$((100 + task)) SLURM_JOB_NAME=sweep SLURM_SUBMIT_DIR=$PWD \\
    bash "${@: -1}" >> "${output//%a/$task}" 2>&1
done
echo "Submitted batch job 100"
"""
FAKE_PYTHON = """#!/bin/bash
printf '%q ' "$@" >> "$STUB_LOG"; echo >> "$STUB_LOG"
[[ " $* " == *" --seed 1 "* ]] && { echo "error: stub failure" >&2; exit 2; }
exit 0
"""


@pytest.mark.slow
def test_slurm_array_tasks_run_their_own_line_through_the_batch_file(tmp_path, tiny_npz, monkeypatch, capsys):
    """sweep.py in this process; a stub sbatch runs the batch file for each task, with a stub python."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("python", FAKE_PYTHON)):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:{script_env(1)['PATH']}")
    monkeypatch.setenv("VENV", str(tmp_path / "no-venv"))
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "python.log"))
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, tiny_npz)
    proc = script_in_process(monkeypatch, capsys, "sweep.py", str(path), "--launcher", "slurm")
    assert proc.returncode == 0, proc.stderr
    assert "--array=0-7" in proc.stdout and "Submitted batch job 100" in proc.stdout
    sweep = load_sweep(path)
    runs = expand(sweep)
    calls = [shlex.split(line) for line in (tmp_path / "python.log").read_text().splitlines()]
    assert [call[-len(run.train_args):] for call, run in zip(calls, runs)] == [list(run.train_args) for run in runs]
    assert all(call[call.index("--out") + 1] == str(run.out_dir.resolve()) for call, run in zip(calls, runs))
    assert all("--resume" in call for call in calls) and len(calls) == len(runs)
    results = collect(sweep, runs)
    assert all(r.errors == ["seed 1: error: stub failure"] for r in results)
