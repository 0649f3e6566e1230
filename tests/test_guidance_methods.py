"""APG, CFG-Zero*, CFG++, autoguidance and the guidance interval: exact reductions and closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from diffbench.denoiser import Denoiser
from diffbench.process import make_process
from diffbench.registry import ConfigError
from diffbench_plugins.guidance import (AutoguidedDenoiser, apply_apg, apply_cfg, apply_cfg_plus_plus,
                                        apply_cfg_zero_star, apply_classifier)
from diffbench_plugins.samplers import sample_ddim
from diffbench_plugins.unet import build_unet

PROC = make_process("vp-linear")
X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 3, 7, 9])
TIMES = (900.0, 400.0, 50.0)


def random_unet(seed):
    torch.manual_seed(seed)
    net = build_unet("tiny-8px", 1, 8, PROC, 10)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def base():
    return Denoiser(random_unet(0), PROC, "eps", num_classes=10, null_class=10, name="test")


def flat_dot(a, b):
    return (a * b).flatten(1).sum(1)


@torch.no_grad()
@pytest.mark.parametrize("t", TIMES)
def test_apg_with_eta_1_and_no_momentum_or_threshold_is_cfg(base, t):
    assert torch.allclose(apply_apg(base, 3.0, eta=1.0)(X, t, Y), apply_cfg(base, 3.0)(X, t, Y), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("t", TIMES)
def test_apg_keeps_only_the_update_orthogonal_to_the_conditional_prediction(base, t):
    w, x0_cond, x0_uncond = 4.0, base(X, t, Y), base(X, t, None)
    update = (apply_apg(base, w)(X, t, Y) - x0_cond) / (w - 1)
    assert flat_dot(update, x0_cond).abs().max() < 1e-4 * flat_dot(x0_cond, x0_cond).max()
    diff = x0_cond - x0_uncond  # Δ = Δ∥ + Δ⊥ and the update is Δ⊥
    parallel = (flat_dot(diff, x0_cond) / flat_dot(x0_cond, x0_cond)).view(-1, 1, 1, 1) * x0_cond
    assert torch.allclose(update, diff - parallel, atol=1e-4 * float(diff.abs().max()))
    # The rescaling caps ‖Δ‖ at r before the projection.
    capped = (apply_apg(base, w, eta=1.0, norm_threshold=0.01)(X, t, Y) - x0_cond) / (w - 1)
    assert torch.allclose(capped.flatten(1).norm(dim=1), torch.full((4,), 0.01), rtol=1e-2)


@torch.no_grad()
def test_apg_momentum_adds_beta_times_the_previous_difference(base):
    guided, beta, w = apply_apg(base, 2.0, eta=1.0, momentum=-0.5), -0.5, 2.0
    guided(X, 900.0, Y)
    second = guided(X, 400.0, Y)
    diff = lambda t: base(X, t, Y) - base(X, t, None)  # noqa: E731
    assert torch.allclose(second, base(X, 400.0, Y) + (w - 1) * (diff(400.0) + beta * diff(900.0)), atol=1e-4)
    # t going up again starts a new trajectory: no momentum carried over.
    assert torch.allclose(guided(X, 900.0, Y), apply_cfg(base, w)(X, 900.0, Y), atol=1e-5)


def velocity(x, t, x0):
    a, s = float(PROC.alpha(t)), float(PROC.sigma(t))
    da, ds = (float(v) for v in PROC.alpha_sigma_derivatives(t))
    return da * x0 + ds * (x - a * x0) / s


@torch.no_grad()
@pytest.mark.parametrize("t", TIMES)
def test_cfg_zero_star_scales_the_unconditional_velocity_by_its_least_squares_fit(base, t):
    w = 3.0
    assert torch.allclose(apply_cfg_zero_star(base, w, optimized_scale=False)(X, t, Y), apply_cfg(base, w)(X, t, Y),
                          atol=1e-4)
    u_c, u_u = velocity(X, t, base(X, t, Y).double()), velocity(X, t, base(X, t, None).double())
    s_star = (flat_dot(u_c, u_u) / flat_dot(u_u, u_u)).view(-1, 1, 1, 1)
    expected = s_star * u_u + w * (u_c - s_star * u_u)
    got = velocity(X, t, apply_cfg_zero_star(base, w)(X, t, Y).double())
    assert torch.allclose(got, expected, atol=1e-3 * float(expected.abs().max()))


@torch.no_grad()
def test_cfg_zero_star_zero_init_returns_zero_velocity_for_the_first_steps(base):
    guided = apply_cfg_zero_star(base, 3.0, zero_init_steps=1)
    assert velocity(X, 900.0, guided(X, 900.0, Y).double()).abs().max() < 1e-4
    assert velocity(X, 400.0, guided(X, 400.0, Y).double()).abs().max() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_cfg_plus_plus_with_ddim_renoises_with_the_unconditional_noise(base, lam):
    """Chung et al. 2024, Alg. 1, written out: x_s = α_s x̂0_λ + σ_s ε̂_∅."""
    timesteps = PROC.timesteps(6, "trailing")
    guided = apply_cfg_plus_plus(base, lam)
    guided.bind_timesteps(timesteps)
    got = sample_ddim(guided.conditioned(Y), X.clone(), timesteps, generator=None)
    x = X.clone()
    for t, s in zip(timesteps[:-1], timesteps[1:]):
        x0_c, x0_u = base(x, t, Y), base(x, t, None)
        eps_u = (x - float(PROC.alpha(t)) * x0_u) / float(PROC.sigma(t))
        x = float(PROC.alpha(s)) * (x0_u + lam * (x0_c - x0_u)) + float(PROC.sigma(s)) * eps_u
    assert torch.allclose(got, x, atol=1e-4)


@pytest.mark.parametrize("ref", ["cfg++:1.5", "cfg++:-0.1", "cfg++[scale=2]"])
def test_cfg_plus_plus_refuses_lambda_outside_0_1(ref):
    from diffbench.plugins import build_registry

    with pytest.raises(ConfigError, match="cfg\\+\\+.*scale"):
        build_registry().resolve("guidance", ref)


@torch.no_grad()
@pytest.mark.parametrize("t", TIMES)
def test_autoguidance_extrapolates_from_the_weak_model_and_counts_both_calls(base, t):
    weak = Denoiser(random_unet(1), PROC, "eps", num_classes=10, null_class=10, name="weak")
    w = 2.5
    guided = AutoguidedDenoiser(base, weak, w, 0.0, math.inf).conditioned(Y)
    base.stats.reset()
    got = guided(X, t)
    assert base.nfe == 2
    expected = weak(X, t, Y) + w * (base(X, t, Y) - weak(X, t, Y))
    assert torch.allclose(got, expected, atol=1e-5)
    # Guiding a model with itself changes nothing.
    assert torch.allclose(AutoguidedDenoiser(base, base, w, 0.0, math.inf)(X, t, Y), base(X, t, Y), atol=1e-5)


class ToyClassifier(torch.nn.Module):
    def forward(self, x, t):
        return torch.stack([x.flatten(1).sum(1) * (k - 4.5) / 64 for k in range(10)], 1)


@torch.no_grad()
@pytest.mark.parametrize("make", [
    lambda b, lo, hi: apply_apg(b, 3.0, sigma_min=lo, sigma_max=hi),
    lambda b, lo, hi: apply_cfg_zero_star(b, 3.0, sigma_min=lo, sigma_max=hi),
    lambda b, lo, hi: apply_cfg(b, 3.0, lo, hi),
], ids=["apg", "cfg-zero-star", "cfg"])
def test_guidance_interval_uses_the_conditional_prediction_outside(base, make):
    # σ/α at t = 50 is ≈ 0.3 and at t = 900 ≈ 38: guide only in [1, 10].
    guided = make(base, 1.0, 10.0)
    assert torch.allclose(guided(X, 50.0, Y), base(X, 50.0, Y), atol=1e-6)
    assert torch.allclose(guided(X, 900.0, Y), base(X, 900.0, Y), atol=1e-6)
    assert not torch.allclose(guided(X, 400.0, Y), base(X, 400.0, Y), atol=1e-3)


def test_classifier_guidance_takes_the_interval_too(base, monkeypatch):
    import diffbench_plugins.classifier as classifier_plugin

    net = ToyClassifier()
    net.process = PROC
    monkeypatch.setattr(classifier_plugin, "load_classifier", lambda name, device: net)
    guided = apply_classifier(base, 5.0, classifier="toy", sigma_min=1.0, sigma_max=10.0)
    with torch.no_grad():
        assert torch.allclose(guided(X, 50.0, Y), base(X, 50.0, Y), atol=1e-6)
        assert not torch.allclose(guided(X, 400.0, Y), base(X, 400.0, Y), atol=1e-4)
