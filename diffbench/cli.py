"""The ``diffbench`` command line: run, list, train, compare, convergence, bench."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from diffbench.registry import KINDS, ConfigError, split_list

EXIT_BAD_INPUT = 2


def _registry(plugins=()):
    from diffbench.plugins import build_registry

    return build_registry(plugins)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _writable_dir(path: Path) -> Path:
    """Create ``path`` and prove it is writable before any work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".diffbench-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {path} is not writable: {exc.strerror or exc}") from None
    return path


def _default_out() -> Path:
    root = Path("results")
    return root / time.strftime("%Y%m%d-%H%M%S")


def _point_latest(out: Path) -> None:
    latest = out.parent / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(out.name, target_is_directory=True)
    except OSError:
        pass  # a filesystem without symlinks: results are still in `out`


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="diffbench")
def main():
    """diffbench: which sampler, model and guidance give the best quality for a given number of
    steps, wall-clock and memory.

    \b
    diffbench run                                     # the default grid of ./bench.toml
    diffbench run --models mlp --samplers ddim,ddpm --steps 10,50 --datasets moons
    diffbench list samplers                           # what is installed
    diffbench compare results/latest results/baseline # CI regression gate
    """


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file with a [run] table (default: ./bench.toml if present).")
@click.option("--models", help="Comma-separated models, e.g. 'gmm-oracle,mlp[parameterization=v]'.")
@click.option("--samplers", help="Comma-separated samplers, e.g. 'ddim,ddim[eta=1.0],dpm-solver++'.")
@click.option("--steps", help="Comma-separated step counts, e.g. '10,50'.")
@click.option("--guidance", help="Comma-separated guidance, e.g. 'none,cfg:3.0'.")
@click.option("--datasets", help="Comma-separated datasets, e.g. 'moons,gmm-2d'.")
@click.option("--metrics", help="Comma-separated metrics, e.g. 'swd,logp'.")
@click.option("--num-samples", type=int, help="Samples per cell.")
@click.option("--batch-size", type=int, help="Samples per batch (timings are per batch; 0 = all at once).")
@click.option("--repeats", type=int, help="Timed repeats of the first batch (median reported).")
@click.option("--seed", type=int, help="Seed: x_T of sample i depends only on (seed, i).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run (default auto).")
@click.option("--attention", type=click.Choice(["triton", "sdpa", "math"]), help="Attention backend of the models.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Network precision (autocast); sampler state and schedule stay fp32/fp64. Default fp32.")
@click.option("--compile", is_flag=False, flag_value="default", metavar="[MODE]",
              help="torch.compile the network; MODE: default (bare --compile), reduce-overhead, max-autotune, "
                   "max-autotune-no-cudagraphs, off. Compile time is reported apart (compile_s).")
@click.option("--cuda-graphs", is_flag=True, default=None,
              help="Capture the network call per shape as a CUDA graph and replay it (CUDA only).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Write results exactly here "
              "(default: results/<run-id>, with results/latest pointing at it).")
@click.option("--save-samples", is_flag=True, default=None, help="Also write samples/<cell>.safetensors (x_T, x_0).")
@click.option("--resume", is_flag=True, help="Reuse finished cells of an interrupted run in --out.")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(dir_okay=False),
              help="Load a plugin from a .py file (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(config_path, out_dir, resume, plugins, quiet, **flags):
    """Run a grid of model × sampler × guidance × dataset × steps and tabulate steps, NFE,
    wall-clock, peak memory and quality metrics.

    Exit status: 0 every cell ok or skipped with a reason, 1 some cell failed, 2 bad input.
    """
    from diffbench.grid import build_config, read_toml
    from diffbench.plugins import PluginError
    from diffbench.results import terminal_table
    from diffbench.runner import GridRunner

    try:
        registry = _registry(plugins)
        path = config_path or ("bench.toml" if Path("bench.toml").is_file() else None)
        settings = read_toml(path) if path else {}
        settings.update({k: v for k, v in flags.items() if v is not None})
        config = build_config(registry, settings)
        out = _writable_dir(Path(out_dir) if out_dir else _default_out())
        runner = GridRunner(registry, config, out, resume=resume, progress=not quiet)
    except (ConfigError, PluginError) as exc:
        _fail(str(exc))
    if not out_dir:
        _point_latest(out)
    df = runner.run()
    click.echo(terminal_table(df, runner.writer.metric_columns))
    counts = df["status"].value_counts().to_dict()
    click.echo(f"\n{len(df)} cells: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "skipped", "failed"))
               + f"  ->  {out}/results.csv (tracebacks in run.log)")
    sys.exit(1 if counts.get("failed", 0) else 0)


@main.command("list")
@click.argument("kind", required=False, type=click.Choice(KINDS))
@click.option("--plugin", "plugins", multiple=True, type=click.Path(dir_okay=False), help="Also load this plugin file.")
def list_(kind, plugins):
    """List installed components (all kinds, or one) with family, options and plugin."""
    from tabulate import tabulate

    from diffbench.plugins import PluginError

    try:
        registry = _registry(plugins)
    except PluginError as exc:
        _fail(str(exc))
    for k in [kind] if kind else KINDS:
        rows = [{"name": c.name, "family": c.family, "description": c.description,
                 "options": ", ".join(f"{o}={v!r}" for o, v in c.options.items()), "plugin": c.plugin.split(" (")[0]}
                for c in registry.all(k)]
        click.echo(f"\n{k} ({len(rows)})")
        click.echo(tabulate(rows, headers="keys", tablefmt="simple", maxcolwidths=[None, None, 60, 40, None]))


@main.command()
@click.option("--model", required=True, help="Model to train, e.g. mlp, unet, dit.")
@click.option("--dataset", required=True, help="Dataset to train on.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint path without suffix (default: the model's own checkpoint location).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Model or training option, e.g. --set steps=3000 --set parameterization=v (repeatable).")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(dir_okay=False), help="Also load this plugin file.")
def train(model, dataset, out_path, device, settings, plugins):
    """Train a model on a dataset and write a safetensors checkpoint (+ JSON config).
    An interrupted run resumes from its last train-state checkpoint."""
    from diffbench.plugins import PluginError
    from diffbench.registry import parse_ref
    from diffbench.runner import resolve_device

    try:
        registry = _registry(plugins)
        component = registry.get("models", model)
        if component.train is None:
            raise ConfigError(f"model {model!r} cannot be trained (it has no train function)")
        data_ref = registry.resolve("datasets", dataset)
        _, options, _ = parse_ref(f"x[{','.join(settings)}]")
        source = registry.get("datasets", data_ref.name).load(**registry.options("datasets", data_ref))
        dev = resolve_device(device)
    except (ConfigError, PluginError) as exc:
        _fail(str(exc))
    tic = time.perf_counter()
    path = component.train(source, out_path, device=dev, **options)
    click.echo(f"trained {model} on {dataset} in {time.perf_counter() - tic:.1f} s -> {path}")


@main.command()
@click.argument("new", type=click.Path())
@click.argument("baseline", type=click.Path())
@click.option("--tolerances", type=click.Path(dir_okay=False), help="TOML with [metrics], [timing], [memory], "
              "[columns.<name>] tables of abs / rel / ratio limits.")
def compare(new, baseline, tolerances):
    """Compare a run against a baseline. Exit 0: no regression; 1: regression (table of what
    moved); 2: broken run or nothing comparable."""
    from diffbench.compare import compare_runs

    try:
        code, report = compare_runs(new, baseline, tolerances)
    except ConfigError as exc:
        _fail(str(exc))
    click.echo(report)
    sys.exit(code)


@main.command()
@click.option("--samplers", default=None, help="Comma-separated deterministic samplers (default: all with a known order).")
@click.option("--steps", default="8,16,32,64,128", show_default=True, help="Step counts.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/convergence", show_default=True)
def convergence(samplers, steps, out_dir):
    """Measure convergence orders on the exact GMM denoiser: error against a high-accuracy ODE
    solution from the same x_T; writes a table and a log-log plot."""
    from diffbench.convergence import run_convergence

    try:
        df = run_convergence(_writable_dir(Path(out_dir)), samplers=split_list(samplers) if samplers else None,
                             steps=tuple(int(s) for s in split_list(steps)))
    except ConfigError as exc:
        _fail(str(exc))
    from tabulate import tabulate

    click.echo(tabulate(df, headers="keys", tablefmt="simple", showindex=False, floatfmt=".4g"))


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/kernels", show_default=True)
@click.option("--budget-s", type=float, default=None,
              help="Time budget in seconds for all steps (default 480 with CUDA, 2400 on CPU).")
@click.option("--cpu-only", is_flag=True, help="Run the CPU subset even where CUDA is available.")
@click.option("--only", default=None, help="Comma-separated step names to run (e.g. to rerun a failed one).")
def doctor(out_dir, budget_s, cpu_only, only):
    """Check the GPU fast path in one command: GPU tests, bench attention / dit-step / pipeline and a
    short GPU grid, then a summary with one line per target (met / not met, the number). Without
    CUDA: the CPU subset, and GPU targets reported as not checked. Writes <out>/<gpu>-doctor.md."""
    import torch

    from diffbench.doctor import run_doctor

    on_cuda = torch.cuda.is_available() and not cpu_only
    path = run_doctor(_writable_dir(Path(out_dir)), budget_s or (480.0 if on_cuda else 2400.0), cpu_only,
                      split_list(only) if only else None, echo=click.echo)
    click.echo(path.read_text())


@main.group()
def bench():
    """Micro-benchmarks (GPU)."""


@bench.command("attention")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/kernels", show_default=True)
def bench_attention(out_dir):
    """TFLOP/s of the Triton kernel vs SDPA backends vs math on diffusion attention shapes."""
    from diffbench.kernels.bench import run_attention_benchmark

    try:
        run_attention_benchmark(_writable_dir(Path(out_dir)))
    except RuntimeError as exc:
        _fail(str(exc))


@bench.command("dit-step")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/kernels", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
def bench_dit_step(out_dir, batch_size):
    """End-to-end DiT-XL/2 (256 px, random weights) denoiser step latency: triton vs sdpa attention."""
    from diffbench.kernels.bench import run_dit_step_benchmark

    try:
        run_dit_step_benchmark(_writable_dir(Path(out_dir)), batch_size=batch_size)
    except RuntimeError as exc:
        _fail(str(exc))


@bench.command("pipeline")
@click.option("--config", "model_config", default="DiT-XL/2", show_default=True, help="DiT config (random weights).")
@click.option("--latent-size", type=int, default=32, show_default=True, help="Latent side (32 = 256 px).")
@click.option("--channels", type=int, default=4, show_default=True, help="Latent channels.")
@click.option("--batch-sizes", default="8,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--schedulers", default="ddim,dpm-solver++", show_default=True,
              help="diffusers DDIMScheduler (ddim) / DPMSolverMultistepScheduler (dpm-solver++) vs diffbench's sampler.")
@click.option("--cfg-scale", type=float, default=4.0, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="bf16", show_default=True)
@click.option("--compile", "compile_mode", default="default", show_default=True,
              help="diffbench side: torch.compile mode, or off.")
@click.option("--cuda-graphs", is_flag=True, help="diffbench side: replay the network as CUDA graphs.")
@click.option("--attention", type=click.Choice(["triton", "sdpa", "math"]), default="triton", show_default=True,
              help="diffbench side's attention backend (diffusers' side uses sdpa).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/kernels", show_default=True)
def bench_pipeline(model_config, batch_sizes, schedulers, device, out_dir, compile_mode, **options):
    """diffbench's sampling loop vs diffusers' (DiTPipeline's) on the same DiT, dtype, batch and x_T:
    ms per step, their ratio, max |difference| of the outputs."""
    from tabulate import tabulate

    from diffbench.kernels.bench import PIPELINE_SCHEDULERS, run_pipeline_benchmark
    from diffbench.runner import resolve_device
    from diffbench_plugins.dit import DIT_CONFIGS

    try:
        sizes = [int(b) for b in split_list(batch_sizes)]
    except ValueError:
        _fail(f"--batch-sizes: {batch_sizes!r} must be comma-separated integers")
    try:
        if model_config not in DIT_CONFIGS:
            raise ConfigError(f"--config: {model_config!r} is not a DiT config; valid: {', '.join(DIT_CONFIGS)}")
        unknown = [s for s in split_list(schedulers) if s not in PIPELINE_SCHEDULERS]
        if unknown:
            raise ConfigError(f"--schedulers: {unknown[0]!r} is not one of {', '.join(PIPELINE_SCHEDULERS)}")
        table = run_pipeline_benchmark(_writable_dir(Path(out_dir)), config=model_config, batch_sizes=sizes,
                                       schedulers=split_list(schedulers), device=resolve_device(device),
                                       compile=compile_mode, **options)
    except ConfigError as exc:
        _fail(str(exc))
    except ImportError as exc:
        _fail(f"bench pipeline compares against diffusers, which cannot be imported: {exc}")
    click.echo(tabulate(table, headers="keys", tablefmt="simple", showindex=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
