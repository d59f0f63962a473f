"""Progress while a run trains: tqdm's bar on a terminal, and timed lines when stdout is a file.

A job under SLURM or nohup writes to a file, where tqdm shows nothing; without lines such a job would be
silent between epochs, for minutes on CIFAR-10.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

from torch import Tensor
from tqdm import tqdm


def progress_bar(n_batches: int, epoch: int, show: bool) -> tqdm:
    """The per-epoch bar, in a terminal only (tqdm decides), and never on a copy that is not the main one."""
    return tqdm(total=n_batches, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=True,
                disable=None if show else True)


def format_duration(seconds: float) -> str:
    """1h02m, 3m12s or 45s: as precise as an estimate deserves."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLines:
    """One line every `every_s` seconds and at each epoch end (and the run's last step):
    epoch, step/steps, images per second, time left, the last step's training loss.

    Images per second count training time since the previous line; the estimate of the time left uses
    the wall clock since the first step, evaluations and checkpoints included. The loss stays where it was
    computed until a line is printed: only then is it read on the host.
    """

    def __init__(self, every_s: float, total_steps: int, steps_per_epoch: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.total_steps, self.steps_per_epoch = every_s, total_steps, steps_per_epoch
        self.clock = clock
        self.started = self.last_line = clock()
        self.steps_done = 0
        self.images, self.train_s = 0, 0.0  # since the last line

    def after_step(self, step: int, images: int, step_s: float, loss: float | Tensor) -> None:
        now = self.clock()
        self.steps_done += 1
        self.images += images
        self.train_s += step_s
        boundary = step % self.steps_per_epoch == 0 or step == self.total_steps
        if now - self.last_line < self.every_s and not boundary:
            return
        left_s = (self.total_steps - step) * (now - self.started) / self.steps_done
        epoch = (step - 1) // self.steps_per_epoch
        print(f"epoch {epoch} step {step}/{self.total_steps} | {self.images / max(self.train_s, 1e-9):.1f} img/s | "
              f"ETA {format_duration(left_s)} | loss {float(loss):.4f}", flush=True)
        self.last_line, self.images, self.train_s = now, 0, 0.0


def progress_lines(every_s: float, total_steps: int, steps_per_epoch: int, show: bool) -> ProgressLines | None:
    """Lines for the main copy when stdout is not a terminal; on a terminal the bar is enough."""
    if not show or sys.stdout.isatty():
        return None
    return ProgressLines(every_s, total_steps, steps_per_epoch)
