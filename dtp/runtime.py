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
    cuda_graphs: bool = False  # feedback loops captured as CUDA graphs, blocks on streams (dtp/graphs.py)

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            # Shapes are fixed for a whole run, so cuDNN's per-shape algorithm search pays off at once.
            torch.backends.cudnn.benchmark = True


def autocast_for(device: torch.device, mixed_precision: str, cache_enabled: bool = True) -> Autocast:
    """bf16 autocast on `device`, or none; what Accelerate provides to the sequential script. A captured
    CUDA graph needs the weight-cast cache off: a cached cast would not be redone on replay."""
    if mixed_precision == "bf16":
        return partial(torch.autocast, device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return nullcontext


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host timers measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
