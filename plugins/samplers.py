"""Samplers for Gaussian diffusion models, one function per algorithm (k-diffusion style).

Every sampler speaks only to the denoiser contract: ``denoiser(x, t) -> x̂0`` and
``denoiser.process`` (α(t), σ(t), λ(t)). ``timesteps`` is a decreasing float64 grid of
``steps + 1`` process times ending at clean data; ``generator`` gives per-sample noise.
Transitions between times t > s use the Gaussian-process posterior (Kingma et al. 2021, VDM
eqs. 4 and 32–33), with α_{t|s} = α_t/α_s and σ²_{t|s} = σ_t² − α²_{t|s} σ_s².
"""
from __future__ import annotations

import torch

import diffbench
from diffbench.registry import ConfigError, Sampler


def _coeffs(process, t, s):
    """(α_t, σ_t, α_s, σ_s, σ²_{t|s}) as float64 scalars."""
    a_t, s_t, a_s, s_s = process.alpha(t), process.sigma(t), process.alpha(s), process.sigma(s)
    var_ts = s_t**2 - (a_t / a_s) ** 2 * s_s**2
    return a_t, s_t, a_s, s_s, var_ts


def _report(callback, i, x, t, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "t": t, "denoised": denoised})


@torch.no_grad()
def sample_ddpm(denoiser, x, timesteps, *, generator, callback=None, variance="small"):
    """Ancestral sampling (Ho et al. 2020, Alg. 2) with the true posterior q(x_s | x_t, x̂0):

        μ = (α_{t|s} σ_s²/σ_t²) x_t + (α_s σ²_{t|s}/σ_t²) x̂0,
        variance "small": β̃ = σ²_{t|s} σ_s²/σ_t²  (posterior variance, eq. 7);
        variance "large": β = σ²_{t|s}             (the other choice of §3.2).
    """
    if variance not in ("small", "large"):
        raise ConfigError(f"ddpm: variance must be 'small' or 'large', got {variance!r}")
    for i, (t, s) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        a_t, s_t, a_s, s_s, var_ts = _coeffs(denoiser.process, t, s)
        x0 = denoiser(x, t)
        mean = float((a_t / a_s) * s_s**2 / s_t**2) * x + float(a_s * var_ts / s_t**2) * x0
        var = var_ts * s_s**2 / s_t**2 if variance == "small" else var_ts
        x = mean + float(var.sqrt()) * generator.randn_like(x) if s_s > 0 else mean
        _report(callback, i, x, t, x0)
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, timesteps, *, generator, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): x_s = α_s x̂0 + sqrt(σ_s² − c²) ε̂ + c z, with
    c = η · sqrt(σ²_{t|s} σ_s² / σ_t²) (eq. 16; η = 0 is the deterministic ODE sampler,
    η = 1 recovers DDPM's posterior variance)."""
    for i, (t, s) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        a_t, s_t, a_s, s_s, var_ts = _coeffs(denoiser.process, t, s)
        x0 = denoiser(x, t)
        eps = (x - float(a_t) * x0) / float(s_t)
        c = eta * (var_ts * s_s**2 / s_t**2).clamp(min=0).sqrt()
        x = float(a_s) * x0 + float((s_s**2 - c**2).clamp(min=0).sqrt()) * eps
        if c > 0:
            x = x + float(c) * generator.randn_like(x)
        _report(callback, i, x, t, x0)
    return x


@diffbench.hookimpl
def register_samplers(register):
    register(Sampler(name="ddpm", family="gaussian", fn=sample_ddpm, options={"variance": "small"},
                     description="ancestral sampling, Ho et al. 2020 (variance: small=β̃ posterior, large=β)"))
    register(Sampler(name="ddim", family="gaussian", fn=sample_ddim, options={"eta": 0.0}, primary="eta",
                     description="DDIM, Song et al. 2021 (eta=0 deterministic; eta=1 ancestral)"))
