"""Kernel and loop benchmarks.

``bench attention`` and ``bench dit-step`` (GPU only) are below; ``bench pipeline`` (GPU or CPU)
is :func:`run_pipeline_benchmark` at the end.

Attention kernel benchmark: TFLOP/s of the forward and forward+backward passes.

Backends: the project's Triton kernel, each SDPA backend torch offers (flash, cuDNN,
memory-efficient; a backend that rejects a shape is recorded as ``unsupported``) and the
float32 math reference. Shapes: the FlashAttention-2 sweep (Dao, 2023, section 4.1: batch x
seqlen = 16k tokens, hidden size 2048) at head dims 64 and 128, and the attention layers of
DiT-XL/2, ADM and Stable Diffusion's cross-attention.

Writes ``<out_dir>/<gpu-name-slug>.csv`` (one row per case, backend and pass) and ``.md``.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

PASSES = ("fwd", "fwd+bwd")
BACKWARD_FLOPS_RATIO = 2.5  # backward = 2.5x forward matmul FLOPs (5 matmuls vs 2, FA2 section 4.1)


@dataclass(frozen=True)
class AttentionCase:
    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int

    def forward_flops(self) -> float:
        """4 B H Lq Lk D: two matmuls (Q K^T and P V) of 2 Lq Lk D flops per head."""
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim

    def flops(self, pass_name: str) -> float:
        return self.forward_flops() * (1.0 if pass_name == "fwd" else 1.0 + BACKWARD_FLOPS_RATIO)


def attention_cases() -> list[AttentionCase]:
    """The benchmarked shapes."""
    sweep = [
        AttentionCase(f"seq{seq // 1024}k-d{head_dim}", 16384 // seq, 2048 // head_dim, seq, seq, head_dim)
        for head_dim in (64, 128)
        for seq in (1024, 2048, 4096, 8192, 16384)
    ]
    models = [
        # DiT-XL/2: hidden 1152 = 16 heads x 72; 256 tokens at 256 px, 1024 at 512 px.
        AttentionCase("dit-xl2-256tok", 32, 16, 256, 256, 72),
        AttentionCase("dit-xl2-1024tok", 32, 16, 1024, 1024, 72),
        # ADM (ImageNet 256): 64 channels per head; 32x32 maps at 512 channels, 16x16 at 1024.
        AttentionCase("adm-1024tok", 32, 8, 1024, 1024, 64),
        AttentionCase("adm-256tok", 32, 16, 256, 256, 64),
    ]
    # Stable Diffusion cross-attention: 64x64 latent tokens over 77 text tokens, 8 heads.
    cross = [AttentionCase(f"sd-cross-d{d}", 16, 8, 4096, 77, d) for d in (40, 80, 160)]
    return sweep + models + cross


def _sdpa(backend: SDPBackend):
    def attention(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return attention


def _backends() -> dict:
    from diffbench.kernels.attention import flash_attention
    from diffbench.nn.attention import math_attention

    return {
        "triton": flash_attention,
        "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "math": math_attention,
    }


def _math_fits(case: AttentionCase) -> bool:
    """The math reference keeps ~4 float32 [B, H, Lq, Lk] tensors alive (scores, probabilities
    and their gradients); skip it where they would take over half of the GPU."""
    score_bytes = 4 * case.batch * case.heads * case.q_len * case.kv_len
    return 4 * score_bytes < torch.cuda.get_device_properties(0).total_memory / 2


def _time_ms(attention, case: AttentionCase, dtype: torch.dtype, pass_name: str) -> float:
    """Median milliseconds of one pass (CUDA events after warm-up, triton.testing.do_bench)."""
    import triton.testing

    backward = pass_name == "fwd+bwd"
    q = torch.randn(case.batch, case.heads, case.q_len, case.head_dim, device="cuda", dtype=dtype,
                    requires_grad=backward)
    k, v = (torch.randn(case.batch, case.heads, case.kv_len, case.head_dim, device="cuda", dtype=dtype,
                        requires_grad=backward) for _ in range(2))
    do = torch.randn_like(q)

    def step():
        out = attention(q, k, v)
        if backward:
            out.backward(do)

    return triton.testing.do_bench(step, grad_to_none=[q, k, v], return_mode="median")


def _measure(name: str, attention, case: AttentionCase, dtype: torch.dtype, pass_name: str) -> dict:
    shape = {key: value for key, value in asdict(case).items() if key != "name"}
    row = {"case": case.name, **shape, "dtype": str(dtype).removeprefix("torch."),
           "backend": name, "pass": pass_name, "status": "ok", "ms": None, "tflops": None}
    if name == "math" and not _math_fits(case):
        return {**row, "status": "skipped (memory)"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA explains each rejected kernel in a warning
            ms = _time_ms(attention, case, dtype, pass_name)
    except torch.OutOfMemoryError:
        return {**row, "status": "oom"}
    except RuntimeError as error:  # an SDPA backend that cannot run this shape or dtype
        if name == "triton":
            raise
        return {**row, "status": f"unsupported: {str(error).splitlines()[0][:120]}"}
    finally:
        torch.cuda.empty_cache()
    return {**row, "ms": ms, "tflops": case.flops(pass_name) / (ms * 1e-3) / 1e12}


def gpu_slug() -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """The GPU's slug on CUDA, ``cpu`` otherwise: the stem of the benchmark tables."""
    return gpu_slug() if device.type == "cuda" else "cpu"


def _markdown(table: pd.DataFrame, title: str) -> str:
    """One TFLOP/s table per pass: rows are cases, columns backends (the status where no figure)."""
    table = table.assign(
        shape=[f"{b}x{h}x{lq}x{lk}x{d}" for b, h, lq, lk, d in
               table[["batch", "heads", "q_len", "kv_len", "head_dim"]].itertuples(index=False)],
        value=[f"{t:.1f}" if s == "ok" else s.split(":")[0] for t, s in zip(table["tflops"], table["status"])],
    )
    sections = [f"# {title}\n\nTFLOP/s; shape is B x H x Lq x Lk x D.\n"]
    for pass_name in PASSES:
        rows = table[table["pass"] == pass_name]
        pivot = rows.pivot(index=["case", "shape"], columns="backend", values="value")
        pivot = pivot.reindex(index=pd.MultiIndex.from_frame(rows[["case", "shape"]].drop_duplicates()),
                              columns=rows["backend"].unique())
        sections.append(f"## {pass_name}\n\n{pivot.reset_index().to_markdown(index=False)}\n")
    return "\n".join(sections)


def run_attention_benchmark(out_dir: str | Path = "results/kernels", dtype: torch.dtype = torch.bfloat16,
                            cases: list[AttentionCase] | None = None) -> pd.DataFrame:
    """Benchmark every backend on every case; write ``<out_dir>/<gpu-slug>.csv`` and ``.md``."""
    if not torch.cuda.is_available():
        raise RuntimeError("the attention benchmark needs a CUDA GPU; torch.cuda.is_available() is False")
    import triton  # after the check: on CPU the benchmark has nothing to import triton for
    cases = attention_cases() if cases is None else cases
    backends = _backends()
    jobs = [(name, case, pass_name) for case in cases for name in backends for pass_name in PASSES]
    rows = [_measure(name, backends[name], case, dtype, pass_name)
            for name, case, pass_name in tqdm(jobs, desc="attention benchmark")]
    table = pd.DataFrame(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / f"{gpu_slug()}.csv", index=False)
    title = (f"Attention on {torch.cuda.get_device_name()}, {str(dtype).removeprefix('torch.')} "
             f"(torch {torch.__version__}, triton {triton.__version__})")
    (out_dir / f"{gpu_slug()}.md").write_text(_markdown(table, title))
    return table


def run_dit_step_benchmark(out_dir: str | Path = "results/kernels", batch_size: int = 32,
                           dtype: torch.dtype = torch.bfloat16, backends=("triton", "sdpa")) -> pd.DataFrame:
    """End-to-end denoiser step latency of DiT-XL/2 at 256 px (a 32×32×4 latent, random weights)
    for each attention backend: CUDA-event median over repeats after warm-up (do_bench).
    Writes ``<out_dir>/<gpu-slug>-dit-step.csv`` and ``.md``."""
    if not torch.cuda.is_available():
        raise RuntimeError("the DiT step benchmark needs a CUDA GPU; torch.cuda.is_available() is False")
    import triton

    from diffbench.nn.attention import use_backend
    from diffbench.process import VPDiscrete
    from diffbench_plugins.dit import build_dit

    model = build_dit("DiT-XL/2", in_channels=4, resolution=32, process=VPDiscrete.linear(), num_classes=1000)
    model = model.to("cuda", dtype).eval()
    x = torch.randn(batch_size, 4, 32, 32, device="cuda", dtype=dtype)
    t = torch.full((batch_size,), 500.0, device="cuda")
    y = torch.randint(0, 1000, (batch_size,), device="cuda")
    rows = []
    for backend in backends:
        with use_backend(backend), torch.no_grad():
            ms = triton.testing.do_bench(lambda: model(x, t, y), return_mode="median")
        rows.append({"model": "DiT-XL/2", "resolution": 256, "batch": batch_size, "dtype": str(dtype).removeprefix("torch."),
                     "attention": backend, "step_ms": ms})
    table = pd.DataFrame(rows)
    table["speedup_vs_sdpa"] = float(table.loc[table["attention"] == "sdpa", "step_ms"].iloc[0]) / table["step_ms"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / f"{gpu_slug()}-dit-step.csv", index=False)
    (out_dir / f"{gpu_slug()}-dit-step.md").write_text(
        f"# DiT-XL/2 denoiser step on {torch.cuda.get_device_name()}\n\n" + table.to_markdown(index=False) + "\n")
    return table


# --- diffbench's sampling loop against diffusers' loop --------------------------------------
#
# Both step the same class-conditional DiT (random weights) with classifier-free guidance from
# the same x_T, the network in the same dtype (autocast; float32 state on both sides). diffusers'
# loop is DiTPipeline.__call__'s: the batch [x; x] with labels [y; ∅], ε̂ = ε̂_∅ + w (ε̂_y − ε̂_∅),
# scheduler.step. diffbench's is its sampler on diffusers' own timestep grid (the time of clean
# data appended), with the network under the fast path being measured (compile, CUDA graphs,
# attention backend). diffusers' side always runs eager with SDPA attention: the peer as shipped.

PIPELINE_SCHEDULERS = ("ddim", "dpm-solver++")


def _scheduler(name: str, steps: int, device: torch.device):
    """diffusers' scheduler with DDPM's linear β (DiT's) and diffbench's sampler + final time for it."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from diffbench_plugins.samplers import sample_ddim, sample_dpm_solver_pp

    schedule = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    if name == "ddim":
        scheduler, sampler = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=True), sample_ddim
    else:
        scheduler = DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2,
                                                final_sigmas_type="zero")
        sampler = sample_dpm_solver_pp
    scheduler.set_timesteps(steps, device=device)
    timesteps = torch.cat([scheduler.timesteps.double().cpu(), torch.tensor([-1.0], dtype=torch.float64)])
    return scheduler, sampler, timesteps


def diffusers_cfg_loop(net, scheduler, x_T: torch.Tensor, labels: torch.Tensor, null_class: int, scale: float):
    """DiTPipeline's denoising loop (diffusers, pipeline_dit.py) around ``net(x, t, y) -> ε̂``."""
    latents, null = x_T, torch.full_like(labels, null_class)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)  # [2B, C, H, W]
        eps = net(model_input, t.expand(model_input.shape[0]).float(), torch.cat([labels, null]))
        eps_cond, eps_uncond = eps.chunk(2)
        latents = scheduler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, latents).prev_sample
    return latents


def _timed_interleaved(runs: dict, device: torch.device, repeats: int) -> dict:
    """{name: (output, warm-up seconds, median seconds)} of each ``runs[name]()``: one warm-up
    each, then ``repeats`` rounds that run each once in turn, so that a machine whose speed
    drifts (a shared CPU) slows both sides alike and their ratio stays meaningful."""
    from diffbench.timing import summarize, wall_timer  # psutil: only the pipeline benchmark needs it

    warmup, times, outputs = {name: [] for name in runs}, {name: [] for name in runs}, {}
    for name, run in runs.items():
        with wall_timer(device, warmup[name]):
            run()
    for _ in range(repeats):
        for name, run in runs.items():
            with wall_timer(device, times[name]):
                outputs[name] = run()
    return {name: (outputs[name], warmup[name][0], summarize(times[name])[0]) for name in runs}


def run_pipeline_benchmark(out_dir: str | Path = "results/kernels", *, config: str = "DiT-XL/2",
                           latent_size: int = 32, channels: int = 4, batch_sizes=(8, 64), steps: int = 50,
                           schedulers=PIPELINE_SCHEDULERS, cfg_scale: float = 4.0, dtype: str = "bf16",
                           compile: str = "default", cuda_graphs: bool = False, attention: str = "triton",
                           device: str | torch.device = "cuda", repeats: int = 3, num_classes: int = 1000,
                           seed: int = 0) -> pd.DataFrame:
    """ms per sampling step of diffbench's loop and diffusers' loop on the same DiT, their ratio
    (``speedup`` > 1: diffbench faster), images/s, the max |difference| of the outputs, and
    diffbench's host overhead (wall minus network time, % of network time).
    Writes ``<out_dir>/<device-slug>-pipeline.csv`` and ``.md``."""
    from diffbench.denoiser import Denoiser
    from diffbench.fastpath import FastPath, accelerate, check_supported
    from diffbench.nn.attention import effective_backend, use_backend
    from diffbench.nn.layers import random_weights
    from diffbench.process import VPDiscrete
    from diffbench.rng import SampleGenerators
    from diffbench_plugins.dit import build_dit
    from diffbench_plugins.guidance import apply_cfg

    device = torch.device(device)
    fast = FastPath(dtype, compile, cuda_graphs)
    check_supported(fast, device)
    process = VPDiscrete.linear()
    with torch.random.fork_rng(devices=[]):
        net = random_weights(build_dit(config, channels, latent_size, process, num_classes), seed).to(device).eval()
    ours_net, _ = accelerate(net, fast, device)
    peer_net, _ = accelerate(net, FastPath(dtype), device)
    rows = []
    for batch in batch_sizes:
        generators = SampleGenerators(seed, range(batch), device)
        x_T = generators.randn((channels, latent_size, latent_size))
        labels = torch.arange(batch, device=device) % num_classes
        for name in schedulers:
            scheduler, sampler, timesteps = _scheduler(name, steps, device)
            denoiser = Denoiser(ours_net, process, "eps", num_classes=num_classes, null_class=num_classes)
            guided = apply_cfg(denoiser, cfg_scale).conditioned(labels)

            def ours():
                denoiser.stats.reset()
                with use_backend(attention):
                    return sampler(guided, x_T.clone(), timesteps, generator=generators)

            def theirs():
                scheduler.set_timesteps(steps, device=device)  # resets the multistep history
                with use_backend("sdpa"):
                    return diffusers_cfg_loop(peer_net, scheduler, x_T.clone(), labels, num_classes, cfg_scale)

            with torch.no_grad():
                timed = _timed_interleaved({"ours": ours, "theirs": theirs}, device, repeats)
            (x_ours, warmup_ours, wall_ours), (x_theirs, _, wall_theirs) = timed["ours"], timed["theirs"]
            model_s = denoiser.stats.model_time()  # of the last run of ours
            rows.append({
                "model": config, "latent": f"{channels}x{latent_size}x{latent_size}", "batch": batch, "steps": steps,
                "scheduler": name, "cfg_scale": cfg_scale, "device": str(device), "dtype": dtype, "compile": compile,
                "cuda_graphs": cuda_graphs, "attention": effective_backend(device),
                "diffbench_ms_per_step": 1e3 * wall_ours / steps, "diffusers_ms_per_step": 1e3 * wall_theirs / steps,
                "speedup": wall_theirs / wall_ours, "diffbench_images_per_s": batch / wall_ours,
                "diffusers_images_per_s": batch / wall_theirs,
                "max_abs_diff": float((x_ours - x_theirs).abs().max()), "max_abs_output": float(x_theirs.abs().max()),
                "overhead_pct": 100 * (wall_ours - model_s) / model_s,
                "compile_s": warmup_ours - wall_ours if fast.fixed_shapes else None,
            })
    table = pd.DataFrame(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{device_slug(device)}-pipeline"
    table.to_csv(out_dir / f"{stem}.csv", index=False)
    title = (f"# diffbench vs diffusers sampling loop on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
             f"\n\ntorch {torch.__version__}; speedup = diffusers ms/step ÷ diffbench ms/step; overhead_pct = "
             "diffbench's wall minus network time, % of network time.\n\n")
    (out_dir / f"{stem}.md").write_text(title + table.to_markdown(index=False, floatfmt=".4g") + "\n")
    return table
