"""One training loop for every model plugin: AdamW, EMA, gradient clipping, mixed precision on
GPU, a progress bar, safetensors checkpoints with a JSON config, and resume after interruption.

A model plugin supplies the network, a loss ``loss_fn(net, x0, labels, generator) -> scalar``
and the config that rebuilds the network; :func:`train` does the rest.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from diffbench.checkpoints import checkpoint_files, checkpoint_stem, load_checkpoint, save_checkpoint
from diffbench.denoiser import append_dims
from diffbench.registry import Model, Option

__all__ = ["TrainConfig", "train", "denoising_loss", "regression_target", "min_snr_weight", "drop_labels",
           "sample_train_times", "ema_update", "half_precision_weights", "NonFiniteLoss", "TRAINER_OPTIONS",
           "train_option_specs"]


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN / Inf loss): it stops, and no checkpoint is written."""


# The knobs of every train function that take them (``diffbench train --set``), with their ranges.
TRAINER_OPTIONS = {"steps": Option(2000, min=1), "batch_size": Option(256, min=1), "lr": Option(2e-3, min=0.0),
                   "seed": Option(0, min=0), "min_snr_gamma": Option(0.0, min=0.0)}


def train_option_specs(model: Model) -> dict[str, Option]:
    """What ``diffbench train --set`` accepts for ``model``: the keyword parameters of its train
    function (typed from their defaults; the :data:`TRAINER_OPTIONS` with their ranges) and, when
    the function takes ``**options`` or names them, the model's own options."""
    params = inspect.signature(model.train).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keywords = {name: TRAINER_OPTIONS.get(name, Option(p.default)) for name, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("device", "progress")}
    model_options = {k: v for k, v in model.specs.items() if takes_any or k in params}
    return {**keywords, **model_options}  # a model's declared spec (choices, range) beats a bare keyword default


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500  # also where an interrupted run resumes from


def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), net.parameters()):
            e.lerp_(p, 1.0 - decay)


def half_precision_weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with parameters in float16 (half the size on disk; ``load_state_dict``
    casts them back to the model's dtype). Buffers keep their dtype."""
    params = dict(net.named_parameters())
    return {k: v.half() if k in params and v.is_floating_point() else v for k, v in net.state_dict().items()}


def _state_path(out: Path) -> Path:
    """Where the resumable state lives: beside the checkpoint, ``<name>-train-state.safetensors``."""
    return out.with_name(out.name + "-train-state")


def _save_state(out: Path, net, ema, opt, step: int, config: dict) -> None:
    """Resumable state: weights, EMA and AdamW moments as tensors (no pickle)."""
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        tensors |= {f"opt.{i}.{k}": torch.as_tensor(v) for k, v in state.items()}
    save_checkpoint(_state_path(out), tensors, {**config, "resume_step": step})


def _load_state(out: Path, net, ema, opt) -> int:
    path = checkpoint_files(_state_path(out))[0]
    if not path.exists():
        return 0
    tensors, config = load_checkpoint(path)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state = opt.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state["state"].setdefault(int(i), {})[name] = value
    opt.load_state_dict(opt_state)
    return int(config["resume_step"])


def train(
    net: torch.nn.Module,
    loss_fn: Callable,
    data: torch.Tensor,
    labels: torch.Tensor | None,
    out: str | Path,
    model_config: dict,
    cfg: TrainConfig = TrainConfig(),
    device: str | torch.device = "cpu",
    resume: bool = True,
    progress: bool = True,
) -> torch.nn.Module:
    """Train ``net`` on (data, labels), write the EMA weights to ``out`` (.safetensors + .json,
    parameters in float16) and return the EMA network. With ``resume``, continues from ``out``'s train-state file."""
    out = checkpoint_stem(out)
    device = torch.device(device)
    net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    config = {"model": model_config, "train": asdict(cfg)}
    start = _load_state(out, net, ema, opt) if resume else 0
    generator = torch.Generator(device=device).manual_seed(cfg.seed + start)
    data = data.to(device)
    labels = labels.to(device) if labels is not None else None
    use_amp = device.type == "cuda"

    finite = torch.ones((), dtype=torch.bool, device=device)  # all losses so far finite (checked without a sync per step)
    bar = tqdm(range(start, cfg.steps), desc=f"train {out.name}", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=generator, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(net, data[idx], labels[idx] if labels is not None else None, generator)
        finite &= torch.isfinite(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, net, cfg.ema_decay)
        saving = (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps
        if step % 50 == 0 or saving:
            _stop_if_diverged(finite, step, out)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if saving:
            _save_state(out, net, ema, opt, step + 1, config)

    _stop_if_diverged(finite, cfg.steps - 1, out)
    save_checkpoint(out, half_precision_weights(ema), config)
    for path in checkpoint_files(_state_path(out)):
        path.unlink(missing_ok=True)
    return ema.eval()


def _stop_if_diverged(finite: torch.Tensor, step: int, out: Path) -> None:
    if not bool(finite):
        raise NonFiniteLoss(f"training loss became NaN or Inf by step {step + 1}; stopped, no checkpoint written "
                            f"to {out} (try a smaller lr)")


def drop_labels(labels, p: float, null_class: int | None, generator: torch.Generator):
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes ``null_class``
    with probability ``p``. ``labels`` None or ``p`` = 0: unchanged (and no random draw)."""
    if labels is None or p <= 0:
        return labels
    drop = torch.rand(len(labels), generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def sample_train_times(process, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Training times [n]: uniform step indices for a discrete process (Ho et al. 2020, Alg. 1),
    log-normal σ for EDM (Karras et al. 2022, Table 1), uniform in [t_min, t_max] otherwise."""
    from diffbench.process import EDMProcess, VPDiscrete

    if isinstance(process, VPDiscrete):
        return torch.randint(0, process.num_steps, (n,), generator=generator, device=device).double()
    if isinstance(process, EDMProcess):
        return torch.exp(-1.2 + 1.2 * torch.randn(n, generator=generator, device=device, dtype=torch.float64))
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return process.t_min + (process.t_max - process.t_min) * u


def regression_target(parameterization: str, process, t, x0, eps):
    """What a network of the given parameterization is trained to output at x_t = α x0 + σ ε."""
    a, s = (append_dims(c, x0) for c in (process.alpha(t), process.sigma(t)))
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return a * eps - s * x0
    if parameterization == "velocity":
        da, ds = (append_dims(c, x0) for c in process.alpha_sigma_derivatives(t))
        return da * x0 + ds * eps
    if parameterization == "score":
        return -eps / s
    raise ValueError(f"no regression target for parameterization {parameterization!r}")


def min_snr_weight(parameterization: str, process, t, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, §3.4) for a network regressing ``parameterization``'s target.

    Min-SNR-γ weights the x0-space loss ‖x0 − x̂0‖² at time t by min(SNR(t), γ), SNR = α²/σ².
    A network regressing its own target y has ‖y − ŷ‖² = k(t) ‖x0 − x̂0‖² (k = 1 / (∂x̂0/∂ŷ)²,
    from the conversions in :meth:`Denoiser.to_x0`), so the weight on its loss is min(SNR, γ) / k:
    k = SNR for ε (weight min(1, γ / SNR)), 1 for x0, (α² + σ²)² / σ² for v (SNR + 1 on VP).
    """
    a, s = process.alpha(t), process.sigma(t)
    snr = (a / s) ** 2
    if parameterization == "eps":
        k = snr
    elif parameterization == "x0":
        k = torch.ones_like(snr)
    elif parameterization == "v":
        k = (a**2 + s**2) ** 2 / s**2
    elif parameterization == "score":
        k = a**2 / s**4
    elif parameterization == "velocity":
        da, ds = process.alpha_sigma_derivatives(t)
        k = ((a * ds - s * da) / s) ** 2
    else:
        raise ValueError(f"no Min-SNR weight for parameterization {parameterization!r}")
    return snr.clamp(max=gamma) / k


def denoising_loss(net, process, parameterization: str, x0, labels, generator, label_dropout: float = 0.0,
                   null_class: int | None = None, min_snr_gamma: float = 0.0):
    """The simple loss of Ho et al. 2020 (eq. 14) for any parameterization: E‖target − net(x_t, t)‖².

    With ``label_dropout`` > 0, labels are replaced by ``null_class`` with that probability
    (classifier-free guidance training, Ho & Salimans 2022). With ``min_snr_gamma`` > 0, each
    sample's error is weighted by :func:`min_snr_weight` (Min-SNR-γ; the paper uses γ = 5).
    """
    t = sample_train_times(process, len(x0), generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = append_dims(process.alpha(t), x0) * x0 + append_dims(process.sigma(t), x0) * eps
    labels = drop_labels(labels, label_dropout, null_class, generator)
    target = regression_target(parameterization, process, t, x0, eps)
    err = (net(x_t, t.float(), labels) - target) ** 2  # [B, ...]
    if min_snr_gamma > 0:
        err = err * append_dims(min_snr_weight(parameterization, process, t, min_snr_gamma).to(err.dtype), err)
    return torch.mean(err)
