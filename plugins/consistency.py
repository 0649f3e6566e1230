"""Consistency models (Song et al. 2023; improved techniques, Song & Dhariwal 2023) for toy points.

A consistency function f(x_σ, σ) maps any point of a probability-flow ODE trajectory of the
EDM process (σ ∈ [σ_min, σ_max] = [0.002, 80]) to its origin, so one call from pure noise is a
sample and a few calls with re-noising in between refine it (CM Alg. 1). The boundary condition
f(x, σ_min) = x is built into the parameterization (CM §3, App. C):

    f(x, σ) = c_skip(σ) x + c_out(σ) F_θ(c_in(σ) x, σ),
    c_skip = σ_d² / ((σ − σ_min)² + σ_d²),  c_out = σ_d (σ − σ_min) / sqrt(σ_d² + σ²),
    c_in = 1 / sqrt(σ² + σ_d²)   (EDM's input scaling, Karras et al. 2022, Table 1).

With σ_min = 0 the same wrapper is EDM's preconditioned denoiser: the ``edm-mlp`` model, which
is the teacher of consistency distillation. Models:

* ``edm-mlp``: EDM diffusion (x0 prediction, loss weight (σ² + σ_d²)/(σ σ_d)², log-normal σ).
* ``consistency-mlp[method=cd]``: consistency distillation (CM Alg. 2) from ``edm-mlp`` with one
  Heun step of the teacher between adjacent Karras points, squared-L2 distance and an EMA target.
* ``consistency-mlp[method=ct]``: consistency training from data (iCT): pseudo-Huber distance,
  no EMA target (θ⁻ = stopgrad θ), log-normal discrete σ sampling, weight 1/(σ_{i+1} − σ_i) and
  the doubling step-count curriculum.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

import diffbench
from diffbench.checkpoints import load_checkpoint
from diffbench.denoiser import Denoiser
from diffbench.process import EDMProcess
from diffbench.registry import ConfigError, Incompatible, Model, Sampler
from diffbench.training import TrainConfig, drop_labels, train
from diffbench_plugins.flow import fit
from diffbench_plugins.mlp import SHIPPED, USER_CACHE, MLPDenoiserNet
from diffbench_plugins.unet import UNET_CONFIGS, UNET_PLUGIN, build_unet

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NET_DEFAULTS = {"hidden": 128, "depth": 3}
METHODS = ("cd", "ct")


class PreconditionedNet(nn.Module):
    """x [B, D], σ [B] -> c_skip(σ) x + c_out(σ) F(c_in(σ) x, σ) (module docstring).

    σ_d is a buffer (saved with the weights: the training set's std); σ − σ_min is computed in
    σ's own float32, so at σ = σ_min c_skip = 1 and c_out = 0 exactly and f(x, σ_min) = x.
    """

    def __init__(self, inner: nn.Module, sigma_data: float, sigma_min: float):
        super().__init__()
        self.inner, self.sigma_min = inner, sigma_min
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data)))

    def forward(self, x, t, cond=None):
        sigma = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # [B, 1...]
        sd = self.sigma_data.to(x.dtype)
        c_skip = sd**2 / ((sigma - self.sigma_min) ** 2 + sd**2)
        c_out = sd * (sigma - self.sigma_min) / torch.sqrt(sd**2 + sigma**2)
        c_in = torch.rsqrt(sigma**2 + sd**2)
        return c_skip * x + c_out * self.inner(c_in * x, t, cond)


def _network(dataset, sigma_data: float, sigma_min: float, hidden: int, depth: int) -> PreconditionedNet:
    if dataset.modality != "points":
        raise Incompatible(f"consistency/edm MLPs model point data; {dataset.name!r} is {dataset.modality}")
    inner = MLPDenoiserNet(dataset.shape[0], EDMProcess(SIGMA_MIN, SIGMA_MAX), hidden, depth)
    return PreconditionedNet(inner, sigma_data, sigma_min)


def _find(stem: str) -> Path:
    for root in (USER_CACHE, SHIPPED):
        if (root / f"{stem}.safetensors").exists():
            return root / stem
    return SHIPPED / stem


def teacher_path(dataset_name: str) -> Path:
    return _find(f"consistency-teacher-{dataset_name}")


def student_path(dataset_name: str, method: str) -> Path:
    return _find(f"consistency-mlp-{dataset_name}-{method}")


def _load_net(dataset, path: Path, sigma_min: float, device, train_hint: str) -> PreconditionedNet:
    if not path.with_suffix(".safetensors").exists():
        raise Incompatible(f"no checkpoint for {dataset.name!r} at {path}.safetensors; run: {train_hint}")
    weights, config = load_checkpoint(path, device)
    model = config.get("model", {})
    net = _network(dataset, float(weights["sigma_data"]), sigma_min, model.get("hidden", 128), model.get("depth", 3))
    net.load_state_dict(weights)
    return net.to(device).eval()


# --- EDM teacher ------------------------------------------------------------------------------


def edm_loss(net, x0, generator, p_mean=-1.2, p_std=1.2):
    """EDM training loss (Karras et al. 2022, eq. 2 and Table 1): ln σ ~ N(P_mean, P_std²),
    weight λ(σ) = (σ² + σ_d²)/(σ σ_d)² on ‖D(x0 + σ n; σ) − x0‖²."""
    sigma = torch.exp(p_mean + p_std * torch.randn(len(x0), generator=generator, device=x0.device))
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    sd = net.sigma_data
    weight = (s**2 + sd**2) / (s * sd) ** 2
    return torch.mean(weight * (net(x0 + s * noise, sigma) - x0) ** 2)


def load_edm_mlp(dataset, *, device="cpu", checkpoint="", **options) -> Denoiser:
    path = Path(checkpoint).with_suffix("") if checkpoint else teacher_path(dataset.name)
    net = _load_net(dataset, path, 0.0, device, f"diffbench train --model edm-mlp --dataset {dataset.name}")
    return Denoiser(net, EDMProcess(SIGMA_MIN, SIGMA_MAX), "x0", name="edm-mlp")


def _train_config(steps, batch_size, lr, seed) -> TrainConfig:
    return TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=float(lr), seed=int(seed), ema_decay=0.995)


def train_edm_mlp(dataset, out=None, *, device="cpu", steps=3000, batch_size=512, lr=2e-3, seed=0, progress=True,
                  hidden=128, depth=3) -> Path:
    """EDM on 20k points, σ_d = the training set's std; ~2 min on one CPU thread."""
    x0, _ = dataset.train_set(20000)
    net = _network(dataset, float(x0.std()), 0.0, hidden, depth)
    out = Path(out).with_suffix("") if out else teacher_path(dataset.name)
    cfg = _train_config(steps, batch_size, lr, seed)
    return fit(net, lambda model, batch, labels, g: edm_loss(model, batch, g), x0, out,
               {"dataset": dataset.name, "hidden": hidden, "depth": depth}, cfg, device, progress)


# --- consistency distillation and consistency training --------------------------------------


def karras_sigmas(n: int, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0) -> torch.Tensor:
    """The N increasing discretization points of CM §4 / EDM eq. 5:
    σ_i = (σ_min^{1/ρ} + (i−1)/(N−1) (σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ, i = 1..N (float64)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def heun_step(teacher, x, sigma, sigma_next):
    """One Heun step of the teacher's probability-flow ODE dx/dσ = (x − D(x; σ))/σ from σ to
    σ_next (EDM Alg. 1 lines 5–8; the solver Φ of CM Alg. 2). σ, σ_next: [B, 1...]."""
    d = (x - teacher(x, sigma.flatten())) / sigma
    x_euler = x + (sigma_next - sigma) * d
    d_next = (x_euler - teacher(x_euler, sigma_next.flatten())) / sigma_next
    return x + (sigma_next - sigma) * 0.5 * (d + d_next)


def pseudo_huber(a, b):
    """iCT's distance (Song & Dhariwal 2023, §3.3): sqrt(‖a − b‖² + c²) − c, c = 0.00054 sqrt(dim)."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + c**2) - c


class ConsistencyDistillation:
    """CM Alg. 2: n ~ U{1..N−1}, x_{n+1} = x0 + σ_{n+1} z, x̂_n = Heun step of the teacher,
    loss ‖f_θ(x_{n+1}, σ_{n+1}) − f_{θ⁻}(x̂_n, σ_n)‖² with θ⁻ ← μ θ⁻ + (1 − μ) θ."""

    def __init__(self, teacher: nn.Module, num_scales: int, target_ema: float):
        self.teacher, self.sigmas, self.mu = teacher, karras_sigmas(num_scales).float(), target_ema
        self.target = None

    def __call__(self, net, x0, labels, generator):
        # The target follows the weights of the previous optimizer step (train() steps after the loss).
        if self.target is None:
            self.target = copy.deepcopy(net).requires_grad_(False)
        else:
            with torch.no_grad():
                for pt, p in zip(self.target.parameters(), net.parameters()):
                    pt.lerp_(p, 1.0 - self.mu)
        sigmas = self.sigmas.to(x0.device)
        n = torch.randint(0, len(sigmas) - 1, (len(x0),), generator=generator, device=x0.device)
        shape = (-1, *([1] * (x0.ndim - 1)))
        s_n, s_next = sigmas[n].reshape(shape), sigmas[n + 1].reshape(shape)
        x_next = x0 + s_next * torch.randn(x0.shape, generator=generator, device=x0.device)
        with torch.no_grad():
            target = self.target(heun_step(self.teacher, x_next, s_next, s_n), s_n.flatten())
        return torch.mean(((net(x_next, s_next.flatten()) - target) ** 2).flatten(1).sum(1))


def ict_num_scales(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's step-count curriculum (Song & Dhariwal 2023, eq. 8): N(k) = min(s0 2^⌊k/K'⌋, s1) + 1,
    K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋."""
    stage = max(1, total // (int(math.log2(s1 // s0)) + 1))
    return min(s0 * 2 ** (k // stage), s1) + 1


class ConsistencyTraining:
    """iCT: σ_i drawn with p(σ_i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std))
    (P_mean = −1.1, P_std = 2), loss λ(σ_i) d(f_θ(x0 + σ_{i+1} z, σ_{i+1}), stopgrad f_θ(x0 + σ_i z, σ_i))
    with λ = 1/(σ_{i+1} − σ_i) and the pseudo-Huber d (§3.2–3.5)."""

    def __init__(self, total_steps: int, s0: int, s1: int, p_mean: float = -1.1, p_std: float = 2.0,
                 label_dropout: float = 0.0, null_class: int | None = None):
        self.total, self.s0, self.s1, self.p_mean, self.p_std = total_steps, s0, s1, p_mean, p_std
        self.label_dropout, self.null_class = label_dropout, null_class
        self.step = 0

    def __call__(self, net, x0, labels, generator):
        sigmas = karras_sigmas(ict_num_scales(self.step, self.total, self.s0, self.s1)).float().to(x0.device)
        self.step += 1
        cdf = torch.erf((sigmas.log() - self.p_mean) / (math.sqrt(2) * self.p_std))
        i = torch.multinomial(cdf[1:] - cdf[:-1], len(x0), replacement=True, generator=generator)
        shape = (-1, *([1] * (x0.ndim - 1)))
        s_i, s_next = sigmas[i].reshape(shape), sigmas[i + 1].reshape(shape)
        z = torch.randn(x0.shape, generator=generator, device=x0.device)
        labels = drop_labels(labels, self.label_dropout, self.null_class, generator)  # the same for both calls
        with torch.no_grad():
            target = net(x0 + s_i * z, s_i.flatten(), labels)
        weight = 1.0 / (s_next - s_i).flatten()
        return torch.mean(weight * pseudo_huber(net(x0 + s_next * z, s_next.flatten(), labels), target))


def load_consistency_mlp(dataset, *, device="cpu", checkpoint="", method="cd", **options) -> Denoiser:
    if method not in METHODS:
        raise ConfigError(f"consistency-mlp: method must be one of {', '.join(METHODS)}, got {method!r}")
    path = Path(checkpoint).with_suffix("") if checkpoint else student_path(dataset.name, method)
    hint = f"diffbench train --model consistency-mlp --dataset {dataset.name} --set method={method}"
    net = _load_net(dataset, path, SIGMA_MIN, device, hint)
    return Denoiser(net, EDMProcess(SIGMA_MIN, SIGMA_MAX), "consistency", name="consistency-mlp")


def train_consistency_mlp(dataset, out=None, *, device="cpu", method="cd", steps=3000, batch_size=512, lr=None,
                          seed=0, progress=True, num_scales=18, target_ema=0.95, s0=10, s1=1280, hidden=128, depth=3) -> Path:
    """CD (from the ``edm-mlp`` teacher, trained first if missing; the student starts from its
    weights as in CM §6) or iCT from scratch, on 20k points."""
    if method not in METHODS:
        raise ConfigError(f"consistency-mlp: method must be one of {', '.join(METHODS)}, got {method!r}")
    x0, _ = dataset.train_set(20000)
    record = {"dataset": dataset.name, "method": method, "hidden": hidden, "depth": depth}
    if method == "cd":
        if not teacher_path(dataset.name).with_suffix(".safetensors").exists():
            train_edm_mlp(dataset, device=device, seed=seed, progress=progress, hidden=hidden, depth=depth)
        teacher = load_edm_mlp(dataset, device=device).net.requires_grad_(False)
        net = _network(dataset, float(teacher.sigma_data), SIGMA_MIN, hidden, depth)
        net.load_state_dict(teacher.state_dict())
        loss_fn = ConsistencyDistillation(teacher, int(num_scales), float(target_ema))
        record |= {"num_scales": num_scales, "target_ema": target_ema}
        lr = 2e-4 if lr is None else lr
    else:
        net = _network(dataset, float(x0.std()), SIGMA_MIN, hidden, depth)
        loss_fn = ConsistencyTraining(int(steps), int(s0), int(s1))
        record |= {"s0": s0, "s1": s1}
        lr = 1e-3 if lr is None else lr
    out = Path(out).with_suffix("") if out else student_path(dataset.name, method)
    return fit(net, loss_fn, x0, out, record, _train_config(steps, batch_size, lr, seed), device, progress)


# --- consistency-unet: iCT with the U-Net of plugins/unet.py ----------------------------------

UNET_DEFAULTS = {"config": "", "class_cond": True, "checkpoint": ""}


def _unet_network(dataset, sigma_data: float, config: str, class_cond: bool) -> tuple[PreconditionedNet, str, int]:
    """PreconditionedNet(U-Net on the EDM process, σ_d, σ_min); config defaults to ``unet``'s for the dataset."""

    if dataset.modality != "image":
        raise Incompatible(f"consistency-unet models images; {dataset.name!r} is {dataset.modality}")
    config = config or UNET_PLUGIN.dataset_defaults.get(dataset.name, UNET_PLUGIN.fallback_config)
    if config not in UNET_CONFIGS:
        raise Incompatible(f"consistency-unet: unknown config {config!r}; valid: {', '.join(UNET_CONFIGS)}")
    num_classes = dataset.num_classes if class_cond else 0
    inner = build_unet(config, dataset.shape[0], dataset.shape[-1], EDMProcess(SIGMA_MIN, SIGMA_MAX), num_classes)
    return PreconditionedNet(inner, sigma_data, SIGMA_MIN), config, num_classes


def consistency_unet_path(dataset_name: str) -> Path:
    return _find(f"consistency-unet-{dataset_name}")


def load_consistency_unet(dataset, *, device="cpu", checkpoint="", config="", class_cond=True) -> Denoiser:
    path = Path(checkpoint).with_suffix("") if checkpoint else consistency_unet_path(dataset.name)
    if dataset.modality == "image" and not path.with_suffix(".safetensors").exists():
        raise Incompatible(f"no consistency-unet checkpoint for {dataset.name!r} at {path}.safetensors; run: "
                           f"diffbench train --model consistency-unet --dataset {dataset.name}")
    if dataset.modality != "image":
        raise Incompatible(f"consistency-unet models images; {dataset.name!r} is {dataset.modality}")
    weights, saved = load_checkpoint(path, device)
    model = saved.get("model", {})
    net, _, num_classes = _unet_network(dataset, float(weights["sigma_data"]), model.get("config", config),
                                        model.get("class_cond", class_cond))
    net.load_state_dict(weights)
    return Denoiser(net.to(device).eval(), EDMProcess(SIGMA_MIN, SIGMA_MAX), "consistency", num_classes=num_classes,
                    null_class=num_classes if num_classes else None, name="consistency-unet")


def train_consistency_unet(dataset, out=None, *, device="cpu", steps=3000, batch_size=128, lr=1e-3, seed=0,
                           progress=True, s0=10, s1=1280, label_dropout=0.1, config="", class_cond=True,
                           checkpoint="") -> Path:
    """iCT (``ConsistencyTraining``: no teacher) of the U-Net on the whole training set, σ_d = its std;
    class-conditional with label dropout for CFG unless class_cond=false."""
    x0, labels = dataset.train_set()
    class_cond = str(class_cond).lower() in ("1", "true", "yes")
    net, config, num_classes = _unet_network(dataset, float(x0.std()), config, class_cond)
    loss_fn = ConsistencyTraining(int(steps), int(s0), int(s1), label_dropout=float(label_dropout) if num_classes
                                  else 0.0, null_class=num_classes)
    record = {"dataset": dataset.name, "method": "ct", "config": config, "class_cond": class_cond, "s0": s0, "s1": s1,
              "label_dropout": label_dropout}
    out = Path(out).with_suffix("") if out else consistency_unet_path(dataset.name)
    cfg = TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=float(lr), seed=int(seed), ema_decay=0.995,
                      checkpoint_every=250)
    train(net, loss_fn, x0, labels if num_classes else None, out, record, cfg, device=device, progress=progress)
    return out.with_suffix(".safetensors")


# --- sampling ---------------------------------------------------------------------------------


def consistency_times(process, steps: int, times="", t_renoise: float = 0.821, rho: float = 7.0) -> list[float]:
    """τ_0 = t_max > τ_1 > ... > τ_{steps−1} > t_min: ``times`` ('/'-separated τ_1..τ_{steps−1}), or
    τ_1 = ``t_renoise`` (the 2-step time CM §6 found by greedy search on CIFAR-10, σ = 0.821) and
    the rest on a Karras ρ-grid of σ/α from there down to t_min, without t_min itself (f is the
    identity there: a wasted call)."""
    if times == "" or times is None:
        s_hi, s_lo = (float(process.sigma(t) / process.alpha(t)) for t in (t_renoise, process.t_min))
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)[:-1]
        s = (s_hi ** (1 / rho) + ramp * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        return [process.t_max] + process.t_from_lambda(-torch.log(s)).tolist()
    given = [float(v) for v in str(times).split("/")]
    if len(given) != steps - 1 or any(a <= b for a, b in zip([process.t_max] + given, given)):
        raise ConfigError(f"multistep-consistency: times must be {steps - 1} decreasing process times below "
                          f"{process.t_max} separated by '/', got {times!r}")
    return [process.t_max] + given


@torch.no_grad()
def sample_multistep_consistency(denoiser, x, timesteps, *, generator, callback=None, times="", t_renoise=0.821,
                                 rho=7.0):
    """Multistep consistency sampling (CM Alg. 1): x̂0 = f(x_T, T); then for each τ_n,
    x_τ = α_τ x̂0 + sqrt(σ_τ² − α_τ² ε²) z and x̂0 = f(x_τ, τ_n), where ε = σ/α at t_min
    (Alg. 1's sqrt(τ_n² − ε²) on EDM). One call per τ: NFE = steps. Uses only len(timesteps)."""
    process = denoiser.process
    taus = consistency_times(process, len(timesteps) - 1, times, t_renoise, rho)
    eps = float(process.sigma(process.t_min) / process.alpha(process.t_min))
    x0 = denoiser(x, taus[0])
    for i, tau in enumerate(taus[1:], start=1):
        a, s = float(process.alpha(tau)), float(process.sigma(tau))
        x = a * x0 + math.sqrt(max(s**2 - a**2 * eps**2, 0.0)) * generator.randn_like(x0)
        x0 = denoiser(x, tau)
        if callback is not None:
            callback({"i": i, "x": x, "t": tau, "denoised": x0})
    return x0


@diffbench.hookimpl
def register_models(register):
    net_options = {**NET_DEFAULTS, "checkpoint": ""}
    register(Model(name="consistency-mlp", family="gaussian", load=load_consistency_mlp, train=train_consistency_mlp,
                   options={**net_options, "method": "cd"},
                   description="consistency model (Song et al. 2023) on EDM, residual MLP for toy points; "
                               "method=cd (distilled from edm-mlp) or ct (iCT)"))
    register(Model(name="edm-mlp", family="gaussian", load=load_edm_mlp, train=train_edm_mlp, options=net_options,
                   description="EDM-preconditioned diffusion MLP for toy points (Karras et al. 2022); the CD teacher"))
    register(Model(name="consistency-unet", family="gaussian", load=load_consistency_unet,
                   train=train_consistency_unet, options=UNET_DEFAULTS,
                   description="consistency model by iCT (no teacher) with the U-Net of plugins/unet.py on EDM; "
                               "class-conditional with a null class for CFG"))


@diffbench.hookimpl
def register_samplers(register):
    register(Sampler(name="multistep-consistency", family="gaussian", fn=sample_multistep_consistency,
                     requires=frozenset({"consistency"}), primary="t_renoise",
                     options={"times": "", "t_renoise": 0.821, "rho": 7.0},
                     description="multistep consistency sampling, Song et al. 2023 Alg. 1 (times 't1/t2/..', or "
                                 "t_renoise then a Karras grid; NFE = steps)"))
