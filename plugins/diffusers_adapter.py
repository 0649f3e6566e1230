"""The ``diffusers`` model: a diffusers ``UNet2DModel`` or ``DiTTransformer2DModel`` from a local
directory (``save_pretrained`` layout; option ``path``), wrapped as a diffbench denoiser — or a
whole Stable-Diffusion directory (``model_index.json`` naming a text encoder): a text-to-image
latent model whose prompts are the dataset's captions or the lines of a file (option ``prompts``).

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

Stable Diffusion (Rombach et al. 2022) goes through the hooks diffbench's own latent models use
(:mod:`~diffbench_plugins.latent`): the denoiser works on latents [4, h, w] and carries a
:class:`~diffbench_plugins.latent.LatentDecoder` (the AutoencoderKL's decoder, its config's
``scaling_factor``), which the runner applies before the metrics, timed apart (``decode_ms``).
Prompts condition as captions do on ``shapes-text``: the condition is a prompt index [B] (sample i
gets prompt i mod K), index K is the empty prompt "" — classifier-free guidance's unconditional
input, as in diffusers' pipeline — and every prompt's CLIP text-encoder hidden states are computed
once at load, as the pipeline encodes its prompt once before its loop. Decoded images are
clamped to [-1, 1] (the pipeline's post-processing) and, when the dataset's images are smaller
than the model's (shapes-text's 32 px under SD's 512), resized to the dataset's size for the
metrics (column ``decoded_size`` keeps the model's).

Every file and field is checked before any work (:func:`validate_diffusers`, bad input: exit 2).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

import diffbench
from diffbench.denoiser import Denoiser
from diffbench.process import VPDiscrete
from diffbench.io import read_json, read_text
from diffbench.registry import ConfigError, Incompatible, Model, Option
from diffbench_plugins.latent import LatentDecoder

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# scheduler_config.json fields that change the process and that this loader cannot reproduce: value it must have
UNSUPPORTED = {"trained_betas": None, "rescale_betas_zero_snr": False}
SINGLE_MODELS = ("UNet2DModel", "DiTTransformer2DModel")
# A Stable-Diffusion directory: component -> the classes (model_index.json's second entry) loaded for it.
PIPELINE_COMPONENTS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
                       "text_encoder": ("CLIPTextModel",), "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")}
PIPELINE = "StableDiffusion"
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))  # either set loads a CLIP tokenizer


def check_scheduler_config(config: dict, file: Path) -> None:
    """Refuse a scheduler config whose fields this loader does not support (naming file and field)."""
    def bad(field: str, why: str):
        raise ConfigError(f"diffusers: {file}: {field} = {config[field]!r} {why}")

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
    """The discrete VP process of a diffusers DDPM/DDIM scheduler config (betas as diffusers builds them;
    Stable Diffusion's "scaled_linear" is linear in √β: β_i = (√β_start + i/(N−1)·(√β_end − √β_start))²)."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        return VPDiscrete(torch.linspace(start, end, n, dtype=torch.float64), "linear")
    if schedule == "scaled_linear":
        return VPDiscrete(torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2, "scaled-linear")
    if schedule == "squaredcos_cap_v2":
        return VPDiscrete.cosine(n)
    raise ConfigError(f"diffusers beta_schedule {schedule!r} is not supported ({', '.join(BETA_SCHEDULES)})")


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise ConfigError(f"diffusers: {file} is missing")
    try:
        config = read_json(file)
    except ValueError as exc:
        raise ConfigError(f"diffusers: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"diffusers: {file} is not a JSON object")
    return config


def _scheduler_config(root: Path, required: bool = False) -> dict:
    """The checked scheduler config of ``root`` ({} when there is none and it is not ``required``)."""
    candidates = (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json")
    for candidate in candidates:
        if candidate.is_file():
            config = _read_config(candidate)
            check_scheduler_config(config, candidate)
            return config
    if required:
        raise ConfigError(f"diffusers: {candidates[0]} is missing (the noise schedule: beta_schedule, beta_start, ...)")
    return {}


def _check_weights(model_dir: Path, allow_pickle: bool) -> None:
    """safetensors weights, or pickle ones only with ``allow_pickle``."""
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in model_dir.glob("*.bin"))
    if pickles and not allow_pickle:
        raise ConfigError(f"{model_dir} has only pickle weights ({', '.join(pickles)}), which can run code when "
                          f"loaded; convert them to safetensors, or accept the risk with diffusers[allow_pickle=true]")
    if not pickles:
        raise ConfigError(f"{model_dir}: no weights (*.safetensors)")


def _is_text_to_image(root: Path, subfolder: str) -> bool:
    """A Stable-Diffusion directory: a model_index.json that names a text encoder (no subfolder picked)."""
    index = root / "model_index.json"
    return not subfolder and index.is_file() and (_read_config(index).get("text_encoder") or [None])[0] is not None


def _single_model_dir(root: Path, subfolder: str) -> Path:
    if subfolder:
        return root / subfolder
    return root / "unet" if (root / "unet").is_dir() else root / "transformer" if (root / "transformer").is_dir() else root


def _check_single_model(root: Path, subfolder: str, allow_pickle: bool) -> str:
    """The class name of a one-model directory, its weights and scheduler checked."""
    model_dir = _single_model_dir(root, subfolder)
    class_name = _read_config(model_dir / "config.json").get("_class_name", "")
    if class_name not in SINGLE_MODELS:
        hint = " (a Stable-Diffusion UNet loads from its whole directory: leave out subfolder)" \
            if class_name == "UNet2DConditionModel" else ""
        raise ConfigError(f"diffusers: {model_dir / 'config.json'}: _class_name {class_name!r} is not supported "
                          f"({', '.join(SINGLE_MODELS)}){hint}")
    _check_weights(model_dir, allow_pickle)
    _scheduler_config(root)
    return class_name


def _check_pipeline(root: Path, allow_pickle: bool) -> None:
    """Every component of a Stable-Diffusion directory checked (class, files, weights, matching
    sizes) from its JSON files alone."""
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("diffusers: a Stable-Diffusion directory needs the transformers package (its CLIPTextModel "
                          "and CLIPTokenizer); install it: pip install transformers")
    index = _read_config(root / "model_index.json")
    configs = {}
    for component, classes in PIPELINE_COMPONENTS.items():
        entry = index.get(component) or [None, None]
        if entry[-1] not in classes:
            raise ConfigError(f"diffusers: {root / 'model_index.json'}: {component} is {entry[-1]!r}; "
                              f"supported: {', '.join(classes)}")
        folder = root / component
        if not folder.is_dir():
            raise ConfigError(f"diffusers: {folder} is missing (model_index.json names {component} {entry[-1]})")
        if component == "tokenizer":
            if not any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES):
                raise ConfigError(f"diffusers: {folder} has neither vocab.json + merges.txt nor tokenizer.json")
            continue
        configs[component] = _read_config(folder / "config.json")
        _check_weights(folder, allow_pickle)
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    for what, ours, theirs in (("unet in_channels vs vae latent_channels", unet.get("in_channels"),
                                vae.get("latent_channels")),
                               ("unet cross_attention_dim vs text_encoder hidden_size", unet.get("cross_attention_dim"),
                                text.get("hidden_size"))):
        if ours != theirs:
            raise ConfigError(f"diffusers: {root}: components do not fit together: {what} = {ours} vs {theirs}")
    _scheduler_config(root, required=True)


def read_prompts(file: str) -> list[str]:
    """The prompts of a file, one a line (blank lines left out)."""
    try:
        lines = [line.strip() for line in read_text(Path(file).expanduser()).splitlines()]
    except ValueError as exc:
        raise ConfigError(f"diffusers: option prompts: {exc}") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"diffusers: option prompts: {file} has no prompts (one a line)")
    return prompts


def validate_diffusers(*, path: str = "", subfolder: str = "", allow_pickle: bool = False, prompts: str = "",
                       **_) -> str:
    """Check the directory (and prompts file) before any work: ConfigError naming what is wrong.
    Returns what it holds: :data:`PIPELINE` or the one model's class name."""
    if not path:
        raise ConfigError("model 'diffusers' needs option 'path': a directory written by save_pretrained "
                          "(e.g. diffusers[path=/models/ddpm-cifar10] or diffusers[path=/models/sd-v1-5])")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"diffusers: option path: {root} is not a directory")
    if prompts:
        read_prompts(prompts)
    if _is_text_to_image(root, subfolder):
        _check_pipeline(root, allow_pickle)
        return PIPELINE
    if prompts:
        raise ConfigError(f"diffusers: option prompts applies to a Stable-Diffusion directory (model_index.json "
                          f"naming a text_encoder); {root} has none")
    return _check_single_model(root, subfolder, allow_pickle)


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


class PromptConditioned(torch.nn.Module):
    """net(z [B, 4, h, w], t [B], cond [B] | None) -> the UNet's prediction, cross-attending to the
    text-encoder hidden states of prompt ``cond`` (a buffer [K + 1, L, D], row K the empty prompt:
    the unconditional input, as :class:`~diffbench_plugins.text_encoder.TextConditioned` has)."""

    def __init__(self, unet, prompt_states: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("prompt_states", prompt_states, persistent=False)  # [K + 1, L, D]
        self.null = len(prompt_states) - 1

    def forward(self, z, t, cond=None):
        if cond is None:
            cond = torch.full((z.shape[0],), self.null, dtype=torch.long, device=z.device)
        context = self.prompt_states[cond.to(z.device).long()]  # [B, L, D]
        return self.unet(z, t, encoder_hidden_states=context, return_dict=False)[0]


def fuse_qkv(model: torch.nn.Module) -> torch.nn.Module:
    """Concatenate q/k/v of every self-attention layer into ``to_qkv`` and attend through it."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    for layer in model.modules():
        if isinstance(layer, Attention) and not layer.is_cross_attention and isinstance(layer.processor, AttnProcessor2_0):
            layer.fuse_projections()
            layer.set_processor(FusedAttnProcessor2_0())
    return model


def from_pretrained(cls, folder: Path, allow_pickle: bool):
    """A diffusers model from a local folder: safetensors unless ``allow_pickle``; without the optional
    accelerate package the plain loading path, asked for outright (else diffusers warns on every load)."""
    return cls.from_pretrained(str(folder), use_safetensors=not allow_pickle,
                               low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device, batch_size: int = 64) -> torch.Tensor:
    """Prompts -> CLIP hidden states [len(prompts), L, D] exactly as StableDiffusionPipeline.encode_prompt:
    padded to the tokenizer's max length, truncated, the last hidden state (after the final LayerNorm).
    L is the text model's positions when the tokenizer has no max length (no tokenizer_config.json)."""
    length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    states = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size], padding="max_length", truncation=True,
                           max_length=length, return_tensors="pt")
        mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
        states.append(text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0])
    return torch.cat(states)


def _prompts_for(dataset, prompts_file: str) -> list[str]:
    if prompts_file:
        return read_prompts(prompts_file)
    captions = dataset.info.get("captions") if dataset is not None else None
    if not captions:
        name = dataset.name if dataset is not None else "no dataset"
        raise Incompatible(f"diffusers: a text-to-image model needs prompts: {name!r} has no captions; "
                           f"give a file of prompts with --prompts FILE")
    return list(captions)


def _image_decoder(vae, latent_shape: tuple[int, ...], dataset) -> LatentDecoder:
    """The AutoencoderKL's decoder: images [B, C, H, W] in [-1, 1], resized to the dataset's H × W
    when it differs (bilinear, antialiased)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = (latent_shape[-2] * factor, latent_shape[-1] * factor)
    target = tuple(dataset.shape[-2:]) if dataset is not None else size

    def decode(z):  # z: unscaled latents [B, 4, h, w]
        images = vae.decode(z, return_dict=False)[0].clamp(-1, 1)  # [B, C, f·h, f·w]
        if images.shape[-2:] != target:
            images = F.interpolate(images, size=target, mode="bilinear", antialias=True, align_corners=False)
        return images

    info = {"autoencoder": f"AutoencoderKL (f={factor})", "latent_scale": float(vae.config.scaling_factor),
            "decoded_size": "x".join(map(str, size))}
    return LatentDecoder(decode, float(vae.config.scaling_factor), latent_shape, info)


def load_stable_diffusion(root: Path, dataset, *, device, prediction: str, allow_pickle: bool, prompts: str):
    """The UNet over latents, its prompts' CLIP hidden states (encoded once, as the pipeline encodes its
    prompt once before its loop) and the VAE decoder; ``root`` checked by :func:`validate_diffusers`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    prompt_list = _prompts_for(dataset, prompts)
    channels = _read_config(root / "vae" / "config.json").get("out_channels", 3)
    if dataset is not None and (dataset.modality != "image" or dataset.shape[0] != channels):
        raise Incompatible(f"diffusers: the Stable-Diffusion VAE decodes {channels}-channel images; "
                           f"{dataset.name!r} has {'×'.join(map(str, dataset.shape))}")
    unet = fuse_qkv(from_pretrained(UNet2DConditionModel, root / "unet", allow_pickle))
    vae = from_pretrained(AutoencoderKL, root / "vae", allow_pickle)
    text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder"), use_safetensors=not allow_pickle)
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    unet, vae, text_encoder = (m.to(device).eval() for m in (unet, vae, text_encoder))
    states = encode_prompts(tokenizer, text_encoder, prompt_list + [""], device)  # [K + 1, L, D]
    size = unet.config.sample_size
    latent_shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    scheduler = _scheduler_config(root, required=True)
    parameterization = prediction or PREDICTIONS[scheduler.get("prediction_type", "epsilon")]
    k = len(prompt_list)
    denoiser = Denoiser(PromptConditioned(unet, states), process_from_scheduler(scheduler), parameterization,
                        num_classes=k, null_class=k, name="diffusers:StableDiffusion")
    denoiser.decoder = _image_decoder(vae, latent_shape, dataset)
    denoiser.dataset_name = ""  # no pixel-space noisy classifier applies to latents
    # Sample i's label indexes the prompts file, not the dataset's classes: label metrics must not read it.
    denoiser.conditions_on_dataset = not prompts
    return denoiser


def load_diffusers(dataset=None, *, device="cpu", path: str = "", subfolder: str = "", prediction: str = "",
                   allow_pickle: bool = False, prompts: str = "", **_):
    class_name = validate_diffusers(path=path, subfolder=subfolder, allow_pickle=allow_pickle, prompts=prompts)
    root = Path(path).expanduser()
    if class_name == PIPELINE:
        return load_stable_diffusion(root, dataset, device=device, prediction=prediction, allow_pickle=allow_pickle,
                                     prompts=prompts)
    from diffusers import DiTTransformer2DModel, UNet2DModel

    classes = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel}
    model_dir = _single_model_dir(root, subfolder)
    model = fuse_qkv(from_pretrained(classes[class_name], model_dir, allow_pickle))
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
    register(Model(name="diffusers", family="gaussian", load=load_diffusers, validate=validate_diffusers,
                   options={"path": "", "subfolder": "", "prediction": Option("", choices=("", *PREDICTIONS.values())),
                            "allow_pickle": False, "prompts": ""},
                   description="a local diffusers UNet2DModel / DiTTransformer2DModel, or a Stable-Diffusion "
                               "directory (prompts: the dataset's captions or option prompts=FILE), schedule and "
                               "prediction type from its scheduler config"))
