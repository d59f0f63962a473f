"""The two reasons a run ends before its last step: a signal from outside, and early stopping."""
from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass
from typing import Any


class StopSignal:
    """SIGUSR1 or SIGTERM (e.g. a cluster's warning before its time limit) asks the loop to stop.

    The loop finishes the current step, checkpoints and returns, so `--resume` continues exactly.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name


@dataclass
class EarlyStopping:
    """Stop once val top-1 has not beaten its best by more than min_delta for `patience` evaluations."""

    patience: int
    min_delta: float
    best: float = -math.inf
    bad_evaluations: int = 0

    def update(self, top1: float) -> bool:
        """Record an evaluation; True when training should stop."""
        if top1 > self.best + self.min_delta:
            self.best, self.bad_evaluations = top1, 0
        else:
            self.bad_evaluations += 1
        return 0 < self.patience <= self.bad_evaluations
