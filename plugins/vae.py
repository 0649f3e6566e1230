"""The ``vae`` autoencoder: a KL-regularised convolutional autoencoder in the style of the LDM /
Stable Diffusion ``AutoencoderKL`` (Rombach et al. 2022, §3 and App. G), small enough to train here.

Encoder: conv, then per level ResNet blocks and a stride-2 conv (factor 2^(levels−1)), a middle
ResNet–self-attention–ResNet stage, GroupNorm-SiLU-conv to the mean and log-variance of a diagonal
Gaussian q(z|x) with ``z_channels`` channels. The decoder mirrors it with nearest upsampling.
Loss: squared reconstruction error (LDM uses L1 + perceptual + GAN terms; see :func:`vae_loss`) plus
``kl_weight`` · KL(q(z|x) ‖ N(0, I)) per latent element: a small weight, so q stays near
deterministic and the latent space only loosely Gaussian.

The latent scaling factor 1/std(z) over the training set (Stable Diffusion's 0.18215) is measured
after training and stored in the checkpoint's JSON, so the diffusion model sees unit-variance
latents. ``diffbench train --model vae --dataset shapes`` trains one; the latent models
(:mod:`diffbench_plugins.latent`) load it with :func:`load_autoencoder`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import diffbench
from diffbench.checkpoints import checkpoint_name, load_checkpoint, locate_checkpoint, save_checkpoint, training_output
from diffbench.nn.attention import attention
from diffbench.nn.layers import zero_module
from diffbench.registry import Incompatible, Model, Option
from diffbench.training import TrainConfig, half_precision_weights, train

VAE_CONFIGS = {
    "tiny-f4": dict(channels=16, channel_mult=(1, 2, 2), z_channels=4),  # 32×32×3 -> 8×8×4
    "small-f4": dict(channels=64, channel_mult=(1, 2, 2), z_channels=4),
    "small-f8": dict(channels=64, channel_mult=(1, 2, 2, 4), z_channels=4),  # SD's factor 8
}


def norm(channels: int) -> nn.Module:
    """Where LDM puts GroupNorm(32), none: on a flat-coloured shape on black, a feature map is
    colour × mask, and a per-sample normalisation divides the colour out (it erases the amplitude
    the decoder must reproduce; the untrained-for-colour VAE gave grey shapes). Shallow enough
    to train without it."""
    return nn.Identity()


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual (LDM's ResnetBlock without the time embedding)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  norm(cout), nn.SiLU(), zero_module(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over the H·W positions (LDM's AttnBlock in the middle stage)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)  # [B, 1, L, C]
        return x + self.proj(attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w))


def middle(ch: int) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(ch, ch), SelfAttention(ch), ResnetBlock(ch, ch))


def head(ch: int, cout: int) -> nn.Sequential:
    return nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, cout, 3, padding=1))


class AutoencoderKL(nn.Module):
    """encode(x [B, C, H, W]) -> (mean, logvar) [B, z, H/f, W/f]; decode(z) -> [B, C, H, W]; f = 2^(levels−1)."""

    def __init__(self, in_channels: int = 3, *, channels: int = 32, channel_mult=(1, 2, 2), z_channels: int = 4):
        super().__init__()
        self.in_channels, self.z_channels, self.factor = in_channels, z_channels, 2 ** (len(channel_mult) - 1)
        widths = [channels * m for m in channel_mult]
        down, ch = [nn.Conv2d(in_channels, channels, 3, padding=1)], channels
        for level, w in enumerate(widths):
            down.append(ResnetBlock(ch, w))
            ch = w
            if level < len(widths) - 1:
                down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        moments = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)  # LDM's quant_conv: -> (mean, log-variance)
        with torch.no_grad():  # start with σ ≈ 0.05: at σ = 1 the decoder first learns to ignore z (grey blobs)
            moments.bias[z_channels:] = -6.0
        self.encoder = nn.Sequential(*down, middle(ch), head(ch, 2 * z_channels), moments)
        up = [nn.Conv2d(z_channels, z_channels, 1), nn.Conv2d(z_channels, ch, 3, padding=1), middle(ch)]
        for level, w in reversed(list(enumerate(widths))):
            up.append(ResnetBlock(ch, w))
            ch = w
            if level > 0:
                up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        self.decoder = nn.Sequential(*up, head(ch, in_channels))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # each [B, z, H/f, W/f]
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # [B, C, H, W]


def vae_loss(model: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """MSE(x, decode(z)) + kl_weight · KL(N(μ, σ²) ‖ N(0, I)), z = μ + σ ε (reparameterisation,
    Kingma & Welling 2014); both terms averaged per element. Squared error, not LDM's L1: on images
    that are ~95% black, L1's unit-size sign gradients on tiny background errors drown the colour
    errors of the shape (the L1-trained VAE reconstructed every shape grey)."""
    mean, logvar = model.encode(x)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=x.device)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)
    return ((model.decode(z) - x) ** 2).mean() + kl_weight * kl.mean()


@torch.no_grad()
def latent_std(model: AutoencoderKL, x: torch.Tensor, seed: int = 0) -> float:
    """std of sampled latents z ~ q(z|x) over x (SD measured 1/0.18215 this way)."""
    g = torch.Generator().manual_seed(seed)
    zs = []
    for batch in x.split(256):
        mean, logvar = model.encode(batch)
        zs.append(mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g))
    return float(torch.cat(zs).std())


@torch.no_grad()
def reconstruct(model: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """decode(mean of q(z|x)), clipped to [-1, 1], in batches of 256."""
    return torch.cat([model.decode(model.encode(b)[0]).clamp(-1, 1) for b in x.split(256)])


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), mean MSE over the set."""
    return 10 * math.log10(4.0 / float(((x - y) ** 2).mean()))


def load_autoencoder(name: str, device="cpu") -> tuple[AutoencoderKL, float]:
    """(autoencoder, latent scaling factor); Incompatible with the train command if missing."""
    explicit = "/" in name  # a path rather than a checkpoint name (vae-shapes: user cache, then shipped)
    path = locate_checkpoint(name, explicit=name if explicit else "",
                             train_hint="diffbench train --model vae --dataset DATASET (writes vae-DATASET)")
    weights, saved = load_checkpoint(path, device)
    m = saved["model"]
    net = AutoencoderKL(m["in_channels"], **VAE_CONFIGS[m["config"]])
    net.load_state_dict(weights)
    return net.to(device).eval().requires_grad_(False), float(saved["scaling_factor"])


def train_vae(dataset, out=None, *, device="cpu", config: str = "tiny-f4", kl_weight: float = 1e-4, steps: int = 800,
              batch_size: int = 32, lr: float = 2e-3, seed: int = 0, progress: bool = True, **options) -> Path:
    """Train on the dataset's training set; writes weights (float16) and {model, train, scaling_factor}."""
    if options:
        raise Incompatible(f"vae: unknown options {', '.join(options)}; valid: config, kl_weight, steps, batch_size, lr, seed")
    if dataset.modality != "image":
        raise Incompatible(f"vae encodes images; {dataset.name!r} is {dataset.modality}")
    x, _ = dataset.train_set()
    net = AutoencoderKL(x.shape[1], **VAE_CONFIGS[config])
    out = training_output(checkpoint_name("vae", dataset.name, {"config": config}, {"config": "tiny-f4"}), out)
    cfg = TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=float(lr), seed=int(seed), ema_decay=0.995,
                      checkpoint_every=250)
    record = {"dataset": dataset.name, "config": config, "in_channels": x.shape[1], "kl_weight": float(kl_weight)}
    ema = train(net, lambda model, batch, _, g: vae_loss(model, batch, kl_weight, g), x, None, out, record, cfg,
                device=device, progress=progress)
    ema = ema.cpu()
    scaling = 1.0 / latent_std(ema, x)
    save_checkpoint(out, half_precision_weights(ema), load_checkpoint(out)[1] | {"scaling_factor": scaling})
    return out.with_suffix(".safetensors")


def load_not_generative(dataset, **options):
    raise Incompatible("vae is an autoencoder, not a generative model: benchmark ldm-unet or ldm-dit, "
                       "which sample in its latent space")


@diffbench.hookimpl
def register_models(register):
    register(Model(name="vae", family="gaussian", load=load_not_generative, train=train_vae,
                   options={"config": Option("tiny-f4", choices=tuple(VAE_CONFIGS)), "kl_weight": Option(1e-4, min=0.0),
                            "steps": Option(800, min=1), "batch_size": Option(32, min=1), "lr": Option(2e-3, min=0.0)},
                   description="KL autoencoder (LDM AutoencoderKL style) for latent diffusion; train only "
                               "(diffbench train --model vae), its latents feed ldm-unet / ldm-dit"))
