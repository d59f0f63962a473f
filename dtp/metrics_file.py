"""metrics.jsonl: the run's logged figures as one JSON object a line, readable without TensorBoard.

Each record is a single write(2) to a file opened for appending, so a killed run leaves whole lines (a
reader still skips a last line that has no newline). A resumed run keeps the records up to the step of
the checkpoint it resumes and appends from there: steps a killed run logged but never checkpointed are
trained again, and logged once.
"""
from __future__ import annotations

import json
import os
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


def _before_resume(record: dict[str, Any], resumed_at: int) -> bool:
    """Whether a resumed run keeps this record: it happened up to the checkpoint's step, and is not the start
    of an earlier attempt from that same checkpoint (the resumed run writes its own start record)."""
    return record["step"] < resumed_at or (record["step"] == resumed_at and record["kind"] != "start")


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record) + "\n").encode()


class MetricsFile:
    """The metrics.jsonl a run appends to; it starts from `history`'s records through step `resumed_at`."""

    def __init__(self, path: Path, history: Path | None, resumed_at: int) -> None:
        kept: list[dict[str, Any]] = []
        if resumed_at > 0 and history is not None and history.is_file():
            kept = [r for r in read_records(history) if _before_resume(r, resumed_at)]
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
