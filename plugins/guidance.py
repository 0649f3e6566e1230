"""Guidance plugins: ``none`` (the model as it is), ``cfg`` (classifier-free guidance, Ho & Salimans
2022), ``classifier`` (classifier guidance, Dhariwal & Nichol 2021), ``apg`` (Sadat et al. 2024),
``cfg-zero-star`` (Fan et al. 2025), ``cfg++`` (Chung et al. 2024) and ``autoguidance`` (Karras et
al. 2024). Every guidance takes ``sigma_min`` / ``sigma_max``: outside that noise interval (σ/α) the
plain conditional prediction is used (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval").

All guided denoisers subclass :class:`~diffbench.denoiser.Denoiser` and share the base model's
call counter, so ``D(x, t)``, ``D.eps`` / ``D.score`` / ``D.velocity``, ``D.process``,
``D.nfe`` / ``D.stats`` and ``D.conditioned(labels)`` keep working for every sampler.
"""
from __future__ import annotations

import copy
import math

import torch

import diffbench
from diffbench.checkpoints import find_checkpoint
from diffbench.denoiser import Denoiser, append_dims
from diffbench.registry import Guidance, Incompatible, Option

INTERVAL = {"sigma_min": Option(0.0, min=0.0), "sigma_max": Option(math.inf, min=0.0)}


class _GuidedDenoiser(Denoiser):
    """A denoiser over the same network, process and call counter as ``base``."""

    def __init__(self, base: Denoiser, label: str):
        if not isinstance(base, Denoiser):
            raise Incompatible(f"{label} guides Gaussian denoisers; got {type(base).__name__}")
        super().__init__(base.net, base.process, base.parameterization, num_classes=base.num_classes,
                         null_class=base.null_class, capabilities=base.capabilities, name=f"{base.name}+{label}")
        self.base = base
        self.stats = base.stats
        self.cond = base.cond
        self.dataset_name = getattr(base, "dataset_name", "")

    def _base_x0(self, x, t, cond):
        return self.base.to_x0(x, t, self.raw(x, t, cond))

    def cond_uncond_x0(self, x, t, cond):
        """(x̂0(x, y), x̂0(x, ∅)) from ONE network call on [x; x] with labels [y; ∅]: one NFE."""
        cond = torch.as_tensor(cond, device=x.device).expand(x.shape[0])
        t = torch.as_tensor(t, dtype=torch.float64)
        t2 = torch.cat([t, t]) if t.ndim == 1 else t
        return self._base_x0(torch.cat([x, x]), t2, torch.cat([cond, torch.full_like(cond, self.null_class)])).chunk(2)

    def _in_interval(self, t, sigma_min: float, sigma_max: float) -> bool:
        """Whether the noise level σ/α at t (EDM's σ, comparable across processes) is in [σ_min, σ_max]."""
        t = torch.as_tensor(t, dtype=torch.float64)
        s = float((self.process.sigma(t) / self.process.alpha(t)).reshape(-1)[0])
        return sigma_min <= s <= sigma_max


class CFGDenoiser(_GuidedDenoiser):
    """Classifier-free guidance: x̂0 = x̂0(x, ∅) + w·(x̂0(x, y) − x̂0(x, ∅)) (equivalently in ε,
    since ε̂ is affine in x̂0 at fixed x, t). The conditional and unconditional predictions come
    from ONE network call on the batch [x; x] with labels [y; ∅]: one NFE per step. At w = 1
    (w = 0) only the conditional (unconditional) half is computed: same samples, half the work.
    Outside the noise interval [sigma_min, sigma_max] (Kynkäänniemi et al. 2024, "Applying guidance
    in a limited interval") the plain conditional prediction is used."""

    def __init__(self, base: Denoiser, scale: float, sigma_min: float = 0.0, sigma_max: float = math.inf):
        super().__init__(base, f"cfg{scale:g}")
        if base.null_class is None:
            raise Incompatible(f"cfg needs a model trained with a null class; {base.name!r} has none")
        self.scale, self.sigma_min, self.sigma_max = float(scale), float(sigma_min), float(sigma_max)

    def __call__(self, x, t, cond=None):
        cond = self.cond if cond is None else cond
        # w = 1 is the conditional prediction alone: no unconditional half to compute.
        if cond is None or self.scale == 1 or not self._in_interval(t, self.sigma_min, self.sigma_max):
            return self._base_x0(x, t, cond)
        if self.scale == 0:  # w = 0 is the unconditional prediction alone
            return self._base_x0(x, t, torch.full((x.shape[0],), self.null_class, device=x.device))
        x0_cond, x0_uncond = self.cond_uncond_x0(x, t, cond)
        return x0_uncond + self.scale * (x0_cond - x0_uncond)


class ClassifierGuidedDenoiser(_GuidedDenoiser):
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 / eq. 14): ε̃ = ε̂ − s·σ_t·∇x log p_φ(y | x_t),
    i.e. x̃0 = x̂0 + s·(σ_t²/α_t)·∇x log p_φ(y | x_t), with a noise-conditional classifier p_φ trained
    on the same process. The classifier's gradient is not a model NFE, and its time shows in the
    table's overhead_ms (wall minus network time), not in the network's time."""

    def __init__(self, base: Denoiser, classifier, scale: float, sigma_min: float = 0.0, sigma_max: float = math.inf):
        super().__init__(base, f"classifier{scale:g}")
        self.classifier, self.scale = classifier, float(scale)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def log_prob_grad(self, x, t, cond):
        """∇x log p_φ(y | x_t) [B, ...] (summed log-probs: each sample's gradient is its own)."""
        t_batch = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0]).to(device=x.device, dtype=torch.float32)
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            log_probs = self.classifier(x_in, t_batch).log_softmax(-1)
            selected = log_probs[torch.arange(len(x)), torch.as_tensor(cond, device=x.device).expand(len(x))]
            return torch.autograd.grad(selected.sum(), x_in)[0].to(x.dtype)

    def __call__(self, x, t, cond=None):
        cond = self.cond if cond is None else cond
        x0 = self._base_x0(x, t, cond)
        if cond is None or self.scale == 0 or not self._in_interval(t, self.sigma_min, self.sigma_max):
            return x0
        a, s = (append_dims(c, x) for c in (self.process.alpha(t), self.process.sigma(t)))
        return x0 + self.scale * s**2 / a * self.log_prob_grad(x, t, cond)


# --- Guidance on two predictions: APG, CFG-Zero*, CFG++, autoguidance -------------------------


def _dot(a, b):
    """Per-sample inner product over all non-batch dimensions, shaped to broadcast against a: [B, 1, ...]."""
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


class _TwoPredictionGuidance(_GuidedDenoiser):
    """Guidance that combines the conditional x̂0 with a second prediction (the unconditional one of
    the same network, from one batched call, unless ``guide_x0`` is overridden), inside the noise
    interval [sigma_min, sigma_max]; outside it, and without a label, the conditional x̂0.

    ``combine(x, t, x0_cond, x0_guide, step)`` gives the guided x̂0; ``step`` counts the calls of
    the current trajectory (it restarts when t does not decrease), for stateful rules.
    """

    needs_null_class = True

    def __init__(self, base: Denoiser, label: str, scale: float, sigma_min: float, sigma_max: float):
        super().__init__(base, label)
        if self.needs_null_class and base.null_class is None:
            raise Incompatible(f"{label} needs a model trained with a null class; {base.name!r} has none")
        self.scale, self.sigma_min, self.sigma_max = float(scale), float(sigma_min), float(sigma_max)
        self.step, self.last_t = 0, -math.inf  # the first call (t < -inf is false) is step 0

    def guide_x0(self, x, t, cond):
        """(x̂0(x, y), the guiding x̂0): by default the unconditional one, in the same network call."""
        return self.cond_uncond_x0(x, t, cond)

    def __call__(self, x, t, cond=None):
        cond = self.cond if cond is None else cond
        t_now = float(torch.as_tensor(t, dtype=torch.float64).reshape(-1)[0])
        self.step, self.last_t = (self.step + 1 if t_now < self.last_t else 0), t_now
        if cond is None or not self._in_interval(t, self.sigma_min, self.sigma_max):
            return self._base_x0(x, t, cond)
        return self.combine(x, t, *self.guide_x0(x, t, cond), self.step)


class APGDenoiser(_TwoPredictionGuidance):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts of
    high guidance scales", §3–4) on the denoised predictions, Δ = x̂0(y) − x̂0(∅):

        Δ ← Δ + β Δ_prev        (reverse momentum, β = ``momentum`` < 0; eq. 12)
        Δ ← Δ · min(1, r/‖Δ‖)   (rescaling, r = ``norm_threshold``; eq. 10)
        Δ = Δ∥ + Δ⊥,  Δ∥ = (⟨Δ, x̂0(y)⟩/‖x̂0(y)‖²) x̂0(y)   (eq. 7)
        x̂0 = x̂0(y) + (w − 1)(Δ⊥ + η Δ∥)                    (eq. 9)

    η = 1, β = 0, r = ∞ is CFG exactly."""

    def __init__(self, base, scale, eta, momentum, norm_threshold, sigma_min, sigma_max):
        super().__init__(base, f"apg{scale:g}", scale, sigma_min, sigma_max)
        self.eta, self.momentum, self.norm_threshold = float(eta), float(momentum), float(norm_threshold)
        self.running = None

    def combine(self, x, t, x0_cond, x0_uncond, step):
        diff = x0_cond - x0_uncond
        if self.momentum:
            diff = diff + self.momentum * self.running if step and self.running is not None else diff
            self.running = diff
        norm = _dot(diff, diff).sqrt()
        diff = diff * torch.clamp(self.norm_threshold / norm.clamp(min=1e-12), max=1.0)
        parallel = _dot(diff, x0_cond) / _dot(x0_cond, x0_cond).clamp(min=1e-12) * x0_cond
        return x0_cond + (self.scale - 1) * (diff - parallel + self.eta * parallel)


class CFGZeroStarDenoiser(_TwoPredictionGuidance):
    """CFG-Zero* (Fan et al. 2025, §3): in the velocity u = α' x̂0 + σ' ε̂ of the process (the flow
    models' own output), the unconditional velocity is scaled by the per-sample least-squares
    s* = ⟨u_y, u_∅⟩/‖u_∅‖² (eq. 8) before guiding, û = s* u_∅ + w (u_y − s* u_∅), and the first
    ``zero_init_steps`` steps of a trajectory return û = 0 ("zero-init", §3.2). s* = 1 is CFG."""

    def __init__(self, base, scale, zero_init_steps, optimized_scale, sigma_min, sigma_max):
        super().__init__(base, f"cfg-zero-star{scale:g}", scale, sigma_min, sigma_max)
        self.zero_init_steps, self.optimized_scale = int(zero_init_steps), bool(optimized_scale)

    def combine(self, x, t, x0_cond, x0_uncond, step):
        a, s = (append_dims(c, x) for c in (self.process.alpha(t), self.process.sigma(t)))
        da, ds = (append_dims(c, x) for c in self.process.alpha_sigma_derivatives(t))
        velocity = lambda x0: da * x0 + ds * (x - a * x0) / s  # noqa: E731
        u_cond, u_uncond = velocity(x0_cond), velocity(x0_uncond)
        s_star = _dot(u_cond, u_uncond) / _dot(u_uncond, u_uncond).clamp(min=1e-12) if self.optimized_scale else 1.0
        u = 0 * u_cond if step < self.zero_init_steps else s_star * u_uncond + self.scale * (u_cond - s_star * u_uncond)
        return (ds * x - s * u) / (a * ds - s * da)  # x̂0 from the velocity (diffbench.denoiser)


class CFGPlusPlusDenoiser(_TwoPredictionGuidance):
    """CFG++ (Chung et al. 2024, Alg. 1): the step to the next grid time s re-noises with the
    UNconditional noise, x_s = α_s x̂0_λ + σ_s ε̂_∅, x̂0_λ = x̂0(∅) + λ (x̂0(y) − x̂0(∅)), λ ∈ [0, 1].

    Samplers only see x̂0, and a DDIM / DPM-Solver-1 step maps x̂0 to α_s x̂0 + (σ_s/σ_t)(x − α_t x̂0);
    so this returns the x̂0* whose step is CFG++'s: x̂0* = (α_s x̂0_λ − (σ_s α_t/σ_t) x̂0(∅)) /
    (α_s − σ_s α_t/σ_t). Exact for first-order samplers (ddim, dpm-solver++[variant=...] at order 1);
    higher-order samplers see it through their extrapolation. Needs the grid (``bind_timesteps``)."""

    def __init__(self, base, scale, sigma_min, sigma_max):
        super().__init__(base, f"cfg++{scale:g}", scale, sigma_min, sigma_max)
        self.timesteps = None

    def bind_timesteps(self, timesteps):
        self.timesteps = timesteps

    def combine(self, x, t, x0_cond, x0_uncond, step):
        if self.timesteps is None:
            raise Incompatible("cfg++ needs the sampling grid (bind_timesteps) to know the next time")
        t = float(torch.as_tensor(t, dtype=torch.float64).reshape(-1)[0])
        later = self.timesteps[self.timesteps < t - 1e-9]
        s = later[0] if len(later) else self.timesteps[-1]
        a_t, s_t, a_s, s_s = (float(f(v)) for v, f in ((t, self.process.alpha), (t, self.process.sigma),
                                                        (s, self.process.alpha), (s, self.process.sigma)))
        x0_lam = x0_uncond + self.scale * (x0_cond - x0_uncond)
        carry = s_s * a_t / s_t  # coefficient of −x̂0 in the step's re-noising term
        return (a_s * x0_lam - carry * x0_uncond) / (a_s - carry)


class AutoguidedDenoiser(_TwoPredictionGuidance):
    """Autoguidance (Karras et al. 2024, eq. 2): guide with a weaker model D0 of the same family on the
    same condition, x̂0 = D0(x; y) + w (D1(x; y) − D0(x; y)). Two network calls per step (NFE 2), both
    counted; the weak model needs no null class."""

    needs_null_class = False

    def __init__(self, base, weak: Denoiser, scale, sigma_min, sigma_max):
        super().__init__(base, f"autoguidance{scale:g}", scale, sigma_min, sigma_max)
        self.weak = copy.copy(weak)
        self.weak.stats = base.stats

    def guide_x0(self, x, t, cond):
        return self._base_x0(x, t, cond), self.weak(x, t, cond)

    def combine(self, x, t, x0_cond, x0_weak, step):
        return x0_weak + self.scale * (x0_cond - x0_weak)


def apply_apg(denoiser, scale=1.0, eta=0.0, momentum=0.0, norm_threshold=math.inf, sigma_min=0.0, sigma_max=math.inf):
    return APGDenoiser(denoiser, scale, eta, momentum, norm_threshold, sigma_min, sigma_max)


def apply_cfg_zero_star(denoiser, scale=1.0, zero_init_steps=0, optimized_scale=True, sigma_min=0.0, sigma_max=math.inf):
    return CFGZeroStarDenoiser(denoiser, scale, zero_init_steps, optimized_scale, sigma_min, sigma_max)


def apply_cfg_plus_plus(denoiser, scale=0.5, sigma_min=0.0, sigma_max=math.inf):
    return CFGPlusPlusDenoiser(denoiser, scale, sigma_min, sigma_max)


def apply_autoguidance(denoiser, scale=2.0, guide: str = "", sigma_min=0.0, sigma_max=math.inf):
    """``guide`` is a model reference (e.g. ``unet[checkpoint=path/to/weak]``); default: the same
    model with the shipped under-trained checkpoint ``<model>-<dataset>-weak``."""
    from diffbench.plugins import build_registry

    dataset = getattr(denoiser, "dataset_name", "")
    if not isinstance(denoiser, Denoiser) or not dataset:
        raise Incompatible("autoguidance needs an image model that knows its dataset")
    weak_name = f"{denoiser.name}-{dataset}-weak"
    weak_path = find_checkpoint(weak_name)
    if not guide and weak_path is None:
        raise Incompatible(f"autoguidance: no weak checkpoint {weak_name} for {denoiser.name!r}; option guide=MODEL")
    registry = build_registry()
    ref = registry.resolve("models", guide or f"{denoiser.name}[checkpoint={weak_path}]")
    source = registry.get("datasets", dataset)
    device = next(iter(denoiser.net.parameters())).device if isinstance(denoiser.net, torch.nn.Module) else "cpu"
    weak = registry.get("models", ref.name).load(source.load(**source.defaults), device=device,
                                                 **registry.options("models", ref))
    if repr(weak.process) != repr(denoiser.process):
        raise Incompatible(f"autoguidance: the guide runs on {weak.process!r}, the model on {denoiser.process!r}")
    return AutoguidedDenoiser(denoiser, weak, scale, sigma_min, sigma_max)


def apply_cfg(denoiser, scale: float = 1.0, sigma_min: float = 0.0, sigma_max: float = math.inf):
    return CFGDenoiser(denoiser, scale, sigma_min, sigma_max)


def apply_classifier(denoiser, scale: float = 1.0, classifier: str = "", sigma_min: float = 0.0,
                     sigma_max: float = math.inf):
    """``classifier`` names a noise-conditional classifier checkpoint; default ``<dataset>-noisy-cnn``
    from the model's dataset (``denoiser.dataset_name``, set by the image model plugins)."""
    from diffbench.process import VPDiscrete
    from diffbench_plugins.classifier import load_classifier

    if not isinstance(denoiser, Denoiser):
        raise Incompatible("classifier guidance needs a Gaussian denoiser")
    name = classifier or (f"{denoiser.dataset_name}-noisy-cnn" if getattr(denoiser, "dataset_name", "") else "")
    if not name:
        raise Incompatible("classifier guidance: no noise-conditional classifier for this model (option classifier=NAME)")
    net = load_classifier(name, next(iter(denoiser.net.parameters())).device
                          if isinstance(denoiser.net, torch.nn.Module) else "cpu")
    proc, cproc = denoiser.process, net.process
    if not (isinstance(proc, VPDiscrete) and isinstance(cproc, VPDiscrete)
            and torch.allclose(proc.alphas_cumprod, cproc.alphas_cumprod)):
        raise Incompatible(f"classifier {name!r} was trained on {cproc!r}; the model runs on {proc!r}")
    return ClassifierGuidedDenoiser(denoiser, net, scale, sigma_min, sigma_max)


@diffbench.hookimpl
def register_guidance(register):
    register(Guidance(name="none", family="any", apply=lambda denoiser: denoiser, conditional=False,
                      description="no guidance: the model's own (conditional, if it is) prediction"))
    register(Guidance(name="cfg", family="gaussian", apply=apply_cfg, primary="scale",
                      options={"scale": 1.0, "sigma_min": Option(0.0, min=0.0), "sigma_max": Option(math.inf, min=0.0)}, aliases=("classifier-free",),
                      description="classifier-free guidance (one batched NFE per step); cfg:W, optional σ interval"))
    register(Guidance(name="classifier", family="gaussian", apply=apply_classifier, primary="scale",
                      options={"scale": 1.0, "classifier": "", **INTERVAL},
                      description="classifier guidance with a noise-conditional classifier (Dhariwal & Nichol 2021)"))
    register(Guidance(name="apg", family="gaussian", apply=apply_apg, primary="scale",
                      options={"scale": 1.0, "eta": 0.0, "momentum": 0.0, "norm_threshold": math.inf, **INTERVAL},
                      description="adaptive projected guidance, Sadat et al. 2024 (eta=1, no momentum/threshold = CFG)"))
    register(Guidance(name="cfg-zero-star", family="gaussian", apply=apply_cfg_zero_star, primary="scale",
                      options={"scale": 1.0, "zero_init_steps": 0, "optimized_scale": True, **INTERVAL},
                      description="CFG-Zero*, Fan et al. 2025 (optimized unconditional scale in velocity, zero-init)"))
    register(Guidance(name="cfg++", family="gaussian", apply=apply_cfg_plus_plus, primary="scale",
                      options={"scale": Option(0.5, min=0.0, max=1.0), **INTERVAL},
                      description="CFG++, Chung et al. 2024 (λ in [0,1]; re-noises with the unconditional ε)"))
    register(Guidance(name="autoguidance", family="gaussian", apply=apply_autoguidance, primary="scale",
                      options={"scale": 2.0, "guide": "", **INTERVAL},
                      description="autoguidance, Karras et al. 2024: guide with a weaker model (NFE 2 per step)"))
