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
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Write results exactly here "
              "(default: results/<run-id>, with results/latest pointing at it).")
@click.option("--save-samples", is_flag=True, default=None, help="Also write samples/<cell>.safetensors (x_T, x_0).")
@click.option("--resume", is_flag=True, help="Reuse finished cells of an interrupted run in --out.")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier run in --out (else refused).")
@click.option("--cell-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds a cell may take (loading included) before its worker is stopped and the cell failed.")
@click.option("--in-process", is_flag=True, help="Run cells in this process (debugging: no isolation, no timeout).")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(dir_okay=False),
              help="Load a plugin from a .py file (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(config_path, out_dir, resume, overwrite, cell_timeout, in_process, plugins, quiet, **flags):
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
    from diffbench.grid import build_config, check_memory, load_datasets, read_toml
    from diffbench.results import terminal_table
    from diffbench.runner import GridRunner, resolve_device
    from diffbench.worker import Supervisor

    try:
        registry = _registry(plugins)
        path = config_path or ("bench.toml" if Path("bench.toml").is_file() else None)
        settings = read_toml(path) if path else {}
        settings.update({k: v for k, v in flags.items() if v is not None})
        config = build_config(registry, settings)
        device = resolve_device(config.device)
        datasets = load_datasets(registry, config)
        check_memory(config, datasets, *_available_memory(device))
        out = Path(out_dir) if out_dir else _default_out()
        shard = from_env(device, cell_timeout)  # one process unless launched by torchrun
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
              help="Checkpoint path without suffix (default: the model's own checkpoint location).")
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


if __name__ == "__main__":
    main()
