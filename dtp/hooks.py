"""What a process hands the maths about how it computes: its autocast context and its part of a block.

These are plain types with no behaviour, kept below every layer that uses them, so that the maths
(dtp.algorithm), the runtime and the parallel layout can each name them without importing one another.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

Autocast = Callable[[], AbstractContextManager]
AllReduce = Callable[[list[Tensor]], None]  # sums tensors in place over the processes sharing a block


@dataclass(frozen=True)
class BlockShard:
    """The rows of the full batch a process trains one feedback block on, and the sum over the parts.

    `batch_total` is the full batch's row count, which each part's loss is a share of (None: `rows` are it).
    """

    rows: slice
    all_reduce: AllReduce | None = None
    batch_total: int | None = None
