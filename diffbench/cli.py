"""The ``diffbench`` command line: run, list, train, compare, report, history, convergence, best, bench."""
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


ARTEFACTS = ("results.csv", "results.json", "results.md", "config.json", "env.json", "run.log", "plot_*_vs_nfe.png",
             "samples_*.png", "samples")  # what a run writes into --out (what --overwrite removes)


def _prepare_out(path: Path, *, resume: bool, overwrite: bool):
    """Create and lock ``--out``. A directory another run holds, or one with results in it (without
    --resume or --overwrite), is refused; --overwrite removes the earlier run's files."""
    import shutil

    from diffbench.io import DirectoryLock, DirectoryLocked

    _writable_dir(path)
    try:
        lock = DirectoryLock(path).acquire()
    except DirectoryLocked as exc:
        raise ConfigError(str(exc)) from None
    earlier = sorted(p.name for p in path.iterdir() if p.name != DirectoryLock.NAME)
    if earlier and not resume and not overwrite:
        lock.release()
        raise ConfigError(f"--out {path} is not empty ({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}); "
                          f"use --resume to continue that run, --overwrite to replace it, or another --out")
    if overwrite and not resume:
        for pattern in ARTEFACTS:
            for old in path.glob(pattern):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    return lock


def _available_memory(device) -> tuple[int, str]:
    import psutil
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"on {torch.cuda.get_device_name(device)}"
    return psutil.virtual_memory().available, "in RAM"


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
    diffbench run                                     # ./bench.toml, else the package's default grid
    diffbench run --show-config                       # what a run would do, and why
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
@click.option("--prompts", type=click.Path(dir_okay=False),
              help="File of prompts, one a line, cycled over sample indices: the prompts option of every model "
                   "that takes one (diffusers on a Stable-Diffusion directory; default: the dataset's captions).")
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
@click.option("--save-samples", is_flag=True, default=None,
              help="Also write samples/<cell>.safetensors: x_T and x_0 exactly, in float, for comparing samplers "
                   "bit for bit (holds every sample of a cell in memory).")
@click.option("--keep-samples", is_flag=True, default=None,
              help="Keep samples/<cell>/<i>.png, the uint8 image files the cell streams its samples to and the "
                   "metrics read (a folder torch-fidelity reads); removed when the cell is done otherwise.")
@click.option("--resume", is_flag=True, help="Reuse finished cells of an interrupted run in --out.")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier run in --out (else refused).")
@click.option("--cell-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds a cell may take (loading included) before its worker is stopped and the cell failed.")
@click.option("--in-process", is_flag=True, help="Run cells in this process (debugging: no isolation, no timeout).")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(dir_okay=False),
              help="Load a plugin from a .py file (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--show-config", is_flag=True, help="Print the resolved grid and where each value came from "
              "(flag, config file, or the package's default grid), then exit without running.")
@click.option("--report/--no-report", "html_report", default=True, show_default=True,
              help="Write report.html (diffbench report) at the end.")
def run(config_path, out_dir, resume, overwrite, cell_timeout, in_process, plugins, quiet, show_config, html_report,
        **flags):
    """Run a grid of model × sampler × guidance × dataset × steps and tabulate steps, NFE,
    wall-clock, peak memory and quality metrics. Each cell runs in a supervised worker process:
    a crash or a cell past --cell-timeout fails that cell, and the grid goes on.

    Exit status: 0 every cell ok or skipped with a reason, 1 some cell failed, 2 bad input
    (nothing run, nothing written).

    Sharded: `torchrun --nproc-per-node N -m diffbench run ...` splits each cell's samples across
    N processes (same samples and metrics as one process); cells then run in-process on every
    rank, rank 0 writes the table, and --cell-timeout bounds every wait on another rank.
    """
    from diffbench.distributed import DistributedError, from_env
    from diffbench.grid import build_config, check_memory, describe, load_datasets, load_settings, validate_models
    from diffbench.results import terminal_table
    from diffbench.runner import GridRunner, resolve_device
    from diffbench.worker import Supervisor

    try:
        registry = _registry(plugins)
        settings, sources = load_settings(config_path, flags)
        config = build_config(registry, settings)
        if show_config:
            from tabulate import tabulate

            click.echo(tabulate(describe(config, sources), headers=["key", "value", "from"], tablefmt="simple",
                                maxcolwidths=[None, 70, None]))
            click.echo(f"\n{len(config.cells())} cells")
            return
        device = resolve_device(config.device)
        validate_models(registry, config)
        datasets = load_datasets(registry, config)
        check_memory(config, datasets, *_available_memory(device))
        shard = from_env(device, cell_timeout)  # one process unless launched by torchrun
        out = shard.broadcast(Path(out_dir) if out_dir else _default_out())  # every rank streams samples there
        lock, refused = None, None
        if shard.is_root:  # only rank 0 writes
            try:
                lock = _prepare_out(out, resume=resume, overwrite=overwrite)
            except ConfigError as exc:
                refused = str(exc)
        if refused := shard.broadcast(refused):
            raise ConfigError(refused)
    except ConfigError as exc:  # PluginError too
        _fail(str(exc))
    in_process = in_process or shard.world_size > 1  # see diffbench.distributed: no workers under torchrun
    batches = -(-config.num_samples // (config.batch_size or config.num_samples))
    if shard.is_root and batches < shard.world_size:  # ranks share batches, never split one (bit-for-bit results)
        click.echo(f"warning: {batches} batch(es) of samples for {shard.world_size} ranks: ranks beyond the "
                   f"{batches} sit idle; pass --batch-size {-(-config.num_samples // shard.world_size)} or less", err=True)
    cells = None if in_process else Supervisor(registry, config, out, plugins=plugins, cell_timeout_s=cell_timeout)
    try:
        runner = GridRunner(registry, config, out, resume=resume and shard.is_root, progress=not quiet and shard.is_root,
                            datasets=datasets if in_process else None, cells=cells, shard=shard)
        if cells:
            cells.start()  # the worker starts while this process writes config.json and env.json
        if not out_dir and shard.is_root:
            _point_latest(out)
        df = runner.run()
    except ConfigError as exc:
        _fail(str(exc))
    except DistributedError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    finally:
        if cells:
            cells.stop()
        if lock:
            lock.release()
        shard.close()
    if df is None:  # not rank 0
        sys.exit(0)
    click.echo(terminal_table(df, runner.writer.metric_columns))
    counts = df["status"].value_counts().to_dict()
    click.echo(f"\n{len(df)} cells: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "skipped", "failed"))
               + f"  ->  {out}/results.csv (tracebacks in run.log)")
    if html_report:  # ---- the HTML report hook (diffbench/report.py) ----
        _write_report(out, fatal=False)
    sys.exit(1 if counts.get("failed", 0) else 0)


@main.command("list")
@click.argument("kind", required=False, type=click.Choice(KINDS))
@click.option("--plugin", "plugins", multiple=True, type=click.Path(dir_okay=False), help="Also load this plugin file.")
def list_(kind, plugins):
    """List installed components (all kinds, or one) with family, options and plugin."""
    from tabulate import tabulate

    from diffbench.plugins import PluginError
    from diffbench.registry import Ref

    try:
        registry = _registry(plugins)
    except PluginError as exc:
        _fail(str(exc))
    for k in [kind] if kind else KINDS:
        rows = [{"name": c.name, "family": c.family, "description": c.description,
                 "options": ", ".join(f"{o}={spec.describe()}" for o, spec in c.specs.items()),
                 "aliases": ", ".join(c.aliases), "plugin": c.plugin.split(" (")[0]}
                for c in registry.all(k)]
        click.echo(f"\n{k} ({len(rows)})")
        click.echo(tabulate(rows, headers="keys", tablefmt="simple", maxcolwidths=[None, None, 50, 36, 24, None]))
        presets = [f"  {alias:<18} = {Ref(c.name, tuple(c.aliases[alias].items()))}"
                   for alias, c in registry.aliases(k).items() if c.aliases[alias]]
        if presets:
            click.echo("aliases with preset options:\n" + "\n".join(presets))


@main.command()
@click.option("--model", required=True, help="Model to train, e.g. mlp, unet, dit.")
@click.option("--dataset", required=True, help="Dataset to train on.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint path without suffix, e.g. to ship a file (default: the user cache, "
                   "$DIFFBENCH_CACHE/checkpoints or ~/.cache/diffbench/checkpoints, under the train command's name).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Model or training option, e.g. --set steps=3000 --set parameterization=v (repeatable).")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(dir_okay=False), help="Also load this plugin file.")
def train(model, dataset, out_path, device, settings, plugins):
    """Train a model on a dataset and write a safetensors checkpoint (+ JSON config).
    An interrupted run resumes from its last train-state checkpoint."""
    from diffbench.grid import load_dataset
    from diffbench.registry import Incompatible, convert_options
    from diffbench.runner import resolve_device
    from diffbench.training import NonFiniteLoss, train_option_specs

    try:
        registry = _registry(plugins)
        component = registry.get("models", model)
        if component.train is None:
            raise ConfigError(f"model {model!r} cannot be trained (it has no train function)")
        options = convert_options(f"train --set: model {model!r}", train_option_specs(component),
                                  _key_values(settings))
        dev = resolve_device(device)
        source = load_dataset(registry, registry.resolve("datasets", dataset), "--dataset")
    except ConfigError as exc:
        _fail(str(exc))
    tic = time.perf_counter()
    try:
        path = component.train(source, out_path, device=dev, **options)
    except (ConfigError, Incompatible) as exc:
        _fail(f"model {model!r} on {dataset!r}: {exc}")
    except NonFiniteLoss as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"trained {model} on {dataset} in {time.perf_counter() - tic:.1f} s -> {path}")


def _key_values(settings) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs (values stay text: the option's declared type converts them)."""
    pairs = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=3000")
        pairs[key.strip()] = value.strip()
    return pairs


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


def _write_report(run_dir, fatal: bool = True) -> None:
    """report.html of a run; a bad RUN_DIR exits 2, unless it is the end of `run` (then a warning)."""
    from diffbench.report import ReportError, write_report

    try:
        click.echo(f"report: {write_report(run_dir)}")
    except ReportError as exc:
        if fatal:
            _fail(str(exc))
        click.echo(f"warning: no report.html: {exc}", err=True)


@main.command()
@click.argument("run_dir", type=click.Path())
def report(run_dir):
    """Write RUN_DIR/report.html: one self-contained page with the run's table (sortable,
    filterable), interactive metric-vs-NFE and metric-vs-wall-clock charts, samples, Pareto
    front, configuration and environment. Open it in any browser; no server needed."""
    _write_report(run_dir)


@main.command()
@click.argument("results_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/history", show_default=True,
              help="Where to write history.csv and the static site (index.html).")
@click.option("--baseline", type=click.Path(), default=None,
              help="Run every other run is compared against (default: the oldest run).")
@click.option("--tolerances", type=click.Path(dir_okay=False), help="Tolerance TOML, as for diffbench compare.")
def history(results_dirs, out_dir, baseline, tolerances):
    """Collect runs (run directories, or folders of them) across commits into history.csv and a
    static site: each cell's metrics and timings over commits, with the baseline, its tolerance
    band and the points `diffbench compare` would flag as regressions."""
    from diffbench.history import build_history
    from diffbench.report import ReportError

    try:
        summary = build_history(results_dirs, _writable_dir(Path(out_dir)), baseline=baseline, tolerances=tolerances)
    except (ConfigError, ReportError) as exc:
        _fail(str(exc))
    click.echo(summary)


@main.command()
@click.option("--samplers", default=None, help="Comma-separated deterministic samplers (default: all with a known order).")
@click.option("--steps", default="8,16,32,64,128", show_default=True, help="Step counts.")
@click.option("--spacing", default="uniform-logsnr", show_default=True,
              help="timestep spacing of every sampler's grid (uniform-logsnr shows asymptotic orders)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/convergence", show_default=True)
def convergence(samplers, steps, spacing, out_dir):
    """Measure convergence orders on the exact GMM denoiser: error against a high-accuracy ODE
    solution from the same x_T; writes a table and a log-log plot."""
    from diffbench.convergence import run_convergence

    try:
        df = run_convergence(_writable_dir(Path(out_dir)), samplers=split_list(samplers) if samplers else None,
                             steps=tuple(int(s) for s in split_list(steps)), spacing=spacing)
    except ConfigError as exc:
        _fail(str(exc))
    from tabulate import tabulate

    click.echo(tabulate(df, headers="keys", tablefmt="simple", showindex=False, floatfmt=".4g"))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--metric", default=None, help="Quality column, e.g. fid or fid[digits-cnn] (default: the run's first metric).")
@click.option("--budget", "budgets", multiple=True, metavar="nfe=N|wall=S",
              help="Cost budget: NFE per sample or wall-clock seconds per batch; repeatable or comma-separated "
                   "(default: every NFE of the run).")
def best(run_dir, metric, budgets):
    """Pareto fronts of quality vs NFE and vs wall-clock from a finished run, and the best
    (sampler, spacing, guidance) per budget; writes RUN_DIR/pareto.png."""
    from diffbench.best import best_report

    try:
        text, plot = best_report(run_dir, metric, budgets)
    except ConfigError as exc:
        _fail(str(exc))
    click.echo(text)
    click.echo(f"plot: {plot}")


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
