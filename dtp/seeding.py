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
NOISE_CHUNK_ROWS = 8  # rows per noise generator: batches are split on multiples of it


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


def noise_generator(seed: int, block: int, step: int, chunk: int, device: torch.device) -> torch.Generator:
    """The generator rows [8·chunk, 8·chunk + 8) of block `block`'s feedback noise come from at step `step`.

    It depends on nothing but (run seed, block, step, chunk), so the order in which blocks are trained,
    the rank that trains them, how the batch is split and whether the run was resumed never change the
    noise (docs/design.md §9).
    """
    return seeded_generator(FEEDBACK_NOISE_STREAM, seed, block, step, chunk, device=device)


class BlockNoise:
    """Feedback noise of one block at one step, for rows [start, stop) of the full batch.

    The full batch's noise is drawn in chunks of NOISE_CHUNK_ROWS rows, each from its own generator, and
    every iteration draws dx then dy from each. A process training only some rows (a split block, a
    data-parallel replica) draws exactly its rows of the full-batch noise and nothing else, so
    splitting the batch never changes the math and costs no extra random numbers.
    """

    def __init__(self, seed: int, block: int, step: int, rows: slice, device: torch.device) -> None:
        start, stop = rows.start, rows.stop
        if start % NOISE_CHUNK_ROWS:
            raise ValueError(f"noise rows must start on a multiple of {NOISE_CHUNK_ROWS}, got {start}")
        self.chunks = [
            (min(NOISE_CHUNK_ROWS, stop - first), noise_generator(seed, block, step, first // NOISE_CHUNK_ROWS, device))
            for first in range(start, stop, NOISE_CHUNK_ROWS)
        ]

    def draw(self, samples: int, x: Tensor, y: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        """dx (K×rows×x-shape) and dy (K×rows×y-shape) for the next iteration, scaled by sigma."""
        dx, dy = [], []
        for rows, gen in self.chunks:
            dx.append(torch.randn((samples, rows, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype))
            dy.append(torch.randn((samples, rows, *y.shape[1:]), generator=gen, device=y.device, dtype=y.dtype))
        return sigma * torch.cat(dx, 1), sigma * torch.cat(dy, 1)
