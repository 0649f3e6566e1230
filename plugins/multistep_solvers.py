"""Multistep solvers of the exponential-integrator family beyond DPM-Solver: UniPC, DEIS, SA-Solver.

Same contract as ``plugins/samplers.py``: ``denoiser(x, t) -> x̂0``, ``denoiser.process`` for α, σ
and λ = log(α/σ); ``timesteps`` decreasing, ending at clean data. One model call per step (NFE =
steps): UniPC's and SA-Solver's correctors reuse the model output at the predicted point, which
the next predictor needs anyway. As in DPM-Solver, the step to clean data (σ = 0, λ = +inf) is
the first-order limit x = x̂0; a grid that stops at σ_min > 0 takes full steps throughout.

All three integrate the model output m along λ with the linear part solved exactly:

    data prediction  (m = x̂0): x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^{λ} m dλ
    noise prediction (m = ε̂):  x_t = (α_t/α_s) x_s − α_t ∫_{λ_s}^{λ_t} e^{−λ} m dλ

and differ in how they approximate m on [λ_s, λ_t] from past outputs (and, for UniPC and
SA-Solver, the output at the predicted x_t). Coefficients are float64 host scalars.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numpy.polynomial import polynomial as P

import diffbench
from diffbench.generate import report_step
from diffbench.registry import Incompatible, Option, Sampler


class _Grid:
    """α, σ, λ of every grid time as floats, and the model output m in the chosen prediction."""

    def __init__(self, denoiser, timesteps, data_prediction: bool):
        process = denoiser.process
        self.denoiser, self.timesteps, self.data_prediction = denoiser, timesteps, data_prediction
        self.alpha = process.alpha(timesteps).tolist()
        if self.alpha[0] == 0:  # λ = −inf there: the interpolation in λ has no finite node
            raise Incompatible(f"this grid starts at t={float(timesteps[0]):g} where α = 0 ({process.name}); "
                               f"use spacing uniform-logsnr or karras")
        self.sigma = process.sigma(timesteps).tolist()
        self.lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(self.alpha, self.sigma)]

    def model(self, x, i):
        """(x̂0, m) at grid time i: one NFE."""
        x0 = self.denoiser(x, self.timesteps[i])
        return x0, (x0 if self.data_prediction else (x - self.alpha[i] * x0) / self.sigma[i])

    def first_order_part(self, x, i, j, m0):
        """The exact linear part plus m held constant from time i to j (DDIM / DPM-Solver-1)."""
        h = self.lam[j] - self.lam[i]
        if self.data_prediction:
            return self.sigma[j] / self.sigma[i] * x - self.alpha[j] * math.expm1(-h) * m0
        return self.alpha[j] / self.alpha[i] * x - self.sigma[j] * math.expm1(h) * m0


# --- UniPC (Zhao et al. 2023) ---------------------------------------------------------------
#
# UniP-p (predictor) and UniC-p (corrector), §3.1–3.2 and Alg. 1–2 of the paper, B(h) form:
#
#   x_t = x_t^{(1)} − d_t B(h) Σ_k a_k D_k,   D_k = (m_k − m_0)/r_k,  r_k = (λ_k − λ_0)/h,
#
# where x_t^{(1)} is the first-order step, d_t = α_t (data) or σ_t (noise), ĥ = −h (data) or h
# (noise), and the weights solve the Vandermonde system R_p a = g/B(h) with R_p[i, k] = r_k^i and
# g_i = ĥ φ_{i+1}(ĥ) · i! (φ_{k+1}(z) = (φ_k(z) − 1/k!)/z, φ_1(z) = (e^z − 1)/z). B1(h) = ĥ, B2(h) = e^ĥ − 1.
# The predictor uses the p − 1 earlier outputs; the corrector adds the output at the predicted
# x_t (r = 1), raising the order to p + 1. A single difference gets a = 1/2 (the paper's and
# diffusers' choice for UniP-2 and UniC-1).


def _unipc_weights(nodes: list[float], hh: float, b_h: float) -> np.ndarray:
    """a with R a = g/B(h) over the given r_k (see above); [1/2] for a single node."""
    if len(nodes) == 1:
        return np.array([0.5])
    g, hh_phi, factorial = [], math.expm1(hh) / hh - 1, 1.0
    for i in range(1, len(nodes) + 1):
        g.append(hh_phi * factorial / b_h)
        factorial *= i + 1
        hh_phi = hh_phi / hh - 1 / factorial
    vandermonde = np.array([[r ** (i - 1) for r in nodes] for i in range(1, len(nodes) + 1)])
    return np.linalg.solve(vandermonde, np.array(g))


def _unipc_update(grid, x, i, j, history, variant, m_new=None):
    """UniP (``m_new`` None) or UniC (``m_new`` = output at the predicted x_j) step from grid time i
    to j, with ``history`` = [(grid index, m)] newest first, history[0] at time i."""
    (_, m0), lam0 = history[0], grid.lam[i]
    h = grid.lam[j] - lam0
    hh = -h if grid.data_prediction else h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    nodes = [(grid.lam[k] - lam0) / h for k, _ in history[1:]]
    diffs = [(m - m0) / r for (_, m), r in zip(history[1:], nodes)]
    if m_new is not None:
        nodes, diffs = nodes + [1.0], diffs + [m_new - m0]
    x_next = grid.first_order_part(x, i, j, m0)
    if not diffs:
        return x_next
    d_j = grid.alpha[j] if grid.data_prediction else grid.sigma[j]
    weights = _unipc_weights(nodes, hh, b_h)
    return x_next - d_j * b_h * sum(float(a) * d for a, d in zip(weights, diffs))


@torch.no_grad()
def sample_unipc(denoiser, x, timesteps, *, generator=None, callback=None, order=2, variant="bh2",
                 prediction="data", corrector=True, lower_order_final=True):
    """UniPC (Zhao et al. 2023): UniP-``order`` predictor, then UniC corrects x_t with the model
    output at the predicted x_t before the next predictor uses it (one NFE per step). Orders warm
    up (≤ i + 1) and, with ``lower_order_final``, fall to ≤ steps − i at the end (diffusers'
    UniPCMultistepScheduler). Expected order: ``order`` + 1 with the corrector, ``order`` without."""
    grid = _Grid(denoiser, timesteps, prediction == "data")
    steps = len(timesteps) - 1
    history, previous = [], None  # [(grid index, m)] newest first; (x, order) before the last predictor
    for i in range(steps):
        x0, m = grid.model(x, i)
        if corrector and previous is not None:  # UniC on the step i − 1 -> i just taken
            x = _unipc_update(grid, previous[0], i - 1, i, history[: previous[1]], variant, m_new=m)
        history = [(i, m)] + history[: order - 1]
        k = min(order, i + 1, steps - i if lower_order_final else order)
        previous = (x, k)
        x = x0 if grid.sigma[i + 1] == 0 else _unipc_update(grid, x, i, i + 1, history[:k], variant)
        report_step(callback, i, x, timesteps[i], timesteps[i + 1], x0)
    return x


# --- DEIS and SA-Solver: Lagrange interpolation of m in λ ------------------------------------
#
# Both replace m on [λ_s, λ_t] by the Lagrange polynomial through earlier outputs (and SA-Solver's
# corrector through the new one) and integrate it exactly against the exponential weight. In
# u = λ − λ_t ∈ [−h, 0]:  ∫ e^{cu} ℓ_j(u) du = e^{cu} Σ_k (−1)^k ℓ_j^{(k)}(u) / c^{k+1}  (by parts).


def _lagrange_exp_weights(nodes: list[float], h: float, c: float) -> list[float]:
    """∫_{−h}^{0} e^{cu} ℓ_j(u) du for the Lagrange basis ℓ_j over ``nodes`` (u-coordinates)."""
    weights = []
    for j, u_j in enumerate(nodes):
        others = nodes[:j] + nodes[j + 1:]
        poly = P.polyfromroots(others) / np.prod([u_j - u for u in others]) if others else np.array([1.0])
        antiderivative = lambda u: sum((-1) ** k * P.polyval(u, P.polyder(poly, k)) / c ** (k + 1)  # noqa: E731
                                       for k in range(len(poly)))
        weights.append(float(antiderivative(0.0) - math.exp(-c * h) * antiderivative(-h)))
    return weights


def _stochastic_adams_update(grid, x, i, j, history, tau, noise, modified_second_order=False):
    """One SA-Solver step from grid time i to j (Xue et al. 2023, eqs. 16–17 for data prediction,
    eqs. 14–15 for noise prediction), m interpolated through ``history`` = [(grid index, m)]:

      data:  x_j = e^{−τ²h} (σ_j/σ_i) x_i + (1+τ²) α_j Σ b_k m_k + σ_j sqrt(1 − e^{−2τ²h}) ξ,
             b_k = ∫_{−h}^0 e^{(1+τ²)u} ℓ_k(u) du;
      noise: x_j = (α_j/α_i) x_i − (1+τ²) σ_j Σ b_k m_k + τ σ_j sqrt(e^{2h} − 1) ξ,
             b_k = ∫_{−h}^0 e^{−u} ℓ_k(u) du   (τ = 0: DEIS's tAB step).

    ``modified_second_order``: with two nodes the slope term's weight ∫ e^{cu}(u + h) du is
    replaced by h²/2 (the official implementation's and diffusers' few-step choice; still second order).
    """
    h = grid.lam[j] - grid.lam[i]
    nodes = [grid.lam[k] - grid.lam[j] for k, _ in history]
    c = 1 + tau**2 if grid.data_prediction else -1.0
    b = _lagrange_exp_weights(nodes, h, c)
    if modified_second_order and len(nodes) == 2:
        shift = (h**2 / 2 - (h * c - 1 + math.exp(-c * h)) / c**2) / (nodes[0] - nodes[1])
        b = [b[0] + shift, b[1] - shift]
    gradient = sum(b_k * m for b_k, (_, m) in zip(b, history))
    if grid.data_prediction:
        x_next = math.exp(-(tau**2) * h) * grid.sigma[j] / grid.sigma[i] * x + (1 + tau**2) * grid.alpha[j] * gradient
        noise_scale = grid.sigma[j] * math.sqrt(-math.expm1(-2 * tau**2 * h))
    else:
        x_next = grid.alpha[j] / grid.alpha[i] * x - (1 + tau**2) * grid.sigma[j] * gradient
        noise_scale = tau * grid.sigma[j] * math.sqrt(math.expm1(2 * h))
    return x_next + noise_scale * noise if noise_scale > 0 else x_next


@torch.no_grad()
def sample_deis(denoiser, x, timesteps, *, generator=None, callback=None, order=2, lower_order_final=True):
    """DEIS (Zhang & Chen 2023), tAB-DEIS (§4, eq. 14) in the time ρ = σ/α (ρAB, §4.2): ε̂ is
    extrapolated by the Lagrange polynomial through the last ``order`` outputs in log ρ = −λ and
    x/α integrated exactly, x_t/α_t = x_s/α_s + ∫_{ρ_s}^{ρ_t} ε̂ dρ (diffusers' "logrho" DEIS).
    Orders warm up and, below 15 steps with ``lower_order_final``, fall at the end."""
    grid = _Grid(denoiser, timesteps, data_prediction=False)
    steps = len(timesteps) - 1
    history = []
    for i in range(steps):
        x0, m = grid.model(x, i)
        history = [(i, m)] + history[: order - 1]
        k = min(order, i + 1, steps - i if lower_order_final and steps < 15 else order)
        x = x0 if grid.sigma[i + 1] == 0 else _stochastic_adams_update(grid, x, i, i + 1, history[:k], 0.0, None)
        report_step(callback, i, x, timesteps[i], timesteps[i + 1], x0)
    return x


@torch.no_grad()
def sample_sa_solver(denoiser, x, timesteps, *, generator, callback=None, predictor_order=2, corrector_order=2,
                     tau=1.0, tau_sigma_min=0.72, tau_sigma_max=25.8, prediction="data", lower_order_final=True):
    """SA-Solver (Xue et al. 2023, Alg. 1): stochastic Adams–Bashforth predictor (``predictor_order``
    past outputs) and Adams–Moulton corrector (``corrector_order`` outputs including the one at the
    predicted point), both with the same fresh noise ξ of the step. τ = ``tau`` while the noise level
    σ/α at the step's start is in [tau_sigma_min, tau_sigma_max] and 0 elsewhere (the defaults
    ≈ diffusers' τ = 1 for t ∈ [200, 800] on the linear VP schedule); τ = 0 is a deterministic
    Adams PC solver of order min(predictor_order + 1, corrector_order)."""
    grid = _Grid(denoiser, timesteps, prediction == "data")
    noise_level = [s / a for a, s in zip(grid.alpha, grid.sigma)]
    taus = [tau if tau_sigma_min <= level <= tau_sigma_max else 0.0 for level in noise_level]
    data = prediction == "data"
    steps = len(timesteps) - 1
    history, previous = [], None  # previous: (x, ξ, corrector order) of the last predictor step
    for i in range(steps):
        x0, m = grid.model(x, i)
        if previous is not None:  # corrector on the step i − 1 -> i, through the new output m
            x_prev, noise_prev, k_c = previous
            x = _stochastic_adams_update(grid, x_prev, i - 1, i, ([(i, m)] + history)[:k_c], taus[i - 1], noise_prev,
                                         data)
        history = [(i, m)] + history[: max(predictor_order, corrector_order - 1) - 1]
        noise = generator.randn_like(x)
        # Orders warm up and, with lower_order_final, fall at the end (diffusers' SASolverScheduler).
        k_p = min(predictor_order, i + 1, steps - i if lower_order_final else predictor_order)
        k_c = min(corrector_order, i + 2, steps - i + 1 if lower_order_final else corrector_order)
        previous = (x, noise, k_c)
        if grid.sigma[i + 1] == 0:
            x = x0
        else:
            x = _stochastic_adams_update(grid, x, i, i + 1, history[:k_p], taus[i], noise, data)
        report_step(callback, i, x, timesteps[i], timesteps[i + 1], x0)
    return x


@diffbench.hookimpl
def register_samplers(register):
    prediction = Option("data", choices=("data", "noise"))  # the model output the solver extrapolates
    register(Sampler(name="unipc", family="gaussian", fn=sample_unipc, primary="order", spacing="uniform-logsnr",
                     options={"order": Option(2, choices=(1, 2, 3)), "variant": Option("bh2", choices=("bh1", "bh2")),
                              "prediction": prediction, "corrector": True, "lower_order_final": True},
                     description="UniPC, Zhao et al. 2023 (order 1-3, variant bh1/bh2, data/noise prediction; "
                                 "NFE = steps)"))
    register(Sampler(name="deis", family="gaussian", fn=sample_deis, primary="order", spacing="uniform-logsnr",
                     options={"order": Option(2, choices=(1, 2, 3)), "lower_order_final": True},
                     description="DEIS tAB in log rho, Zhang & Chen 2023 (order 1-3; ε-prediction)"))
    register(Sampler(name="sa-solver", family="gaussian", fn=sample_sa_solver, primary="tau",
                     spacing="uniform-logsnr",
                     options={"predictor_order": Option(2, choices=(1, 2, 3)), "corrector_order": Option(2, choices=(1, 2, 3, 4)),
                              "tau": Option(1.0, min=0.0), "tau_sigma_min": Option(0.72, min=0.0),
                              "tau_sigma_max": Option(25.8, min=0.0), "prediction": prediction, "lower_order_final": True},
                     description="SA-Solver, Xue et al. 2023 (stochastic Adams PC; tau=0 is an ODE solver)"))
