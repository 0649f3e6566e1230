"""Consistency models (plugins/consistency.py): the boundary condition, the iCT curriculum and
discretization, and few-step sampling through ``diffbench run`` (determinism per seed, skipped
cells for models without a consistency head)."""
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from diffbench.denoiser import Denoiser
from diffbench.process import EDMProcess
from diffbench_plugins.consistency import (SIGMA_MAX, SIGMA_MIN, PreconditionedNet, consistency_times, ict_num_scales,
                                           discretization_sigmas)
from diffbench_plugins.mlp import MLPDenoiserNet


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_consistency_model(sigma_data=0.7) -> Denoiser:
    torch.manual_seed(0)
    inner = MLPDenoiserNet(2, EDMProcess(), hidden=32, depth=2)
    with torch.no_grad():  # a net whose F is far from zero, so only the parameterization can give x
        for p in inner.parameters():
            p.normal_()
    return Denoiser(PreconditionedNet(inner, sigma_data, SIGMA_MIN).eval(), EDMProcess(SIGMA_MIN, SIGMA_MAX),
                    "consistency")


def test_boundary_condition_holds_exactly():
    f = _random_consistency_model()
    x = 3 * torch.randn(256, 2)
    assert "consistency" in f.capabilities
    with torch.no_grad():
        assert torch.equal(f(x, f.process.t_min), x)  # c_skip(σ_min) = 1, c_out(σ_min) = 0 exactly
        assert (f(x, 2 * SIGMA_MIN) - x).abs().max() > 1e-4  # ... and only there


def test_karras_discretization_and_ict_curriculum():
    sigmas = discretization_sigmas(18)
    assert float(sigmas[0]) == pytest.approx(SIGMA_MIN, rel=1e-12)
    assert float(sigmas[-1]) == pytest.approx(SIGMA_MAX, rel=1e-12)
    assert bool((sigmas.diff() > 0).all())
    # Song & Dhariwal 2023, eq. 8 with s0 = 10, s1 = 1280, K = 800: K' = 800 // 8 = 100.
    assert [ict_num_scales(k, 800) for k in (0, 99, 100, 250, 699, 700, 799)] == [11, 11, 21, 41, 641, 1281, 1281]


def test_consistency_times():
    process = EDMProcess(SIGMA_MIN, SIGMA_MAX)
    assert consistency_times(process, 1) == [SIGMA_MAX]
    taus = consistency_times(process, 3)
    assert taus[0] == SIGMA_MAX and taus[1] == pytest.approx(0.821) and len(taus) == 3
    assert 0.821 > taus[2] > 10 * SIGMA_MIN  # the Karras midpoint of [σ_min, 0.821], not σ_min itself
    assert consistency_times(process, 3, "2.0/0.5") == [SIGMA_MAX, 2.0, 0.5]
    with pytest.raises(ValueError, match="times"):
        consistency_times(process, 3, "0.5/2.0")


def _run(cli, out, seed, models="consistency-mlp", samplers="one-step", steps="1"):
    result = cli("run", "--models", models, "--samplers", samplers, "--steps", steps, "--datasets", "moons",
                 "--metrics", "swd", "--num-samples", "64", "--repeats", "1", "--seed", seed, "--save-samples",
                 "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    return pd.read_csv(out / "results.csv")


def _samples(out, model, sampler, steps):
    return load_file(str(out / "samples" / f"{model}__{sampler}__none__moons__{steps}.safetensors"))["x_0"]


def test_few_step_grid_is_deterministic_per_seed_and_skips_models_without_consistency(cli, tmp_path):
    table = _run(cli, tmp_path / "a", 0, "consistency-mlp,flow-mlp", "one-step,multistep-consistency", "1,2")
    _run(cli, tmp_path / "b", 0)
    _run(cli, tmp_path / "c", 1)
    rows = table.set_index(["model", "sampler", "steps"])
    assert rows.loc[("consistency-mlp", "one-step", 1), "status"] == "ok"
    assert rows.loc[("consistency-mlp", "one-step", 1), "nfe"] == 1
    assert rows.loc[("consistency-mlp", "multistep-consistency", 2), "nfe"] == 2
    skipped = rows.loc[("flow-mlp", "multistep-consistency", 2)]
    assert skipped.status == "skipped" and "consistency" in skipped.reason

    one_step = [_samples(tmp_path / run, "consistency-mlp", "one-step", 1) for run in "abc"]
    assert torch.equal(one_step[0], one_step[1])  # same seed, same samples
    assert (one_step[0] - one_step[2]).abs().max() > 0.1  # another seed, other samples
    # Multistep with a single step is Alg. 1 without re-noising: the one-step sampler exactly.
    torch.testing.assert_close(_samples(tmp_path / "a", "consistency-mlp", "multistep-consistency", 1), one_step[0])


# --- consistency-unet (iCT with the U-Net, shipped for digits) ------------------------------


def test_unet_consistency_wrapper_boundary_condition_holds_exactly():
    from diffbench_plugins.unet import build_unet

    torch.manual_seed(0)
    inner = build_unet("tiny-8px", 1, 8, EDMProcess(SIGMA_MIN, SIGMA_MAX), 10)
    with torch.no_grad():  # the U-Net's output conv is zero-initialised: make F far from zero
        for p in inner.parameters():
            p.normal_(0, 0.2)
    f = Denoiser(PreconditionedNet(inner, 0.75, SIGMA_MIN).eval(), EDMProcess(SIGMA_MIN, SIGMA_MAX), "consistency",
                 num_classes=10, null_class=10)
    x, labels = 2 * torch.randn(6, 1, 8, 8), torch.arange(6)
    with torch.no_grad():
        assert torch.equal(f.conditioned(labels)(x, SIGMA_MIN), x)
        assert torch.equal(f(x, SIGMA_MIN), x)
        assert (f.conditioned(labels)(x, 2 * SIGMA_MIN) - x).abs().max() > 1e-4


def test_consistency_unet_loads_the_shipped_checkpoint_and_samples():
    from diffbench.plugins import build_registry
    from diffbench.rng import SampleGenerators
    from diffbench_plugins.consistency import sample_multistep_consistency

    registry = build_registry()
    digits = registry.get("datasets", "digits").load()
    f = registry.get("models", "consistency-unet").load(digits)
    assert "consistency" in f.capabilities and f.num_classes == 10
    x = 2 * torch.randn(8, *digits.shape)
    with torch.no_grad():
        assert torch.equal(f(x, SIGMA_MIN), x)  # boundary condition of the trained network
    cond = f.conditioned(torch.arange(8) % 10)
    x_t = SIGMA_MAX * torch.randn(8, *digits.shape, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 4):
        out = sample_multistep_consistency(cond, x_t.clone(), torch.zeros(steps + 1),
                                           generator=SampleGenerators(0, range(8)))
        assert out.shape == (8, 1, 8, 8) and torch.isfinite(out).all()
