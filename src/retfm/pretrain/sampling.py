"""Random draws for one process's share of a data-parallel batch.

With DDP each process holds ``b`` rows of a global batch of ``b * world`` images. Every process draws the random
numbers of the whole global batch, in the same order, and keeps its own rows: masks and noise are then exactly
those one process with the global batch would draw, and every process's generator stays in step with the others'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BatchShard:
    rank: int = 0
    world: int = 1

    @property
    def holds_last(self) -> bool:
        """Whether this process holds the global batch's last image."""
        return self.rank == self.world - 1

    def rand(self, b: int, *shape: int, device=None, dtype=None) -> Tensor:
        return self._own_rows(torch.rand(b * self.world, *shape, device=device, dtype=dtype), b)

    def randn(self, b: int, *shape: int, device=None, dtype=None) -> Tensor:
        return self._own_rows(torch.randn(b * self.world, *shape, device=device, dtype=dtype), b)

    def _own_rows(self, values: Tensor, b: int) -> Tensor:
        return values[self.rank * b:(self.rank + 1) * b]
