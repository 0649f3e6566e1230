"""UniPC, DEIS, SA-Solver and stochastic DDIM against diffusers' schedulers on the exact GMM denoiser.

Same protocol as tests/test_diffusers_agreement.py: our samplers get diffusers' own timestep grid
(``scheduler.timesteps`` plus the final time: clean data t = −1 where diffusers ends at σ = 0,
t = 0 where it ends at σ_min), the model is the exact posterior mean E[x0 | x_t] of the 2-D
mixture, x_T and (for SA-Solver) every step's noise are the same, float32 state throughout.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, SASolverScheduler, UniPCMultistepScheduler

from diffbench.gmm import oracle_denoiser
from diffbench.plugins import build_registry
from diffbench.process import SPACINGS, VPDiscrete, make_process
from diffbench.registry import Incompatible
from diffbench.rng import SampleGenerators
from diffbench_plugins.multistep_solvers import sample_deis, sample_sa_solver, sample_unipc
from diffbench_plugins.samplers import sample_ddim, sample_ddpm

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
TOL = 1e-4
STEPS = (10, 50)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _mixture():
    source = build_registry().get("datasets", "gmm-2d")
    return source.load(**source.defaults).mixture


MIXTURE = _mixture()
PROCESS = VPDiscrete.linear()


def x_T():
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0))


def oracle():
    return oracle_denoiser(MIXTURE, PROCESS)


class ReplayGenerator:
    """Draws the noise diffusers draws, in the same order."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


def ours(fn, scheduler, final_t, **options):
    timesteps = torch.cat([scheduler.timesteps.double(), torch.tensor([final_t], dtype=torch.float64)])
    denoiser = oracle()
    return fn(denoiser, x_T(), timesteps, **options), denoiser.nfe


def theirs(scheduler, generator=None):
    """diffusers' loop with the oracle's x0 as the model output (prediction_type="sample")."""
    x, denoiser = x_T(), oracle()
    for t in scheduler.timesteps:
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(denoiser(x, t.double()), t, x, **kwargs).prev_sample
    return x


def make(cls, spacing, steps, **kwargs):
    scheduler = cls(**SCHEDULE, prediction_type="sample", timestep_spacing=spacing, **kwargs)
    scheduler.set_timesteps(steps)
    return scheduler


def max_diff(a, b):
    return float((a - b).abs().max())


UNIPC_CASES = [(order, variant, "data") for order in (1, 2, 3) for variant in ("bh1", "bh2")]
UNIPC_CASES += [(2, "bh2", "noise"), (3, "bh1", "noise")]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order,variant,prediction", UNIPC_CASES)
def test_unipc_matches_unipc_scheduler(order, variant, prediction, steps):
    # diffusers' UniPC steps to σ = 0 only with data prediction and bh2 (else 0·inf = nan): the
    # others stop at σ_min (t = 0), where our samplers take the full-order step too.
    final = ("zero", -1.0) if (prediction, variant) == ("data", "bh2") else ("sigma_min", 0.0)
    scheduler = make(UniPCMultistepScheduler, "linspace", steps, solver_order=order, solver_type=variant,
                     predict_x0=prediction == "data", final_sigmas_type=final[0])
    x, nfe = ours(sample_unipc, scheduler, final[1], order=order, variant=variant, prediction=prediction)
    assert max_diff(x, theirs(scheduler)) <= TOL and nfe == steps


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_unipc_without_corrector_is_unip(spacing, steps):
    scheduler = make(UniPCMultistepScheduler, spacing, steps, solver_order=2,
                     disable_corrector=list(range(steps)))
    x, _ = ours(sample_unipc, scheduler, -1.0, order=2, corrector=False)
    assert max_diff(x, theirs(scheduler)) <= TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_deis_scheduler(order, steps):
    # DEIS (ε-form) ends at σ_min in diffusers: the final time is t = 0.
    scheduler = make(DEISMultistepScheduler, "linspace", steps, solver_order=order)
    x, nfe = ours(sample_deis, scheduler, 0.0, order=order)
    assert max_diff(x, theirs(scheduler)) <= TOL and nfe == steps


# Noise prediction runs with τ = 0: with τ = 1 that form amplifies the float32 rounding of diffusers'
# λ table step after step (on a smooth ε-model its own samples grow to O(1e3) at 10 steps), so the
# two agree to ~3e-6 relative there but not to 1e-4 absolute.
SA_CASES = [(2, 2, "data", 1.0), (3, 3, "data", 1.0), (3, 4, "data", 1.0), (1, 1, "data", 1.0), (2, 3, "noise", 0.0)]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("predictor,corrector,prediction,tau", SA_CASES)
def test_sa_solver_matches_sa_solver_scheduler_with_the_same_noise(predictor, corrector, prediction, tau, steps):
    scheduler = make(SASolverScheduler, "linspace", steps, predictor_order=predictor, corrector_order=corrector,
                     algorithm_type=f"{prediction}_prediction", tau_func=None if tau else (lambda t: 0))
    # diffusers evaluates its Lagrange/exponential coefficients as polynomials in the absolute λ in
    # float32; with the 4-point corrector at 50 steps that cancellation alone is 1.4e-4. Its σ table in
    # float64 makes those coefficients float64 (the state stays float32): then the difference is 3e-6.
    scheduler.sigmas = scheduler.sigmas.double()
    # diffusers' default τ(t) = 1 on t ∈ [200, 800]: the same interval in noise levels σ/α.
    sigma_min, sigma_max = (float(PROCESS.sigma(t) / PROCESS.alpha(t)) for t in (200, 800))
    x, nfe = ours(sample_sa_solver, scheduler, 0.0, generator=ReplayGenerator(3), predictor_order=predictor,
                  corrector_order=corrector, prediction=prediction, tau=tau, tau_sigma_min=sigma_min, tau_sigma_max=sigma_max)
    expected = theirs(scheduler, torch.Generator().manual_seed(3))
    assert max_diff(x, expected) <= TOL and nfe == steps


# --- stochastic samplers, tested as tightly as deterministic ones ----------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "uniform-logsnr"])
def test_ddim_with_eta_1_is_ddpm_with_posterior_variance(spacing, steps):
    timesteps = PROCESS.timesteps(steps, spacing)
    ddim = sample_ddim(oracle(), x_T(), timesteps, generator=ReplayGenerator(5), eta=1.0)
    ddpm = sample_ddpm(oracle(), x_T(), timesteps, generator=ReplayGenerator(5), variance="small")
    assert max_diff(ddim, ddpm) <= 1e-5


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.3, 0.8])
def test_ddim_with_eta_matches_ddim_scheduler_with_the_same_noise(eta, spacing, steps):
    scheduler = make(DDIMScheduler, spacing, steps, clip_sample=False, set_alpha_to_one=True)
    x, nfe = ours(sample_ddim, scheduler, -1.0, generator=ReplayGenerator(7), eta=eta)
    expected, denoiser, generator = x_T(), oracle(), torch.Generator().manual_seed(7)
    for t in scheduler.timesteps:
        expected = scheduler.step(denoiser(expected, t.double()), t, expected, eta=eta, generator=generator).prev_sample
    assert max_diff(x, expected) <= TOL and nfe == steps


# --- every spacing, every process ---------------------------------------------------------------

NAMES = ["unipc", "deis", "sa-solver"]


def registered(name, process, steps, spacing, n=32, **options):
    component = build_registry().get("samplers", name)
    proc = make_process(process)
    denoiser = oracle_denoiser(MIXTURE, proc)
    options = {k: v for k, v in {**component.defaults, **options}.items() if k != "spacing"}
    generators = SampleGenerators(0, range(n))
    x = proc.prior_std() * generators.randn((2,), dtype=torch.float64)
    return component.fn(denoiser, x, proc.timesteps(steps, spacing), generator=generators, **options), denoiser.nfe


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NAMES)
def test_smoke_every_spacing_runs_with_nfe_equal_to_steps(name, spacing):
    x, nfe = registered(name, "vp-linear", 6, spacing, n=8)
    assert torch.isfinite(x).all() and nfe == 6


@pytest.mark.parametrize("process", ["vp-continuous", "edm", "flow"])
@pytest.mark.parametrize("name", NAMES)
def test_samples_land_on_the_modes_on_every_process(name, process):
    ode = {"tau": 0.0} if name == "sa-solver" else {}  # the ODE: every sample converges to a mode
    x, _ = registered(name, process, 40, "uniform-logsnr", **ode)
    assert (torch.cdist(x, MIXTURE.means).min(1).values < 0.6).all() and MIXTURE.log_prob(x).mean() > -1.5


@pytest.mark.parametrize("name", NAMES)
def test_a_grid_starting_at_zero_signal_is_incompatible(name):
    with pytest.raises(Incompatible, match="α = 0"):
        registered(name, "flow", 4, "uniform")
