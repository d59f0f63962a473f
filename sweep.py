"""Run a grid of config settings × seeds from a sweep file, here or as a SLURM job array, and report it.

    python sweep.py configs/sweeps/shapes_seeds.yaml --dry-run
    python sweep.py configs/sweeps/shapes_seeds.yaml                      # here, one run at a time
    python sweep.py configs/sweeps/shapes_seeds.yaml --launcher slurm --sbatch=--gpus-per-node=0
    python sweep.py configs/sweeps/shapes_seeds.yaml --report             # mean ± std over seeds, report.csv
"""
from __future__ import annotations

import argparse
import shlex
import sys

from dtp.cli import exit_on_user_error
from dtp.errors import UserError
from dtp.sweep import expand, load_sweep, summary_of
from dtp.sweep_launch import command, run_local, submit_slurm
from dtp.sweep_report import report


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="the sweep file (YAML: script, nproc, args, grid, seeds, out)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: train here; slurm: submit one job array through launch/'s batch file")
    p.add_argument("--parallel", type=int, default=None,
                   help="runs at once: here (default 1), or the array's task limit under SLURM (default none)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an sbatch option for the array, e.g. --sbatch=--gpus-per-node=0 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print every run's directory and command, start nothing")
    p.add_argument("--report", action="store_true", help="print the results table and write OUT/report.csv")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.parallel is not None and args.parallel < 1:
        raise UserError(f"--parallel must be a positive integer, got {args.parallel}")
    sweep = load_sweep(args.sweep)
    runs = expand(sweep)
    if args.report:
        report(sweep, runs)
    elif args.dry_run:
        for run in runs:
            state = "finished" if summary_of(run).is_file() else "to run"
            print(f"{run.out_dir} ({state})\n    {shlex.join(command(sweep, run))}")
        print(f"{len(runs)} runs")
    elif args.launcher == "slurm":
        submit_slurm(sweep, runs, args.sbatch, args.parallel)
    elif run_local(sweep, runs, args.parallel or 1):
        sys.exit(1)


if __name__ == "__main__":
    exit_on_user_error(main)
