"""The run configuration (bench.toml + CLI flags) and its expansion into cells.

Every axis is a list. Validation errors name the key, the bad value and the valid choices.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from diffbench.fastpath import FastPath, compile_mode
from diffbench.process import SPACINGS
from diffbench.registry import ConfigError, Ref, Registry, split_list

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
    # The network's fast path (diffbench.fastpath).
    dtype: str = "fp32"
    compile: str = "off"
    cuda_graphs: bool = False

    @property
    def fast_path(self) -> FastPath:
        return FastPath(self.dtype, self.compile, self.cuda_graphs)

    def cells(self) -> list[Cell]:
        return [Cell(*combo) for combo in itertools.product(self.models, self.samplers, self.guidance,
                                                             self.datasets, self.steps)]

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = [str(v) for v in value] if f.name in AXES else value
        return out


SCALARS = {"num_samples": int, "batch_size": int, "seed": int, "repeats": int, "device": str,
           "attention": str, "save_samples": bool,
           "dtype": str, "compile": compile_mode, "cuda_graphs": bool}
VALID_KEYS = (*AXES, "steps", *SCALARS)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The ``[run]`` table of a config file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    unknown_tables = sorted(set(data) - {"run"})
    if unknown_tables:
        raise ConfigError(f"{path}: unknown table [{unknown_tables[0]}]; valid tables: [run]")
    return dict(data.get("run", {}))


def _as_list(key: str, value: Any) -> list:
    if isinstance(value, str):
        return split_list(value)
    if isinstance(value, list):
        return value
    raise ConfigError(f"run.{key} must be a list, got {value!r}")


def build_config(registry: Registry, settings: dict[str, Any]) -> RunConfig:
    """Validate merged settings (file values overridden by flags) into a RunConfig."""
    unknown = sorted(set(settings) - set(VALID_KEYS))
    if unknown:
        raise ConfigError(f"unknown key run.{unknown[0]} = {settings[unknown[0]]!r}; valid keys: {', '.join(VALID_KEYS)}")
    missing = [k for k in ("models", "samplers", "datasets", "steps") if not settings.get(k)]
    if missing:
        raise ConfigError(f"run.{missing[0]} is required (in the config file or as --{missing[0]})")

    axes = {}
    for kind in AXES:
        values = _as_list(kind, settings.get(kind, ["none"] if kind == "guidance" else []))
        refs = []
        for item in values:
            if not isinstance(item, str):
                raise ConfigError(f"run.{kind}: entries must be strings, got {item!r}")
            try:
                refs.append(registry.resolve(kind, item))
            except ConfigError as exc:
                raise ConfigError(f"run.{kind}: {exc}") from None
        axes[kind] = refs
    for ref in axes["samplers"]:
        spacing = dict(ref.options).get("spacing")
        if spacing is not None and spacing not in SPACINGS:
            raise ConfigError(f"run.samplers: {ref.label}: unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")

    steps = []
    for item in _as_list("steps", settings["steps"]):
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise ConfigError(f"run.steps: {item!r} is not an integer") from None
        if isinstance(item, float) and item != value or value < 1:
            raise ConfigError(f"run.steps: {item!r} must be a positive integer")
        steps.append(value)

    scalars = {}
    for key, cast in SCALARS.items():
        if key not in settings or settings[key] is None:
            continue
        value = settings[key]
        if cast is bool and not isinstance(value, bool) or cast is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"run.{key} must be {cast.__name__}, got {value!r}")
        scalars[key] = cast(value)
    for key in ("num_samples", "repeats"):
        if scalars.get(key, 1) < 1:
            raise ConfigError(f"run.{key} must be >= 1, got {scalars[key]}")
    if scalars.get("batch_size", 0) < 0:
        raise ConfigError(f"run.batch_size must be >= 0, got {scalars['batch_size']}")
    if scalars.get("device", "auto") not in DEVICES:
        raise ConfigError(f"run.device: {scalars['device']!r} is not one of {', '.join(DEVICES)}")
    if scalars.get("attention", "sdpa") not in ATTENTION:
        raise ConfigError(f"run.attention: {scalars['attention']!r} is not one of {', '.join(ATTENTION)}")
    config = RunConfig(**axes, steps=steps, **scalars)
    config.fast_path  # validates dtype, compile and cuda_graphs (ConfigError names the key)
    return config
