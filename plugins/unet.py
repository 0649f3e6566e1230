"""The ``unet`` model: the DDPM / ADM U-Net (Ho et al. 2020, App. B; Dhariwal & Nichol 2021, §3).

ResNet blocks with GroupNorm, a sinusoidal time embedding through an MLP (plus an optional class
embedding with a null class for classifier-free guidance), self-attention at chosen resolutions
(through :func:`diffbench.nn.attention.attention`), and skip connections between encoder and
decoder at matching resolutions. Sizes are named configs (``UNET_CONFIGS``); ``ddpm-cifar10`` is
the 35.7M-parameter network of the DDPM paper.

Loading, training and checkpoints are :class:`~diffbench_plugins.image_model.ImageModelPlugin`'s,
shared with ``dit``, ``flow-unet`` and ``consistency-unet``.
"""
from __future__ import annotations

import torch
from torch import nn

import diffbench
from diffbench.nn.attention import CrossAttention, attention
from diffbench.nn.embeddings import time_input
from diffbench.nn.layers import TimeClassEmbedding, group_norm, zero_module
from diffbench_plugins.image_model import ImageModelPlugin


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time(+class) embedding injected in between: added
    (DDPM) or as a GroupNorm scale and shift (ADM's "scale-shift norm")."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(group_norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout if scale_shift else cout))
        self.norm = group_norm(cout, groups)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)  # [B, Cout, H, W]
        e = self.emb(emb)[:, :, None, None]  # [B, Cout or 2 Cout, 1, 1]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm(h) * (1 + scale) + shift
        else:
            h = self.norm(h + e)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, residual, with a zero-initialised output."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)  # [B, 3, H, D, L]
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, L, D]
        out = attention(q, k, v)  # [B, heads, L, D]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class TextAttentionBlock(nn.Module):
    """Cross-attention from the H·W positions to text tokens, residual (the cross-attention layer of
    LDM's SpatialTransformer, Rombach et al. 2022 §3.3): x [B, C, H, W], context [B, M, context_dim]."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.cross = CrossAttention(channels, context_dim, heads)

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, H·W, C]
        return x + self.cross(tokens, context).transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """x [B, C, H, W], t [B] (process time), cond [B] | None -> [B, C, H, W]. With ``context_dim``
    > 0, every attention layer is followed by cross-attention to ``context`` [B, M, context_dim]."""

    def __init__(self, in_channels: int, resolution: int, process, *, channels: int = 128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks: int = 2, attention_resolutions=(16,), heads: int = 1, dropout: float = 0.0,
                 groups: int = 32, scale_shift: bool = False, num_classes: int = 0, context_dim: int = 0):
        super().__init__()
        self.process = process
        emb_dim = 4 * channels
        self.embed = TimeClassEmbedding(channels, emb_dim, num_classes)
        block = lambda cin, cout: ResBlock(cin, cout, emb_dim, dropout, groups, scale_shift)  # noqa: E731

        def attn(c):  # self-attention, then cross-attention to the text when there is one
            return [AttentionBlock(c, heads, groups)] + ([TextAttentionBlock(c, context_dim, heads, groups)]
                                                         if context_dim else [])

        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch, res = [channels], channels, resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [block(ch, mult * channels)]
                ch = mult * channels
                if res in attention_resolutions:
                    layers.extend(attn(ch))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_channels.append(ch)
                res //= 2
        self.middle = nn.ModuleList([block(ch, ch), *attn(ch), block(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [block(ch + skip_channels.pop(), mult * channels)]
                ch = mult * channels
                if res in attention_resolutions:
                    layers.extend(attn(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
                    res *= 2
                self.up.append(nn.ModuleList(layers))
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), zero_module(nn.Conv2d(ch, in_channels, 3, padding=1)))

    @staticmethod
    def _run(layers, h, emb, context):
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, TextAttentionBlock):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def forward(self, x, t, cond=None, context=None):
        emb = self.embed(time_input(self.process, t), cond)  # [B, 4·ch]
        h = self.stem(x)  # [B, ch, H, W]
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb, context)
            skips.append(h)
        h = self._run(self.middle, h, emb, context)  # [B, ch·mult[-1], H / 2^(levels-1), ...]
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)  # [B, C, H, W]


# Named configs (DiT-style dict of factories' arguments). ddpm-cifar10: Ho et al. 2020 App. B
# (35.7M parameters); adm-cifar10-like: ADM's improvements (scale-shift norm, more heads,
# attention at 16 and 8). The tiny ones are the shipped checkpoints' networks.
UNET_CONFIGS = {
    "ddpm-cifar10": dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                         heads=1, dropout=0.1, groups=32, scale_shift=False),
    "adm-small": dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8),
                      heads=4, dropout=0.1, groups=32, scale_shift=True),
    "small": dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,),
                  heads=4, groups=32, scale_shift=True),
    "tiny": dict(channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(8,),
                 heads=2, groups=8, scale_shift=True),
    "tiny-8px": dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                     heads=2, groups=8, scale_shift=True),
    # ldm-unet on 8×8×4 latents: self- and text cross-attention at 4×4 and in the middle.
    "ldm-tiny": dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                     heads=2, groups=8, scale_shift=True),
}


def build_unet(config: str, in_channels: int, resolution: int, process, num_classes: int, context_dim: int = 0) -> UNet:
    return UNet(in_channels, resolution, process, num_classes=num_classes, context_dim=context_dim, **UNET_CONFIGS[config])


UNET_PLUGIN = ImageModelPlugin(
    name="unet", configs=UNET_CONFIGS, build=build_unet,
    dataset_defaults={"digits": "tiny-8px", "shapes": "tiny"}, fallback_config="small",
    train_defaults={"digits": {"steps": 1500, "batch_size": 128, "lr": 2e-3},
                    "shapes": {"steps": 700, "batch_size": 32, "lr": 2e-3}},
    # v-prediction on shapes: an ε-model's x̂0 = (x − σ ε̂) / α is noise at low SNR (σ/α ≈ 150 at
    # t ≈ T), and clipping it to [-1, 1] greys the background; v predicts x̂0 there directly
    # (Salimans & Ho 2022, §4; docs/checkpoints.md).
    dataset_options={"shapes": {"parameterization": "v"}},
    # By default digits only: a shapes cell (32×32) costs ~15× a digits cell on CPU (84 s vs 6 s per
    # 500-sample batch at 50 steps), which would take the default grid past a few minutes. --datasets shapes runs it.
    run_datasets=("digits",),
)


@diffbench.hookimpl
def register_models(register):
    UNET_PLUGIN.register(register, "DDPM/ADM U-Net (ResNet blocks, GroupNorm, attention, skips); class-conditional "
                                   "with a null class for CFG; shipped for digits (ε-prediction) and shapes (v)")
