"""The ``dit`` model: Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), following the reference ``models.py``: patchify, fixed 2-D sin-cos position
embedding, adaLN-Zero blocks conditioned on time + class (with a null class for classifier-free
guidance), and a linear decoder back to patches. Configs are the paper's DiT-{S,B,L,XL}/{2,4,8}
(Table 1) plus tiny ones for the shipped checkpoints. Attention runs through
:func:`diffbench.nn.attention.attention`.
"""
from __future__ import annotations


import torch
from torch import nn

import diffbench
from diffbench.nn.attention import CrossAttention, attention
from diffbench.nn.embeddings import time_input
from diffbench.nn.layers import TimeClassEmbedding, modulate, zero_module
from diffbench_plugins.image_model import ImageModelPlugin


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """[grid², dim]: half the channels encode the row, half the column (MAE / DiT)."""
    def one_axis(d, pos):  # pos [L] -> [L, d]
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos[:, None].double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    # DiT's get_2d_sincos_pos_embed uses the width index for the first half (grid[0] = w).
    return torch.cat([one_axis(dim // 2, xs.flatten()), one_axis(dim // 2, ys.flatten())], dim=1).float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the conditioning (adaLN) and
    whose residual branches are gated by a zero-initialised scale (adaLN-Zero, §3.2). With
    ``context_dim`` > 0, cross-attention to the text tokens sits between self-attention and the MLP,
    unmodulated, as in PixArt-α (Chen et al. 2023, §2.3)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, context_dim: int = 0):
        super().__init__()
        self.heads = heads
        self.cross = CrossAttention(hidden, context_dim, heads) if context_dim else None
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))
        self.adaLN_modulation = zero_module(nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden)))

    def forward(self, x, c, context=None):
        b, n, d = x.shape  # x [B, N, D], c [B, D], context [B, M, context_dim] | None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.qkv(modulate(self.norm1(x), shift_msa, scale_msa))  # [B, N, 3D]
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # each [B, H, N, D/H]
        attn = attention(q, k, v).transpose(1, 2).reshape(b, n, d)  # [B, N, D]
        x = x + gate_msa[:, None] * self.proj(attn)
        if self.cross is not None:
            x = x + self.cross(x, context)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = zero_module(nn.Linear(hidden, patch * patch * out_channels))
        self.adaLN_modulation = zero_module(nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, p·p·C_out]


class DiT(nn.Module):
    """x [B, C, H, W], t [B] (process time), cond [B] | None -> [B, C_out, H, W]."""

    def __init__(self, in_channels: int, input_size: int, process, *, patch: int = 2, hidden: int = 1152,
                 depth: int = 28, heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 0,
                 learn_sigma: bool = False, context_dim: int = 0):
        super().__init__()
        if input_size % patch:
            raise ValueError(f"DiT: input size {input_size} is not divisible by patch size {patch}")
        self.process, self.patch, self.in_channels = process, patch, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grid = input_size // patch
        self.x_embedder = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        self.embed = TimeClassEmbedding(256, hidden, num_classes)  # DiT's t_embedder + y_embedder
        self.register_buffer("pos_embed", sincos_pos_embed(hidden, self.grid)[None], persistent=False)  # [1, N, D]
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, context_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch, self.out_channels)
        self._init_weights()

    def _init_weights(self):
        # DiT's initialize_weights: xavier-uniform linears (adaLN / output stay zero), N(0, 0.02) embeddings.
        for block in self.blocks:
            for lin in (block.qkv, block.proj, block.mlp[0], block.mlp[2]):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for lin in (self.embed.mlp[0], self.embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.embed.classes is not None:
            nn.init.normal_(self.embed.classes.weight, std=0.02)

    def unpatchify(self, x):
        b, p, g, c = x.shape[0], self.patch, self.grid, self.out_channels
        x = x.reshape(b, g, g, p, p, c)  # [B, gh, gw, p, p, C]
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)  # [B, C, H, W]

    def forward(self, x, t, cond=None, context=None):
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D], N = (H/p)²
        c = self.embed(time_input(self.process, t), cond)  # [B, D]
        for block in self.blocks:
            h = block(h, c, context)  # [B, N, D]
        out = self.unpatchify(self.final_layer(h, c))  # [B, C_out, H, W]
        return out[:, : self.in_channels] if self.out_channels != self.in_channels else out


# The paper's model sizes (Table 1) × patch sizes 2/4/8; tiny ones for the shipped checkpoints.
_SIZES = {"S": dict(depth=12, hidden=384, heads=6), "B": dict(depth=12, hidden=768, heads=12),
          "L": dict(depth=24, hidden=1024, heads=16), "XL": dict(depth=28, hidden=1152, heads=16)}
DIT_CONFIGS = {f"DiT-{size}/{patch}": dict(patch=patch, **dims) for size, dims in _SIZES.items() for patch in (2, 4, 8)}
DIT_CONFIGS |= {
    "DiT-tiny/2": dict(patch=2, depth=4, hidden=64, heads=4),
    "DiT-tiny/4": dict(patch=4, depth=4, hidden=96, heads=4),
}


def build_dit(config: str, in_channels: int, resolution: int, process, num_classes: int, learn_sigma: bool = False,
              context_dim: int = 0) -> DiT:
    return DiT(in_channels, resolution, process, num_classes=num_classes, learn_sigma=learn_sigma,
               context_dim=context_dim, **DIT_CONFIGS[config])


DIT_PLUGIN = ImageModelPlugin(
    name="dit", configs=DIT_CONFIGS, build=build_dit,
    dataset_defaults={"digits": "DiT-tiny/2", "shapes": "DiT-tiny/4"}, fallback_config="DiT-S/4",
    train_defaults={"digits": {"steps": 1000, "batch_size": 128, "lr": 1e-3},
                    "shapes": {"steps": 700, "batch_size": 32, "lr": 1e-3}},
    # v-prediction on shapes: an ε-model's x̂0 = (x − σ ε̂) / α is noise at low SNR (σ/α ≈ 150 at
    # t ≈ T), and clipping it to [-1, 1] greys the background; v predicts x̂0 there directly
    # (Salimans & Ho 2022, §4; docs/checkpoints.md).
    dataset_options={"shapes": {"parameterization": "v"}},
    run_datasets=("digits",),  # as the U-Net: shapes cells are slow on CPU
)


@diffbench.hookimpl
def register_models(register):
    DIT_PLUGIN.register(register, "Diffusion Transformer (adaLN-Zero), DiT-S/B/L/XL with patch 2/4/8 and tiny configs; "
                                  "class-conditional with a null class for CFG; shipped for digits (ε-prediction) "
                                  "and shapes (v)")
