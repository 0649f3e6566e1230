"""The ``diffusers`` model: a diffusers ``UNet2DModel`` or ``DiTTransformer2DModel`` from a local
directory (``save_pretrained`` layout; option ``path``), wrapped as a diffbench denoiser.

The noise process comes from ``<path>/scheduler/scheduler_config.json`` (or
``<path>/scheduler_config.json``) when present — ``num_train_timesteps``, ``beta_schedule``,
``beta_start``, ``beta_end``, ``prediction_type`` — else DDPM's linear schedule with ε-prediction.
diffbench's discrete VP time is the step index, exactly diffusers' ``timestep``, so t is passed
through unchanged (fractional t as well: both networks embed a float timestep).

Weights load from safetensors only: pickle files (``diffusion_pytorch_model.bin``) can run code
when read, so they need the explicit option ``allow_pickle=true``, which then shows in the row's
model label. Scheduler fields the loader cannot honour are refused, not ignored.

diffusers checkpoints store separate q, k and v projections; at load they are concatenated into
one fused QKV projection per self-attention layer (one matmul instead of three, as diffbench's
own attention blocks do), with the same outputs.
"""
from __future__ import annotations

from pathlib import Path

import torch

import diffbench
from diffbench.denoiser import Denoiser
from diffbench.process import VPDiscrete
from diffbench.io import read_json
from diffbench.registry import ConfigError, Incompatible, Model, Option

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# scheduler_config.json fields that change the process and that this loader cannot reproduce: value it must have
UNSUPPORTED = {"trained_betas": None, "rescale_betas_zero_snr": False}


def check_scheduler_config(config: dict, file: Path) -> None:
    """Refuse a scheduler config whose fields this loader does not support (naming file and field)."""
    def bad(field: str, why: str):
        raise Incompatible(f"diffusers: {file}: {field} = {config[field]!r} {why}")

    if "num_train_timesteps" in config and (not isinstance(config["num_train_timesteps"], int)
                                            or isinstance(config["num_train_timesteps"], bool)
                                            or config["num_train_timesteps"] < 1):
        bad("num_train_timesteps", "must be a positive integer")
    for field in ("beta_start", "beta_end"):
        if field in config and (isinstance(config[field], bool) or not isinstance(config[field], (int, float))
                                or not 0 < config[field] < 1):
            bad(field, "must be a number in (0, 1)")
    if config.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        bad("beta_schedule", f"is not supported ({', '.join(BETA_SCHEDULES)})")
    if config.get("prediction_type", "epsilon") not in PREDICTIONS:
        bad("prediction_type", f"is not supported ({', '.join(PREDICTIONS)})")
    for field, supported in UNSUPPORTED.items():
        if config.get(field, supported) != supported:
            bad(field, f"is not supported (only {supported!r})")


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
    raise Incompatible(f"diffusers beta_schedule {schedule!r} is not supported ({', '.join(BETA_SCHEDULES)})")


def _read_config(file: Path) -> dict:
    try:
        config = read_json(file)
    except ValueError as exc:
        raise Incompatible(f"diffusers: {exc}") from None
    if not isinstance(config, dict):
        raise Incompatible(f"diffusers: {file} is not a JSON object")
    return config


def _scheduler_config(root: Path) -> dict:
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if candidate.is_file():
            config = _read_config(candidate)
            check_scheduler_config(config, candidate)
            return config
    return {}


def _check_weights(model_dir: Path, allow_pickle: bool) -> None:
    """safetensors weights, or pickle ones only with ``allow_pickle``."""
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in model_dir.glob("*.bin"))
    if pickles and not allow_pickle:
        raise ValueError(f"{model_dir} has only pickle weights ({', '.join(pickles)}), which can run code when "
                         f"loaded; convert them to safetensors, or accept the risk with diffusers[allow_pickle=true]")
    if not pickles:
        raise ValueError(f"{model_dir}: no weights (*.safetensors)")


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


def load_diffusers(dataset=None, *, device="cpu", path: str = "", subfolder: str = "", prediction: str = "",
                   allow_pickle: bool = False, **_):
    if not path:
        raise ConfigError("model 'diffusers' needs option 'path': a directory written by save_pretrained "
                          "(e.g. diffusers[path=/models/ddpm-cifar10])")
    root = Path(path).expanduser()
    model_dir = root / subfolder if subfolder else (root / "unet" if (root / "unet").is_dir() else
                                                    root / "transformer" if (root / "transformer").is_dir() else root)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise Incompatible(f"diffusers: no config.json in {model_dir}")
    class_name = _read_config(config_file).get("_class_name", "")
    from diffusers import DiTTransformer2DModel, UNet2DModel

    classes = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel}
    if class_name not in classes:
        raise Incompatible(f"diffusers: {class_name!r} is not supported (UNet2DModel, DiTTransformer2DModel)")
    _check_weights(model_dir, allow_pickle)
    model = fuse_qkv(classes[class_name].from_pretrained(str(model_dir), use_safetensors=not allow_pickle))
    model = model.to(device).eval()
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
                   options={"path": "", "subfolder": "", "prediction": Option("", choices=("", *PREDICTIONS.values())),
                            "allow_pickle": False},
                   description="a local diffusers UNet2DModel / DiTTransformer2DModel (option path), "
                               "schedule and prediction type from its scheduler config"))
