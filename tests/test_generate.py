"""diffbench.generate: the one generation path (runner, scripts, tests)."""
import torch

from diffbench.denoiser import Denoiser
from diffbench.generate import generate
from diffbench.gmm import GaussianMixture, oracle_denoiser
from diffbench.process import make_process
from diffbench_plugins.flow import sample_flow_heun
from diffbench_plugins.samplers import sample_ddim, sample_dpm_solver_pp

UNIT_GAUSSIAN = GaussianMixture.isotropic([1.0], [[0.0]], [1.0])


def test_prior_scale_follows_the_grid_start_under_leading_spacing():
    # `leading` leaves out t_max: on the flow path the grid starts at t = 10/11, where x_t of
    # unit-variance data has std sqrt(α² + σ²) = 0.91, not 1. With the exact denoiser of N(0, 1)
    # the ODE then lands on std 1; the t_max scale (the old evidence-script copy) lands ~9% too wide.
    proc = make_process("flow")
    denoiser = oracle_denoiser(UNIT_GAUSSIAN, proc)
    timesteps = proc.timesteps(10, "leading")
    assert float(timesteps[0]) < proc.t_max
    for sampler in (sample_dpm_solver_pp, sample_flow_heun):
        out = generate(denoiser, sampler, timesteps, range(20000), (1,), seed=0)
        assert abs(float(out.x_T.std()) - proc.prior_std(timesteps[0])) < 0.01
        assert abs(float(out.samples.std()) - 1.0) < 0.015
        too_wide = sampler(denoiser, out.x_T * proc.prior_std() / proc.prior_std(timesteps[0]), timesteps, generator=None)
        assert float(too_wide.std()) > 1.06


def test_sample_i_depends_only_on_seed_and_i_and_gets_label_i_mod_k():
    proc = make_process("vp-linear")
    seen = []
    denoiser = Denoiser(lambda x, t, c: seen.append(c) or torch.zeros_like(x), proc, "eps", num_classes=3, null_class=3)
    timesteps = proc.timesteps(2)
    whole = generate(denoiser, sample_ddim, timesteps, range(6), (2,), seed=5)
    part = generate(denoiser, sample_ddim, timesteps, [4, 5], (2,), seed=5)
    assert torch.equal(whole.x_T[4:], part.x_T) and torch.allclose(whole.samples[4:], part.samples)
    assert whole.labels.tolist() == [0, 1, 2, 0, 1, 2] and seen[0].tolist() == [0, 1, 2, 0, 1, 2]


def test_callbacks_share_one_dict_format_across_families():
    proc = make_process("flow")
    denoiser = oracle_denoiser(UNIT_GAUSSIAN, proc)
    timesteps = proc.timesteps(3)
    for sampler in (sample_ddim, sample_flow_heun):
        steps = []
        generate(denoiser, sampler, timesteps, range(4), (1,), callback=steps.append)
        assert [s["i"] for s in steps] == [0, 1, 2]
        assert all(set(s) >= {"i", "x", "t", "t_next", "denoised"} for s in steps)
        assert [float(s["t"]) for s in steps] == timesteps[:-1].tolist()
        assert [float(s["t_next"]) for s in steps] == timesteps[1:].tolist()


def test_save_samples_file_names_keep_every_distinguishing_character(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from diffbench.cli import main

    samplers = "dpm-solver,dpm-solver++,ddim,ddim[eta=1.0]"
    result = CliRunner().invoke(main, ["run", "--models", "gmm-oracle", "--samplers", samplers, "--steps", "4",
                                       "--datasets", "gmm-2d", "--metrics", "swd", "--num-samples", "16",
                                       "--repeats", "1", "--save-samples", "--quiet", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "samples").glob("*.safetensors"))
    assert files == ["gmm-oracle__ddim[eta=1.0]__none__gmm-2d__4.safetensors", "gmm-oracle__ddim__none__gmm-2d__4.safetensors",
                     "gmm-oracle__dpm-solver++__none__gmm-2d__4.safetensors",
                     "gmm-oracle__dpm-solver__none__gmm-2d__4.safetensors"]
    plain, pp = (load_file(str(tmp_path / "samples" / f"gmm-oracle__{s}__none__gmm-2d__4.safetensors"))
                 for s in ("dpm-solver", "dpm-solver++"))
    assert torch.equal(plain["x_T"], pp["x_T"]) and not torch.equal(plain["x_0"], pp["x_0"])  # two cells, two files
