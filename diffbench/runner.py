"""Runs a grid: every cell ends ``ok``, ``failed`` (exception + plugin) or ``skipped`` (reason).

One bad cell never loses the others: each cell's row is written atomically as it finishes,
tracebacks go to ``run.log``, and ``--resume`` reuses finished rows of an interrupted run.
"""
from __future__ import annotations

import ctypes
import functools
import io
import json
import logging
import math
import numbers
import shutil
import traceback
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffbench.data import DataSource
from diffbench.denoiser import NetworkError
from diffbench.distributed import RankFailed, Shard, assemble
from diffbench.fastpath import apply_fast_path, check_supported
from diffbench.grid import Cell, RunConfig
from diffbench.io import atomic_write_bytes, atomic_write_text, read_json
from diffbench.metrics import MetricContext
from diffbench.nn.attention import effective_backend, use_backend
from diffbench.generate import class_labels, generate
from diffbench.registry import SINGULAR, Component, ConfigError, Incompatible, Registry
from diffbench.results import AXES, ResultsWriter, load_rows, plot_metrics, plot_point_cell, plot_point_samples
from diffbench.samples import PNGFolder, SampleSet, TensorSamples, streams
from diffbench.timing import PeakMemory, environment_fingerprint, summarize, wall_timer

log = logging.getLogger("diffbench")
REFERENCE_SIZE = 2000  # held-out examples metrics compare against (fewer if the dataset is smaller)
WARMUP_SAMPLES = 8


class CellFailure(Exception):
    """A plugin misbehaved in a cell: ``what`` it did (raised ..., returned ...), naming the plugin."""

    def __init__(self, component: Component, what: str):
        super().__init__(f"{SINGULAR[component.kind]} {component.name!r} (plugin {component.plugin}) {what}")


def _raised(component: Component, exc: BaseException) -> CellFailure:
    if isinstance(exc, SystemExit):
        return CellFailure(component, f"called sys.exit({exc.code!r})")
    return CellFailure(component, f"raised {type(exc).__name__}: {exc}")


def _call(component: Component, fn, *args, **kwargs):
    """Call into a plugin; Incompatible, CellFailure and the model's NetworkError pass through,
    anything else (sys.exit included) becomes a CellFailure naming ``component``."""
    try:
        return fn(*args, **kwargs)
    except (Incompatible, CellFailure, NetworkError):
        raise
    except (Exception, SystemExit) as exc:
        raise _raised(component, exc) from exc


def check_sample_output(component: Component, out, expected: torch.Tensor) -> torch.Tensor:
    """What a sampler returned must be samples like its input x_T: a tensor of the same shape and
    kind of dtype (floating point for Gaussian models, integer tokens for masked ones)."""
    if not isinstance(out, torch.Tensor):
        raise CellFailure(component, f"returned {type(out).__name__}, expected a tensor of shape {list(expected.shape)}")
    if out.shape != expected.shape:
        raise CellFailure(component, f"returned shape {list(out.shape)}, expected {list(expected.shape)} "
                                     f"({expected.shape[0]} samples)")
    if out.is_floating_point() != expected.is_floating_point() or out.is_complex():
        raise CellFailure(component, f"returned dtype {out.dtype}, expected {expected.dtype}")
    return out


class SampleError(Exception):
    """The cell's samples are unusable (not finite): the cell fails with this reason."""


def count_nonfinite(samples: torch.Tensor) -> int:
    """How many samples [B, ...] hold NaN or Inf (checked per batch, before quantisation to uint8)."""
    return int((~torch.isfinite(samples.flatten(1))).any(1).sum()) if samples.is_floating_point() else 0


def check_finite_samples(cell: Cell, nonfinite: int, num_samples: int) -> None:
    """A cell whose samples hold NaN or Inf fails before any metric sees them."""
    if nonfinite:
        raise SampleError(f"{nonfinite} of {num_samples} samples are not finite (model {cell.model.label!r}, "
                          f"sampler {cell.sampler.label!r}, guidance {cell.guidance.label!r})")


def check_metric_value(metric: Component, column: str, value) -> float:
    """A metric value must be a finite real number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CellFailure(metric, f"returned {type(value).__name__} {value!r} for column {column!r}, expected a number")
    if not math.isfinite(value):
        raise CellFailure(metric, f"returned {value} for column {column!r}, expected a finite number")
    return float(value)


def _cached(cache: dict, key, load):
    """Load once per run; a load that is Incompatible or fails is remembered and re-raised too."""
    if key not in cache:
        try:
            cache[key] = load()
        except (Incompatible, CellFailure) as exc:
            cache[key] = exc
    if isinstance(cache[key], BaseException):
        raise cache[key]
    return cache[key]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' requested but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def check_compatible(model: Component, denoiser, sampler: Component, guidance: Component) -> str | None:
    """Why this model × sampler × guidance cannot run, or None."""
    if sampler.family != denoiser.family:
        return f"sampler {sampler.name} works on {sampler.family} models; {model.name} is a {denoiser.family} model"
    missing = sorted(sampler.requires - denoiser.capabilities)
    if missing:
        return (f"sampler {sampler.name} needs a model with {', '.join(missing)}; "
                f"{model.name} ({denoiser.parameterization if hasattr(denoiser, 'parameterization') else denoiser.family}) has none")
    if guidance.family not in ("any", denoiser.family):
        return f"guidance {guidance.name} is for {guidance.family} models; {model.name} is a {denoiser.family} model"
    if guidance.conditional and not denoiser.num_classes:
        return f"guidance {guidance.name} needs a class-conditional model; {model.name} is unconditional"
    return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing to do).
    Called after each streamed batch: freed batch-sized tensors otherwise stay resident in a heap that
    small objects (e.g. the PNG writer's) fragment, so the high-water mark grew with the number of
    batches (shapes, batches of 250: 404 MiB at 1,000 samples, 690 MiB at 10,000). Fixing glibc's
    mmap threshold instead also bounds it, but makes every batch-sized allocation a fresh mmap: the
    networks then ran 1.4x (conv) to 2.2x (MLP) slower, which would distort every timing column."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once; None where there is none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def sample_folder(out_dir: Path, cell: Cell) -> Path:
    """Where a cell streams its image samples: ``samples/<cell>/`` (:class:`~diffbench.samples.PNGFolder`)."""
    return Path(out_dir) / "samples" / cell.slug


def discard_samples(config: RunConfig, out_dir: Path, cell: Cell) -> None:
    """Remove a cell's streamed samples once its metrics are done or it failed, unless --keep-samples."""
    if not config.keep_samples:
        shutil.rmtree(sample_folder(out_dir, cell), ignore_errors=True)


@dataclass
class Generated:
    """A cell's samples, or (under torchrun) one rank's share of them: the samples of ``batches``.
    Image samples go to the cell's :class:`PNGFolder` as they are made; ``samples`` holds them in
    memory only when they are not streamed or --save-samples wants x_0, and ``x_T`` only for
    --save-samples: memory stays bounded by the batch size."""

    samples: torch.Tensor | None  # [N, *shape], or None when streamed to disk
    x_T: torch.Tensor | None  # [N, *shape] starting noise (or fully masked tokens), for --save-samples
    labels: torch.Tensor | None
    nfe: int
    wall_s: float  # of the first batch (median over repeats)
    wall_std_s: float
    model_s: float
    warmup_s: float = 0.0  # the warm-up run (with compile / CUDA graphs: includes compilation and capture)
    batches: list[range] = field(default_factory=list)
    samples_per_s: float = 0.0  # first batch; summed over ranks when shares are merged
    decode_s: float | None = None  # latent models: median seconds to decode one batch
    decoder_info: dict | None = None  # latent models: the autoencoder and scaling factor
    nonfinite: int = 0  # samples holding NaN or Inf (the cell fails; nothing after them is written)

    def cpu(self) -> "Generated":
        return replace(self, **{name: getattr(self, name).cpu() for name in ("samples", "x_T", "labels")
                                if getattr(self, name) is not None})


def merge_shares(shares: list[Generated], num_samples: int, device: torch.device) -> Generated:
    """One Generated from every rank's share (rank 0's timings; throughput summed over ranks)."""
    if len(shares) == 1:
        return shares[0]
    shares = [s for s in shares if s.batches]  # ranks beyond the number of batches sampled nothing

    def whole(name):
        if getattr(shares[0], name) is None:
            return None
        return assemble([(s.batches, getattr(s, name)) for s in shares], num_samples).to(device)

    return replace(shares[0], samples=whole("samples"), x_T=whole("x_T"), labels=whole("labels"),
                   batches=[range(num_samples)], samples_per_s=sum(s.samples_per_s for s in shares),
                   nonfinite=sum(s.nonfinite for s in shares))


@dataclass
class CellResult:
    """What a cell gives the table: its row, the direction of its metric columns and, for point
    data, (dataset label, panel title, samples [n, D], reference data [m, D]) for the scatter plot."""

    row: dict
    directions: dict
    points: tuple | None = None


def base_row(config: RunConfig, cell: Cell, registry: Registry, device: torch.device, world_size: int = 1) -> dict:
    """The columns every row has, whatever happens in the cell."""
    return {"model": cell.model.label, "sampler": cell.sampler.label, "guidance": cell.guidance.label,
            "dataset": cell.dataset.label, "steps": cell.steps,
            "spacing": registry.options("samplers", cell.sampler).get("spacing"),
            "num_samples": config.num_samples, "batch_size": min(config.batch_size or config.num_samples,
                                                                 config.num_samples),
            "seed": config.seed, "device": str(device), "attention": effective_backend(device),
            "world_size": world_size, "reason": "",
            "dtype": config.dtype, "compile": config.compile, "cuda_graphs": config.cuda_graphs}


class GridRunner:
    """Runs the cells of a grid and writes the table. Cells run in this process, or (``cells``
    = a :class:`diffbench.worker.Supervisor`) in a supervised worker process, or (``shard``, under
    torchrun) in this process on every rank, each sampling its share (:mod:`diffbench.distributed`)."""

    def __init__(self, registry: Registry, config: RunConfig, out_dir: Path, *, resume: bool = False,
                 progress: bool = True, datasets: dict | None = None, cells=None, shard: Shard | None = None):
        self.registry, self.config, self.out_dir = registry, config, Path(out_dir)
        self.shard = shard or Shard()
        self.device = resolve_device(config.device)
        check_supported(config.fast_path, self.device)
        self.progress = progress
        self.writer = ResultsWriter(self.out_dir)
        if resume:
            self._resume()
        # datasets and models (or why they could not load); ``datasets``: already loaded, by label
        self._loaded: dict[tuple, object] = {("dataset", label): d for label, d in (datasets or {}).items()}
        self._references: dict[str, tuple] = {}
        self._point_samples: dict[str, dict[str, torch.Tensor]] = {}
        self._point_references: dict[str, torch.Tensor] = {}
        self.cells = cells or self  # anything with run_cell(cell) -> CellResult

    # ---- bookkeeping -------------------------------------------------------------------
    def _resume(self) -> None:
        """Keep the finished (ok / skipped) rows of an earlier run in out_dir, and its metric directions."""
        if not (self.out_dir / "results.json").exists():
            return
        config_file = self.out_dir / "config.json"
        try:
            previous = read_json(config_file) if config_file.exists() else {}
            if not isinstance(previous, dict):
                raise ValueError(f"{config_file}: not a run configuration")
            rows, directions = load_rows(self.out_dir)
        except ValueError as exc:
            raise ConfigError(f"cannot --resume in {self.out_dir}: {exc}") from None
        current = self.config.as_dict()
        defaults = {f.name: f.default for f in fields(RunConfig)}  # for a run made before a key existed
        for key in ("num_samples", "batch_size", "seed", "metrics", "device", "attention", "dtype", "compile",
                    "cuda_graphs"):
            if previous.get(key, defaults[key]) != current[key]:
                raise ConfigError(f"cannot --resume in {self.out_dir}: run.{key} was {previous.get(key)!r}, now {current[key]!r}")
        self.writer.rows = [r for r in rows if r["status"] in ("ok", "skipped")]
        self.writer.metric_columns.update(directions)

    def _done(self, cell: Cell) -> bool:
        return any((r["model"], r["sampler"], r["guidance"], r["dataset"], r["steps"]) == cell.key for r in self.writer.rows)

    def run(self):
        """Run every cell; returns the results DataFrame (None on ranks other than 0)."""
        if not self.shard.is_root:
            return self._run_share()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            atomic_write_text(self.out_dir / "config.json", json.dumps(self.config.as_dict(), indent=2))
            atomic_write_text(self.out_dir / "env.json", json.dumps(environment_fingerprint(self.device), indent=2))
            cells = self.shard.broadcast([c for c in self.config.cells() if not self._done(c)])
            with use_backend(self.config.attention):
                bar = tqdm(cells, desc="cells", unit="cell", disable=not self.progress)
                for cell in bar:
                    bar.set_postfix_str(cell.slug[:60])
                    result = self.cells.run_cell(cell)
                    self.writer.add(result.row, result.directions)
                    if result.points:
                        dataset, title, samples, reference = result.points
                        self._point_samples.setdefault(dataset, {})[title] = samples
                        self._point_references[dataset] = reference
            self._plots()
        finally:
            log.removeHandler(handler)
            handler.close()
        return self.writer.frame()

    def _run_share(self) -> None:
        """Ranks other than 0: sample this rank's share of each of rank 0's cells (rank 0 writes)."""
        with use_backend(self.config.attention):
            for cell in self.shard.broadcast(None):
                self.run_cell(cell)

    # ---- one cell ------------------------------------------------------------------------
    def run_cell(self, cell: Cell) -> CellResult:
        """Run one cell here; every outcome is a row."""
        row = base_row(self.config, cell, self.registry, self.device, self.shard.world_size)
        try:
            return self._run_cell(cell, row)
        except Incompatible as exc:
            row.update(status="skipped", reason=str(exc))
            log.info("skipped %s: %s", cell.slug, exc)
        except NetworkError as exc:  # raised where the network is called: the model's fault, whoever called it
            model = self.registry.get("models", cell.model.name)
            row.update(status="failed", reason=str(CellFailure(model, f"network: {exc}")))
            log.error("failed %s: %s\n%s", cell.slug, row["reason"], "".join(traceback.format_exception(exc)))
        except (CellFailure, SampleError, RankFailed) as exc:
            row.update(status="failed", reason=str(exc))
            log.error("failed %s: %s\n%s", cell.slug, exc, "".join(traceback.format_exception(exc)))
        except Exception as exc:  # a bug in the host itself: still never lose the other cells
            row.update(status="failed", reason=f"diffbench host error {type(exc).__name__}: {exc}")
            log.error("failed %s (host): %s", cell.slug, traceback.format_exc())
        finally:
            if self.shard.is_root:  # every rank has written its share by now (or failed)
                discard_samples(self.config, self.out_dir, cell)
        return CellResult(row, {})

    def _run_cell(self, cell: Cell, row: dict) -> CellResult:
        sampler = self.registry.get("samplers", cell.sampler.name)
        options = self.registry.options("samplers", cell.sampler)
        # Peak memory is that of making the samples (warm-up, timed runs, decoding, writing them), above
        # the cell's model and dataset, loaded first: a row reads the same whether or not an earlier
        # cell loaded its model, and the metrics' one-off reference features count in no row.
        self._model(cell.model, cell.dataset, self._dataset(cell.dataset))
        with PeakMemory(self.device) as memory:
            shares = self.shard.gather(lambda: self._generate(cell, sampler, options), cell.slug)
        if shares is None:  # not rank 0: rank 0 writes the row
            return CellResult(row, {})
        row["peak_mem_mb"] = memory.peak_mb
        generated = merge_shares(shares, self.config.num_samples, self.device)
        dataset = self._dataset(cell.dataset)
        denoiser = self._model(cell.model, cell.dataset, dataset)
        check_finite_samples(cell, generated.nonfinite, self.config.num_samples)
        samples = self._sample_folder(cell, dataset) if streams(dataset) else TensorSamples(generated.samples)
        row.update(self._timing_columns(generated, cell.steps), channels_last=denoiser.channels_last)
        metrics, directions = self._metrics(cell, samples, generated.labels, dataset, denoiser)
        row.update(metrics, status="ok")
        self._save(cell, generated, samples, dataset)
        points = None
        if dataset.modality == "points":
            title = f"{cell.model.label} · {cell.sampler.label} · {cell.guidance.label} · {cell.steps} steps"
            points = (cell.dataset.label, title, samples.read(0, 2000).cpu(), self._references[cell.dataset.label][0])
        return CellResult(row, directions, points)

    def _sample_folder(self, cell: Cell, dataset: DataSource) -> PNGFolder:
        return PNGFolder(sample_folder(self.out_dir, cell), self.config.num_samples, dataset.shape)

    def _batch_size(self) -> int:
        return min(self.config.batch_size or self.config.num_samples, self.config.num_samples)

    def _dataset(self, ref) -> DataSource:
        component = self.registry.get("datasets", ref.name)
        return _cached(self._loaded, ("dataset", ref.label),
                       lambda: _call(component, component.load, **self.registry.options("datasets", ref)))

    def _model(self, ref, dataset_ref, dataset: DataSource):
        component = self.registry.get("models", ref.name)

        def load():
            denoiser = _call(component, component.load, dataset, device=self.device,
                             **self.registry.options("models", ref))
            return apply_fast_path(denoiser, self.config.fast_path, self.device)
        return _cached(self._loaded, ("model", ref.label, dataset_ref.label), load)

    def _generate(self, cell: Cell, sampler: Component, options: dict) -> Generated:
        """This rank's share of the cell's samples (all of them in a one-process run)."""
        dataset = self._dataset(cell.dataset)
        model_component = self.registry.get("models", cell.model.name)
        base = self._model(cell.model, cell.dataset, dataset)
        guidance = self.registry.get("guidance", cell.guidance.name)
        reason = check_compatible(model_component, base, sampler, guidance)
        if reason:
            raise Incompatible(reason)
        denoiser = _call(guidance, guidance.apply, base, **self.registry.options("guidance", cell.guidance))
        spacing = options.pop("spacing", None)
        if denoiser.family == "gaussian":
            timesteps = denoiser.process.timesteps(cell.steps, spacing)
        else:
            timesteps = torch.linspace(1.0, 0.0, cell.steps + 1, dtype=torch.float64)
        if hasattr(denoiser, "bind_timesteps"):  # guidance that needs the sampler's grid (cfg++)
            denoiser.bind_timesteps(timesteps)

        # Latent models (plugins/latent.py) carry a decoder: samplers see latents of its shape and the
        # samples are decoded to images before the metrics, timed apart from sampling.
        decoder = getattr(base, "decoder", None)
        shape = decoder.latent_shape if decoder is not None else dataset.shape

        def sample(indices: range) -> tuple[torch.Tensor, torch.Tensor]:
            out = _call(sampler, generate, denoiser, sampler.fn, timesteps, indices, shape,
                        seed=self.config.seed, device=self.device, **options)
            return out.x_T, check_sample_output(sampler, out.samples, out.x_T)

        def decode(out: tuple[torch.Tensor, torch.Tensor], decode_times: list[float]):
            if decoder is None:
                return out
            with wall_timer(self.device, decode_times):
                return out[0], _call(self.registry.get("models", cell.model.name), decoder, out[1])

        # Image samples stream to the cell's folder batch by batch (checked finite first); in memory
        # stay the samples that are not streamed, and x_T and x_0 for --save-samples.
        folder = self._sample_folder(cell, dataset) if streams(dataset) else None
        keep_x0, keep_x_T = folder is None or self.config.save_samples, self.config.save_samples
        kept_x_T, kept_x0, nonfinite = [], [], 0

        def take(indices: range, out: tuple[torch.Tensor, torch.Tensor]) -> None:
            nonlocal nonfinite
            x_T, x0 = out
            nonfinite += count_nonfinite(x0)
            if folder is not None and not nonfinite:  # the cell fails: write nothing after a bad batch
                folder.write(indices, x0)
                release_free_memory()  # host memory bounded by the batch size, not the number of batches
            if keep_x0:
                kept_x0.append(x0)
            if keep_x_T:
                kept_x_T.append(x_T)

        bs = self._batch_size()
        batches = self.shard.batches(self.config.num_samples, bs)  # the first is timed
        if not batches:  # more ranks than batches
            return Generated(None, None, None, 0, math.nan, math.nan, math.nan)
        # Warm-up: allocator, lazy init, kernel autotuning; with compile / CUDA graphs the timed
        # batch's shapes, so that compilation and capture happen here (reported as compile_s).
        warmup = []
        with wall_timer(self.device, warmup):
            decode(sample(range(bs if self.config.fast_path.fixed_shapes else min(WARMUP_SAMPLES, bs))), [])
        times, model_times, decode_times, first = [], [], [], None
        for _ in range(self.config.repeats):
            denoiser.stats.reset()
            with wall_timer(self.device, times):
                out = sample(batches[0])
            out = decode(out, decode_times)  # timed apart: wall_s is sampling only
            model_times.append(denoiser.stats.model_time())
            first = first or (out, denoiser.stats.nfe)
        out, nfe = first
        take(batches[0], out)
        for batch in batches[1:]:
            take(batch, decode(sample(batch), []))
        wall, wall_std = summarize(times)
        indices = [i for batch in batches for i in batch]
        generated = Generated(torch.cat(kept_x0) if keep_x0 else None, torch.cat(kept_x_T) if keep_x_T else None,
                              class_labels(denoiser, indices, self.device), nfe, wall, wall_std,
                              summarize(model_times)[0], warmup[0], batches, len(batches[0]) / wall,
                              summarize(decode_times)[0] if decoder is not None else None,
                              decoder.info if decoder is not None else None, nonfinite)
        return generated.cpu() if self.shard.world_size > 1 else generated

    def _timing_columns(self, g: Generated, steps: int) -> dict:
        """Timings are per batch of ``batch_size`` samples (median over ``repeats``) on one device;
        samples_per_s is summed over ranks under torchrun."""
        columns = {"nfe": g.nfe, "wall_s": g.wall_s, "wall_std_s": g.wall_std_s, "step_ms": 1e3 * g.wall_s / steps,
                   "overhead_ms": 1e3 * (g.wall_s - g.model_s) / steps,
                   "samples_per_s": g.samples_per_s,
                   # compile_s: what the warm-up run took over a timed run (compilation, graph capture).
                   "compile_s": g.warmup_s - g.wall_s if self.config.fast_path.fixed_shapes else None}
        if g.decode_s is not None:  # latent models: wall_s is sampling only; decoding one batch apart
            columns |= {"decode_ms": 1e3 * g.decode_s, **g.decoder_info}
        return columns

    def _metrics(self, cell: Cell, samples: SampleSet, labels: torch.Tensor | None, dataset: DataSource,
                 denoiser) -> tuple[dict, dict]:
        """Each metric gets the SampleSet (``Metric.streaming``) or all samples as one tensor."""
        key = cell.dataset.label  # the label: one dataset with two option sets is two references
        if key not in self._references:
            self._references[key] = dataset.reference(max(REFERENCE_SIZE, self.config.num_samples))
        ref_x, ref_y = self._references[key]
        # A model conditioned on its own prompts (diffusers[prompts=FILE]) has labels that are not the dataset's.
        labels = labels if getattr(denoiser, "conditions_on_dataset", True) else None
        ctx = MetricContext(dataset=dataset, reference=ref_x, reference_labels=ref_y, labels=labels,
                            denoiser=denoiser, device=self.device, seed=self.config.seed)
        load_all = functools.cache(samples.load_all)  # once per cell, for the metrics that take a tensor
        values, directions = {}, {}
        for ref in self.config.metrics:
            metric = self.registry.get("metrics", ref.name)
            if metric.family != dataset.modality:
                continue
            try:
                result = _call(metric, metric.compute, samples if metric.streaming else load_all(), ctx,
                               **self.registry.options("metrics", ref))
            except Incompatible as exc:
                log.info("metric %s not applicable to %s: %s", ref.label, cell.slug, exc)
                continue
            result = result if isinstance(result, dict) else {ref.label: result}
            values.update({k: check_metric_value(metric, k, v) for k, v in result.items()})
            directions.update({k: metric.better_is_higher(k) for k in result})
        values.update(ctx.columns)
        if ctx.warnings:
            values["warnings"] = "; ".join(dict.fromkeys(ctx.warnings))
        return values, directions

    # ---- artefacts -------------------------------------------------------------------------
    def _save(self, cell: Cell, g: Generated, samples: SampleSet, dataset: DataSource) -> None:
        samples_dir = self.out_dir / "samples"
        if self.config.save_samples:
            from safetensors.torch import save

            tensors = {"x_T": g.x_T.contiguous().cpu(), "x_0": g.samples.contiguous().cpu()}
            atomic_write_bytes(samples_dir / f"{cell.slug}.safetensors", save(tensors))
        if dataset.modality == "points":
            plot_point_cell(self._references[cell.dataset.label][0], samples.read(0, 2000).cpu(),
                            samples_dir / f"{cell.slug}.png")
        elif dataset.modality == "image":
            from torchvision.utils import save_image

            buffer = io.BytesIO()
            save_image((samples.read(0, 64).float().cpu() + 1) / 2, buffer, format="png", nrow=8)
            atomic_write_bytes(samples_dir / f"{cell.slug}.png", buffer.getvalue())
        elif dataset.modality == "text" and "decode" in dataset.info:
            text = "\n".join(dataset.info["decode"](seq) for seq in samples.read(0, 32).cpu())
            atomic_write_text(samples_dir / f"{cell.slug}.txt", text + "\n")

    def _plots(self) -> None:
        df = self.writer.frame()
        for x in AXES:  # metric vs NFE and vs wall-clock
            plot_metrics(df, self.writer.metric_columns, self.out_dir, x)
        for label, samples in self._point_samples.items():
            plot_point_samples(label, self._point_references[label], samples, self.out_dir)
