"""The toy slice against ground truth: the exact denoiser of a Gaussian mixture."""
import torch

from diffbench.convergence import reference_sample
from diffbench.gmm import oracle_denoiser
from diffbench.process import VPDiscrete
from diffbench.rng import SampleGenerators
from diffbench_plugins.samplers import sample_ddim, sample_ddpm
from diffbench_plugins.toy_data import MOG_1D, gmm_2d


def test_ddim_with_many_steps_agrees_with_an_accurate_ode_solution():
    mixture, process = gmm_2d(), VPDiscrete.linear()
    d = oracle_denoiser(mixture, process)
    x_T = SampleGenerators(0, range(32)).randn((2,)).double()
    reference = reference_sample(mixture, process, x_T)  # DOP853, rtol 1e-10, same x_T
    errors = {}
    for steps in (64, 512):
        x0 = sample_ddim(d, x_T.clone(), process.timesteps(steps, "uniform-logsnr"), generator=None)
        errors[steps] = float((x0 - reference).abs().max())
    assert errors[512] < 5e-3, errors
    assert errors[512] < errors[64] / 4, errors  # first order: 8x the steps, ~8x smaller error


def test_ddpm_samples_have_the_log_density_of_true_data():
    mixture, process = MOG_1D, VPDiscrete.linear()
    d = oracle_denoiser(mixture, process)
    n = 4000
    data_logp = float(mixture.log_prob(mixture.sample(n, torch.Generator().manual_seed(1))[0]).mean())
    gaps = {}
    for steps in (5, 250):
        x_T = SampleGenerators(0, range(n)).randn((1,)).double()
        x0 = sample_ddpm(d, x_T, process.timesteps(steps, "uniform"), generator=SampleGenerators(1, range(n)))
        gaps[steps] = abs(float(mixture.log_prob(x0).mean()) - data_logp)
    assert gaps[250] < 0.05, gaps
    assert gaps[5] > 3 * gaps[250], gaps
