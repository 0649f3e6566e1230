"""The run configuration (bench.toml + CLI flags) and its expansion into cells.

Every axis is a list. Validation errors name the key, the bad value and the valid choices.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from diffbench.data import DataSource
from diffbench.io import read_text
from diffbench.registry import ConfigError, Option, Ref, Registry, convert_options, split_list

AXES = ("models", "samplers", "guidance", "datasets", "metrics")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("triton", "sdpa", "math")


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
        """A file-system-safe id, e.g. ``mlp__ddim-eta-1.0__none__moons__10``."""
        parts = [self.model.label, self.sampler.label, self.guidance.label, self.dataset.label, str(self.steps)]
        return "__".join(re.sub(r"[^A-Za-z0-9.]+", "-", p).strip("-") for p in parts)


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

    def cells(self) -> list[Cell]:
        return [Cell(*combo) for combo in itertools.product(self.models, self.samplers, self.guidance,
                                                             self.datasets, self.steps)]

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = [str(v) for v in value] if f.name in AXES else value
        return out


# The scalar settings of a run, typed like component options (see diffbench.registry.Option).
RUN_OPTIONS = {"num_samples": Option(1000, min=1), "batch_size": Option(0, min=0), "seed": Option(0, min=0, max=2**62),
               "repeats": Option(3, min=1), "device": Option("auto", choices=DEVICES),
               "attention": Option("sdpa", choices=ATTENTION), "save_samples": Option(False)}
STEP = Option(10, min=1, max=100_000)  # one entry of run.steps
VALID_KEYS = (*AXES, "steps", *RUN_OPTIONS)
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
    missing = [k for k in ("models", "samplers", "datasets", "steps") if settings.get(k) in (None, "", [])]
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

    steps = []
    for item in _as_list("steps", settings["steps"]):
        try:
            steps.append(STEP.convert(item))
        except ValueError as exc:
            raise ConfigError(f"run.steps: {item!r} {exc}") from None

    scalars = convert_options("run", RUN_OPTIONS, {k: v for k, v in settings.items() if k in RUN_OPTIONS and v is not None})
    return RunConfig(**axes, steps=steps, **scalars)


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


def load_datasets(registry: Registry, config: RunConfig) -> dict[str, DataSource]:
    """Every dataset of the grid, loaded before anything runs or is created: a missing path or a
    truncated or corrupt file is bad input, not a failed cell per model."""
    return {ref.label: load_dataset(registry, ref) for ref in config.datasets}


def check_memory(config: RunConfig, datasets: dict[str, DataSource], available_bytes: int, where: str) -> None:
    """Refuse a grid whose samples cannot fit: per cell the N samples and their x_T are kept, plus
    a batch's working tensors (an estimate from below: networks need more)."""
    batch = min(config.batch_size or config.num_samples, config.num_samples)
    for label, dataset in datasets.items():
        values = math.prod(dataset.shape)
        need = BYTES_PER_VALUE * values * (2 * config.num_samples + WORKING_COPIES * batch)
        if need > available_bytes:
            raise ConfigError(
                f"run.num_samples = {config.num_samples} (batch_size {batch}) on {label} (samples of shape "
                f"{list(dataset.shape)}) needs at least {need / 2**30:.1f} GiB, more than the "
                f"{available_bytes / 2**30:.1f} GiB available {where}; lower --num-samples or --batch-size")
