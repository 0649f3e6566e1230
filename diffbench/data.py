"""What a dataset plugin returns: a :class:`DataSource`.

A source either holds a finite tensor of examples (digits, an image folder, a text corpus)
or can draw fresh ones (toy distributions). Either way it offers a deterministic training
set and a held-out reference set that metrics compare generated samples against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffbench.gmm import GaussianMixture

__all__ = ["DataSource"]

TRAIN_SEED, REFERENCE_SEED = 0, 12345


@dataclass
class DataSource:
    name: str
    modality: str  # "points" | "image" | "text"
    shape: tuple[int, ...]  # one sample's shape, e.g. (2,), (3, 32, 32), (seq_len,)
    # Either a sampler `draw(n, generator) -> (x [n, *shape], labels [n] | None)` ...
    draw: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    # ... or a finite set of examples (split deterministically into train / reference).
    examples: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    num_classes: int = 0  # > 0 for class-labelled data
    mixture: GaussianMixture | None = None  # closed form, when the data is a Gaussian mixture
    log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None  # exact density, if known
    info: dict[str, Any] = field(default_factory=dict)  # modality-specific extras (vocab, ...)

    def __post_init__(self):
        if (self.draw is None) == (self.examples is None):
            raise ValueError(f"dataset {self.name!r}: give exactly one of draw or examples")

    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference indices, training indices) of a finite set: a fixed permutation split in half
        when the reference is held out, else the whole permutation for both."""
        perm = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(TRAIN_SEED))
        if not self.reference_is_held_out:
            return perm, perm
        half = len(self.examples) // 2
        return perm[:half], perm[half:]

    def train_set(self, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training examples: n fresh draws, or the finite set minus its reference half."""
        if self.draw is not None:
            return self.draw(n, torch.Generator().manual_seed(TRAIN_SEED))
        return self._take(self._split()[1])

    def reference(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n held-out reference examples (deterministic); fewer if the finite set is smaller."""
        if self.draw is not None:
            return self.draw(n, torch.Generator().manual_seed(REFERENCE_SEED))
        return self._take(self._split()[0][:n])

    @property
    def reference_is_held_out(self) -> bool:
        """Finite sets of at least 1000 examples keep half out of training for metrics."""
        return self.examples is not None and len(self.examples) >= 1000

    def _take(self, idx: torch.Tensor):
        return self.examples[idx], (self.labels[idx] if self.labels is not None else None)
