"""Our samplers against diffusers' schedulers, from the same x_T with the same ε-model.

The model is a fixed smooth function of (x, t); our samplers get diffusers' own timestep grid
(``scheduler.timesteps`` plus the final time: clean data t = −1, or t = 0 where diffusers stops
at σ_min), so any difference is in the update rules. Float32 throughout, as diffusers runs.

Conventions that cannot be matched exactly, and what is tested instead:
* DDIM "linspace": diffusers rounds linspace(0, N−1, steps) for the model times but steps to
  t − N//steps, not to the next grid time, so x is never at the noise level the model is
  evaluated at next. No grid sampler can reproduce that; DDIM is tested with leading/trailing.
* Euler/Heun at fractional times (linspace, 50 steps): diffusers interpolates σ̃ linearly in t,
  VPDiscrete interpolates log σ̃ (k-diffusion's choice, which makes λ(t) invertible). The
  samplers are checked exactly with a process that interpolates like diffusers, and with
  VPDiscrete on the grids where both agree (integer times).
* DDPM "fixed_large" with "trailing": diffusers adds β-variance noise on the last step into clean
  data; Ho et al. (Alg. 2) add none there. Tested with leading and linspace.
"""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler)

from diffbench.denoiser import Denoiser
from diffbench.process import VPDiscrete
from diffbench_plugins.samplers import (sample_ddim, sample_ddpm, sample_dpm_solver, sample_dpm_solver_pp,
                                        sample_euler, sample_heun)

SPACINGS = ("leading", "trailing", "linspace")
STEPS = (10, 50)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
TOL = 1e-4
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


_VP = VPDiscrete.linear()


def eps_model(x, t):
    """A fixed smooth ε-predictor: the exact one for N(0, 0.5²) data plus a smooth perturbation,
    so samples stay O(1) and float32 rounding stays far below the tolerance."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    a, s = _VP.alpha(t).float(), _VP.sigma(t).float()
    return s * x / (0.25 * a**2 + s**2) + 0.1 * torch.tanh(x + torch.sin(t.float() / 150.0 + x.roll(1, dims=-1)))


class LinearSigmaVP(VPDiscrete):
    """VPDiscrete with σ̃ = σ/α interpolated linearly between indices, as diffusers' Euler/Heun do."""

    def _log_s(self, t):
        sigmas = torch.exp(self._log_snr_inv)
        t = t.clamp(0, self.t_max)
        lo = t.floor().long().clamp(max=self.num_steps - 2)
        w = t - lo
        return torch.log((1 - w) * sigmas[lo] + w * sigmas[lo + 1])


def x_T():
    return torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def ours(fn, scheduler, final_t=-1.0, process=None, **options):
    process = process or VPDiscrete.linear()
    times = torch.unique_consecutive(scheduler.timesteps).double()  # Heun repeats its times
    timesteps = torch.cat([times, torch.tensor([final_t], dtype=torch.float64)])
    denoiser = Denoiser(lambda x, t, c: eps_model(x, t), process, "eps")
    return fn(denoiser, x_T(), timesteps, **options), denoiser.nfe


def theirs(scheduler, x):
    """diffusers' loop; x is VP x_T, mapped to the scheduler's space (x/α for Euler/Heun)."""
    x = x * scheduler.init_noise_sigma if scheduler.init_noise_sigma == 1 else x / _alpha(scheduler.sigmas[0])
    for t in scheduler.timesteps:
        eps = eps_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _alpha(sigma_tilde):
    return 1 / (1 + sigma_tilde.double() ** 2).sqrt().float()


def make(cls, spacing, steps, **kwargs):
    scheduler = cls(**SCHEDULE, timestep_spacing=spacing, **kwargs)
    scheduler.set_timesteps(steps)
    return scheduler


def max_diff(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_ddim_scheduler(spacing, steps):
    scheduler = make(DDIMScheduler, spacing, steps, clip_sample=False, set_alpha_to_one=True)
    x, nfe = ours(sample_ddim, scheduler, generator=None)
    assert max_diff(x, theirs(scheduler, x_T())) <= TOL and nfe == steps


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_dpm_solver_2m_matches_multistep_scheduler(algorithm, spacing, steps):
    # diffusers refuses final_sigmas_type="zero" for the ε-form: it stops at σ_min (t = 0).
    final = {"dpmsolver++": ("zero", -1.0), "dpmsolver": ("sigma_min", 0.0)}[algorithm]
    scheduler = make(DPMSolverMultistepScheduler, spacing, steps, algorithm_type=algorithm, solver_order=2,
                     final_sigmas_type=final[0])
    if algorithm == "dpmsolver++":
        x, nfe = ours(sample_dpm_solver_pp, scheduler, final[1], variant="2m")
    else:
        x, nfe = ours(sample_dpm_solver, scheduler, final[1], order=2, method="multistep")
    assert max_diff(x, theirs(scheduler, x_T())) <= TOL and nfe == steps


EDM = [(EulerDiscreteScheduler, sample_euler, lambda n: n), (HeunDiscreteScheduler, sample_heun, lambda n: 2 * n - 1)]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("cls,fn,nfe_of", EDM, ids=["euler", "heun"])
def test_edm_samplers_match_with_diffusers_sigma_interpolation(cls, fn, nfe_of, spacing, steps):
    scheduler = make(cls, spacing, steps)
    x, nfe = ours(fn, scheduler, process=LinearSigmaVP(VPDiscrete.linear().betas))
    assert max_diff(x, theirs(scheduler, x_T())) <= TOL and nfe == nfe_of(steps)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("cls,fn,nfe_of", EDM, ids=["euler", "heun"])
def test_edm_samplers_match_on_integer_grids_with_vp_discrete(cls, fn, nfe_of, spacing, steps):
    scheduler = make(cls, spacing, steps)
    if not torch.equal(scheduler.timesteps, scheduler.timesteps.round()):
        pytest.skip("fractional times: diffusers interpolates σ̃ linearly, VPDiscrete log σ̃ (see module doc)")
    x, _ = ours(fn, scheduler)
    assert max_diff(x, theirs(scheduler, x_T())) <= TOL


class ReplayGenerator:
    """Stands in for SampleGenerators: draws the noise diffusers draws, in the same order."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing,variance", [(s, "small") for s in SPACINGS] + [("leading", "large"),
                                                                                 ("linspace", "large")])
def test_ddpm_matches_ddpm_scheduler_with_the_same_noise(spacing, variance, steps):
    scheduler = make(DDPMScheduler, spacing, steps, clip_sample=False, variance_type=f"fixed_{variance}")
    x, nfe = ours(sample_ddpm, scheduler, generator=ReplayGenerator(1), variance=variance)
    expected = x_T()
    generator = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        expected = scheduler.step(eps_model(expected, t), t, expected, generator=generator).prev_sample
    assert max_diff(x, expected) <= TOL and nfe == steps
