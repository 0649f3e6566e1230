"""Time embeddings shared by the built-in networks."""
from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017; DDPM's time embedding): t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def time_input(process, t: torch.Tensor) -> torch.Tensor:
    """The scalar a network embeds for process time t [B]: mapped onto ~[0, 1000] so one
    sinusoidal embedding serves step indices (VP discrete), t ∈ [0, 1] (VP continuous, flow)
    and σ (EDM: 250·log σ, a scaled version of EDM's c_noise = ¼ log σ)."""
    if process.name == "edm":
        return 250.0 * torch.log(t.clamp(min=1e-5))
    return t * (1000.0 / max(process.t_max, 1.0))
