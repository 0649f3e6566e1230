"""Parameterization conversions are exact, and every network call is counted."""
import pytest
import torch

from diffbench.denoiser import Denoiser
from diffbench.process import EDMProcess, FlowProcess, VPContinuous, VPDiscrete
from diffbench.training import denoising_loss, min_snr_weight, regression_target

PROCESSES = [VPDiscrete.linear(), VPContinuous(), EDMProcess(), FlowProcess()]


def _oracle_net(parameterization, process, x0, eps):
    """A 'network' that outputs the exact regression target for the (x0, ε) it was built from."""
    def net(x, t, cond):
        return regression_target(parameterization, process, t.double(), x0, eps).to(x.dtype)
    return net


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "velocity", "score"])
def test_every_parameterization_recovers_x0_and_eps(process, parameterization):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.tensor(0.37 * process.t_max + 0.63 * process.t_min, dtype=torch.float64)
    x_t = process.alpha(t) * x0 + process.sigma(t) * eps
    d = Denoiser(_oracle_net(parameterization, process, x0, eps), process, parameterization)
    assert torch.allclose(d(x_t, t), x0, atol=1e-6)
    assert torch.allclose(d.eps(x_t, t), eps, atol=1e-6)
    assert torch.allclose(d.score(x_t, t), -eps / process.sigma(t), atol=1e-5)
    da, ds = process.alpha_sigma_derivatives(t)
    assert torch.allclose(d.velocity(x_t, t), da * x0 + ds * eps, atol=1e-5)


def test_per_sample_times_broadcast():
    process = VPDiscrete.linear()
    x0, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([10.0, 200.0, 500.0, 990.0], dtype=torch.float64)
    x_t = process.alpha(t)[:, None] * x0 + process.sigma(t)[:, None] * eps
    d = Denoiser(_oracle_net("eps", process, x0, eps), process, "eps")
    assert torch.allclose(d(x_t, t), x0, atol=1e-6)


def test_nfe_counts_every_call_and_is_shared_by_bound_views():
    calls = []
    d = Denoiser(lambda x, t, c: calls.append(c) or x, VPDiscrete.linear(), "x0", num_classes=3)
    x = torch.zeros(2, 2)
    bound = d.conditioned(torch.tensor([1, 2]))
    d(x, 5.0)
    bound(x, 5.0)
    bound.eps(x, 5.0)
    assert d.nfe == 3 == len(calls)
    assert calls[0] is None and calls[1].tolist() == [1, 2]
    d.stats.reset()
    assert bound.nfe == 0


def test_consistency_parameterization_adds_capability():
    d = Denoiser(lambda x, t, c: x, FlowProcess(), "consistency")
    assert "consistency" in d.capabilities
    with pytest.raises(ValueError, match="valid: eps"):
        Denoiser(lambda x, t, c: x, FlowProcess(), "epsilon")


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "velocity", "score"])
def test_min_snr_weight_is_min_snr_gamma_in_x0_space(process, parameterization):
    """Hang et al. 2023 §3.4: the weighted loss on any target equals min(SNR, γ) ‖x0 − x̂0‖²."""
    g = torch.Generator().manual_seed(1)
    x0, eps, pred = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = process.t_min + (process.t_max - process.t_min) * torch.tensor([0.02, 0.2, 0.5, 0.8, 0.97], dtype=torch.float64)
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    x_t = a * x0 + s * eps
    x0_hat = Denoiser(lambda *_: pred, process, parameterization).to_x0(x_t, t, pred)
    target = regression_target(parameterization, process, t, x0, eps)
    gamma = 5.0
    weighted = min_snr_weight(parameterization, process, t, gamma)[:, None] * (target - pred) ** 2
    assert torch.allclose(weighted, ((a / s) ** 2).clamp(max=gamma) * (x0 - x0_hat) ** 2, rtol=1e-6, atol=1e-9)


def test_min_snr_loss_for_eps_weights_by_min_one_gamma_over_snr():
    """ε-prediction: the weight is min(1, γ/SNR) (Hang et al. 2023), so a huge γ gives the simple loss."""
    process = VPDiscrete.linear()
    t = torch.tensor([0.0, 10.0, 100.0, 500.0, 999.0], dtype=torch.float64)
    snr = process.alpha(t) ** 2 / process.sigma(t) ** 2
    assert torch.allclose(min_snr_weight("eps", process, t, 5.0), (5.0 / snr).clamp(max=1.0))
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    net = lambda x, t, cond: 0.5 * x  # noqa: E731  (any fixed function of x_t)
    plain, huge_gamma = (denoising_loss(net, process, "eps", x0, None, torch.Generator().manual_seed(3),
                                        min_snr_gamma=gamma) for gamma in (0.0, 1e12))
    assert torch.allclose(plain, huge_gamma)
