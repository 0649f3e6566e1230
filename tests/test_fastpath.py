"""The GPU fast path on CPU: precision, compile, channels_last, the CFG shortcut, host-sync-free
samplers, the pipeline benchmark against diffusers; the CUDA-only checks skip without a GPU."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from diffbench.denoiser import Denoiser, MaskedDenoiser
from diffbench.fastpath import FastNet, FastPath, accelerate, compile_mode, is_convolutional
from diffbench.nn.layers import random_weights
from diffbench.plugins import build_registry
from diffbench.process import make_process
from diffbench.registry import ConfigError
from diffbench.rng import SampleGenerators
from diffbench_plugins.dit import build_dit
from diffbench_plugins.guidance import apply_cfg
from diffbench_plugins.mdlm import SCHEDULES
from diffbench_plugins.samplers import sample_dpm_solver_pp
from diffbench_plugins.image_model import ClipDenoised
from diffbench_plugins.unet import build_unet

PROC = make_process("vp-linear")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_unet():
    return random_weights(build_unet("tiny-8px", 1, 8, PROC, 10), seed=0).eval()


def tiny_dit():
    return random_weights(build_dit("DiT-tiny/2", 4, 8, PROC, 10), seed=0).eval()


class RowCounter(torch.nn.Module):
    """Counts the batch rows the network evaluates (a doubled CFG batch counts twice)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, t, cond):
        self.rows += len(x)
        return self.net(x, t, cond)


def x_T(batch=4, shape=(1, 8, 8)):
    return SampleGenerators(0, range(batch)).randn(shape)


# --- no wasted work: CFG at w = 1 and w = 0 ------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("scale, labels_seen", [(1.0, "cond"), (0.0, "null")])
def test_cfg_at_scale_1_and_0_gives_identical_samples_with_half_the_network_rows(scale, labels_seen):
    net = RowCounter(tiny_unet())
    base = Denoiser(net, PROC, "eps", num_classes=10, null_class=10)
    labels = torch.tensor([0, 3, 7, 9])
    reference_labels = labels if labels_seen == "cond" else torch.full_like(labels, 10)
    timesteps = PROC.timesteps(8, "uniform-logsnr")

    expected = sample_dpm_solver_pp(base.conditioned(reference_labels), x_T(), timesteps)
    rows_alone, nfe_alone = net.rows, base.nfe
    net.rows = 0
    base.stats.reset()
    guided = sample_dpm_solver_pp(apply_cfg(base, scale).conditioned(labels), x_T(), timesteps)

    assert torch.equal(guided, expected)
    assert base.nfe == nfe_alone == 8  # one NFE per step either way
    assert net.rows == rows_alone == 8 * 4  # B rows per step, not the 2B of a guided batch
    net.rows = 0
    sample_dpm_solver_pp(apply_cfg(base, 3.0).conditioned(labels), x_T(), timesteps)
    assert net.rows == 2 * rows_alone  # a real guidance scale still evaluates both halves


# --- precision, channels_last, compile -----------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("dtype, rtol", [("bf16", 3e-2), ("fp16", 3e-3)])
def test_autocast_keeps_float32_output_and_state_within_the_dtypes_precision(dtype, rtol):
    net = tiny_dit()
    x, t, y = x_T(4, (4, 8, 8)), torch.full((4,), 600.0), torch.arange(4)
    reference = net(x, t, y)
    fast, channels_last = accelerate(net, FastPath(dtype=dtype), torch.device("cpu"))
    out = fast(x, t, y)
    assert out.dtype == torch.float32 and not channels_last
    assert float((out - reference).abs().max()) <= rtol * float(reference.abs().max())
    denoiser = Denoiser(fast, PROC, "eps", num_classes=10, null_class=10)
    assert denoiser(x, 600.0, y).dtype == torch.float32  # the sampler's state stays float32


@torch.no_grad()
def test_channels_last_unet_gives_the_same_output():
    net = tiny_unet()
    x, t, y = x_T(), torch.full((4,), 300.0), torch.arange(4)
    reference = net(x, t, y)
    out = FastNet(net, torch.float32, channels_last=True)(x, t, y)
    assert torch.allclose(out, reference, atol=1e-5)
    assert is_convolutional(net) and not is_convolutional(tiny_dit())


def test_fast_path_options_are_validated():
    assert compile_mode(True) == "default" and compile_mode(False) == "off"
    with pytest.raises(ConfigError, match="run.dtype"):
        FastPath(dtype="fp8")
    with pytest.raises(ConfigError, match="run.compile"):
        FastPath(compile="fastest")
    with pytest.raises(ConfigError, match="already captures CUDA graphs"):
        FastPath(compile="reduce-overhead", cuda_graphs=True)


@pytest.mark.parametrize("flags, key", [(["--cuda-graphs"], "run.cuda_graphs"), (["--compile", "fastest"], "run.compile")])
def test_unsupported_fast_path_is_bad_input_before_any_work(cli, tmp_path, flags, key):
    result = cli("run", "--models", "mlp", "--samplers", "ddim", "--steps", "2", "--datasets", "moons",
                 "--device", "cpu", "--out", tmp_path / "out", *flags)
    assert result.exit_code == 2 and key in result.output
    assert not (tmp_path / "out" / "results.csv").exists()


def test_compiled_bf16_run_records_its_fast_path_and_matches_eager(cli, tmp_path):
    """torch.compile on CPU (inductor needs a C compiler): same samples as eager within bf16's
    precision, compile time reported apart from the timed runs."""
    common = ["--models", "mlp", "--samplers", "ddim", "--steps", "4", "--datasets", "moons", "--metrics", "swd",
              "--num-samples", "32", "--repeats", "1", "--device", "cpu", "--save-samples", "--quiet"]
    assert cli("run", *common, "--out", tmp_path / "eager").exit_code == 0
    assert cli("run", *common, "--dtype", "bf16", "--compile", "--out", tmp_path / "fast").exit_code == 0
    eager, fast = (pd.read_csv(tmp_path / run / "results.csv").iloc[0] for run in ("eager", "fast"))
    assert (eager["dtype"], eager["compile"], fast["dtype"], fast["compile"]) == ("fp32", "off", "bf16", "default")
    assert pd.isna(eager["compile_s"]) and fast["compile_s"] > 0
    assert fast["nfe"] == eager["nfe"] == 4
    from safetensors.torch import load_file

    name = "mlp__ddim__none__moons__4.safetensors"
    x_eager, x_fast = (load_file(tmp_path / run / "samples" / name)["x_0"] for run in ("eager", "fast"))
    assert float((x_fast - x_eager).abs().max()) < 0.05 * float(x_eager.abs().max())
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["compile"] == "default"


# --- no host synchronisation inside sampler loops ------------------------------------------

SYNCS_BY_DESIGN = {"flow-dopri5": "adaptive step-size control reads the local error on the host every step"}


def gaussian_samplers():
    return [s for s in build_registry().all("samplers") if s.family == "gaussian" and s.name not in SYNCS_BY_DESIGN]


def run_sampler(sampler, denoiser, x, device, steps=4):
    options = dict(sampler.defaults)
    timesteps = denoiser.process.timesteps(steps, options.pop("spacing", None))
    return sampler.fn(denoiser, x, timesteps, generator=SampleGenerators(0, range(len(x)), device), **options)


@torch.no_grad()
@pytest.mark.parametrize("process", ["vp-linear", "flow", "edm"])
def test_samplers_never_read_a_device_tensor_on_the_host(process):
    """On the meta device every host read (.item(), float(x), `if x`) raises, as it would
    synchronise on a GPU: the samplers' schedule arithmetic must stay on host scalars."""
    denoiser = Denoiser(lambda x, t, c: 0.5 * x + 1e-3 * t[:, None, None, None], make_process(process), "eps",
                        num_classes=3, null_class=3, capabilities={"consistency"})
    guided = apply_cfg(denoiser, 3.0).conditioned(torch.arange(2, device="meta"))
    for sampler in gaussian_samplers():
        assert run_sampler(sampler, guided, torch.empty(2, 1, 4, 4, device="meta"), "meta").is_meta, sampler.name


@torch.no_grad()
def test_masked_samplers_never_read_a_device_tensor_on_the_host():
    vocab = 8
    denoiser = MaskedDenoiser(lambda x, t, c: 0.01 * x[..., None].float().expand(*x.shape, vocab), vocab_size=vocab,
                              mask_id=vocab - 1, schedule=SCHEDULES["linear"]())
    timesteps = torch.linspace(1.0, 0.0, 5, dtype=torch.float64)
    for sampler in [s for s in build_registry().all("samplers") if s.family == "masked"]:
        x = torch.full((2, 16), vocab - 1, device="meta")
        out = sampler.fn(denoiser, x, timesteps, generator=SampleGenerators(0, range(2), "meta"), **sampler.defaults)
        assert out.is_meta, sampler.name


@cuda
@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("fast", [FastPath(), FastPath(dtype="bf16")], ids=["fp32", "bf16"])
def test_gpu_sampler_loops_do_not_synchronise(fast):
    net = ClipDenoised(tiny_unet(), PROC, "eps").cuda()
    fast_net, _ = accelerate(net, fast, torch.device("cuda"))
    guided = apply_cfg(Denoiser(fast_net, PROC, "eps", num_classes=10, null_class=10), 3.0)
    guided = guided.conditioned(torch.arange(4, device="cuda"))
    x = torch.randn(4, 1, 8, 8, device="cuda")
    for sampler in gaussian_samplers():
        run_sampler(sampler, guided, x, "cuda")  # warm-up: cuDNN, the schedule's table on the GPU
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_sampler(sampler, guided, x, "cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_cuda_graphs_and_compile_match_eager():
    net = tiny_unet().cuda()
    x, t, y = torch.randn(4, 1, 8, 8, device="cuda"), torch.full((4,), 300.0, device="cuda"), torch.arange(4).cuda()
    reference = net(x, t, y)
    for fast in (FastPath(cuda_graphs=True), FastPath(compile="reduce-overhead"), FastPath(dtype="bf16", cuda_graphs=True)):
        fn, channels_last = accelerate(net, fast, torch.device("cuda"))
        first, second = fn(x, t, y), fn(x + 1, t, y)  # replays must not overwrite earlier outputs
        tolerance = 3e-2 if fast.dtype == "bf16" else 1e-4
        assert channels_last and float((first - reference).abs().max()) <= tolerance * float(reference.abs().max())
        assert not torch.equal(first, second)


# --- diffbench's loop against diffusers' ---------------------------------------------------

@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_pipeline_benchmark_outputs_agree_with_diffusers_loop(tmp_path):
    from diffbench.kernels.bench import run_pipeline_benchmark

    table = run_pipeline_benchmark(tmp_path, config="DiT-tiny/2", latent_size=8, batch_sizes=(3,), steps=6,
                                   dtype="fp32", compile="off", attention="sdpa", device="cpu", repeats=1,
                                   num_classes=10)
    assert list(table["scheduler"]) == ["ddim", "dpm-solver++"]
    assert (table["max_abs_diff"] <= 1e-5 * table["max_abs_output"]).all()
    assert (table["max_abs_output"] > 1).all()  # random weights, not a zero network
    assert (table["speedup"] > 0).all() and (tmp_path / "cpu-pipeline.md").exists()


def test_pipeline_benchmark_bad_input(cli):
    result = cli("bench", "pipeline", "--schedulers", "euler", "--device", "cpu")
    assert result.exit_code == 2 and "ddim" in result.output
    result = cli("bench", "pipeline", "--config", "DiT-huge", "--device", "cpu")
    assert result.exit_code == 2 and "DiT-XL/2" in result.output


def test_random_weights_checkpoint_is_deterministic_and_not_a_zero_network():
    from diffbench_plugins.dit import DIT_PLUGIN
    from diffbench_plugins.image_data import load_shapes

    shapes = load_shapes(num=16)
    first, second = (DIT_PLUGIN.load(shapes, config="DiT-tiny/4", checkpoint="random") for _ in range(2))
    x = x_T(2, shapes.shape)
    with torch.no_grad():
        out = first.raw(x, 500.0, torch.tensor([0, 1]))
        assert torch.equal(out, second.raw(x, 500.0, torch.tensor([0, 1]))) and float(out.abs().min()) > 0


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_diffusers_checkpoints_load_with_fused_qkv_and_unchanged_outputs(tmp_path):
    """diffusers stores separate to_q/to_k/to_v; the adapter concatenates them at load time."""
    diffusers = pytest.importorskip("diffusers")
    from diffbench_plugins.diffusers_adapter import load_diffusers
    from diffbench_plugins.image_data import load_digits

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2,
                                            sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    random_weights(model)
    model.save_pretrained(tmp_path)
    denoiser = load_diffusers(load_digits(), path=str(tmp_path))
    attention_layers = [m for m in denoiser.net.modules() if hasattr(m, "to_qkv")]
    assert len(attention_layers) == 2 and all(type(m.processor).__name__ == "FusedAttnProcessor2_0"
                                              for m in attention_layers)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 700.0]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.allclose(denoiser.raw(x, t, y), model(x, t, class_labels=y).sample, atol=1e-5)
