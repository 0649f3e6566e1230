"""The run configuration (bench.toml + CLI flags) and its expansion into cells.

Every axis is a list. Validation errors name the key, the bad value and the valid choices.
Settings come from CLI flags, else the config file (``--config`` or ``./bench.toml``), else the
grid embedded in the package (``default_grid.toml``, used only when there is no config file).
When neither flags nor config name datasets, each model runs on its own default datasets.
"""
from __future__ import annotations

import itertools
from urllib.parse import quote
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from diffbench.checkpoints import checkpoint_name, find_checkpoint
from diffbench.process import SPACINGS
from diffbench.registry import ConfigError, Ref, Registry, split_list

DEFAULT_GRID = Path(__file__).with_name("default_grid.toml")
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
        """A file-system-safe id that keeps every character that tells cells apart, e.g.
        ``mlp__ddim[eta=1.0]__none__moons__10`` and ``unet__dpm-solver++__cfg[scale=3.0]__digits__10``;
        anything else (``/``, spaces, ``%``) is percent-encoded, so two cells never share a file."""
        parts = [self.model.label, self.sampler.label, self.guidance.label, self.dataset.label, str(self.steps)]
        return "__".join(quote(p, safe="+=,[]-.") for p in parts)


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
    model_datasets: dict[str, list[Ref]] = field(default_factory=dict)  # model label -> datasets, if no datasets

    def datasets_of(self, model: Ref) -> list[Ref]:
        return self.datasets or self.model_datasets[model.label]

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


SCALARS = {"num_samples": int, "batch_size": int, "seed": int, "repeats": int, "device": str,
           "attention": str, "save_samples": bool}
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
    missing = [k for k in ("models", "samplers", "steps") if not settings.get(k)]
    if missing:
        raise ConfigError(f"run.{missing[0]} is required (in the config file or as --{missing[0]})")

    axes = {}
    for kind in AXES:
        values = _as_list(kind, settings.get(kind) or (["none"] if kind == "guidance" else []))
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
    model_datasets = {} if axes["datasets"] else {m.label: default_datasets(registry, m) for m in axes["models"]}
    return RunConfig(**axes, steps=steps, **scalars, model_datasets=model_datasets)


def default_datasets(registry: Registry, model: Ref) -> list[Ref]:
    """The datasets a model runs on when nobody names any: those it declares (``Model.datasets``),
    else those its checkpoints cover (``<model>-<dataset>[<its options>]`` in the user cache or shipped)."""
    component = registry.get("models", model.name)

    def covered(options: dict) -> list[str]:
        return [name for name in registry.names("datasets")
                if find_checkpoint(checkpoint_name(model.name, name, options, component.options)) is not None]

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
