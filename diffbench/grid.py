"""The run configuration (bench.toml + CLI flags) and its expansion into cells.

Every axis is a list. Validation errors name the key, the bad value and the valid choices.
Settings come from CLI flags, else the config file (``--config`` or ``./bench.toml``), else the
grid embedded in the package (``default_grid.toml``, used only when there is no config file).
When neither flags nor config name datasets, each model runs on its own default datasets.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from urllib.parse import quote
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from diffbench.checkpoints import checkpoint_name, find_checkpoint
from diffbench.data import DataSource
from diffbench.fastpath import COMPILE_MODES, DTYPES, FastPath, compile_mode
from diffbench.io import read_text
from diffbench.registry import ConfigError, Option, Ref, Registry, convert_options, split_list
from diffbench.samples import streams

DEFAULT_GRID = Path(__file__).with_name("default_grid.toml")
AXES = ("models", "samplers", "guidance", "datasets", "metrics")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("triton", "sdpa", "math")
MAX_SLUG = 200  # characters of a cell's file name stem: suffixes (".safetensors", a temporary's) need the rest of 255


@dataclass(frozen=True)
class Cell:
    """One point of the grid: model × sampler × guidance × dataset × steps."""

    model: Ref
    sampler: Ref
    guidance: Ref
    dataset: Ref
    steps: int

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return (self.model.label, self.sampler.label, self.guidance.label, self.dataset.label, self.steps)

    @property
    def slug(self) -> str:
        return cell_slug(self.key)


def cell_slug(key) -> str:
    """A file-system-safe id of a cell key (model, sampler, guidance, dataset, steps) that keeps every
    character that tells cells apart, e.g. ``mlp__ddim[eta=1.0]__none__moons__10`` and
    ``unet__dpm-solver++__cfg[scale=3.0]__digits__10``; anything else (``/``, spaces, ``%``) is
    percent-encoded, so two cells never share a file under samples/. A file name holds at most 255
    bytes: a longer slug (a model path in its options) keeps its first characters and ends in a hash of the whole."""
    slug = "__".join(quote(str(p), safe="+=,[]-.") for p in key)
    if len(slug) <= MAX_SLUG:
        return slug
    return f"{slug[:MAX_SLUG - 17]}~{hashlib.sha256(slug.encode()).hexdigest()[:16]}"


@dataclass
class RunConfig:
    models: list[Ref]
    samplers: list[Ref]
    guidance: list[Ref]
    datasets: list[Ref]
    metrics: list[Ref]
    steps: list[int]
    num_samples: int = 1000
    batch_size: int = 0  # 0: all samples in one batch
    seed: int = 0
    repeats: int = 3
    device: str = "auto"
    attention: str = "sdpa"
    save_samples: bool = False
    keep_samples: bool = False
    # The network's fast path (diffbench.fastpath).
    dtype: str = "fp32"
    compile: str = "off"
    cuda_graphs: bool = False
    model_datasets: dict[str, list[Ref]] = field(default_factory=dict)  # model label -> datasets, if no datasets

    def datasets_of(self, model: Ref) -> list[Ref]:
        return self.datasets or self.model_datasets[model.label]

    @property
    def fast_path(self) -> FastPath:
        return FastPath(self.dtype, self.compile, self.cuda_graphs)

    def cells(self) -> list[Cell]:
        return [Cell(model, *combo) for model in self.models
                for combo in itertools.product(self.samplers, self.guidance, self.datasets_of(model), self.steps)]

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = [str(v) for v in value] if f.name in AXES else value
        out["model_datasets"] = {m: [str(d) for d in ds] for m, ds in self.model_datasets.items()}
        return out


# The scalar settings of a run, typed like component options (see diffbench.registry.Option).
RUN_OPTIONS = {"num_samples": Option(1000, min=1), "batch_size": Option(0, min=0), "seed": Option(0, min=0, max=2**62),
               "repeats": Option(3, min=1), "device": Option("auto", choices=DEVICES),
               "attention": Option("sdpa", choices=ATTENTION), "save_samples": Option(False),
               "keep_samples": Option(False),
               # the network's fast path (diffbench.fastpath)
               "dtype": Option("fp32", choices=tuple(DTYPES)), "compile": Option("off", choices=COMPILE_MODES),
               "cuda_graphs": Option(False)}
# Run keys that set a model option on every model of the grid that takes it (and does not set its own).
MODEL_OPTION_KEYS = {"prompts": Option("")}
STEP = Option(10, min=1, max=100_000)  # one entry of run.steps
VALID_KEYS = (*AXES, "steps", *RUN_OPTIONS, *MODEL_OPTION_KEYS)
BYTES_PER_VALUE = 4  # float32 samples
WORKING_COPIES = 16  # live tensors of a batch while sampling (x, x0, noise, network activations): a floor


def read_toml(path: str | Path) -> dict[str, Any]:
    """The ``[run]`` table of a config file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    except ValueError as exc:  # unreadable or not UTF-8
        raise ConfigError(f"config file {exc}") from None
    unknown_tables = sorted(set(data) - {"run"})
    if unknown_tables:
        raise ConfigError(f"{path}: unknown table [{unknown_tables[0]}]; valid tables: [run]")
    run = data.get("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"{path}: 'run' must be a table ([run] with keys {', '.join(VALID_KEYS)}), got {run!r}")
    return dict(run)


def _as_list(key: str, value: Any) -> list:
    if isinstance(value, str):
        value = split_list(value)
    if not isinstance(value, list):
        raise ConfigError(f"run.{key} must be a list, got {value!r}")
    if not value:
        raise ConfigError(f"run.{key} is empty; give at least one value")
    return value


def build_config(registry: Registry, settings: dict[str, Any]) -> RunConfig:
    """Validate merged settings (file values overridden by flags) into a RunConfig."""
    unknown = sorted(set(settings) - set(VALID_KEYS))
    if unknown:
        raise ConfigError(f"unknown key run.{unknown[0]} = {settings[unknown[0]]!r}; valid keys: {', '.join(VALID_KEYS)}")
    missing = [k for k in ("models", "samplers", "steps") if settings.get(k) in (None, "", [])]
    if missing:
        raise ConfigError(f"run.{missing[0]} is required (in the config file or as --{missing[0]})")

    axes = {}
    for kind in AXES:
        default = ["none"] if kind == "guidance" else []  # no metrics: a timing-only grid
        values = _as_list(kind, settings[kind]) if kind in settings else default
        refs = []
        for item in values:
            if not isinstance(item, str):
                raise ConfigError(f"run.{kind}: entries must be strings, got {item!r}")
            try:
                refs.append(registry.resolve(kind, item))
            except ConfigError as exc:
                raise ConfigError(f"run.{kind}: {exc}") from None
        axes[kind] = refs

    axes["models"] = forward_model_options(registry, axes["models"], settings)
    steps = []
    for item in _as_list("steps", settings["steps"]):
        try:
            steps.append(STEP.convert(item))
        except ValueError as exc:
            raise ConfigError(f"run.steps: {item!r} {exc}") from None

    if "compile" in settings:  # `compile = true` in a config file means the default mode
        settings = {**settings, "compile": compile_mode(settings["compile"])}
    scalars = convert_options("run", RUN_OPTIONS, {k: v for k, v in settings.items() if k in RUN_OPTIONS and v is not None},
                              table=True)
    model_datasets = {} if axes["datasets"] else {m.label: default_datasets(registry, m) for m in axes["models"]}
    config = RunConfig(**axes, steps=steps, **scalars, model_datasets=model_datasets)
    config.fast_path  # validates the combination of dtype, compile and cuda_graphs (ConfigError names the key)
    return config


def load_dataset(registry: Registry, ref: Ref, where: str = "run.datasets") -> DataSource:
    """A dataset checked (its ``validate``) and loaded; any failure is bad input naming it."""
    component = registry.get("datasets", ref.name)
    options = registry.options("datasets", ref)
    try:
        if component.validate is not None:
            component.validate(**options)
        return component.load(**options)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"{where}: dataset {ref.label!r} (plugin {component.plugin}) could not load: "
                          f"{type(exc).__name__}: {exc}") from None


def forward_model_options(registry: Registry, models: list[Ref], settings: dict[str, Any]) -> list[Ref]:
    """``--prompts FILE`` (run.prompts) as the ``prompts`` option of every model that takes one and does
    not set its own; refused when no model of the grid takes it."""
    given = {key: settings[key] for key in MODEL_OPTION_KEYS if settings.get(key) not in (None, "")}
    for key, value in convert_options("run", MODEL_OPTION_KEYS, given, table=True).items():
        takers = [m for m in models if key in registry.get("models", m.name).options]
        if not takers:
            raise ConfigError(f"run.{key}: no model of the grid takes option {key!r} "
                              f"({', '.join(m.label for m in models)}); e.g. diffusers on a Stable-Diffusion directory does")
        models = [replace(m, options=tuple(sorted({key: value, **dict(m.options)}.items()))) if m in takers else m
                  for m in models]
    return models


def validate_models(registry: Registry, config: RunConfig) -> None:
    """Every model's ``validate`` (the files it would load), before anything runs or is created: a
    missing weights directory is bad input naming the model, not a failed cell per dataset."""
    for ref in config.models:
        component = registry.get("models", ref.name)
        if component.validate is None:
            continue
        try:
            component.validate(**registry.options("models", ref))
        except ConfigError as exc:
            raise ConfigError(f"run.models: {ref.label}: {exc}") from None
        except (Exception, SystemExit) as exc:
            raise ConfigError(f"run.models: model {ref.label!r} (plugin {component.plugin}) could not be checked: "
                              f"{type(exc).__name__}: {exc}") from None


def load_datasets(registry: Registry, config: RunConfig) -> dict[str, DataSource]:
    """Every dataset of the grid, loaded before anything runs or is created: a missing path or a
    truncated or corrupt file is bad input, not a failed cell per model."""
    refs = dict.fromkeys(cell.dataset for cell in config.cells())  # per-model defaults included
    return {ref.label: load_dataset(registry, ref) for ref in refs}


def check_memory(config: RunConfig, datasets: dict[str, DataSource], available_bytes: int, where: str) -> None:
    """Refuse a grid whose samples cannot fit: per cell a batch's working tensors (an estimate from
    below: networks need more), plus the N samples and their x_T where they are kept in memory (not
    streamed to disk, or --save-samples)."""
    batch = min(config.batch_size or config.num_samples, config.num_samples)
    for label, dataset in datasets.items():
        values = math.prod(dataset.shape)
        kept = 2 * config.num_samples if config.save_samples or not streams(dataset) else 0
        need = BYTES_PER_VALUE * values * (kept + WORKING_COPIES * batch)
        if need > available_bytes:
            raise ConfigError(
                f"run.num_samples = {config.num_samples} (batch_size {batch}) on {label} (samples of shape "
                f"{list(dataset.shape)}) needs at least {need / 2**30:.1f} GiB, more than the "
                f"{available_bytes / 2**30:.1f} GiB available {where}; lower --num-samples or --batch-size")


def default_datasets(registry: Registry, model: Ref) -> list[Ref]:
    """The datasets a model runs on when nobody names any: those it declares (``Model.datasets``),
    else those its checkpoints cover (``<model>-<dataset>[<its options>]`` in the user cache or shipped)."""
    component = registry.get("models", model.name)

    def covered(options: dict) -> list[str]:
        return [name for name in registry.names("datasets")
                if find_checkpoint(checkpoint_name(model.name, name, options, component.defaults)) is not None]

    names = list(component.datasets) or covered(dict(model.options)) or covered({})
    if not names:
        raise ConfigError(f"run.datasets: model {model.label!r} has no checkpoints to pick its datasets from; "
                          f"name them with --datasets (valid datasets: {', '.join(registry.names('datasets'))})")
    return [registry.resolve("datasets", name) for name in names]


def load_settings(config_path: str | Path | None, flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged settings and where each came from: a flag, the config file (``config_path`` or
    ``./bench.toml``) or, when there is no config file, the grid embedded in the package."""
    path = config_path or ("bench.toml" if Path("bench.toml").is_file() else None)
    settings = read_toml(path or DEFAULT_GRID)
    sources = dict.fromkeys(settings, str(path) if path else "default")
    given = {k: v for k, v in flags.items() if v is not None}
    settings.update(given)
    sources.update(dict.fromkeys(given, "flag"))
    return settings, sources


def describe(config: RunConfig, sources: dict[str, str]) -> list[tuple[str, str, str]]:
    """(key, resolved value, source) rows for ``diffbench run --show-config``."""
    rows = []
    for key, value in config.as_dict().items():
        if key == "model_datasets":
            continue
        if key == "datasets" and not value:
            value = "; ".join(f"{m}: {', '.join(ds)}" for m, ds in config.as_dict()["model_datasets"].items())
            rows.append((key, value, "per model (the datasets its checkpoints cover)"))
            continue
        # TOML spelling (true/false); tabulate's column wrapping would turn the string "False" into True.
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) \
            else str(value)
        rows.append((key, shown, sources.get(key, "built-in default")))
    return rows
