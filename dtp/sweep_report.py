"""`sweep.py --report`: one row per grid point, its seeds' final and best val top-1 as mean ± std.

The figures come from each run's summary.json (`val_top1`, `best_val_top1`, `wall_time_s`); a run
without one is counted as failed when its `error:` line was recorded, else as not finished.
"""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtp.sweep import Sweep, SweepRun, set_value, summary_of
from dtp.sweep_launch import FAILED, slurm_errors

REPORT_CSV = "report.csv"


@dataclass
class SettingResult:
    """A grid point's runs over the seeds."""

    setting: str
    values: tuple[tuple[str, Any], ...]
    seeds: int = 0
    final_top1: list[float] = field(default_factory=list)
    best_top1: list[float] = field(default_factory=list)
    wall_time_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1); no std for fewer than 2 values, nothing for none."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _run_error(run: SweepRun, from_slurm: dict[Path, str]) -> str | None:
    failed = run.out_dir / FAILED
    if failed.is_file():
        return failed.read_text().splitlines()[-1]
    return from_slurm.get(run.out_dir.resolve())


def collect(sweep: Sweep, runs: list[SweepRun]) -> list[SettingResult]:
    """Every grid point's figures, in the sweep's order."""
    results: dict[str, SettingResult] = {}
    from_slurm = slurm_errors(sweep.out)
    for run in runs:
        result = results.setdefault(run.setting, SettingResult(run.setting, run.values))
        result.seeds += 1
        if summary_of(run).is_file():
            summary = json.loads(summary_of(run).read_text())
            result.final_top1.append(summary["val_top1"])
            result.best_top1.append(summary.get("best_val_top1", summary["val_top1"]))
            result.wall_time_s.append(summary["wall_time_s"])
        elif (error := _run_error(run, from_slurm)) is not None:
            result.errors.append(f"seed {run.seed}: {error}")
    return list(results.values())


def _percent(values: list[float]) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "—"
    return f"{100 * mean:.1f}%" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}%"


def format_table(results: list[SettingResult]) -> str:
    """A Markdown table: setting, final and best val top-1, seeds finished, mean wall time, failures."""
    lines = ["| setting | final val top-1 | best val top-1 | seeds finished | wall time | failures |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        wall, _ = mean_std(r.wall_time_s)
        failures = "; ".join(r.errors) if r.errors else "0"
        lines.append(f"| {r.setting} | {_percent(r.final_top1)} | {_percent(r.best_top1)} | "
                     f"{len(r.final_top1)}/{r.seeds} | {'—' if wall is None else f'{wall:.0f} s'} | {failures} |")
    return "\n".join(lines)


def write_csv(results: list[SettingResult], keys: list[str], path: Path) -> None:
    """report.csv: the grid values in a column each, then the figures as fractions and seconds."""
    columns = ["setting", *keys, "seeds", "finished", "failed", "final_top1_mean", "final_top1_std",
               "best_top1_mean", "best_top1_std", "wall_time_s_mean", "errors"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in results:
            values = dict(r.values)
            final, best, wall = mean_std(r.final_top1), mean_std(r.best_top1), mean_std(r.wall_time_s)
            writer.writerow([r.setting, *(set_value(values[k]) for k in keys), r.seeds, len(r.final_top1),
                             len(r.errors), *final, *best, wall[0], " | ".join(r.errors)])


def report(sweep: Sweep, runs: list[SweepRun]) -> list[SettingResult]:
    """Print the table and write OUT/report.csv."""
    results = collect(sweep, runs)
    print(format_table(results))
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_csv(results, [key for key, _ in sweep.grid], sweep.out / REPORT_CSV)
    print(f"wrote {sweep.out / REPORT_CSV}")
    return results
