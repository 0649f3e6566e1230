"""The ``unet`` model: the DDPM / ADM U-Net (Ho et al. 2020, App. B; Dhariwal & Nichol 2021, §3).

ResNet blocks with GroupNorm, a sinusoidal time embedding through an MLP (plus an optional class
embedding with a null class for classifier-free guidance), self-attention at chosen resolutions
(through :func:`diffbench.nn.attention.attention`), and skip connections between encoder and
decoder at matching resolutions. Sizes are named configs (``UNET_CONFIGS``); ``ddpm-cifar10`` is
the 35.7M-parameter network of the DDPM paper.

This module also holds :class:`ImageModelPlugin`, the load / train / checkpoint logic shared
with the ``dit`` model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import diffbench
from diffbench.checkpoints import load_checkpoint
from diffbench.denoiser import Denoiser, _per_sample
from diffbench.nn.attention import attention
from diffbench.nn.embeddings import time_input
from diffbench.nn.layers import TimeClassEmbedding, group_norm, random_weights, zero_module
from diffbench.process import make_process
from diffbench.registry import Incompatible, Model
from diffbench.training import TrainConfig, denoising_loss, train, train_command

SHIPPED = Path(__file__).parent / "checkpoints"
USER_CACHE = Path.home() / ".cache" / "diffbench" / "checkpoints"
RANDOM_WEIGHTS = "random"  # option checkpoint=random: untrained stand-in weights, for timing at any size


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


class UNet(nn.Module):
    """x [B, C, H, W], t [B] (process time), cond [B] | None -> [B, C, H, W]."""

    def __init__(self, in_channels: int, resolution: int, process, *, channels: int = 128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks: int = 2, attention_resolutions=(16,), heads: int = 1, dropout: float = 0.0,
                 groups: int = 32, scale_shift: bool = False, num_classes: int = 0):
        super().__init__()
        self.process = process
        emb_dim = 4 * channels
        self.embed = TimeClassEmbedding(channels, emb_dim, num_classes)
        block = lambda cin, cout: ResBlock(cin, cout, emb_dim, dropout, groups, scale_shift)  # noqa: E731
        attn = lambda c: AttentionBlock(c, heads, groups)  # noqa: E731

        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch, res = [channels], channels, resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [block(ch, mult * channels)]
                ch = mult * channels
                if res in attention_resolutions:
                    layers.append(attn(ch))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_channels.append(ch)
                res //= 2
        self.middle = nn.ModuleList([block(ch, ch), attn(ch), block(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [block(ch + skip_channels.pop(), mult * channels)]
                ch = mult * channels
                if res in attention_resolutions:
                    layers.append(attn(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
                    res *= 2
                self.up.append(nn.ModuleList(layers))
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), zero_module(nn.Conv2d(ch, in_channels, 3, padding=1)))

    @staticmethod
    def _run(layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x, t, cond=None):
        emb = self.embed(time_input(self.process, t), cond)  # [B, 4·ch]
        h = self.stem(x)  # [B, ch, H, W]
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)  # [B, ch·mult[-1], H / 2^(levels-1), ...]
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb)
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
}


class ClipDenoised(nn.Module):
    """Wraps a network so that its implied x0 prediction is clipped to the data range [-1, 1], as
    the DDPM reference sampler does (``clip_denoised=True``; diffusers' ``clip_sample``). Without
    it a small ε-model's error at t ≈ T is amplified by σ/α ≈ 150 in x̂0 and ruins the samples."""

    def __init__(self, model: nn.Module, process, parameterization: str):
        super().__init__()
        self.model, self.process, self.parameterization = model, process, parameterization

    def forward(self, x, t, cond=None):
        out = self.model(x, t, cond)
        a, s = (_per_sample(c, x) for c in (self.process.alpha(t.double()), self.process.sigma(t.double())))
        if self.parameterization == "eps":
            x0 = ((x - s * out) / a).clamp(-1, 1)
            return (x - a * x0) / s
        if self.parameterization == "velocity":  # u = α' x0 + σ' ε, x = α x0 + σ ε (any process)
            da, ds = (_per_sample(c, x) for c in self.process.alpha_sigma_derivatives(t.double()))
            x0 = ((s * out - ds * x) / (da * s - ds * a)).clamp(-1, 1)
            return da * x0 + ds * (x - a * x0) / s
        x0 = (a * x - s * out).clamp(-1, 1)  # v = α ε − σ x0 (with α² + σ² = 1)
        return a * (x - a * x0) / s - s * x0




@dataclass
class ImageModelPlugin:
    """Load / train logic shared by the image networks (``unet``, ``dit``).

    ``build(config, in_channels, resolution, process, num_classes) -> nn.Module``. Checkpoints are
    ``<name>-<dataset>[-<config>-<parameterization>-<process>].safetensors`` (suffix only when
    not the dataset's default), in the user cache (``diffbench train``) or shipped with the package.
    """

    name: str
    configs: dict
    build: Callable
    dataset_defaults: dict  # dataset name -> default config name
    fallback_config: str
    train_defaults: dict  # dataset name -> TrainConfig keyword overrides

    def options(self) -> dict:
        return {"config": "", "process": "vp-linear", "parameterization": "eps", "class_cond": True, "checkpoint": "",
                "clip_denoised": True}

    def _resolve(self, dataset, options: dict) -> dict:
        if dataset.modality != "image":
            raise Incompatible(f"{self.name} models images; {dataset.name!r} is {dataset.modality}")
        opts = {**self.options(), **options}
        opts["config"] = opts["config"] or self.dataset_defaults.get(dataset.name, self.fallback_config)
        if opts["config"] not in self.configs:
            raise Incompatible(f"{self.name}: unknown config {opts['config']!r}; valid: {', '.join(self.configs)}")
        if opts["parameterization"] not in ("eps", "v", "velocity"):
            raise Incompatible(f"{self.name}: parameterization must be eps, v or velocity, "
                               f"got {opts['parameterization']!r}")
        return opts

    def checkpoint_path(self, dataset_name: str, opts: dict) -> Path:
        keys, base = ("parameterization", "process", "class_cond"), self.options()
        default = (opts["config"] == self.dataset_defaults.get(dataset_name, self.fallback_config)
                   and all(opts[k] == base[k] for k in keys))
        stem = f"{self.name}-{dataset_name}" + ("" if default else
                                                f"-{opts['config'].replace('/', '')}-{opts['parameterization']}-"
                                                f"{opts['process']}" + ("" if opts["class_cond"] else "-uncond"))
        for root in (USER_CACHE, SHIPPED):
            if (root / f"{stem}.safetensors").exists():
                return root / stem
        return USER_CACHE / stem

    def network(self, dataset, opts: dict):
        process = make_process(opts["process"])
        num_classes = dataset.num_classes if opts["class_cond"] else 0
        channels, resolution = dataset.shape[0], dataset.shape[-1]
        return self.build(opts["config"], channels, resolution, process, num_classes), process, num_classes

    def load(self, dataset, *, device="cpu", **options) -> Denoiser:
        opts = self._resolve(dataset, options)
        if opts["checkpoint"] == RANDOM_WEIGHTS:
            net, process, num_classes = self.network(dataset, opts)
            random_weights(net)
        else:
            net, process, num_classes, opts = self._load_checkpoint(dataset, opts, options, device)
        if opts["clip_denoised"]:
            net = ClipDenoised(net, process, opts["parameterization"])
        denoiser = Denoiser(net.to(device).eval(), process, opts["parameterization"], num_classes=num_classes,
                            null_class=num_classes if num_classes else None, name=self.name)
        denoiser.dataset_name = dataset.name  # lets classifier guidance find <dataset>-noisy-cnn
        return denoiser

    def _load_checkpoint(self, dataset, opts: dict, options: dict, device):
        """(network with the checkpoint's weights, process, num_classes, options the checkpoint fixes)."""
        path = Path(opts["checkpoint"]).with_suffix("") if opts["checkpoint"] else self.checkpoint_path(dataset.name, opts)
        if not path.with_suffix(".safetensors").exists():
            raise Incompatible(f"no {self.name} checkpoint for {dataset.name!r} at {path}.safetensors; "
                               f"run: {train_command(self.name, dataset.name, options, self.options())}")
        weights, saved = load_checkpoint(path, device)
        opts = {**opts, **{k: saved["model"][k] for k in ("config", "process", "parameterization", "class_cond")
                           if k in saved.get("model", {})}}
        net, process, num_classes = self.network(dataset, opts)
        net.load_state_dict(weights)
        return net, process, num_classes, opts

    def train(self, dataset, out=None, *, device="cpu", steps=None, batch_size=None, lr=None, seed=0,
              label_dropout=0.1, progress=True, init="", **options) -> Path:
        """Train with the simple loss (Ho et al. eq. 14) and label dropout for CFG; EMA weights are saved.
        ``init``: start from the weights of this checkpoint (continued training, fresh optimizer)."""
        opts = self._resolve(dataset, options)
        net, process, num_classes = self.network(dataset, opts)
        if init:
            net.load_state_dict(load_checkpoint(Path(init).with_suffix(""))[0])
        x0, labels = dataset.train_set()
        defaults = {"steps": 2000, "batch_size": 128, "lr": 1e-3, **self.train_defaults.get(dataset.name, {})}
        given = {"steps": steps, "batch_size": batch_size, "lr": lr}
        cfg = TrainConfig(seed=seed, ema_decay=0.995, checkpoint_every=250,
                          **{k: int(v) if k != "lr" else float(v) for k, v in
                             {**defaults, **{k: v for k, v in given.items() if v is not None}}.items()})
        out = Path(out) if out else self.checkpoint_path(dataset.name, opts)
        loss_fn = self.loss(process, opts, num_classes, label_dropout)

        record = {"dataset": dataset.name, **{k: v for k, v in opts.items() if k not in ("checkpoint", "clip_denoised")},
                  **({"init": str(init)} if init else {})}
        train(net, loss_fn, x0, labels if num_classes else None, out, record, cfg, device=device, progress=progress)
        return out.with_suffix(".safetensors")

    def loss(self, process, opts: dict, num_classes: int, label_dropout: float) -> Callable:
        """``loss_fn(net, x0, labels, generator)`` for :func:`train` (subclasses swap the objective)."""
        parameterization = opts["parameterization"]

        def loss_fn(model, batch, batch_labels, generator):
            return denoising_loss(model, process, parameterization, batch, batch_labels if num_classes else None,
                                  generator, label_dropout=label_dropout if num_classes else 0.0, null_class=num_classes)
        return loss_fn

    def register(self, register, description: str):
        register(Model(name=self.name, family="gaussian", load=self.load, train=self.train,
                       options=self.options(), description=description))


def build_unet(config: str, in_channels: int, resolution: int, process, num_classes: int) -> UNet:
    return UNet(in_channels, resolution, process, num_classes=num_classes, **UNET_CONFIGS[config])


UNET_PLUGIN = ImageModelPlugin(
    name="unet", configs=UNET_CONFIGS, build=build_unet,
    dataset_defaults={"digits": "tiny-8px", "shapes": "tiny"}, fallback_config="small",
    train_defaults={"digits": {"steps": 1500, "batch_size": 128, "lr": 2e-3},
                    "shapes": {"steps": 700, "batch_size": 32, "lr": 2e-3}},
)


@diffbench.hookimpl
def register_models(register):
    UNET_PLUGIN.register(register, "DDPM/ADM U-Net (ResNet blocks, GroupNorm, attention, skips); class-conditional "
                                   "with a null class for CFG; shipped for digits and shapes")
