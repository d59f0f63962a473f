"""Generators seeded from integer keys only, e.g. (seed, epoch, batch) or (seed, block, step).

Nothing draws from global RNG state, so a run's randomness does not depend on how it was split
into processes or resumed.
"""
from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*keys))
    return gen
