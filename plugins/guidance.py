"""Guidance plugins: ``none`` (the model as it is), ``cfg`` (classifier-free guidance, Ho & Salimans
2022) and ``classifier`` (classifier guidance, Dhariwal & Nichol 2021).

Both guided denoisers subclass :class:`~diffbench.denoiser.Denoiser` and share the base model's
call counter, so ``D(x, t)``, ``D.eps`` / ``D.score`` / ``D.velocity``, ``D.process``,
``D.nfe`` / ``D.stats`` and ``D.conditioned(labels)`` keep working for every sampler.
"""
from __future__ import annotations

import math

import torch

import diffbench
from diffbench.denoiser import Denoiser, append_dims
from diffbench.registry import Guidance, Incompatible


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

    def _in_interval(self, t, sigma_min: float, sigma_max: float) -> bool:
        """Whether the noise level σ/α at t (EDM's σ, comparable across processes) is in [σ_min, σ_max]."""
        t = torch.as_tensor(t, dtype=torch.float64)
        s = float((self.process.sigma(t) / self.process.alpha(t)).reshape(-1)[0])
        return sigma_min <= s <= sigma_max


class CFGDenoiser(_GuidedDenoiser):
    """Classifier-free guidance: x̂0 = x̂0(x, ∅) + w·(x̂0(x, y) − x̂0(x, ∅)) (equivalently in ε,
    since ε̂ is affine in x̂0 at fixed x, t). The conditional and unconditional predictions come
    from ONE network call on the batch [x; x] with labels [y; ∅]: one NFE per step.
    Outside the noise interval [sigma_min, sigma_max] (Kynkäänniemi et al. 2024, "Applying guidance
    in a limited interval") the plain conditional prediction is used."""

    def __init__(self, base: Denoiser, scale: float, sigma_min: float = 0.0, sigma_max: float = math.inf):
        super().__init__(base, f"cfg{scale:g}")
        if base.null_class is None:
            raise Incompatible(f"cfg needs a model trained with a null class; {base.name!r} has none")
        self.scale, self.sigma_min, self.sigma_max = float(scale), float(sigma_min), float(sigma_max)

    def __call__(self, x, t, cond=None):
        cond = self.cond if cond is None else cond
        if cond is None or not self._in_interval(t, self.sigma_min, self.sigma_max):
            return self._base_x0(x, t, cond)
        cond = torch.as_tensor(cond, device=x.device).expand(x.shape[0])
        null = torch.full_like(cond, self.null_class)
        t = torch.as_tensor(t, dtype=torch.float64)
        t2 = torch.cat([t, t]) if t.ndim == 1 else t
        x0_cond, x0_uncond = self._base_x0(torch.cat([x, x]), t2, torch.cat([cond, null])).chunk(2)
        return x0_uncond + self.scale * (x0_cond - x0_uncond)


class ClassifierGuidedDenoiser(_GuidedDenoiser):
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 / eq. 14): ε̃ = ε̂ − s·σ_t·∇x log p_φ(y | x_t),
    i.e. x̃0 = x̂0 + s·(σ_t²/α_t)·∇x log p_φ(y | x_t), with a noise-conditional classifier p_φ trained
    on the same process. The classifier's gradient is not a model NFE, and its time shows in the
    table's overhead_ms (wall minus network time), not in the network's time."""

    def __init__(self, base: Denoiser, classifier, scale: float):
        super().__init__(base, f"classifier{scale:g}")
        self.classifier, self.scale = classifier, float(scale)

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
        if cond is None or self.scale == 0:
            return x0
        a, s = (append_dims(c, x) for c in (self.process.alpha(t), self.process.sigma(t)))
        return x0 + self.scale * s**2 / a * self.log_prob_grad(x, t, cond)


def apply_cfg(denoiser, scale: float = 1.0, sigma_min: float = 0.0, sigma_max: float = math.inf):
    return CFGDenoiser(denoiser, scale, sigma_min, sigma_max)


def apply_classifier(denoiser, scale: float = 1.0, classifier: str = ""):
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
    return ClassifierGuidedDenoiser(denoiser, net, scale)


@diffbench.hookimpl
def register_guidance(register):
    register(Guidance(name="none", family="any", apply=lambda denoiser: denoiser, conditional=False,
                      description="no guidance: the model's own (conditional, if it is) prediction"))
    register(Guidance(name="cfg", family="gaussian", apply=apply_cfg, primary="scale",
                      options={"scale": 1.0, "sigma_min": 0.0, "sigma_max": math.inf}, aliases=("classifier-free",),
                      description="classifier-free guidance (one batched NFE per step); cfg:W, optional σ interval"))
    register(Guidance(name="classifier", family="gaussian", apply=apply_classifier, primary="scale",
                      options={"scale": 1.0, "classifier": ""},
                      description="classifier guidance with a noise-conditional classifier (Dhariwal & Nichol 2021)"))
