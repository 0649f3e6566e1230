"""Small layers shared by the built-in image networks (U-Net, DiT, classifiers)."""
from __future__ import annotations

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation (DiT, Peebles & Xie 2023): x [B, L, C] * (1 + scale [B, C]) + shift [B, C]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise a module's parameters, so a residual branch starts as the identity
    (DDPM/ADM's output convolutions; DiT's adaLN-Zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def random_weights(module: nn.Module, seed: int = 0, bias_std: float = 0.02) -> nn.Module:
    """Stand-in weights for timing and agreement runs without a checkpoint, deterministic in
    ``seed`` alone: matrices and kernels from N(0, 1/fan_in) (LeCun init: activations stay O(1)),
    norm scales (vectors of ones) kept, other vectors (biases) from N(0, bias_std²). Unlike a
    fresh init, nothing is zero (adaLN-Zero, output layers), so the output depends on the input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            elif not bool((p == 1).all()):
                p.copy_(torch.randn(p.shape, generator=generator) * bias_std)
    return module


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups, or fewer when the channel count is not divisible."""
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6)


class TimeClassEmbedding(nn.Module):
    """Sinusoidal time embedding through a 2-layer MLP (DDPM), plus an optional class embedding
    with one extra row: the null class (index ``num_classes``) for classifier-free guidance."""

    def __init__(self, freq_dim: int, dim: int, num_classes: int = 0):
        super().__init__()
        self.freq_dim, self.num_classes = freq_dim, num_classes
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.classes = nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, t_in: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """t_in [B] (already mapped by ``time_input``), cond [B] long or None -> [B, dim]."""
        from diffbench.nn.embeddings import timestep_embedding

        emb = self.mlp(timestep_embedding(t_in, self.freq_dim))  # [B, dim]
        if self.classes is not None:
            if cond is None:  # unconditional call: the null class
                cond = torch.full((len(t_in),), self.num_classes, dtype=torch.long, device=t_in.device)
            emb = emb + self.classes(cond.to(t_in.device))
        return emb
