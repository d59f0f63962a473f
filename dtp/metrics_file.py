"""metrics.jsonl: the run's logged figures as one JSON object a line, readable without TensorBoard.

Each record is a single write(2) to a file opened for appending, so a killed run leaves whole lines (a
reader still skips a last line that has no newline). A resumed run keeps the records its checkpoint
holds and appends from there: steps a killed run logged but never checkpointed are trained again, and
logged once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtp.checkpoint import atomic_write
from dtp.errors import UserError

METRICS = "metrics.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every whole record of a metrics.jsonl, in file order."""
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # the last piece is '' or a line cut short by a kill
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"'{path}' line {number} is not a JSON record ({exc.msg}); "
                            f"it was not written by this project, or was edited") from None
    return records


@dataclass(frozen=True)
class Checkpointed:
    """How far the checkpoint a run resumes from had come: its training step, and DRL's feedback-only
    batches (s-DDTP passes run between epochs, at one training step)."""

    step: int
    feedback_only_batches: int = 0

    def keeps(self, record: dict[str, Any]) -> bool:
        """Whether the checkpoint was written after this record, so that the resumed run keeps it: records of
        earlier steps, and those of its own step (logged before it was written) but a start record, which the
        resumed run writes anew; feedback-only records by their batch count."""
        if record["kind"] == "feedback_only":
            return record["batch"] <= self.feedback_only_batches
        return record["step"] < self.step or (record["step"] == self.step and record["kind"] != "start")


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record) + "\n").encode()


class MetricsFile:
    """The metrics.jsonl a run appends to: empty for a new run; for a resumed one, `history`'s records
    that its checkpoint holds."""

    def __init__(self, path: Path, history: Path | None, resumed: Checkpointed | None) -> None:
        kept: list[dict[str, Any]] = []
        if resumed is not None and history is not None and history.is_file():
            kept = [r for r in read_records(history) if resumed.keeps(r)]
        atomic_write(path, lambda f: f.write(b"".join(_encode(r) for r in kept)))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def write(self, record: dict[str, Any]) -> None:
        data = _encode(record)
        while data:  # os.write may take less than it is given; a regular file takes it all at once
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
