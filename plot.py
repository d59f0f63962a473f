"""Figures of training runs, drawn from their run directories (metrics.jsonl, or an older run's TensorBoard events).

    python plot.py runs/shapes runs/shapes-p2 --out figures
    python plot.py runs/seq runs/p2 --labels sequential "2 ranks" --out figures --pdf

Writes accuracy.png (val top-1 by epoch and by wall-clock), angles.png (update vs BP gradient, W vs Bᵀ,
per block), losses.png (feedback and forward losses per block) and, for parallel runs, timing.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dtp.cli import exit_on_user_error
from dtp.errors import UserError
from dtp.plots import write_figures
from dtp.rundata import RunData, load_run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a training run's --out directory")
    parser.add_argument("--out", help="where the figures go (default: the first RUN_DIR)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="one legend label per RUN_DIR (default: from the run: algorithm, ranks, replicas)")
    parser.add_argument("--pdf", action="store_true", help="write a PDF beside each PNG")
    return parser.parse_args()


def final_line(run: RunData) -> str:
    """The run's last evaluation and the training time it took, for comparing wall-clocks."""
    epochs, top1 = run.series("val", "val/top1", "epoch")
    if not top1:
        return f"{run.label}: no evaluation logged yet"
    wall, _ = run.series("val", "val/top1", "wall_s")
    return f"{run.label}: val top-1 {top1[-1]:.4f} after {epochs[-1]:g} epochs, {wall[-1]:.1f} s of training"


def main() -> None:
    args = parse_args()
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        raise UserError(f"--labels gives {len(args.labels)} label(s) for {len(args.run_dirs)} run directories; "
                        f"give one per RUN_DIR, in the same order")
    labels = args.labels or [None] * len(args.run_dirs)
    runs = [load_run(Path(run_dir), label) for run_dir, label in zip(args.run_dirs, labels)]
    out_dir = Path(args.out or args.run_dirs[0])
    drawn = write_figures(runs, out_dir, args.pdf)
    if not drawn:
        raise UserError("these runs have logged no figures yet; plot them after their first logged step")
    for name in drawn:
        print(f"wrote {out_dir / name}.png" + (f" and {name}.pdf" if args.pdf else ""))
    for run in runs:
        print(final_line(run))


if __name__ == "__main__":
    exit_on_user_error(main)
