"""Samplers on the Gaussian-mixture oracle: NFE honesty, spacings, stochastic samplers in distribution."""
import pytest
import torch

from diffbench.denoiser import Denoiser
from diffbench.gmm import oracle_denoiser
from diffbench.generate import generate
from diffbench.plugins import build_registry
from diffbench.process import SPACINGS, make_process
from diffbench.registry import ConfigError
from diffbench.rng import SampleGenerators
from diffbench_plugins.point_metrics import sliced_wasserstein
from diffbench_plugins.toy_data import gmm_2d

MIXTURE = gmm_2d()
REGISTRY = build_registry()
OURS = [s for s in REGISTRY.all("samplers") if s.fn.__module__ == "diffbench_plugins.samplers"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead
    yield
    torch.set_num_threads(threads)


def sample(name, steps, n=8, process="vp-linear", spacing=None, seed=0, **options):
    """Run a registered sampler as the runner does; returns (x0, denoiser, model calls counted by the net)."""
    component = REGISTRY.get("samplers", name)
    proc = make_process(process)
    calls = []
    oracle = oracle_denoiser(MIXTURE, proc)
    denoiser = Denoiser(lambda x, t, c: calls.append(1) or oracle.net(x, t, c), proc, "x0")
    options = {**component.defaults, **options}
    timesteps = proc.timesteps(steps, spacing or options.pop("spacing"))
    options.pop("spacing", None)
    out = generate(denoiser, component.fn, timesteps, range(n), (2,), seed=seed, **options)
    return out.samples, denoiser, len(calls)


# NFE formulas (see the plugins/samplers.py docstring), for steps = 6 and the default options.
NFE = {
    "ddpm": 6, "ddim": 6, "euler": 6, "dpm-solver": 6, "dpm-solver++": 6, "heun": 2 * 6 - 1,
    "langevin": 5 * 6 + 1, "pc": 6 + 1 * 5, "one-step": 1,
}
VARIANTS = [
    ("dpm-solver", {"method": "singlestep", "order": 2}, 2 * 5 + 1),
    ("dpm-solver", {"method": "singlestep", "order": 3}, 3 * 5 + 1),
    ("dpm-solver", {"order": 3}, 6),
    ("dpm-solver++", {"variant": "3m"}, 6),
    ("dpm-solver++", {"variant": "2s"}, 2 * 5 + 1),
    ("heun", {"s_churn": 10.0}, 2 * 6 - 1),
    ("pc", {"n_steps_each": 3, "predictor": "ancestral"}, 6 + 3 * 5),
    ("langevin", {"n_steps_each": 2}, 2 * 6 + 1),
]


def test_every_sampler_of_this_plugin_has_a_documented_nfe():
    assert {s.name for s in OURS} == set(NFE)


@pytest.mark.parametrize("name", sorted(NFE))
def test_nfe_equals_model_calls_and_formula(name):
    _, denoiser, calls = sample(name, 6)
    assert denoiser.nfe == calls == NFE[name]


@pytest.mark.parametrize("name,options,nfe", VARIANTS)
def test_nfe_of_variants(name, options, nfe):
    _, denoiser, calls = sample(name, 6, **options)
    assert denoiser.nfe == calls == nfe


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", sorted(NFE))
def test_smoke_every_sampler_accepts_every_spacing(name, spacing):
    x, _, _ = sample(name, 4, spacing=spacing)
    assert x.shape == (8, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("process", ["vp-continuous", "edm", "flow"])
@pytest.mark.parametrize("name", ["ddim", "heun", "dpm-solver++", "dpm-solver"])
def test_ode_samplers_agree_across_processes(name, process):
    """The samplers only see D and D.process, so they run on VP, EDM and flow alike: with 64 steps
    every sample lands on a mode and the mean log-density is near the data's (−1.13)."""
    x, _, _ = sample(name, 64, n=32, process=process, spacing="uniform-logsnr")
    assert (torch.cdist(x.double(), MIXTURE.means).min(1).values < 0.6).all()
    assert MIXTURE.log_prob(x).mean() > -1.5


def test_one_step_returns_the_denoiser_at_t_max():
    x, denoiser, _ = sample("one-step", 10)
    proc = denoiser.process
    x_T = proc.prior_std() * SampleGenerators(0, range(8)).randn((2,))
    assert torch.allclose(x, denoiser(x_T, proc.t_max))


def test_callback_sees_every_step():
    seen = []
    component = REGISTRY.get("samplers", "dpm-solver++")
    proc = make_process("vp-linear")
    timesteps = proc.timesteps(5, "uniform-logsnr")
    component.fn(oracle_denoiser(MIXTURE, proc), torch.randn(4, 2), timesteps, generator=None, callback=seen.append)
    assert [info["i"] for info in seen] == list(range(5))
    assert all(info["x"].shape == (4, 2) and info["denoised"].shape == (4, 2) for info in seen)


def test_samples_do_not_depend_on_batch_size():
    a, _, _ = sample("pc", 5, n=6)
    b, _, _ = sample("pc", 5, n=3)
    assert torch.allclose(a[:3], b)


@pytest.mark.parametrize("name,options", [("ddpm", {"variance": "huge"}), ("dpm-solver", {"order": 4}),
                                          ("dpm-solver++", {"variant": "4m"}), ("pc", {"predictor": "euler"})])
def test_bad_options_are_config_errors(name, options):
    """Declared choices refuse a bad value when the reference is resolved, before any sampling."""
    (key, value), = options.items()
    with pytest.raises(ConfigError, match=f"{key}='{value}' must be one of"):
        REGISTRY.resolve("samplers", f"{name}[{key}={value}]")


# Stochastic samplers in distribution: as steps grow, the samples' mean log-density and sliced
# Wasserstein distance approach those of true data. N is large because SWD between two sets of
# true data is itself 0.075 at N = 4000 (the per-mode counts fluctuate).
STOCHASTIC = [("ddpm", {}), ("ddim", {"eta": 1.0}), ("langevin", {}), ("pc", {})]
N = 4000


@pytest.fixture(scope="module")
def truth():
    data = MIXTURE.sample(N, torch.Generator().manual_seed(1))[0]
    return data, float(MIXTURE.log_prob(data).mean())


@pytest.mark.parametrize("name,options", STOCHASTIC, ids=[n for n, _ in STOCHASTIC])
def test_stochastic_samplers_approach_the_data_distribution(truth, name, options):
    data, true_logp = truth
    result = {}
    for steps in (10, 100):
        x, _, _ = sample(name, steps, n=N, spacing="uniform", **options)
        result[steps] = (float(MIXTURE.log_prob(x).mean()), sliced_wasserstein(x, data))
    (logp_10, swd_10), (logp_100, swd_100) = result[10], result[100]
    assert abs(logp_100 - true_logp) < 0.5 * abs(logp_10 - true_logp), result
    assert swd_100 < 0.1 and swd_100 < swd_10, result


@pytest.mark.parametrize("name", ["euler", "heun", "dpm-solver"])
def test_samplers_that_divide_by_alpha_refuse_a_grid_starting_at_zero_signal(name):
    """On the flow path α(1) = 0: the uniform grid starts there, so these samplers skip the cell."""
    from diffbench.process import FlowProcess
    from diffbench.registry import Incompatible

    process = FlowProcess()
    d = oracle_denoiser(gmm_2d(), process)
    with pytest.raises(Incompatible, match="α = 0"):
        REGISTRY.get("samplers", name).fn(d, torch.randn(4, 2), process.timesteps(4, "uniform"), generator=None)
