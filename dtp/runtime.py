"""Where a process computes and how: its device and its autocast context."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from dtp.hooks import Autocast


@dataclass
class Runtime:
    """Where this process computes and how: device and the autocast context (bf16 or none)."""

    device: torch.device
    autocast: Autocast = nullcontext


def autocast_for(device: torch.device, mixed_precision: str) -> Autocast:
    """bf16 autocast on `device`, or none; what Accelerate provides to the sequential script."""
    if mixed_precision == "bf16":
        return partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return nullcontext


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host timers measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
