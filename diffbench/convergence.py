"""Convergence order of the deterministic samplers against an exact reference.

With the Gaussian-mixture oracle (the exact denoiser E[x0 | x_t]) the only error left in a
sample is the sampler's discretisation error. The reference is the probability-flow ODE solved
to rtol 1e-10 from the same x_T; a sampler of order p has error ∝ steps^(−p).

Choices that make the asymptotic order visible:

* The ODE is integrated in the variable where it is smooth: with x̃ = x/α and σ̃ = σ/α = e^{−λ}
  (Karras et al. 2022, eq. 4), dx̃/dλ = D(x; t(λ)) − x̃, from λ(t_max) to λ(t_min).
* Every grid uses the same ``uniform-logsnr`` spacing (evenly spaced in λ), so the step
  sizes of all samplers shrink uniformly in that variable; grid times are rounded to float32
  because the network sees float32 times (Denoiser.raw) and state is kept in float64.
* The step from t_min to clean data (σ = 0, λ = +inf) is singular for the λ-ODE; every sampler
  takes it as x0 = D(x, t_min), so the reference takes the same step from the reference
  x(t_min), and the error compared is the one in the final clean sample.
* The fitted order is the least-squares slope of −log(error) against log(steps) over the
  finest ``fit_points`` step counts (the coarsest grids are pre-asymptotic: the data's 0.15
  standard deviation makes the ODE stiff near σ̃ ≈ 0.15).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.integrate import solve_ivp

from diffbench.denoiser import Denoiser
from diffbench.gmm import GaussianMixture, oracle_denoiser
from diffbench.io import atomic_write_text
from diffbench.process import GaussianProcess, make_process
from diffbench.registry import ConfigError
from diffbench.rng import SampleGenerators

SPACING = "uniform-logsnr"
DEFAULT_STEPS = (8, 16, 32, 64, 128)
# Sampler references and the order each is expected to show (documentation for the table).
DEFAULT_SAMPLERS = {
    "ddim": 1,
    "euler": 1,
    "heun": 2,
    "dpm-solver[method=singlestep,order=2]": 2,
    "dpm-solver[method=singlestep,order=3]": 3,
    "dpm-solver[order=2]": 2,
    "dpm-solver[order=3]": 3,
    "dpm-solver++[variant=2m]": 2,
    "dpm-solver++[variant=3m,d2_weighting=taylor]": 3,
    "dpm-solver++[variant=2s]": 2,
    # UniPC: UniP-p is order p, the corrector UniC raises it to p + 1 (Zhao et al. 2023, §3.1: UniC-p has order p + 1).
    "unipc[order=1]": 2,
    "unipc[order=2]": 3,
    "unipc[order=2,variant=bh1]": 3,
    "unipc[order=2,prediction=noise]": 3,
    "unipc[order=2,corrector=false]": 2,
    "deis[order=1]": 1,
    "deis[order=2]": 2,
    "deis[order=3]": 3,
    # SA-Solver at τ = 0 (the ODE): Adams PC of order min(predictor_order + 1, corrector_order).
    "sa-solver[tau=0]": 2,
}


def reference_sample(mixture: GaussianMixture, process: GaussianProcess, x_T: torch.Tensor,
                     rtol: float = 1e-10) -> torch.Tensor:
    """The clean sample of the probability-flow ODE from x_T (float64): DOP853 on
    dx̃/dλ = D − x̃ down to t_min, then the final step x0 = D(x(t_min), t_min)."""
    shape = x_T.shape

    def rhs(lam, y):
        alpha = 1 / math.sqrt(1 + math.exp(-2 * lam))  # α and σ = α e^{−λ} of a VP-normalised x̃
        x_tilde = torch.from_numpy(y).view(shape)
        return (mixture.posterior_mean(alpha * x_tilde, alpha, alpha * math.exp(-lam)) - x_tilde).reshape(-1).numpy()

    lam_T, lam_min = float(process.lambda_(process.t_max)), float(process.lambda_(process.t_min))
    x_tilde_T = (x_T.double() / float(process.alpha(process.t_max))).reshape(-1).numpy()
    sol = solve_ivp(rhs, (lam_T, lam_min), x_tilde_T, method="DOP853", rtol=rtol, atol=rtol * 1e-2)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    x_min = torch.from_numpy(sol.y[:, -1]).view(shape) * float(process.alpha(process.t_min))
    return mixture.posterior_mean(x_min, process.alpha(process.t_min), process.sigma(process.t_min))


def convergence_grid(process: GaussianProcess, steps: int, spacing: str = SPACING) -> torch.Tensor:
    """The grid (default ``uniform-logsnr``) with its times rounded to what the network sees (float32)."""
    return process.timesteps(steps, spacing).float().double()


def fitted_order(steps, errors) -> float:
    """Least-squares slope of −log(error) against log(steps)."""
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def measure(denoiser: Denoiser, x_T: torch.Tensor, reference: torch.Tensor, fn, options: dict, steps,
            spacing: str = SPACING) -> list[dict]:
    """Error (RMS over samples of ‖x0 − x0_ref‖) and NFE of one sampler at each step count."""
    rows = []
    for n in steps:
        denoiser.stats.reset()
        generator = SampleGenerators(0, range(len(x_T)))  # drawn by stochastic samplers, unused at τ = 0
        x0 = fn(denoiser, x_T.clone(), convergence_grid(denoiser.process, n, spacing), generator=generator, **options)
        error = float((x0.double() - reference).reshape(len(x0), -1).pow(2).sum(1).mean().sqrt())
        rows.append({"steps": n, "nfe": denoiser.nfe, "error": error})
    return rows


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for sampler, rows in table.groupby("sampler", sort=False):
        ax.loglog(rows["nfe"], rows["error"], "o-", label=f"{sampler} (order {rows['order'].iloc[0]:.2f})")
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMS error of x0 vs reference ODE solution")
    ax.set_title("Sampler convergence on the Gaussian-mixture oracle")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_convergence(out_dir: Path, samplers: list[str] | None = None, steps=DEFAULT_STEPS, dataset: str = "gmm-2d",
                    process: str = "vp-linear", num_samples: int = 64, seed: int = 0,
                    fit_points: int = 3, spacing: str = SPACING) -> pd.DataFrame:
    """Measure every sampler's error against the reference ODE solution at each step count.

    ``spacing`` picks the grid of every sampler (``uniform-logsnr`` shows the asymptotic orders;
    others, e.g. ``trailing``, compare errors on the grids users run). Writes ``convergence.csv``, ``convergence.md`` and ``convergence.png`` (error vs NFE,
    log-log) into ``out_dir`` and returns the table: one row per (sampler, steps) with
    ``nfe``, ``error``, the fitted ``order`` (over the finest ``fit_points`` step counts) and
    the ``expected`` order where known.
    """
    from diffbench.plugins import build_registry

    registry = build_registry()
    source = registry.get("datasets", dataset)
    data = source.load(**source.defaults)
    if data.mixture is None:
        raise ConfigError(f"convergence needs a Gaussian-mixture dataset (exact denoiser); {dataset!r} is not one")
    proc = make_process(process)
    proc.timesteps(1, spacing)  # an unknown spacing is a ConfigError before any work
    denoiser = oracle_denoiser(data.mixture, proc)
    x_T = proc.prior_std() * SampleGenerators(seed, range(num_samples)).randn(data.shape, dtype=torch.float64)
    reference = reference_sample(data.mixture, proc, x_T)

    rows = []
    for text in samplers or list(DEFAULT_SAMPLERS):
        ref = registry.resolve("samplers", text)
        component = registry.get("samplers", ref.name)
        options = {k: v for k, v in registry.options("samplers", ref).items() if k != "spacing"}
        measured = measure(denoiser, x_T, reference, component.fn, options, steps, spacing)
        finest = measured[-fit_points:]
        order = fitted_order([r["steps"] for r in finest], [r["error"] for r in finest])
        expected = DEFAULT_SAMPLERS.get(text, float("nan"))
        rows += [{"sampler": text, **r, "order": order, "expected": expected} for r in measured]
    table = pd.DataFrame(rows)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "convergence.csv", table.to_csv(index=False))
    summary = table.groupby("sampler", sort=False)[["order", "expected"]].first().reset_index()
    atomic_write_text(out_dir / "convergence.md",
                      f"# Sampler convergence ({dataset}, {process}, {spacing} spacing, {num_samples} samples)\n\n"
                      f"Fitted order over steps {list(steps)[-fit_points:]}:\n\n"
                      f"{summary.to_markdown(index=False, floatfmt='.2f')}\n\n"
                      f"{table.to_markdown(index=False, floatfmt='.3g')}\n")
    _plot(table, out_dir / "convergence.png")
    return table
