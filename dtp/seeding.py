"""Generators seeded from integer keys only, e.g. (seed, epoch, batch) or (seed, block, step), and the
feedback noise drawn from them.

Nothing draws from global RNG state, so a run's randomness does not depend on how it was split
into processes or resumed. The one exception, weight initialisation (nn.Module initialisers only draw
from the global CPU generator), runs inside `global_cpu_rng_seeded`, which leaves that state as it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

FEEDBACK_NOISE_STREAM = 1  # the first key of every feedback-noise generator


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*keys))
    return gen

@contextmanager
def global_cpu_rng_seeded(seed: int) -> Iterator[None]:
    """The global CPU generator seeded with `seed` inside the block, and restored after it.

    Weights initialised inside are exactly those torch.manual_seed(seed) gives (they are built on the
    CPU), yet building a network changes no random state that anything else draws from.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def block_noise_seed(seed: int, block: int, step: int) -> int:
    """The seed of block `block`'s feedback noise at step `step`: nothing but (run seed, block, step), so
    the order in which blocks are trained, the rank that trains them, how the batch is split and whether
    the run was resumed never change the noise (docs/design.md §9)."""
    return derive_seed(FEEDBACK_NOISE_STREAM, seed, block, step)


class BlockNoise:
    """One block's feedback noise: a generator and two buffers, kept for the whole run.

    Each step re-seeds the generator (`start`), and every iteration draws dx, then dy, for the full batch
    (K × batch rows) into the buffers, one kernel each; a process that trains rows [start, stop) of the
    batch (a split block, a data-parallel replica) uses those rows. Fixed buffers, few kernels and a
    generator re-seeded between steps are what let a CUDA graph capture the loop and replay it exactly.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.generator = torch.Generator(device=device)
        self.rows, self.batch = slice(0, 0), 0
        self._dx: Tensor | None = None
        self._dy: Tensor | None = None

    def start(self, seed: int, block: int, step: int, rows: slice, batch: int) -> BlockNoise:
        """Seed the step's noise of a batch of `batch` rows, of which this process trains `rows`."""
        self.generator.manual_seed(block_noise_seed(seed, block, step))
        self.rows, self.batch = rows, batch
        return self

    def draw(self, samples: int, x: Tensor, y: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        """dx (K×rows×x-shape) and dy (K×rows×y-shape) for the next iteration, scaled by sigma."""
        self._dx = self._filled(self._dx, (samples, self.batch, *x.shape[1:]), x)
        self._dy = self._filled(self._dy, (samples, self.batch, *y.shape[1:]), y)
        return sigma * self._dx[:, self.rows], sigma * self._dy[:, self.rows]

    def _filled(self, buffer: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """`buffer` (reallocated only if the batch's shape changed) filled with standard normal noise."""
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffer.normal_(generator=self.generator)
