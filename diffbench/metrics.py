"""What a metric plugin receives besides the samples."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffbench.data import DataSource

__all__ = ["MetricContext"]


@dataclass
class MetricContext:
    dataset: DataSource
    reference: torch.Tensor  # held-out real examples [M, *shape]
    reference_labels: torch.Tensor | None
    labels: torch.Tensor | None  # class labels the samples were generated for ([N]), if conditional
    denoiser: Any  # the (unguided) model, for likelihood metrics
    device: torch.device
    seed: int
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "diffbench")
    # What a metric adds to the row besides its values: informational columns (a protocol, a
    # confidence interval; ``compare`` reads ``<column>_ci95``), and warnings (the ``warnings`` column).
    columns: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    memo: dict[str, Any] = field(default_factory=dict)  # work metrics of one cell share (e.g. features)
