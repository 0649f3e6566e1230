"""Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"): ``ldm-unet`` and ``ldm-dit`` are the ``unet`` and ``dit`` backbones trained on the
scaled latents z = scaling_factor · E(x) of a :mod:`~diffbench_plugins.vae` autoencoder.

The host sees an ordinary Gaussian :class:`~diffbench.denoiser.Denoiser` over latents, so every
sampler and every guidance runs unchanged; the denoiser also carries a :class:`LatentDecoder`
(``denoiser.decoder``), which the runner applies to the sampled latents before the metrics,
timed apart from sampling (column ``decode_ms``), inside the same peak-memory window, and whose
``info`` (autoencoder, scaling factor) goes into the row.

On a captioned dataset (``shapes-text``) the backbone gets cross-attention to a
:class:`~diffbench_plugins.text_encoder.TextEncoder` trained with it (option ``text_cond``);
caption dropout (the empty caption) makes ``cfg:<w>`` work on text as on labels. Defaults:
v-prediction (Salimans & Ho 2022), which behaves at t ≈ T where an unclipped ε-model's x̂0 blows
up (latents have no data range to clip to).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import diffbench
from diffbench.data import DataSource
from diffbench.process import make_process
from diffbench.registry import Incompatible
from diffbench_plugins.dit import DIT_CONFIGS, build_dit
from diffbench_plugins.image_model import ImageModelPlugin
from diffbench_plugins.text_encoder import TextConditioned
from diffbench_plugins.unet import UNET_CONFIGS, build_unet
from diffbench_plugins.vae import load_autoencoder

TEXT_DIM = 64  # width of the text encoder's tokens (the backbones' context_dim)


@dataclass
class LatentDecoder:
    """Latents -> images: x = D(z / scaling_factor). ``latent_shape`` is what samplers start from."""

    decode: Callable[[torch.Tensor], torch.Tensor]
    scaling_factor: float
    latent_shape: tuple[int, ...]
    info: dict  # columns for the result row

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z / self.scaling_factor)


def latent_view(dataset: DataSource, autoencoder, scaling_factor: float) -> DataSource:
    """``dataset`` as the diffusion model sees it: shape (z, H/f, W/f), the same labels, classes and
    captions. Its training set is the scaled posterior means of the image training set, encoded
    when first asked for (loading a model needs only the shape)."""

    def training_latents(n, generator):  # a fixed set: n and generator do not apply
        x, labels = dataset.train_set()
        with torch.no_grad():
            z = torch.cat([autoencoder.encode(batch)[0] for batch in x.split(256)])
        return scaling_factor * z, labels

    c, h, w = dataset.shape
    f = autoencoder.factor
    if c != autoencoder.in_channels or h % f or w % f:
        raise Incompatible(f"the autoencoder takes {autoencoder.in_channels}-channel images with sides divisible by {f}; "
                           f"{dataset.name!r} has {'×'.join(map(str, dataset.shape))}")
    return DataSource(name=dataset.name, modality="image", shape=(autoencoder.z_channels, h // f, w // f),
                      draw=training_latents, num_classes=dataset.num_classes, info=dataset.info)


@dataclass
class LatentModelPlugin(ImageModelPlugin):
    """:class:`ImageModelPlugin` on the latent view of the dataset, text-conditioned on captions."""

    def options(self) -> dict:
        return {**super().options(), "parameterization": "v", "clip_denoised": False, "autoencoder": "vae-shapes",
                "text_cond": True}

    def network(self, dataset, opts: dict):
        captions = dataset.info.get("captions") if opts["text_cond"] else None
        if not captions:
            return super().network(dataset, opts)
        process = make_process(opts["process"])
        backbone = self.build(opts["config"], dataset.shape[0], dataset.shape[-1], process, 0, context_dim=TEXT_DIM)
        return TextConditioned(backbone, list(captions), TEXT_DIM), process, len(captions)

    def _autoencoder(self, options: dict, device):
        return load_autoencoder(options.get("autoencoder", self.options()["autoencoder"]), device)

    def load(self, dataset, *, device="cpu", **options):
        autoencoder, scale = self._autoencoder(options, device)
        latents = latent_view(dataset, autoencoder, scale)
        denoiser = super().load(latents, device=device, **options)
        denoiser.dataset_name = ""  # no pixel-space noisy classifier applies to latents
        denoiser.decoder = LatentDecoder(autoencoder.decode, scale, latents.shape,
                                         {"autoencoder": options.get("autoencoder", self.options()["autoencoder"]),
                                          "latent_scale": scale})
        return denoiser

    def train(self, dataset, out=None, *, device="cpu", **options):
        autoencoder, scale = self._autoencoder(options, "cpu")
        return super().train(latent_view(dataset, autoencoder, scale), out, device=device, **options)


# On shapes, the pixel models' budgets (steps × batch of unet-shapes and dit-shapes), for a matched comparison.
LDM_UNET = LatentModelPlugin(name="ldm-unet", configs=UNET_CONFIGS, build=build_unet, dataset_defaults={},
                             fallback_config="ldm-tiny",
                             train_defaults={"shapes": {"steps": 1400, "batch_size": 32, "lr": 2e-3},
                                             "shapes-text": {"steps": 1500, "batch_size": 64, "lr": 2e-3}})
LDM_DIT = LatentModelPlugin(name="ldm-dit", configs=DIT_CONFIGS, build=build_dit, dataset_defaults={},
                            fallback_config="DiT-tiny/2",
                            train_defaults={"shapes": {"steps": 700, "batch_size": 32, "lr": 1e-3},
                                            "shapes-text": {"steps": 1500, "batch_size": 64, "lr": 2e-3}})


@diffbench.hookimpl
def register_models(register):
    LDM_UNET.register(register, "latent diffusion: the U-Net on vae latents (decoded before metrics); text "
                                "cross-attention on captioned data, class-conditional otherwise")
    LDM_DIT.register(register, "latent diffusion: DiT on vae latents (decoded before metrics); PixArt-style text "
                               "cross-attention on captioned data, class-conditional otherwise")
