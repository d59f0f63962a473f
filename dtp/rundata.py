"""A run directory's logged figures, as plot.py reads them: its metrics.jsonl, or for a run from before
metrics.jsonl existed, its TensorBoard events.

Both give the same records (dtp.runlog): "train" and "val" records of step, epoch, wall_s and scalars
keyed by their TensorBoard tags. Events carry no epoch and no run clock: an old run's epochs come from
its summary.json (steps / epochs), and its wall_s from the events' timestamps since its first event,
which include the pauses between a run and its resumptions.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from dtp.checkpoint import SUMMARY
from dtp.errors import UserError
from dtp.metrics_file import METRICS, read_records

EVENTS_GLOB = "events.out.tfevents.*"


@dataclass(frozen=True)
class RunData:
    """One run's records, in step order, and the name its curves carry."""

    path: Path
    label: str
    records: list[dict[str, Any]]

    def series(self, kind: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x, value) of every `kind` record that holds `key`, in the order logged."""
        pairs = [(r[x], r[key]) for r in self.records if r["kind"] == kind and key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def keys(self, kind: str) -> set[str]:
        return {key for r in self.records if r["kind"] == kind for key in r}


def describe_layout(algorithm: str, layout: dict[str, Any]) -> str:
    """'dtp, sequential', 'dtp, 2 ranks' or 'dtp, 2 replicas × 3 ranks': how a run trained."""
    world, replicas = layout.get("world_size", 1), layout.get("replicas", 1)
    if world == 1 and replicas == 1 and "group_size" not in layout:
        return f"{algorithm}, sequential"
    if replicas == 1:
        return f"{algorithm}, {world} rank{'s' if world > 1 else ''}"
    return f"{algorithm}, {replicas} replicas × {layout.get('group_size', world // replicas)} ranks"


def load_run(path: Path, label: str | None = None) -> RunData:
    """A run directory's records; a path that is not one is a UserError that says why."""
    if not path.exists():
        raise UserError(f"'{path}' does not exist; pass the --out directory of a training run")
    if not path.is_dir():
        raise UserError(f"'{path}' is not a directory; pass the --out directory of a training run")
    if (path / METRICS).is_file():
        records = read_records(path / METRICS)
        starts = [r for r in records if r["kind"] == "start"]
        if not starts:
            raise UserError(f"'{path / METRICS}' has no start record; it was not written by this project")
        layout = {k: starts[-1][k] for k in ("world_size", "replicas", "group_size") if k in starts[-1]}
        return RunData(path, label or describe_layout(starts[-1]["algorithm"], layout), records)
    if not any(path.glob(EVENTS_GLOB)):
        raise UserError(f"'{path}' holds neither {METRICS} nor TensorBoard events; "
                        f"pass the --out directory of a training run")
    return _from_events(path, label)


def _from_events(path: Path, label: str | None) -> RunData:
    """An old run: its scalars from the TensorBoard events, its epochs and label from summary.json."""
    summary_path = path / SUMMARY
    if not summary_path.is_file():
        raise UserError(f"'{path}' has no {METRICS} (it predates it) and no {SUMMARY} (it did not finish), so "
                        f"its epochs cannot be told from its TensorBoard events; resume it to the end once to plot it")
    summary = json.loads(summary_path.read_text())
    steps_per_epoch = summary["steps"] / summary["epochs"]
    scalars = _event_scalars(path)
    if not scalars:
        raise UserError(f"'{path}' has TensorBoard events but no scalars in them")
    first = min(wall for values in scalars.values() for wall, _ in values.values())
    grouped: dict[tuple[str, int], dict[str, Any]] = defaultdict(dict)
    for tag, values in scalars.items():
        kind = "val" if tag.startswith("val/") else "train"
        for step, (wall, value) in values.items():
            record = grouped[(kind, step)]
            record[tag] = value
            record["wall_s"] = max(record.get("wall_s", 0.0), wall - first)
    records = [{"kind": kind, "step": step, "epoch": step / steps_per_epoch, **values}
               for (kind, step), values in sorted(grouped.items(), key=lambda item: (item[0][1], item[0][0]))]
    algorithm = summary.get("algorithm", path.name)
    return RunData(path, label or describe_layout(algorithm, summary.get("parallel", {})), records)


def _event_scalars(path: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """Every scalar of every event file, by tag and step: (timestamp, value); a step logged twice (a run
    killed before its checkpoint and resumed) keeps its last value."""
    scalars: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for event_file in sorted(path.glob(EVENTS_GLOB)):
        accumulator = EventAccumulator(str(event_file), size_guidance={SCALARS: 0})  # 0: keep every event
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith(("hparam/", "feedback_only/")):  # DRL's are logged by batch count, not step
                continue
            for event in accumulator.Scalars(tag):
                scalars[tag][event.step] = (event.wall_time, event.value)
    return scalars
