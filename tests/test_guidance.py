"""Classifier-free and classifier guidance keep the denoiser contract and follow their formulas."""
from __future__ import annotations

import math

import pytest
import torch

from diffbench.denoiser import Denoiser
from diffbench.process import make_process
from diffbench.registry import Incompatible
from diffbench.rng import SampleGenerators
from diffbench_plugins.guidance import ClassifierGuidedDenoiser, apply_cfg
from diffbench_plugins.samplers import sample_ddim
from diffbench_plugins.unet import build_unet

PROC = make_process("vp-linear")


class CountingNet(torch.nn.Module):
    """A tiny class-conditional U-Net with random (non-zero) weights that records its batch sizes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = build_unet("tiny-8px", 1, 8, PROC, 10)
        with torch.no_grad():
            for p in self.net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        self.batches = []

    def forward(self, x, t, cond):
        self.batches.append(len(x))
        return self.net(x, t, cond)


@pytest.fixture(scope="module")
def base():
    return Denoiser(CountingNet().eval(), PROC, "eps", num_classes=10, null_class=10, name="test")


X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 3, 7, 9])


@torch.no_grad()
def test_cfg_scale_0_is_unconditional_and_1_is_conditional(base):
    t = 400.0
    assert torch.allclose(apply_cfg(base, 0.0)(X, t, Y), base(X, t, None), atol=1e-5)
    assert torch.allclose(apply_cfg(base, 1.0)(X, t, Y), base(X, t, Y), atol=1e-5)
    w = 3.0
    expected = base(X, t, None) + w * (base(X, t, Y) - base(X, t, None))
    assert torch.allclose(apply_cfg(base, w)(X, t, Y), expected, atol=1e-5)
    # ... and in ε space (ε̂ is affine in x̂0 at fixed x, t).
    eps_expected = base.eps(X, t, None) + w * (base.eps(X, t, Y) - base.eps(X, t, None))
    assert torch.allclose(apply_cfg(base, w).eps(X, t, Y), eps_expected, atol=1e-4)


@torch.no_grad()
def test_cfg_costs_one_batched_nfe_per_call_and_shares_the_counter(base):
    guided = apply_cfg(base, 2.0).conditioned(Y)
    base.net.batches.clear()
    start = base.nfe
    timesteps = PROC.timesteps(5)
    sample_ddim(guided, X.clone(), timesteps, generator=SampleGenerators(0, range(4)))
    assert guided.nfe - start == 5 and base.nfe == guided.nfe  # one NFE per step, counted on the base
    assert base.net.batches == [8] * 5  # [cond; null] in one batch of 2B


@torch.no_grad()
def test_cfg_interval_uses_the_conditional_prediction_outside(base):
    guided = apply_cfg(base, 4.0, sigma_min=0.5, sigma_max=2.0)
    t_low = float(PROC.t_from_lambda(torch.tensor(-math.log(0.1))))  # σ/α = 0.1: outside
    t_mid = float(PROC.t_from_lambda(torch.tensor(0.0)))  # σ/α = 1: inside
    assert torch.allclose(guided(X, t_low, Y), base(X, t_low, Y), atol=1e-5)
    assert not torch.allclose(guided(X, t_mid, Y), base(X, t_mid, Y), atol=1e-3)


def test_cfg_without_null_class_is_incompatible():
    with pytest.raises(Incompatible, match="null class"):
        apply_cfg(Denoiser(lambda x, t, c: x, PROC, "eps"), 2.0)


class LinearClassifier(torch.nn.Module):
    """logits = W·flatten(x): ∇x log p(y|x) = W_y − Σ_k p_k W_k in closed form."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(10, 64, generator=torch.Generator().manual_seed(2)) * 0.3)

    def forward(self, x, t):
        return x.flatten(1) @ self.w.T


def test_classifier_guidance_shifts_eps_by_sigma_times_gradient(base):
    clf = LinearClassifier()
    s, t = 2.5, 300.0
    guided = ClassifierGuidedDenoiser(base, clf, s)
    with torch.no_grad():
        p = (X.flatten(1) @ clf.w.T).softmax(-1)  # [B, 10]
        grad = (clf.w[Y] - p @ clf.w).reshape(X.shape)  # closed-form ∇ log p(y|x)
        sigma = float(PROC.sigma(t))
        expected = base.eps(X, t, Y) - s * sigma * grad  # ε̃ = ε̂ − s σ ∇ log p(y|x_t)
        start = base.nfe
        got = guided.eps(X, t, Y)
    assert torch.allclose(got, expected, atol=1e-4)
    assert base.nfe - start == 1  # the classifier gradient is not a model NFE
    assert torch.allclose(ClassifierGuidedDenoiser(base, clf, 0.0)(X, t, Y), base(X, t, Y))
