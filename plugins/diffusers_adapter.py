"""The ``diffusers`` model: a diffusers ``UNet2DModel`` or ``DiTTransformer2DModel`` from a local
directory (``save_pretrained`` layout; option ``path``), wrapped as a diffbench denoiser.

The noise process comes from ``<path>/scheduler/scheduler_config.json`` (or
``<path>/scheduler_config.json``) when present — ``num_train_timesteps``, ``beta_schedule``,
``beta_start``, ``beta_end``, ``prediction_type`` — else DDPM's linear schedule with ε-prediction.
diffbench's discrete VP time is the step index, exactly diffusers' ``timestep``, so t is passed
through unchanged (fractional t as well: both networks embed a float timestep).

diffusers checkpoints store separate q, k and v projections; at load they are concatenated into
one fused QKV projection per self-attention layer (one matmul instead of three, as diffbench's
own attention blocks do), with the same outputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import diffbench
from diffbench.denoiser import Denoiser
from diffbench.process import VPDiscrete
from diffbench.registry import ConfigError, Incompatible, Model

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def process_from_scheduler(config: dict) -> VPDiscrete:
    """The discrete VP process of a diffusers DDPM/DDIM scheduler config (betas as diffusers builds them)."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        return VPDiscrete(torch.linspace(start, end, n, dtype=torch.float64), "linear")
    if schedule == "scaled_linear":
        return VPDiscrete(torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2, "scaled-linear")
    if schedule == "squaredcos_cap_v2":
        return VPDiscrete.cosine(n)
    raise Incompatible(f"diffusers beta_schedule {schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


def _scheduler_config(root: Path) -> dict:
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


class DiffusersNet(torch.nn.Module):
    """net(x [B, C, H, W], t [B], cond [B] | None) -> the diffusers model's prediction [B, C, H, W]
    (the first C channels when the model also predicts a variance, as DiT and improved DDPM do)."""

    def __init__(self, model, null_class: int | None):
        super().__init__()
        self.model, self.null_class = model, null_class

    def forward(self, x, t, cond=None):
        if cond is None and self.null_class is not None:
            cond = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        out = self.model(x, t, class_labels=cond, return_dict=False)[0]
        return out[:, : x.shape[1]]


def fuse_qkv(model: torch.nn.Module) -> torch.nn.Module:
    """Concatenate q/k/v of every self-attention layer into ``to_qkv`` and attend through it."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    for layer in model.modules():
        if isinstance(layer, Attention) and not layer.is_cross_attention and isinstance(layer.processor, AttnProcessor2_0):
            layer.fuse_projections()
            layer.set_processor(FusedAttnProcessor2_0())
    return model


def load_diffusers(dataset=None, *, device="cpu", path: str = "", subfolder: str = "", prediction: str = "", **_):
    if not path:
        raise ConfigError("model 'diffusers' needs option 'path': a directory written by save_pretrained "
                          "(e.g. diffusers[path=/models/ddpm-cifar10])")
    root = Path(path).expanduser()
    model_dir = root / subfolder if subfolder else (root / "unet" if (root / "unet").is_dir() else
                                                    root / "transformer" if (root / "transformer").is_dir() else root)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise Incompatible(f"diffusers: no config.json in {model_dir}")
    class_name = json.loads(config_file.read_text()).get("_class_name", "")
    from diffusers import DiTTransformer2DModel, UNet2DModel

    classes = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel}
    if class_name not in classes:
        raise Incompatible(f"diffusers: {class_name!r} is not supported (UNet2DModel, DiTTransformer2DModel)")
    model = fuse_qkv(classes[class_name].from_pretrained(str(model_dir))).to(device).eval()
    if dataset is not None and dataset.modality == "image":
        size = model.config.sample_size
        size = size if isinstance(size, int) else size[0]
        if (model.config.in_channels, size) != (dataset.shape[0], dataset.shape[-1]):
            raise Incompatible(f"diffusers model takes {model.config.in_channels}×{size}×{size} images; "
                               f"{dataset.name!r} has {'×'.join(map(str, dataset.shape))}")
    if class_name == "DiTTransformer2DModel":
        num_classes = int(model.config.num_embeds_ada_norm or 0)
    else:
        num_classes = int(model.config.num_class_embeds or 0)
    # DiT's label table has a last row for the dropped (null) label; a UNet2DModel has none.
    null_class = num_classes if class_name == "DiTTransformer2DModel" and num_classes else None
    scheduler = _scheduler_config(root)
    parameterization = prediction or PREDICTIONS.get(scheduler.get("prediction_type", "epsilon"), "eps")
    denoiser = Denoiser(DiffusersNet(model, null_class), process_from_scheduler(scheduler), parameterization,
                        num_classes=num_classes, null_class=null_class, name=f"diffusers:{class_name}")
    denoiser.dataset_name = dataset.name if dataset is not None else ""
    return denoiser


@diffbench.hookimpl
def register_models(register):
    register(Model(name="diffusers", family="gaussian", load=load_diffusers,
                   options={"path": "", "subfolder": "", "prediction": ""},
                   description="a local diffusers UNet2DModel / DiTTransformer2DModel (option path), "
                               "schedule and prediction type from its scheduler config"))
