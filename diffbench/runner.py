"""Runs a grid: every cell ends ``ok``, ``failed`` (exception + plugin) or ``skipped`` (reason).

One bad cell never loses the others: each cell's row is written atomically as it finishes,
tracebacks go to ``run.log``, and ``--resume`` reuses finished rows of an interrupted run.
"""
from __future__ import annotations

import io
import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffbench.data import DataSource
from diffbench.grid import Cell, RunConfig
from diffbench.io import atomic_write_bytes, atomic_write_text
from diffbench.metrics import MetricContext
from diffbench.nn.attention import effective_backend, use_backend
from diffbench.registry import Component, ConfigError, Incompatible, Registry
from diffbench.results import ResultsWriter, load_rows, plot_metrics_vs_nfe, plot_point_samples
from diffbench.rng import SampleGenerators
from diffbench.timing import PeakMemory, environment_fingerprint, summarize, wall_timer

log = logging.getLogger("diffbench")
REFERENCE_SIZE = 2000  # held-out examples metrics compare against (fewer if the dataset is smaller)
WARMUP_SAMPLES = 8


class CellFailure(Exception):
    """An exception raised inside a plugin, tagged with the plugin that raised it."""

    def __init__(self, component: Component, exc: BaseException):
        super().__init__(f"{component.kind[:-1]} {component.name!r} (plugin {component.plugin}) raised "
                         f"{type(exc).__name__}: {exc}")


def _call(component: Component, fn, *args, **kwargs):
    """Call into a plugin; Incompatible passes through, anything else becomes a CellFailure."""
    try:
        return fn(*args, **kwargs)
    except (Incompatible, CellFailure):
        raise
    except Exception as exc:
        raise CellFailure(component, exc) from exc


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


@dataclass
class Generated:
    samples: torch.Tensor  # [N, *shape]
    x_T: torch.Tensor  # [N, *shape] starting noise (or fully masked tokens)
    labels: torch.Tensor | None
    nfe: int
    wall_s: float
    wall_std_s: float
    model_s: float
    peak_mem_mb: float
    decode_s: float | None = None  # latent models: median seconds to decode one batch
    decoder_info: dict | None = None  # latent models: the autoencoder and scaling factor


class GridRunner:
    def __init__(self, registry: Registry, config: RunConfig, out_dir: Path, *, resume: bool = False,
                 progress: bool = True):
        self.registry, self.config, self.out_dir = registry, config, Path(out_dir)
        self.device = resolve_device(config.device)
        self.progress = progress
        self.writer = ResultsWriter(self.out_dir)
        if resume:
            self._resume()
        self._loaded: dict[tuple, object] = {}  # datasets and models (or why they could not load)
        self._references: dict[str, tuple] = {}
        self._point_samples: dict[str, dict[str, torch.Tensor]] = {}

    # ---- bookkeeping -------------------------------------------------------------------
    def _resume(self) -> None:
        """Keep the finished (ok / skipped) rows of an earlier run in out_dir, and its metric directions."""
        if not (self.out_dir / "results.json").exists():
            return
        previous = json.loads((self.out_dir / "config.json").read_text()) if (self.out_dir / "config.json").exists() else {}
        current = self.config.as_dict()
        for key in ("num_samples", "batch_size", "seed", "metrics", "device", "attention"):
            if previous.get(key) != current[key]:
                raise ConfigError(f"cannot --resume in {self.out_dir}: run.{key} was {previous.get(key)!r}, now {current[key]!r}")
        rows, directions = load_rows(self.out_dir)
        self.writer.rows = [r for r in rows if r["status"] in ("ok", "skipped")]
        self.writer.metric_columns.update(directions)

    def _done(self, cell: Cell) -> bool:
        return any((r["model"], r["sampler"], r["guidance"], r["dataset"], r["steps"]) == cell.key for r in self.writer.rows)

    def run(self):
        """Run every cell; returns the results DataFrame."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            atomic_write_text(self.out_dir / "config.json", json.dumps(self.config.as_dict(), indent=2))
            atomic_write_text(self.out_dir / "env.json", json.dumps(environment_fingerprint(self.device), indent=2))
            cells = [c for c in self.config.cells() if not self._done(c)]
            with use_backend(self.config.attention):
                bar = tqdm(cells, desc="cells", unit="cell", disable=not self.progress)
                for cell in bar:
                    bar.set_postfix_str(cell.slug[:60])
                    row, directions = self.run_cell(cell)
                    self.writer.add(row, directions)
            self._plots()
        finally:
            log.removeHandler(handler)
            handler.close()
        return self.writer.frame()

    # ---- one cell ------------------------------------------------------------------------
    def run_cell(self, cell: Cell) -> tuple[dict, dict]:
        sampler = self.registry.get("samplers", cell.sampler.name)
        options = self.registry.options("samplers", cell.sampler)
        row = {"model": cell.model.label, "sampler": cell.sampler.label, "guidance": cell.guidance.label,
               "dataset": cell.dataset.label, "steps": cell.steps, "spacing": options.get("spacing"),
               "num_samples": self.config.num_samples, "batch_size": self._batch_size(), "seed": self.config.seed,
               "device": str(self.device), "attention": effective_backend(self.device), "reason": ""}
        try:
            generated, dataset, denoiser = self._generate(cell, sampler, options)
            row.update(self._timing_columns(generated, cell.steps))
            metrics, directions = self._metrics(cell, generated, dataset, denoiser)
            row.update(metrics)
            row["status"] = "ok"
            self._save(cell, generated, dataset)
            return row, directions
        except Incompatible as exc:
            row.update(status="skipped", reason=str(exc))
            log.info("skipped %s: %s", cell.slug, exc)
        except CellFailure as exc:
            row.update(status="failed", reason=str(exc))
            log.error("failed %s: %s\n%s", cell.slug, exc, "".join(traceback.format_exception(exc.__cause__)))
        except Exception as exc:  # a bug in the host itself: still never lose the other cells
            row.update(status="failed", reason=f"diffbench host error {type(exc).__name__}: {exc}")
            log.error("failed %s (host): %s", cell.slug, traceback.format_exc())
        return row, {}

    def _batch_size(self) -> int:
        return min(self.config.batch_size or self.config.num_samples, self.config.num_samples)

    def _dataset(self, ref) -> DataSource:
        component = self.registry.get("datasets", ref.name)
        return _cached(self._loaded, ("dataset", ref.label),
                       lambda: _call(component, component.load, **self.registry.options("datasets", ref)))

    def _model(self, ref, dataset_ref, dataset: DataSource):
        component = self.registry.get("models", ref.name)
        return _cached(self._loaded, ("model", ref.label, dataset_ref.label),
                       lambda: _call(component, component.load, dataset, device=self.device,
                                     **self.registry.options("models", ref)))

    def _generate(self, cell: Cell, sampler: Component, options: dict):
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

        # Latent models (plugins/latent.py) carry a decoder: samplers see latents of its shape and the
        # samples are decoded to images before the metrics, timed apart from sampling.
        decoder = getattr(base, "decoder", None)
        shape = decoder.latent_shape if decoder is not None else dataset.shape

        def sample(indices: range) -> tuple[torch.Tensor, torch.Tensor]:
            generators = SampleGenerators(self.config.seed, indices, self.device)
            x_T = self._initial(denoiser, shape, generators, timesteps[0])
            labels = self._labels(denoiser, indices)
            bound = denoiser.conditioned(labels) if labels is not None else denoiser
            with torch.no_grad():
                out = _call(sampler, sampler.fn, bound, x_T.clone(), timesteps, generator=generators, **options)
            return x_T, out

        def decode(out: tuple[torch.Tensor, torch.Tensor], decode_times: list[float]):
            if decoder is None:
                return out
            with wall_timer(self.device, decode_times):
                return out[0], _call(self.registry.get("models", cell.model.name), decoder, out[1])

        n, bs = self.config.num_samples, self._batch_size()
        decode(sample(range(min(WARMUP_SAMPLES, bs))), [])  # warm-up: allocator, lazy init, kernel autotuning
        times, model_times, decode_times, first = [], [], [], None
        with PeakMemory(self.device) as memory:  # covers sampling and decoding
            for _ in range(self.config.repeats):
                denoiser.stats.reset()
                with wall_timer(self.device, times):
                    out = sample(range(bs))
                out = decode(out, decode_times)
                model_times.append(denoiser.stats.model_time())
                first = first or (out, denoiser.stats.nfe)
        (x_T0, samples0), nfe = first
        rest = [decode(sample(range(start, min(start + bs, n))), []) for start in range(bs, n, bs)]
        x_T = torch.cat([x_T0] + [r[0] for r in rest])
        samples = torch.cat([samples0] + [r[1] for r in rest])
        wall, wall_std = summarize(times)
        generated = Generated(samples, x_T, self._labels(denoiser, range(n)), nfe, wall, wall_std,
                              summarize(model_times)[0], memory.peak_mb,
                              summarize(decode_times)[0] if decoder is not None else None,
                              decoder.info if decoder is not None else None)
        return generated, dataset, base

    def _initial(self, denoiser, shape: tuple, generators: SampleGenerators, t_start) -> torch.Tensor:
        """x_T [N, *shape]: N(0, prior_std(t_start)²) for Gaussian models, all-mask tokens for masked models."""
        if denoiser.family == "gaussian":
            return generators.randn(shape) * denoiser.process.prior_std(t_start)
        return torch.full((len(generators), *shape), denoiser.mask_id, dtype=torch.long, device=self.device)

    def _labels(self, denoiser, indices: range) -> torch.Tensor | None:
        """Class labels for a conditional model: sample i gets class i mod K (balanced)."""
        if not denoiser.num_classes:
            return None
        return torch.tensor(list(indices), device=self.device) % denoiser.num_classes

    def _timing_columns(self, g: Generated, steps: int) -> dict:
        """Timings are per batch of ``batch_size`` samples (median over ``repeats``)."""
        columns = {"nfe": g.nfe, "wall_s": g.wall_s, "wall_std_s": g.wall_std_s, "step_ms": 1e3 * g.wall_s / steps,
                   "overhead_ms": 1e3 * (g.wall_s - g.model_s) / steps, "peak_mem_mb": g.peak_mem_mb,
                   "samples_per_s": self._batch_size() / g.wall_s}
        if g.decode_s is not None:  # latent models: wall_s is sampling only; decoding one batch apart
            columns |= {"decode_ms": 1e3 * g.decode_s, **g.decoder_info}
        return columns

    def _metrics(self, cell: Cell, g: Generated, dataset: DataSource, denoiser) -> tuple[dict, dict]:
        key = cell.dataset.label  # the label: one dataset with two option sets is two references
        if key not in self._references:
            self._references[key] = dataset.reference(max(REFERENCE_SIZE, self.config.num_samples))
        ref_x, ref_y = self._references[key]
        ctx = MetricContext(dataset=dataset, reference=ref_x, reference_labels=ref_y, labels=g.labels,
                            denoiser=denoiser, device=self.device, seed=self.config.seed)
        values, directions = {}, {}
        for ref in self.config.metrics:
            metric = self.registry.get("metrics", ref.name)
            if metric.family != dataset.modality:
                continue
            try:
                result = _call(metric, metric.compute, g.samples, ctx, **self.registry.options("metrics", ref))
            except Incompatible as exc:
                log.info("metric %s not applicable to %s: %s", ref.label, cell.slug, exc)
                continue
            result = result if isinstance(result, dict) else {ref.label: result}
            values.update({k: float(v) for k, v in result.items()})
            directions.update({k: metric.better_is_higher(k) for k in result})
        return values, directions

    # ---- artefacts -------------------------------------------------------------------------
    def _save(self, cell: Cell, g: Generated, dataset: DataSource) -> None:
        samples_dir = self.out_dir / "samples"
        if self.config.save_samples:
            from safetensors.torch import save

            tensors = {"x_T": g.x_T.contiguous().cpu(), "x_0": g.samples.contiguous().cpu()}
            atomic_write_bytes(samples_dir / f"{cell.slug}.safetensors", save(tensors))
        if dataset.modality == "points":
            label = f"{cell.model.label} · {cell.sampler.label} · {cell.guidance.label} · {cell.steps} steps"
            self._point_samples.setdefault(cell.dataset.label, {})[label] = g.samples[:2000].cpu()
        elif dataset.modality == "image":
            from torchvision.utils import save_image

            buffer = io.BytesIO()
            save_image((g.samples[:64].float().cpu() + 1) / 2, buffer, format="png", nrow=8)
            atomic_write_bytes(samples_dir / f"{cell.slug}.png", buffer.getvalue())
        elif dataset.modality == "text" and "decode" in dataset.info:
            text = "\n".join(dataset.info["decode"](seq) for seq in g.samples[:32].cpu())
            atomic_write_text(samples_dir / f"{cell.slug}.txt", text + "\n")

    def _plots(self) -> None:
        df = self.writer.frame()
        plot_metrics_vs_nfe(df, self.writer.metric_columns, self.out_dir)
        for label, samples in self._point_samples.items():
            plot_point_samples(label, self._references[label][0], samples, self.out_dir)
