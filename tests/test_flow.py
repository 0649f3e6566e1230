"""Flow matching (plugins/flow.py): the training loss, DDIM = Euler on the linear path, and the
convergence order of the velocity ODE samplers against adaptive Dormand–Prince."""
import math

import pytest
import torch

from diffbench.denoiser import Denoiser
from diffbench.gmm import GaussianMixture
from diffbench.process import FlowProcess
from diffbench_plugins.flow import (flow_matching_loss, sample_flow_dopri5, sample_flow_euler, sample_flow_heun,
                                    sample_flow_midpoint)
from diffbench_plugins.mlp import MLPDenoiserNet
from diffbench_plugins.samplers import sample_ddim
from diffbench_plugins.toy_data import _draw_moons


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


def _train_losses(ot: bool, steps: int = 120) -> torch.Tensor:
    torch.manual_seed(0)
    data, _ = _draw_moons(10000, torch.Generator().manual_seed(0))
    net = MLPDenoiserNet(2, FlowProcess(), hidden=32, depth=1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(len(data), (128,), generator=g)]
        loss = flow_matching_loss(net, batch, g, ot=ot)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_flow_matching_loss_falls_and_ot_pairing_lowers_it():
    plain, ot = _train_losses(ot=False), _train_losses(ot=True)
    # E‖ε − x0‖² ≈ 2 per coordinate at the start; the conditional-velocity variance is the floor.
    assert plain[-30:].mean() < 0.85 * plain[:20].mean()
    # Minibatch OT pairs each point with nearby noise: a far less noisy regression target.
    assert ot[-30:].mean() < 0.5 * plain[-30:].mean()


def test_reflow_loss_vanishes_on_the_velocity_of_its_coupling():
    # A deterministic coupling x0 = A ε has straight paths x_t = ((1 − t) A + t I) ε with velocity
    # ε − x0: the fixed-coupling loss of that field is 0; with fresh independent noise it is not.
    a = torch.tensor([[0.5, 0.2], [0.0, 1.5]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(512, 2, generator=g, dtype=torch.float64)

    def velocity(x, t, cond):
        m = (1 - t)[:, None, None] * a + t[:, None, None] * torch.eye(2, dtype=torch.float64)
        e = torch.linalg.solve(m, x.unsqueeze(-1)).squeeze(-1)
        return e - e @ a.T

    assert flow_matching_loss(velocity, eps @ a.T, g, eps=eps) < 1e-20
    assert flow_matching_loss(velocity, eps @ a.T, g) > 0.1


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "karras"])
def test_ddim_on_a_flow_model_is_the_flow_euler_step(spacing):
    # On α = 1 − t, σ = t: α_s x̂0 + σ_s ε̂ = x + (s − t)(ε̂ − x̂0) = x + (s − t) u.
    torch.manual_seed(0)
    net = MLPDenoiserNet(2, FlowProcess(), hidden=32, depth=2).eval()
    timesteps = FlowProcess().timesteps(12, spacing)
    x_T = torch.randn(64, 2)
    d_ddim, d_euler = (Denoiser(net, FlowProcess(), "velocity") for _ in range(2))
    ddim = sample_ddim(d_ddim, x_T.clone(), timesteps, generator=None)
    euler = sample_flow_euler(d_euler, x_T.clone(), timesteps)
    torch.testing.assert_close(ddim, euler, rtol=1e-5, atol=1e-5)
    assert d_ddim.nfe == d_euler.nfe == 12


def _oracle() -> Denoiser:
    """The exact x0-denoiser E[x0 | x_t] of a smooth 2-D mixture under the flow path."""
    mixture = GaussianMixture.isotropic([0.5, 0.3, 0.2], [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], [0.5, 0.4, 0.6])
    process = FlowProcess()

    def net(x, t, cond):
        t = t.double()
        return mixture.posterior_mean(x, process.alpha(t), process.sigma(t))

    return Denoiser(net, process, "x0")


def _rms(a, b) -> float:
    return float(((a - b) ** 2).mean().sqrt())


@pytest.fixture(scope="module")
def reference():
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    oracle = _oracle()
    x0 = sample_flow_dopri5(oracle, x_T.clone(), FlowProcess().timesteps(16), rtol=1e-10, atol=1e-10, t_eps=1e-7)
    return x_T, x0, oracle.nfe


@pytest.mark.parametrize("sampler, order", [(sample_flow_euler, 1), (sample_flow_heun, 2), (sample_flow_midpoint, 2)])
def test_flow_samplers_converge_with_their_order(reference, sampler, order):
    x_T, x_ref, _ = reference
    steps = (16, 32, 64, 128)
    errors = [_rms(sampler(_oracle(), x_T.clone(), FlowProcess().timesteps(n)), x_ref) for n in steps]
    slopes = [math.log2(e0 / e1) for e0, e1 in zip(errors, errors[1:])]
    assert all(e0 > e1 for e0, e1 in zip(errors, errors[1:])), errors
    assert abs(slopes[-1] - order) < 0.25 and abs(sum(slopes[-2:]) / 2 - order) < 0.3, (errors, slopes)


def test_dopri5_tolerance_trades_nfe_for_accuracy(reference):
    x_T, x_ref, tight_nfe = reference
    loose = _oracle()
    x0 = sample_flow_dopri5(loose, x_T.clone(), FlowProcess().timesteps(16), rtol=1e-4, atol=1e-4)
    assert loose.nfe < tight_nfe
    assert 1e-7 < _rms(x0, x_ref) < 1e-3


# --- the image flow model (flow-unet, shipped for digits) -----------------------------------


def test_flow_unet_loads_the_shipped_checkpoint_and_samples():
    from diffbench.plugins import build_registry

    registry = build_registry()
    digits = registry.get("datasets", "digits").load()
    denoiser = registry.get("models", "flow-unet").load(digits)
    assert denoiser.parameterization == "velocity" and isinstance(denoiser.process, FlowProcess)
    assert denoiser.num_classes == 10 and denoiser.null_class == 10
    cond = denoiser.conditioned(torch.arange(8) % 10)
    x = torch.randn(8, *digits.shape, generator=torch.Generator().manual_seed(0))
    for sampler in (sample_flow_euler, sample_flow_heun):
        out = sampler(cond, x.clone(), denoiser.process.timesteps(3))
        assert out.shape == (8, 1, 8, 8) and torch.isfinite(out).all()
        assert out.abs().max() <= 1.0 + 1e-5  # the last step is the clipped x̂0


def test_clip_denoised_velocity_is_exact_when_the_prediction_is_in_range():
    # ClipDenoised on a velocity net: unchanged where the implied x̂0 = x − t·u is inside [−1, 1].
    from diffbench_plugins.image_model import ClipDenoised

    x0, eps = 0.9 * (2 * torch.rand(4, 1, 8, 8) - 1), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    x = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    clip = ClipDenoised(lambda x, t, cond: eps - x0, FlowProcess(), "velocity")
    torch.testing.assert_close(clip(x, t), eps - x0, atol=1e-5, rtol=1e-5)
    big = ClipDenoised(lambda x, t, cond: eps - 5 * x0, FlowProcess(), "velocity")(x, t)  # x̂0 = 5 x0 + ...
    assert (x - t[:, None, None, None] * big).abs().max() <= 1.0 + 1e-5
