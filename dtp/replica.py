"""How the training loop sees data-parallel copies of itself: its rows of a batch, and sums over copies.

The loop never maps copies to ranks; under torchrun dtp.parallel.layout.ReplicaGroup does, and a
single process is the one WholeBatch copy.
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor


class DataReplica(Protocol):
    """This process's share of every batch when the training loop runs as several data-parallel copies.

    The loop takes its rows of each batch, sums forward gradients and step statistics over the copies
    and leaves logging, evaluation and checkpoints to the main copy.
    """

    is_main: bool
    copies: int

    def rows(self, batch: int) -> slice:
        """The rows of a batch of `batch` rows this copy trains on."""

    def all_reduce(self, tensors: list[Tensor]) -> None:
        """Sum the tensors in place over all copies."""


class WholeBatch:
    """The one and only copy: all rows, nothing to sum."""

    is_main = True
    copies = 1

    def rows(self, batch: int) -> slice:
        return slice(0, batch)

    def all_reduce(self, tensors: list[Tensor]) -> None:
        pass
