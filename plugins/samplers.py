"""Samplers for Gaussian diffusion models, one function per algorithm (k-diffusion style).

Every sampler speaks only to the denoiser contract: ``denoiser(x, t) -> x̂0`` and
``denoiser.process`` (α(t), σ(t), λ(t) = log(α/σ) and its inverse). ``timesteps`` is a
decreasing float64 grid of ``steps + 1`` process times whose last entry is clean data (σ = 0);
``generator`` gives per-sample noise (``generator.randn_like``). Schedule coefficients are
float64 host scalars computed from that grid, so no loop ever syncs with the device.

Notation: x_t = α_t x0 + σ_t ε. Every sampler steps from ``t_cur`` to ``t_next`` < ``t_cur``
(one pair per grid interval); for such a step α_{cur|next} = α_cur/α_next and
σ²_{cur|next} = σ_cur² − α²_{cur|next} σ_next² (Kingma et al. 2021, VDM eqs. 4 and 32–33,
there written α_{t|s}, σ²_{t|s} with t > s).

NFE (model calls) for ``steps`` = len(timesteps) − 1:

    ddpm, ddim, euler, dpm-solver[method=multistep], dpm-solver++ 2m/3m   steps
    heun                                                                    2·steps − 1
    dpm-solver[method=singlestep, order=k], dpm-solver++ 2s (k = 2)       k·(steps − 1) + 1
    langevin                                                                n_steps_each·steps + 1
    pc                                                                      steps + n_steps_each·(steps − 1)
    one-step                                                                1
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

import diffbench
from diffbench.registry import ConfigError, Incompatible, Sampler


def _report(callback, i, x, t, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "t": t, "denoised": denoised})


def _check(sampler: str, option: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{sampler}: {option} must be one of {', '.join(map(repr, valid))}, got {value!r}")


class Transition(NamedTuple):
    """The schedule at both ends of a step t_cur -> t_next, as float64 0-d tensors."""

    alpha_cur: torch.Tensor
    sigma_cur: torch.Tensor
    alpha_next: torch.Tensor
    sigma_next: torch.Tensor
    var: torch.Tensor  # σ²_{cur|next}: the variance the forward process adds from t_next to t_cur


def transition(process, t_cur, t_next) -> Transition:
    a_cur, s_cur, a_next, s_next = process.alpha(t_cur), process.sigma(t_cur), process.alpha(t_next), process.sigma(t_next)
    return Transition(a_cur, s_cur, a_next, s_next, s_cur**2 - (a_cur / a_next) ** 2 * s_next**2)


# --- DDPM and DDIM -------------------------------------------------------------------------


def _posterior_step(process, x, x0, t_cur, t_next, variance, generator):
    """One ancestral step x_cur -> x_next from q(x_next | x_cur, x̂0) (Ho et al. 2020, eqs. 6–7; VDM eq. 33):

        μ = (α_{cur|next} σ_next²/σ_cur²) x_cur + (α_next σ²_{cur|next}/σ_cur²) x̂0,
        variance "small": β̃ = σ²_{cur|next} σ_next²/σ_cur² (the posterior's), "large": β = σ²_{cur|next} (§3.2).

    No noise is added on the last step to clean data (Alg. 2: z = 0 at t = 1).
    """
    tr = transition(process, t_cur, t_next)
    mean = (float((tr.alpha_cur / tr.alpha_next) * tr.sigma_next**2 / tr.sigma_cur**2) * x
            + float(tr.alpha_next * tr.var / tr.sigma_cur**2) * x0)
    if tr.sigma_next == 0:
        return mean
    var = tr.var * tr.sigma_next**2 / tr.sigma_cur**2 if variance == "small" else tr.var
    return mean + float(var.sqrt()) * generator.randn_like(x)


@torch.no_grad()
def sample_ddpm(denoiser, x, timesteps, *, generator, callback=None, variance="small"):
    """Ancestral sampling (Ho et al. 2020, Alg. 2) on any grid, with either variance choice."""
    _check("ddpm", "variance", variance, ("small", "large"))
    for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        x0 = denoiser(x, t_cur)
        x = _posterior_step(denoiser.process, x, x0, t_cur, t_next, variance, generator)
        _report(callback, i, x, t_cur, x0)
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, timesteps, *, generator, callback=None, eta=0.0):
    """DDIM (Song et al. 2021a, eq. 12): x_next = α_next x̂0 + sqrt(σ_next² − c²) ε̂ + c z, with
    c = η · sqrt(σ²_{cur|next} σ_next²/σ_cur²) (eq. 16; η = 0 is the deterministic ODE sampler,
    η = 1 has DDPM's posterior variance)."""
    for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        tr = transition(denoiser.process, t_cur, t_next)
        x0 = denoiser(x, t_cur)
        eps = (x - float(tr.alpha_cur) * x0) / float(tr.sigma_cur)
        c = eta * (tr.var * tr.sigma_next**2 / tr.sigma_cur**2).clamp(min=0).sqrt()
        x = float(tr.alpha_next) * x0 + float((tr.sigma_next**2 - c**2).clamp(min=0).sqrt()) * eps
        if c > 0:
            x = x + float(c) * generator.randn_like(x)
        _report(callback, i, x, t_cur, x0)
    return x


# --- DPM-Solver and DPM-Solver++ -----------------------------------------------------------
#
# Both solve the probability-flow ODE exactly in its linear part and integrate the model
# output m in the half log-SNR λ (Lu et al. 2022a, eq. 3.4; Lu et al. 2022b, eq. 8):
#
#   DPM-Solver   (m = ε̂):  x_next = (α_next/α_cur) x_cur − α_next ∫_{λ_cur}^{λ_next} e^{−λ} ε̂ dλ
#   DPM-Solver++ (m = x̂0): x_next = (σ_next/σ_cur) x_cur + σ_next ∫_{λ_cur}^{λ_next} e^{λ}  x̂0 dλ
#
# (the papers write the step s -> t). Both read x_next = (c_next/c_cur) x_cur + d_next ∫_0^h e^{−(h−u)} m(u) du
# with (c, d, h) = (α, σ, λ_cur − λ_next) for DPM-Solver and (σ, α, λ_next − λ_cur) for DPM-Solver++.
# Expanding m in u (Taylor, eq. 3.6 of 2022a) gives the coefficients φ1 = 1 − e^{−h}, h·φ2 and
# h²·φ3 of m, m' and m'' below; an order-k solver replaces the derivatives by finite differences
# of earlier model outputs.


class Phis(NamedTuple):
    """∫_0^h e^{−(h−u)} (u/h)^j / j! du for j = 0, 1, 2."""

    phi1: float
    phi2: float
    phi3: float


def _phis(h: float) -> Phis:
    """(φ1, φ2, φ3) at h; h = ±inf allowed for φ1."""
    phi1 = -math.expm1(-h)
    return Phis(phi1, 1 - phi1 / h, 0.5 - (h - phi1) / h**2)


class ExponentialStep(NamedTuple):
    """x_next = c_ratio · x_cur + d_next · ∫_0^h e^{−(h−u)} m(u) du (see above)."""

    c_ratio: float  # c_next / c_cur
    d_next: float
    h: float


class _ExponentialIntegrator:
    """The (c, d, h) of one DPM-Solver step and the model output it integrates (see above)."""

    def __init__(self, denoiser, data_prediction: bool):
        self.denoiser, self.process, self.data_prediction = denoiser, denoiser.process, data_prediction

    def model(self, x, t):
        """(x̂0, m): m = x̂0 for DPM-Solver++, m = ε̂ = (x − α x̂0)/σ for DPM-Solver."""
        x0 = self.denoiser(x, t)
        if self.data_prediction:
            return x0, x0
        return x0, (x - float(self.process.alpha(t)) * x0) / float(self.process.sigma(t))

    def lam(self, t) -> float:
        """λ signed so that h = lam(t_next) − lam(t_cur) (λ for DPM-Solver++, −λ for DPM-Solver)."""
        lam = float(self.process.lambda_(t))
        return lam if self.data_prediction else -lam

    def step(self, t_cur, t_next) -> ExponentialStep:
        tr = transition(self.process, t_cur, t_next)
        a_cur, s_cur, a_next, s_next = (float(v) for v in tr[:4])
        c_ratio, d_next = (s_next / s_cur, a_next) if self.data_prediction else (a_next / a_cur, s_next)
        return ExponentialStep(c_ratio, d_next, self.lam(t_next) - self.lam(t_cur))

    def time_between(self, t_cur, t_next, r: float):
        """The time whose λ is λ_cur + r (λ_next − λ_cur): the intermediate points of singlestep solvers."""
        lam_cur, lam_next = self.process.lambda_(t_cur), self.process.lambda_(t_next)
        return self.process.t_from_lambda(lam_cur + r * (lam_next - lam_cur))

    def first_order(self, x, t_cur, t_next, m):
        """DPM-Solver-1 (2022a, eq. 3.7 = DDIM) / DPM-Solver++(1) (2022b, eq. 9)."""
        st = self.step(t_cur, t_next)
        return st.c_ratio * x + st.d_next * _phis(st.h).phi1 * m


def _multistep_update(ei, x, t_cur, t_next, history):
    """One multistep step t_cur -> t_next from the model outputs [(lam, m)] at t_cur and before
    (newest first).

    Order 2 (DPM-Solver++ Alg. 2, "2M"; multistep DPM-Solver-2 of 2022b, App. B):
        x_next = c x_cur + d φ1 (m0 + D1/2),  D1 = (m0 − m1)/r0,  r0 = h0/h.
    Order 3 (2022b, App. B, "3M"): D1 ≈ h m' and D2 ≈ h² m''/2 from three outputs, then
        x_next = c x_cur + d (φ1 m0 + φ2 D1 + 2 φ3 D2).
    (The reference implementation weights D2 by φ3; with D2 ≈ h² m''/2 that drops half of the
    m'' term and the method falls to second order, which tests/test_convergence.py shows.)
    """
    (lam0, m0), k = history[0], len(history)
    if k == 1:
        return ei.first_order(x, t_cur, t_next, m0)
    st = ei.step(t_cur, t_next)
    phi = _phis(st.h)
    r0 = (lam0 - history[1][0]) / st.h
    d1_0 = (m0 - history[1][1]) / r0
    if k == 2:
        return st.c_ratio * x + st.d_next * phi.phi1 * (m0 + 0.5 * d1_0)
    r1 = (history[1][0] - history[2][0]) / st.h
    d1_1 = (history[1][1] - history[2][1]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return st.c_ratio * x + st.d_next * (phi.phi1 * m0 + phi.phi2 * d1 + 2 * phi.phi3 * d2)


def _singlestep_update(ei, x, t_cur, t_next, m0, order):
    """One singlestep step t_cur -> t_next with ``order`` model calls (the first, m0 at t_cur, is given).

    Order 2: DPM-Solver-2 (2022a, Alg. 1) / DPM-Solver++(2S) (2022b, Alg. 1) with r1 = 1/2:
        u = first-order step to t_mid1 (λ_cur + r1 h);  x_next = c x_cur + d φ1 (m0 + (m(u) − m0)/(2 r1)).
    Order 3: DPM-Solver-3 (2022a, Alg. 2) with r1 = 1/3, r2 = 2/3:
        u1 = first-order step to t_mid1;  u2 = c x_cur + d (φ1 m0 + (r2/r1) φ2 (m(u1) − m0)) at t_mid2;
        x_next = c x_cur + d (φ1 m0 + (1/r2) φ2 (m(u2) − m0)).
    (The papers call the intermediate times s1, s2.)
    """
    if order == 1:
        return ei.first_order(x, t_cur, t_next, m0)
    r1, r2 = (0.5, None) if order == 2 else (1 / 3, 2 / 3)
    t_mid1 = ei.time_between(t_cur, t_next, r1)
    m1 = ei.model(ei.first_order(x, t_cur, t_mid1, m0), t_mid1)[1]
    if order == 2:
        st = ei.step(t_cur, t_next)
        return st.c_ratio * x + st.d_next * _phis(st.h).phi1 * (m0 + (m1 - m0) / (2 * r1))
    t_mid2 = ei.time_between(t_cur, t_next, r2)
    st = ei.step(t_cur, t_mid2)
    phi = _phis(st.h)
    m2 = ei.model(st.c_ratio * x + st.d_next * (phi.phi1 * m0 + r2 / r1 * phi.phi2 * (m1 - m0)), t_mid2)[1]
    st = ei.step(t_cur, t_next)
    phi = _phis(st.h)
    return st.c_ratio * x + st.d_next * (phi.phi1 * m0 + phi.phi2 * (m2 - m0) / r2)


def _dpm_solve(ei, x, timesteps, order, multistep, lower_order_final, callback):
    """The DPM-Solver loop shared by both model outputs and both methods.

    Multistep solvers warm up with lower orders (order ≤ i + 1) and, with fewer than 15 steps,
    lower the order again for the last steps (order ≤ steps − i; 2022b §5 and diffusers'
    ``lower_order_final``). The step to clean data (σ = 0, λ = +inf) is always the first-order
    limit x = x̂0 (diffusers' ``final_sigmas_type="zero"``): higher orders divide by h = inf.
    """
    steps = len(timesteps) - 1
    history = []  # [(lam, m)] newest first
    for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        x0, m = ei.model(x, t_cur)
        history = [(ei.lam(t_cur), m)] + history[: order - 1]
        if ei.process.sigma(t_next) == 0:
            x = x0
        elif multistep:
            k = min(order, i + 1, steps - i if lower_order_final and steps < 15 else order)
            x = _multistep_update(ei, x, t_cur, t_next, history[:k])
        else:
            x = _singlestep_update(ei, x, t_cur, t_next, m, order)
        _report(callback, i, x, t_cur, x0)
    return x


def _require_signal_at_start(name: str, process, timesteps) -> None:
    """Samplers that divide by α(t) cannot start where α = 0 (the flow path's t = 1)."""
    if float(process.alpha(timesteps[0])) == 0.0:
        raise Incompatible(f"{name} divides by α(t) and this grid starts at t={float(timesteps[0]):g} where "
                           f"α = 0 ({process.name}); use spacing karras or uniform-logsnr")


@torch.no_grad()
def sample_dpm_solver(denoiser, x, timesteps, *, generator=None, callback=None, order=2, method="multistep",
                      lower_order_final=True):
    """DPM-Solver (Lu et al. 2022a) with the noise prediction ε̂: orders 1–3, singlestep
    (Alg. 1–2: ``order`` model calls per step) or multistep (one call per step, 2022b App. B)."""
    _check("dpm-solver", "order", order, (1, 2, 3))
    _check("dpm-solver", "method", method, ("multistep", "singlestep"))
    _require_signal_at_start("dpm-solver", denoiser.process, timesteps)
    ei = _ExponentialIntegrator(denoiser, data_prediction=False)
    return _dpm_solve(ei, x, timesteps, order, method == "multistep", lower_order_final, callback)


@torch.no_grad()
def sample_dpm_solver_pp(denoiser, x, timesteps, *, generator=None, callback=None, variant="2m",
                         lower_order_final=True):
    """DPM-Solver++ (Lu et al. 2022b) with the data prediction x̂0: 2M (Alg. 2), 3M (App. B)
    or the singlestep 2S (Alg. 1)."""
    _check("dpm-solver++", "variant", variant, ("2m", "3m", "2s"))
    ei = _ExponentialIntegrator(denoiser, data_prediction=True)
    return _dpm_solve(ei, x, timesteps, int(variant[0]), variant != "2s", lower_order_final, callback)


# --- EDM Euler and Heun --------------------------------------------------------------------
#
# Karras et al. 2022 sample x̃ = x/α along σ̃ = σ/α (eq. 4 with s(t) = α: the ODE becomes
# dx̃/dσ̃ = (x̃ − D(x̃; σ̃))/σ̃, eqs. 3 and 8), so the same loop runs on VP, VE and flow processes.


def _sample_edm(denoiser, x, timesteps, generator, callback, s_churn, s_tmin, s_tmax, s_noise, second_order):
    """EDM Alg. 2 (stochastic; Alg. 1 when s_churn = 0); ``second_order=False`` drops the
    Heun correction (lines 9–11), leaving Euler. No correction on the last step to σ̃ = 0."""
    process = denoiser.process
    _require_signal_at_start("heun" if second_order else "euler", process, timesteps)
    sigmas = (process.sigma(timesteps) / process.alpha(timesteps)).tolist()  # σ̃_i, 0 at clean data
    alphas = process.alpha(timesteps).tolist()
    steps = len(timesteps) - 1
    x = x / alphas[0]
    for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Lines 4–6: raise the noise level to σ̂ = σ (1 + γ) by adding fresh noise ("churn").
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        if gamma > 0:
            sigma_hat = sigma * (1 + gamma)
            t_cur = process.t_from_lambda(torch.tensor(-math.log(sigma_hat), dtype=torch.float64))
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * generator.randn_like(x)
        else:
            sigma_hat = sigma
        # Lines 7–8: Euler step along d = (x̃ − D)/σ̂.
        denoised = denoiser(x * float(process.alpha(t_cur)), t_cur)
        d = (x - denoised) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        # Lines 9–11: Heun's correction with the slope at the end of the step.
        if second_order and sigma_next > 0:
            d_next = (x_next - denoiser(x_next * alphas[i + 1], t_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
        _report(callback, i, x * alphas[i + 1], t_cur, denoised)
    return x * alphas[-1]


@torch.no_grad()
def sample_euler(denoiser, x, timesteps, *, generator=None, callback=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Euler on the EDM ODE (Karras et al. 2022, Alg. 2 without the correction)."""
    return _sample_edm(denoiser, x, timesteps, generator, callback, s_churn, s_tmin, s_tmax, s_noise, False)


@torch.no_grad()
def sample_heun(denoiser, x, timesteps, *, generator=None, callback=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Heun's 2nd-order method on the EDM ODE (Karras et al. 2022, Alg. 1; Alg. 2 with churn)."""
    return _sample_edm(denoiser, x, timesteps, generator, callback, s_churn, s_tmin, s_tmax, s_noise, True)


# --- Langevin dynamics and predictor–corrector ---------------------------------------------


def _langevin_step(denoiser, x, t, snr, generator):
    """One Langevin MCMC step targeting p_t: x ← x + ε ∇log p_t(x) + sqrt(2ε) z.

    Song et al. 2021b (Alg. 4–5) set ε = 2 (r ‖z‖/‖∇log p‖)² so that the update's signal-to-noise
    ratio is r = ``snr``; we use the per-sample expectation ‖z‖² ≈ d, ‖∇log p_t‖² ≈ d/σ_t², i.e.
    ε = 2 (r σ_t)², which is Song & Ermon's (2019, Alg. 1) rule α_i ∝ σ_i². It keeps a sample
    independent of its batch and does not blow up where the score vanishes.
    """
    step = 2 * (snr * float(denoiser.process.sigma(t))) ** 2
    return x + step * denoiser.score(x, t) + math.sqrt(2 * step) * generator.randn_like(x)


@torch.no_grad()
def sample_langevin(denoiser, x, timesteps, *, generator, callback=None, n_steps_each=5, snr=0.16):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): ``n_steps_each`` Langevin steps at
    every noisy time of the grid, then the denoising step x̂0 = D(x, t_min) (Song & Ermon 2020)."""
    for i, t in enumerate(timesteps[:-1]):
        for _ in range(n_steps_each):
            x = _langevin_step(denoiser, x, t, snr, generator)
        _report(callback, i, x, t, None)
    return denoiser(x, timesteps[-2])


def _reverse_diffusion_step(process, x, x0, t_cur, t_next, generator):
    """Reverse-diffusion predictor (Song et al. 2021b, eq. 46; Alg. 2–3 lines 3–5) for the
    discretised forward step x_cur = α_{cur|next} x_next + σ_{cur|next} z:
        x_next = (2 − α_{cur|next}) x_cur + σ²_{cur|next} ∇log p_cur(x_cur) + σ_{cur|next} z,
        ∇log p_cur = (α_cur x̂0 − x_cur)/σ_cur²."""
    tr = transition(process, t_cur, t_next)
    score = (float(tr.alpha_cur) * x0 - x) / float(tr.sigma_cur**2)
    return (float(2 - tr.alpha_cur / tr.alpha_next) * x + float(tr.var) * score
            + float(tr.var.sqrt()) * generator.randn_like(x))


@torch.no_grad()
def sample_pc(denoiser, x, timesteps, *, generator, callback=None, predictor="reverse-diffusion", n_steps_each=1,
              snr=0.16):
    """Predictor–corrector sampling (Song et al. 2021b, Alg. 2–3): a reverse-diffusion or
    ancestral (DDPM posterior, App. F) predictor step, then ``n_steps_each`` Langevin corrector
    steps at the new time; the step to clean data is the noise-free x̂0 = D(x, t_min)."""
    _check("pc", "predictor", predictor, ("reverse-diffusion", "ancestral"))
    process = denoiser.process
    for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        x0 = denoiser(x, t_cur)
        if process.sigma(t_next) == 0:
            x = x0
        else:
            if predictor == "ancestral":
                x = _posterior_step(process, x, x0, t_cur, t_next, "small", generator)
            else:
                x = _reverse_diffusion_step(process, x, x0, t_cur, t_next, generator)
            for _ in range(n_steps_each):
                x = _langevin_step(denoiser, x, t_next, snr, generator)
        _report(callback, i, x, t_cur, x0)
    return x


@torch.no_grad()
def sample_one_step(denoiser, x, timesteps, *, generator=None, callback=None):
    """One model call from pure noise: x̂0 = D(x_T, t_max) (the one-step baseline; consistency
    models, Song et al. 2023, Alg. 1 with a single step). Only timesteps[0] is used."""
    x0 = denoiser(x, timesteps[0])
    _report(callback, 0, x0, timesteps[0], x0)
    return x0


@diffbench.hookimpl
def register_samplers(register):
    churn = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
    register(Sampler(name="ddpm", family="gaussian", fn=sample_ddpm, options={"variance": "small"}, primary="variance",
                     description="ancestral sampling, Ho et al. 2020 (variance: small=β̃ posterior, large=β)"))
    register(Sampler(name="ddim", family="gaussian", fn=sample_ddim, options={"eta": 0.0}, primary="eta",
                     description="DDIM, Song et al. 2021 (eta=0 deterministic; eta=1 ancestral)"))
    register(Sampler(name="dpm-solver", family="gaussian", fn=sample_dpm_solver, primary="order",
                     options={"order": 2, "method": "multistep", "lower_order_final": True},
                     spacing="uniform-logsnr",
                     description="DPM-Solver, Lu et al. 2022 (order 1-3, multistep or singlestep; ε-prediction)"))
    register(Sampler(name="dpm-solver++", family="gaussian", fn=sample_dpm_solver_pp, primary="variant",
                     options={"variant": "2m", "lower_order_final": True}, spacing="uniform-logsnr",
                     description="DPM-Solver++, Lu et al. 2022b (variant 2m, 3m or 2s; x0-prediction)"))
    register(Sampler(name="euler", family="gaussian", fn=sample_euler, options=dict(churn), spacing="karras",
                     description="Euler on the EDM ODE, Karras et al. 2022 (optional churn)"))
    register(Sampler(name="heun", family="gaussian", fn=sample_heun, options=dict(churn), spacing="karras",
                     description="Heun 2nd order on the EDM ODE, Karras et al. 2022 Alg. 1-2 (NFE = 2*steps-1)"))
    register(Sampler(name="langevin", family="gaussian", fn=sample_langevin, primary="snr",
                     options={"n_steps_each": 5, "snr": 0.16},
                     description="annealed Langevin dynamics, Song & Ermon 2019 (step size from snr)"))
    register(Sampler(name="pc", family="gaussian", fn=sample_pc, primary="predictor",
                     options={"predictor": "reverse-diffusion", "n_steps_each": 1, "snr": 0.16},
                     description="predictor-corrector, Song et al. 2021 (reverse-diffusion/ancestral + Langevin)"))
    register(Sampler(name="one-step", family="gaussian", fn=sample_one_step,
                     description="a single denoiser call from pure noise at t_max (one-step baseline)"))
