"""Gaussian noise processes x_t = α(t)·x0 + σ(t)·ε (all schedules in float64).

Every process exposes α(t), σ(t), the half log-SNR λ(t) = log(α/σ) and its inverse, the
time range it is sampled over, and the timestep spacing rules samplers share. Time ``t`` is
the process's own time, the one its models are conditioned on: a step index for the
discrete VP process, t ∈ [0, 1] for VP-continuous and flow, σ itself for VE/EDM.

References: Ho et al. 2020 (DDPM, linear β); Nichol & Dhariwal 2021 (cosine ᾱ);
Song et al. 2021 (score SDE, VP-continuous); Karras et al. 2022 (EDM, σ(t) = t and ρ-spacing);
Lipman et al. 2023 / Liu et al. 2023 (flow path α = 1 − t, σ = t).
"""
from __future__ import annotations

import math

import torch

from diffbench.registry import ConfigError

__all__ = ["SPACINGS", "DIFFUSERS_SPACINGS", "PROCESSES", "GaussianProcess", "VPDiscrete", "VPContinuous",
           "EDMProcess", "FlowProcess", "karras_sigmas", "make_process"]

# diffusers' integer grids over N training steps (its set_timesteps), by name; see docs/samplers.md.
DIFFUSERS_SPACINGS = ("leading-offset", "linspace-rounded", "leading-multistep", "leading-multistep-offset",
                      "linspace-multistep")
SPACINGS = ("uniform", "leading", "trailing", "quadratic", "uniform-logsnr", "karras") + DIFFUSERS_SPACINGS
F64 = torch.float64


def _as_f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=F64)


def karras_sigmas(n: int, sigma_start: float, sigma_end: float, rho: float = 7.0) -> torch.Tensor:
    """``n`` noise levels from ``sigma_start`` to ``sigma_end`` (either direction), evenly spaced in
    σ^(1/ρ) (Karras et al. 2022, eq. 5; the N discretization points of consistency models), float64."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=F64)
    return (sigma_start ** (1 / rho) + ramp * (sigma_end ** (1 / rho) - sigma_start ** (1 / rho))) ** rho


class GaussianProcess:
    """Base class: subclasses define ``alpha``, ``sigma``, ``t_from_lambda`` and the time range.

    ``t_max`` is where sampling starts, ``t_min`` the least-noisy time on a sampling grid and
    ``t_data`` the time of clean data (σ = 0), always the last entry of a grid.
    """

    name = "gaussian"
    t_max: float
    t_min: float
    t_data: float

    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def lambda_(self, t) -> torch.Tensor:
        """Half log-SNR λ(t) = log α(t) − log σ(t); +inf at clean data."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_from_lambda(self, lam) -> torch.Tensor:
        raise NotImplementedError

    def alpha_sigma_derivatives(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(dα/dt, dσ/dt), by a float64 central difference unless a subclass knows them."""
        t = _as_f64(t)
        h = 1e-6 * torch.clamp(t.abs(), min=1.0)
        da = (self.alpha(t + h) - self.alpha(t - h)) / (2 * h)
        ds = (self.sigma(t + h) - self.sigma(t - h)) / (2 * h)
        return da, ds

    def prior_std(self, t=None) -> float:
        """Std of x at t (default t_max) under unit-variance data: sqrt(α² + σ²) (1 for VP, ≈σ_max
        for EDM), the scale of x_T for a grid that starts at t."""
        t = self.t_max if t is None else t
        a, s = self.alpha(t), self.sigma(t)
        return float(torch.sqrt(a**2 + s**2))

    def _lambda_range(self) -> tuple[float, float]:
        """(λ at t_max, λ at t_min), clipped to EDM's σ/α ∈ [0.002, 80] where infinite."""
        lo, hi = float(self.lambda_(self.t_max)), float(self.lambda_(self.t_min))
        return (lo if math.isfinite(lo) else -math.log(80.0)), (hi if math.isfinite(hi) else -math.log(0.002))

    def timesteps(self, steps: int, spacing: str = "uniform", *, rho: float = 7.0) -> torch.Tensor:
        """A decreasing float64 grid of ``steps + 1`` times: ``steps`` noisy times then ``t_data``.

        uniform: evenly spaced in t; leading / trailing: evenly spaced fractions that leave out
        t_max / t_min (the conventions of Lin et al. 2024, "Common diffusion noise schedules and
        sample steps are flawed", Table 2); quadratic: t ∝ u² (DDIM, Song et al. 2021, App. D);
        uniform-logsnr: evenly spaced in λ (DPM-Solver, Lu et al. 2022); karras: σ/α evenly
        spaced in its 1/ρ power (EDM eq. 5, ρ = 7). The diffusers grids (:func:`diffusers_indices`)
        are indices over N training steps; a continuous process maps index k to
        t_min + (t_max − t_min) k/(N − 1) with N = 1000 (k + 1 over N where t_min is clean data).
        """
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        if spacing not in SPACINGS:
            raise ConfigError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
        noisy = self._noisy_times(steps, spacing, rho)
        return torch.cat([noisy, _as_f64([self.t_data])])

    def _noisy_times(self, steps: int, spacing: str, rho: float) -> torch.Tensor:
        t_max, t_min = self.t_max, self.t_min
        i = torch.arange(steps, dtype=F64)
        # A grid that reaches the data itself (flow: t_min = t_data) must not repeat it.
        reaches_data = int(t_min == self.t_data)
        if spacing in DIFFUSERS_SPACINGS:  # index k of N = 1000 (k + 1 where t_min is the data itself)
            return t_min + (t_max - t_min) * (diffusers_indices(steps, spacing, 1000) + reaches_data) / (999 + reaches_data)
        if spacing == "uniform":
            if reaches_data:
                return torch.linspace(t_max, t_min, steps + 1, dtype=F64)[:-1]
            return torch.linspace(t_max, t_min, steps, dtype=F64) if steps > 1 else _as_f64([t_max])
        if spacing == "leading":
            return t_min + (t_max - t_min) * (steps - i - 1 + reaches_data) / (steps + reaches_data)
        if spacing == "trailing":
            return t_min + (t_max - t_min) * (steps - i) / steps
        if spacing == "quadratic":  # like uniform, but evenly spaced in sqrt(t − t_min)
            u = torch.linspace(1.0, 0.0, steps + reaches_data, dtype=F64)[: steps] if steps > 1 or reaches_data \
                else _as_f64([1.0])
            return t_min + (t_max - t_min) * u**2
        lam_lo, lam_hi = self._lambda_range()
        if spacing == "uniform-logsnr":
            return self.t_from_lambda(torch.linspace(lam_lo, lam_hi, steps, dtype=F64))
        # karras: s = σ/α from s_max to s_min, evenly in s^(1/ρ); λ = −log s.
        return self.t_from_lambda(-torch.log(karras_sigmas(steps, math.exp(-lam_lo), math.exp(-lam_hi), rho)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def diffusers_indices(steps: int, spacing: str, n: int) -> torch.Tensor:
    """diffusers' ``timesteps`` (decreasing float64 indices in [0, n − 1]) for a named spacing:

    leading-offset:            DDIM/DDPM/Euler/PNDM "leading" with steps_offset=1 (Stable Diffusion):
                               k·(n // steps) + 1
    linspace-rounded:          DDIM/DDPM "linspace": round(linspace(0, n − 1, steps))
    leading-multistep(-offset): DPM-Solver/UniPC/DEIS/SA-Solver "leading": k·(n // (steps + 1)) for
                               k = 1..steps (k = 0 dropped), plus 1 with steps_offset=1
    linspace-multistep:        their "linspace": round(linspace(0, n − 1, steps + 1)), the 0 dropped
    """
    k = torch.arange(steps, 0, -1, dtype=F64)  # steps, ..., 1
    if spacing == "leading-offset":
        return (k - 1) * (n // steps) + 1
    if spacing == "linspace-rounded":
        return torch.linspace(0, n - 1, steps, dtype=F64).round().flip(0)
    if spacing in ("leading-multistep", "leading-multistep-offset"):
        return k * (n // (steps + 1)) + (spacing == "leading-multistep-offset")
    return torch.linspace(0, n - 1, steps + 1, dtype=F64).round().flip(0)[:-1]  # linspace-multistep


class VPDiscrete(GaussianProcess):
    """Discrete-time VP (DDPM): ᾱ_n = ∏_{i≤n}(1 − β_i) for step indices n = 0..N−1.

    t is the step index (as diffusers' timesteps); t = −1 means clean data (ᾱ = 1, the
    "final alpha" of DDIM). Between integer indices log(σ/α) is interpolated linearly, as
    k-diffusion's DiscreteSchedule does, so λ(t) and its inverse are exact on the grid.
    """

    name = "vp-discrete"

    def __init__(self, betas: torch.Tensor, schedule: str = "custom"):
        self.betas = _as_f64(betas)
        self.num_steps = len(self.betas)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.schedule = schedule
        self.t_max, self.t_min, self.t_data = float(self.num_steps - 1), 0.0, -1.0
        # log(σ/α) at each index: the quantity interpolated between indices.
        self._log_snr_inv = 0.5 * torch.log((1 - self.alphas_cumprod) / self.alphas_cumprod)
        self._log_snr_inv_on = {torch.device("cpu"): self._log_snr_inv}  # the table per device

    def _log_snr_inv_table(self, device: torch.device) -> torch.Tensor:
        """The log(σ/α) table on ``device`` (copied once: a network evaluates α(t) on its own device)."""
        if device not in self._log_snr_inv_on:
            self._log_snr_inv_on[device] = self._log_snr_inv.to(device)
        return self._log_snr_inv_on[device]

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """Ho et al. 2020: β linear from 1e-4 to 0.02 (for N = 1000; scaled by 1000/N otherwise)."""
        scale = 1000.0 / num_steps
        return cls(torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=F64), "linear")

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/N + s)/(1 + s)·π/2)."""
        n = torch.arange(num_steps + 1, dtype=F64)
        f = torch.cos((n / num_steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = torch.clamp(1 - f[1:] / f[:-1], max=max_beta)
        return cls(betas, "cosine")

    def _log_s(self, t: torch.Tensor) -> torch.Tensor:
        """log(σ/α) at (fractional) index t ≥ 0."""
        t = t.clamp(0, self.t_max)
        lo = t.floor().long().clamp(max=self.num_steps - 2)
        w = t - lo
        table = self._log_snr_inv_table(t.device)
        return (1 - w) * table[lo] + w * table[lo + 1]

    def alpha(self, t) -> torch.Tensor:
        t = _as_f64(t)
        alpha = torch.rsqrt(1 + torch.exp(2 * self._log_s(t)))
        return torch.where(t < 0, torch.ones_like(alpha), alpha)

    def sigma(self, t) -> torch.Tensor:
        t = _as_f64(t)
        sigma = torch.rsqrt(1 + torch.exp(-2 * self._log_s(t)))
        return torch.where(t < 0, torch.zeros_like(sigma), sigma)

    def alpha_sigma_derivatives(self, t):
        """Exact derivatives of the interpolation: with ℓ = log(σ/α) linear on each segment,
        dα/dt = −α σ² dℓ/dt and dσ/dt = σ α² dℓ/dt (zero at clean data, t < 0)."""
        t = _as_f64(t)
        lo = t.clamp(0, self.t_max).floor().long().clamp(max=self.num_steps - 2)
        table = self._log_snr_inv_table(t.device)
        slope = table[lo + 1] - table[lo]
        a, s = self.alpha(t), self.sigma(t)
        da, ds = -a * s**2 * slope, s * a**2 * slope
        return torch.where(t < 0, torch.zeros_like(da), da), torch.where(t < 0, torch.zeros_like(ds), ds)

    def t_from_lambda(self, lam) -> torch.Tensor:
        """Inverse of the piecewise-linear λ(t) = −log(σ/α)(t) (k-diffusion's sigma_to_t)."""
        log_s = -_as_f64(lam)
        table = self._log_snr_inv  # increasing in t
        idx = torch.searchsorted(table, log_s.clamp(table[0], table[-1]).contiguous()).clamp(1, self.num_steps - 1)
        lo, hi = table[idx - 1], table[idx]
        w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).to(F64) + w

    def _noisy_times(self, steps: int, spacing: str, rho: float) -> torch.Tensor:
        """Integer index grids for diffusers' discrete conventions; the rest as in the base class."""
        n = self.num_steps
        i = torch.arange(steps, dtype=F64)
        if spacing in DIFFUSERS_SPACINGS:
            return diffusers_indices(steps, spacing, n)
        if spacing == "leading":  # diffusers "leading": 0, N/steps, 2N/steps, ... (reversed)
            return ((steps - 1 - i) * (n // steps)).to(F64)
        if spacing == "trailing":  # diffusers "trailing": N−1, N−1−N/steps, ...
            return torch.round(n - i * n / steps) - 1
        return super()._noisy_times(steps, spacing, rho)

    def __repr__(self) -> str:
        return f"VPDiscrete({self.schedule}, N={self.num_steps})"


class VPContinuous(GaussianProcess):
    """Song et al. 2021 (score SDE), VP SDE with β(t) = β_min + t(β_max − β_min), t ∈ [0, 1]:
    log α(t) = −¼t²(β_max − β_min) − ½tβ_min, σ = sqrt(1 − α²)."""

    name = "vp-continuous"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3):
        self.beta_min, self.beta_max = beta_min, beta_max
        self.t_max, self.t_min, self.t_data = 1.0, eps, 0.0

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t) -> torch.Tensor:
        return torch.exp(self._log_alpha(_as_f64(t)))

    def sigma(self, t) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(_as_f64(t))))

    def t_from_lambda(self, lam) -> torch.Tensor:
        # log α² = −log(1 + e^{−2λ}) = −(β_min t + ½Δ t²): solve the quadratic for t ≥ 0.
        log_alpha2 = -torch.nn.functional.softplus(-2 * _as_f64(lam))
        delta = self.beta_max - self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 - 2 * delta * log_alpha2)) / delta

    def __repr__(self) -> str:
        return f"VPContinuous(beta_min={self.beta_min}, beta_max={self.beta_max})"


class EDMProcess(GaussianProcess):
    """VE / EDM (Karras et al. 2022): α = 1, σ(t) = t, sampled over [σ_min, σ_max]."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_max, self.t_min, self.t_data = sigma_max, sigma_min, 0.0

    def alpha(self, t) -> torch.Tensor:
        return torch.ones_like(_as_f64(t))

    def sigma(self, t) -> torch.Tensor:
        return _as_f64(t).clone()

    def t_from_lambda(self, lam) -> torch.Tensor:
        return torch.exp(-_as_f64(lam))

    def alpha_sigma_derivatives(self, t):
        t = _as_f64(t)
        return torch.zeros_like(t), torch.ones_like(t)

    def __repr__(self) -> str:
        return f"EDMProcess(sigma_min={self.t_min}, sigma_max={self.t_max})"


class FlowProcess(GaussianProcess):
    """Rectified-flow / conditional flow-matching path: α = 1 − t, σ = t, t ∈ [0, 1]."""

    name = "flow"

    def __init__(self):
        self.t_max, self.t_min, self.t_data = 1.0, 0.0, 0.0

    def alpha(self, t) -> torch.Tensor:
        return 1.0 - _as_f64(t)

    def sigma(self, t) -> torch.Tensor:
        return _as_f64(t).clone()

    def t_from_lambda(self, lam) -> torch.Tensor:
        # (1 − t)/t = e^λ  =>  t = 1 / (1 + e^λ) = sigmoid(−λ)
        return torch.sigmoid(-_as_f64(lam))

    def alpha_sigma_derivatives(self, t):
        t = _as_f64(t)
        return -torch.ones_like(t), torch.ones_like(t)


PROCESSES = {
    "vp-linear": VPDiscrete.linear,
    "vp-cosine": VPDiscrete.cosine,
    "vp-continuous": VPContinuous,
    "edm": EDMProcess,
    "flow": FlowProcess,
}


def make_process(name: str, **kwargs) -> GaussianProcess:
    """Build a process by name (``vp-linear``, ``vp-cosine``, ``vp-continuous``, ``edm``, ``flow``)."""
    try:
        factory = PROCESSES[name]
    except KeyError:
        raise ConfigError(f"unknown process {name!r}; valid processes: {', '.join(PROCESSES)}") from None
    return factory(**kwargs)
