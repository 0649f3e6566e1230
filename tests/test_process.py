"""Closed forms of the noise processes (float64)."""
import math

import pytest
import torch

from diffbench.process import SPACINGS, EDMProcess, FlowProcess, VPContinuous, VPDiscrete, make_process
from diffbench.registry import ConfigError

ALL = [VPDiscrete.linear(), VPDiscrete.cosine(), VPContinuous(), EDMProcess(), FlowProcess()]


def test_alpha_bar_is_product_of_one_minus_beta():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    p = VPDiscrete.linear(1000)
    for n in (0, 1, 10, 500, 999):
        expected = math.prod(1 - b for b in betas[: n + 1].tolist())
        assert float(p.alpha(n) ** 2) == pytest.approx(expected, rel=1e-12)
        assert float(p.alpha(n) ** 2 + p.sigma(n) ** 2) == pytest.approx(1.0, abs=1e-12)


def test_cosine_schedule_matches_nichol_dhariwal():
    p, s, n_steps = VPDiscrete.cosine(1000), 0.008, 1000
    f = lambda n: math.cos((n / n_steps + s) / (1 + s) * math.pi / 2) ** 2
    for n in (0, 100, 500, 900):
        assert float(p.alpha(n) ** 2) == pytest.approx(f(n + 1) / f(0), rel=1e-9)


def test_clean_data_time_has_no_noise():
    for p in ALL:
        assert float(p.sigma(p.t_data)) == 0.0 and float(p.alpha(p.t_data)) == 1.0


@pytest.mark.parametrize("process", ALL, ids=repr)
def test_lambda_round_trip(process):
    t = torch.linspace(process.t_min, process.t_max, 37, dtype=torch.float64)[1:-1]
    assert torch.allclose(process.t_from_lambda(process.lambda_(t)), t, rtol=1e-9, atol=1e-9)


def test_discrete_lambda_is_exact_on_the_grid():
    p = VPDiscrete.linear()
    a2 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    n = torch.tensor([0.0, 3.0, 700.0])
    assert torch.allclose(p.lambda_(n), 0.5 * torch.log(a2[[0, 3, 700]] / (1 - a2[[0, 3, 700]])), rtol=1e-12)


def test_vp_continuous_closed_form():
    p = VPContinuous(0.1, 20.0)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    log_mean_coeff = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1  # Song et al. 2021, eq. 33
    assert torch.allclose(p.alpha(t), torch.exp(log_mean_coeff))
    assert torch.allclose(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("process", [VPDiscrete.linear(), VPContinuous(), EDMProcess(), FlowProcess()], ids=repr)
def test_derivatives_match_finite_differences(process):
    t = torch.tensor([0.3 * process.t_max + 0.2 * process.t_min], dtype=torch.float64)
    h = 1e-5 * max(process.t_max, 1.0)
    da, ds = process.alpha_sigma_derivatives(t)
    assert float(da) == pytest.approx(float((process.alpha(t + h) - process.alpha(t - h)) / (2 * h)), rel=1e-4, abs=1e-8)
    assert float(ds) == pytest.approx(float((process.sigma(t + h) - process.sigma(t - h)) / (2 * h)), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("process", ALL, ids=repr)
def test_timesteps_decrease_to_clean_data(process, spacing):
    for steps in (1, 7, 50):
        ts = process.timesteps(steps, spacing)
        assert ts.dtype == torch.float64 and len(ts) == steps + 1
        assert ts[-1] == process.t_data
        assert bool((ts[1:] < ts[:-1]).all()), ts


def test_karras_spacing_follows_edm_eq5():
    p = EDMProcess(0.002, 80.0)
    i = torch.arange(5, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(p.timesteps(5, "karras")[:-1], expected, rtol=1e-10)


def test_discrete_leading_and_trailing_follow_diffusers():
    p = VPDiscrete.linear(1000)
    assert p.timesteps(10, "leading")[:-1].tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert p.timesteps(10, "trailing")[:-1].tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


def test_bad_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="valid spacings: uniform"):
        VPDiscrete.linear().timesteps(10, "linear")
    with pytest.raises(ConfigError, match="valid processes"):
        make_process("vp-quadratic")


def test_discrete_derivatives_are_one_sided_at_the_grid_end():
    """At t = 0 a central difference would straddle the jump to clean data (t = −1)."""
    p = VPDiscrete.linear()
    h = 1e-6
    da, ds = p.alpha_sigma_derivatives(torch.tensor([0.0], dtype=torch.float64))
    assert float(da) == pytest.approx(float((p.alpha(h) - p.alpha(0.0)) / h), rel=1e-4)
    assert float(ds) == pytest.approx(float((p.sigma(h) - p.sigma(0.0)) / h), rel=1e-4)


def test_checkerboard_density_covers_its_own_samples():
    from diffbench_plugins.toy_data import checkerboard_log_prob, draw_checkerboard

    x, _ = draw_checkerboard(2000, torch.Generator().manual_seed(0))
    logp = checkerboard_log_prob(x)
    assert torch.isfinite(logp).all() and torch.allclose(logp, torch.full_like(logp, math.log(1 / 8)))
    assert torch.isinf(checkerboard_log_prob(x + torch.tensor([1.0, 0.0]))).float().mean() > 0.7
