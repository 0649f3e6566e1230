"""Per-sample random streams: the noise of sample i depends only on (seed, i), never on the batch.

Like EDM's StackedRandomGenerator: one torch.Generator per sample; samplers call
``generator.randn_like(x)`` for every fresh noise draw. Calling B generators for every small
draw would dominate a toy sampler's run time, so each sample's stream is drawn in blocks whose
size depends only on the per-sample shape, then served slice by slice: still a function of
(seed, i, shape) alone.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["SampleGenerators", "sample_seed"]


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of run ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _BlockStream:
    """Serves [B, n] draws from per-sample blocks of one distribution (randn or rand)."""

    def __init__(self, generators: list[torch.Generator], draw):
        self.generators, self.draw = generators, draw
        self.buffer, self.pos = None, 0

    def take(self, n: int, dtype) -> torch.Tensor:
        block = min(max(32 * n, 1024), 1 << 16)
        if n > block:
            return torch.stack([self.draw(n, g, dtype) for g in self.generators])
        if self.buffer is None or self.buffer.dtype != dtype or self.buffer.shape[1] != block or self.pos + n > block:
            self.buffer = torch.stack([self.draw(block, g, dtype) for g in self.generators])
            self.pos = 0
        out = self.buffer[:, self.pos : self.pos + n]
        self.pos += n
        return out


class SampleGenerators:
    """One random stream per sample index; draws are stacked along the batch dimension."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.seed, self.indices, self.device = seed, list(indices), torch.device(device)
        generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]
        self._normal = _BlockStream(generators, lambda n, g, dt: torch.randn(n, generator=g, dtype=dt))
        self._uniform = _BlockStream(generators, lambda n, g, dt: torch.rand(n, generator=g, dtype=dt))

    def __len__(self) -> int:
        return len(self.indices)

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """[B, *shape] standard normal draws."""
        return self._to_device(self._normal.take(math.prod(shape), dtype).reshape(len(self), *shape))

    def rand(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """[B, *shape] uniform draws in [0, 1)."""
        return self._to_device(self._uniform.take(math.prod(shape), dtype).reshape(len(self), *shape))

    def _to_device(self, draws: torch.Tensor) -> torch.Tensor:
        """On CUDA: a pinned copy sent asynchronously (a blocking copy would synchronise every
        stochastic sampler step)."""
        if self.device.type == "cuda":
            return draws.pin_memory().to(self.device, non_blocking=True)
        return draws.to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def rand_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.rand(x.shape[1:], dtype=x.dtype).to(x.device)
