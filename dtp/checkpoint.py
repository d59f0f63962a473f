"""Atomic checkpoints: a crash or a kill mid-write never destroys the previous checkpoint."""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from dtp.errors import UserError

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"


def atomic_write(path: Path, write: Any) -> None:
    """Call write(f) on a temporary file beside path, then rename it over path: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(out_dir: str | Path, state: dict[str, Any]) -> Path:
    path = Path(out_dir) / CHECKPOINT
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def save_summary(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(out_dir) / SUMMARY
    atomic_write(path, lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
    return path


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Load DIR/checkpoint.pt (or a checkpoint file given directly) onto the CPU.

    Only tensors and plain data are unpickled (weights_only=True), so a checkpoint handed over from a
    shared directory cannot run code on --resume; this project's checkpoints hold nothing else.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at '{path}'; pass the --out directory of an earlier run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"--resume: '{path}' holds Python objects besides tensors and plain data; it was refused "
                        f"because loading it could run code. Resume only from checkpoints this project wrote") from None
    except Exception as exc:  # a truncated or foreign file: say which, not a pickle traceback
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--resume: '{path}' is not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise UserError(f"--resume: '{path}' holds a {type(state).__name__}, not a checkpoint of this project")
    missing = {"forward", "feedback", "step", "epoch", "config"} - set(state)
    if missing:
        raise UserError(f"--resume: '{path}' lacks {sorted(missing)}; it was not written by this project")
    return state
