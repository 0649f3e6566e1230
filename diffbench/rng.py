"""Per-sample random streams: the noise of sample i depends only on (seed, i), never on the batch.

Like EDM's StackedRandomGenerator: one torch.Generator per sample; samplers call
``generator.randn_like(x)`` for every fresh noise draw.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of run ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SampleGenerators:
    """One generator per sample index; draws are stacked along the batch dimension."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.seed, self.indices, self.device = seed, list(indices), torch.device(device)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """[B, *shape] standard normal draws."""
        draws = [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(draws).to(self.device)

    def rand(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """[B, *shape] uniform draws in [0, 1)."""
        draws = [torch.rand(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(draws).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def rand_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.rand(x.shape[1:], dtype=x.dtype).to(x.device)
