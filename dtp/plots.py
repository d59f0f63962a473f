"""The published figures, drawn from run directories (dtp.rundata): accuracy, angles, losses, timing.

A figure is first a list of Panels, the curves exactly as logged (top-1 in percent), and then a
drawing of those panels alone: `write_figures` returns what it drew, so tests compare it with the
logs. Drawing uses matplotlib's Figure and its Agg canvas directly, without pyplot or a display, so it
works on a headless node.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dtp.rundata import RunData

Curve = tuple[list[float], list[float]]
LINESTYLES = ("-", "--", ":", "-.")  # one per run where colours tell blocks or figures apart


@dataclass
class Panel:
    """One set of axes: its curves by legend label, as (x, y) lists."""

    title: str
    xlabel: str
    ylabel: str
    curves: dict[str, Curve] = field(default_factory=dict)
    styles: dict[str, dict[str, str]] = field(default_factory=dict)  # matplotlib line keywords, by label
    markers: bool = False
    log_y: bool = False

    def add(self, label: str, curve: Curve, **style: str) -> None:
        """Keep a curve that has points; a run that never logged the figure adds nothing."""
        if curve[0]:
            self.curves[label] = curve
            self.styles[label] = style


def accuracy_panels(runs: list[RunData]) -> list[Panel]:
    """The seed's figure: validation top-1 against epochs (left) and against wall-clock seconds (right)."""
    by_epoch = Panel("validation top-1 by epoch", "epoch", "val top-1 (%)", markers=True)
    by_time = Panel("validation top-1 by wall-clock", "wall-clock (s)", "val top-1 (%)", markers=True)
    for run in runs:
        for panel, x in ((by_epoch, "epoch"), (by_time, "wall_s")):
            xs, top1 = run.series("val", "val/top1", x)
            panel.add(run.label, (xs, [100 * value for value in top1]))
    return [by_epoch, by_time]


def _tag_numbers(runs: list[RunData], pattern: str) -> list[int]:
    """The numbers in the "train" tags matching `pattern` (its one group): the blocks or ranks any run logged."""
    found = {int(m.group(1)) for run in runs for key in run.keys("train") if (m := re.fullmatch(pattern, key))}
    return sorted(found)


def angles_panels(runs: list[RunData]) -> list[Panel]:
    """Per block, over steps: the DTP update against the BP gradient, and W against Bᵀ (per-filter angles)."""
    blocks = _tag_numbers(runs, r"(?:bp_comparison|alignment)/angle_block(\d+)")
    panels = []
    for i in blocks:
        panel = Panel(f"block {i}", "step", "angle (degrees)")
        for n, run in enumerate(runs):
            dashes = LINESTYLES[n % len(LINESTYLES)]
            panel.add(f"{run.label}: update vs BP gradient", run.series("train", f"bp_comparison/angle_block{i}"),
                      color="C0", linestyle=dashes)
            panel.add(f"{run.label}: W vs $B^\\top$", run.series("train", f"alignment/angle_block{i}"),
                      color="C1", linestyle=dashes)
        panels.append(panel)
    return panels


def losses_panels(runs: list[RunData]) -> list[Panel]:
    """Per block, over steps: the feedback losses (left) and the forward losses (right)."""
    panels = []
    for name, title in (("feedback_loss", "feedback loss"), ("forward_loss", "forward loss")):
        panel = Panel(title, "step", "loss")
        for i in _tag_numbers(runs, rf"{name}/block(\d+)"):
            for n, run in enumerate(runs):
                panel.add(f"{run.label}: block {i}", run.series("train", f"{name}/block{i}"), color=f"C{i % 10}",
                          linestyle=LINESTYLES[n % len(LINESTYLES)])
        panel.log_y = bool(panel.curves) and all(v > 0 for _, ys in panel.curves.values() for v in ys)
        panels.append(panel)
    return panels


TIMING_NAMES = {"compute_s": "compute", "comm_s": "communication", "wait_s": "wait"}


def timing_panels(runs: list[RunData]) -> list[Panel]:
    """Parallel runs, per rank, over steps: seconds of a step spent computing, communicating and waiting
    (rank 0, the leader: its own feedback training, and its wait for the workers' results)."""
    panels = []
    for run in runs:
        for r in _tag_numbers([run], r"parallel/rank(\d+)_(?:compute|comm|wait)_s"):
            panel = Panel(f"{run.label}: rank {r}", "step", "seconds per step")
            for key, name in TIMING_NAMES.items():
                panel.add(name, run.series("train", f"parallel/rank{r}_{key}"))
            panels.append(panel)
    return panels


FIGURES: dict[str, tuple[Callable[[list[RunData]], list[Panel]], str]] = {
    "accuracy": (accuracy_panels, "validation top-1"),
    "angles": (angles_panels, "comparison with backprop"),
    "losses": (losses_panels, "losses per block"),
    "timing": (timing_panels, "where a parallel step's time goes"),
}


def draw(panels: list[Panel], title: str, columns: int = 3) -> Figure:
    """A figure of these panels, and of nothing else, in a grid of at most `columns` columns."""
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    width, height = 5.2 * columns, 3.8 * rows
    figure = Figure(figsize=(width, height))
    # Fixed margins in inches: a layout engine would measure every label again at each save, at twice the cost.
    figure.subplots_adjust(left=0.8 / width, right=1 - 0.25 / width, bottom=0.55 / height, top=1 - 0.75 / height,
                           wspace=0.3, hspace=0.45)
    figure.suptitle(title)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for label, (xs, ys) in panel.curves.items():
            axes.plot(xs, ys, label=label, marker="o" if panel.markers else None, markersize=4,
                      **panel.styles.get(label, {}))
        axes.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        if panel.xlabel == "step":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.log_y:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def write_figures(runs: list[RunData], out_dir: Path, pdf: bool = False) -> dict[str, list[Panel]]:
    """Write NAME.png (and NAME.pdf) for every figure these runs have curves for; return what was drawn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for name, (make_panels, title) in FIGURES.items():
        panels = [panel for panel in make_panels(runs) if panel.curves]
        if not panels:
            continue
        figure = draw(panels, title, columns=2 if name == "accuracy" else 3)
        for suffix in ("png", "pdf") if pdf else ("png",):
            figure.savefig(out_dir / f"{name}.{suffix}", dpi=110)
        drawn[name] = panels
    return drawn
