"""Where a process computes and how: its device, its autocast context and its host allocator."""
from __future__ import annotations

import ctypes
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache, partial

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
        else:
            keep_freed_host_memory()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
KEPT_BYTES = 1 << 30  # blocks up to this size come from (and go back to) the heap, never the OS


@cache
def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS at once.

    Every feedback iteration frees and reallocates the same temporaries. glibc serves a block above its
    mmap threshold with fresh pages from the OS and unmaps it on free, so each iteration page-faults it in
    again: with 2 threads, CIFAR-10 SimpleVGG's block 4 took about 256,000 page faults a step (1 GB of
    zeroed pages). With both thresholds raised those blocks are reused, and the process keeps its peak
    host memory, as a GPU caching allocator does. Returns whether the C library took the settings (False
    where it is not glibc); set once per process.
    """
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the interpreter runs on
    except (OSError, TypeError):  # no process-wide symbol table (Windows)
        return False
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEPT_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_BYTES))


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
