"""Named components that plugins register, and the references users write to pick them.

Every component has a unique kebab-case ``name``, a one-line ``description``, the ``family``
it works on and its ``options`` with defaults. Families:

* models and samplers: ``"gaussian"`` (continuous Gaussian processes: VP, VE/EDM, flow)
  or ``"masked"`` (absorbing-state discrete diffusion);
* guidance: the model family it applies to (``"any"`` for ``none``);
* datasets and metrics: the data modality, ``"points"``, ``"image"`` or ``"text"``.

Users pick components with references: ``ddim``, ``ddim[eta=1.0,spacing=karras]``, or for a
component with a ``primary`` option the short form ``cfg:3.0`` (= ``cfg[scale=3.0]``).

Options are typed. A plain default (``{"eta": 0.0}``) gives the option the default's type; an
:class:`Option` adds the values it may take (``Option(2, choices=(1, 2, 3))``,
``Option(0.0, min=0.0)``). Resolving a reference converts and checks every value, so a bad one
is a :class:`ConfigError` (exit 2) before anything runs, and plugins receive typed values.

A component may declare ``aliases``, the other names people type for it, each with preset
options: ``dpm`` is ``dpm-solver++`` with ``variant=2m``. An alias resolves to the canonical name
(which is what result rows record); the user's own options override the alias's presets.
Lookups also forgive case and ``_`` for ``-`` (``DPM_Solver++`` finds ``dpm-solver++``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["KINDS", "FAMILIES", "Component", "Model", "Sampler", "Guidance", "Dataset", "Metric", "Incompatible",
           "ConfigError", "Ref", "Registry", "parse_ref", "split_list", "normalize_name"]

KINDS = ("models", "samplers", "guidance", "datasets", "metrics")
FAMILIES = {
    "models": ("gaussian", "masked"),
    "samplers": ("gaussian", "masked"),
    "guidance": ("gaussian", "masked", "any"),
    "datasets": ("points", "image", "text"),
    "metrics": ("points", "image", "text"),
}
SINGULAR = {"models": "model", "samplers": "sampler", "guidance": "guidance", "datasets": "dataset",
            "metrics": "metric"}
_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*\+*$")  # kebab-case; a "++" suffix as in dpm-solver++


class Incompatible(Exception):
    """Raised by a component when a cell cannot run (the cell is recorded as ``skipped``)."""


class ConfigError(ValueError):
    """Bad user input (unknown name, bad option, bad config key): exit status 2."""


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


@dataclass(frozen=True)
class Option:
    """A component option: its ``default`` (whose type, bool / int / float / str, the option
    takes) and optionally the ``choices`` it may take or an inclusive range ``min``..``max``."""

    default: Any
    choices: tuple = ()
    min: float | None = None
    max: float | None = None

    @property
    def type(self) -> type:
        return type(self.default if self.default is not None or not self.choices else self.choices[0])

    def describe(self) -> str:
        """``2 (1|2|3)``, ``0.0 (>= 0.0)``: the default and what is valid, for ``diffbench list``."""
        valid = "|".join(_fmt(c) for c in self.choices)
        if self.min is not None or self.max is not None:
            valid = " ".join(f"{op} {v}" for op, v in ((">=", self.min), ("<=", self.max)) if v is not None)
        return _fmt(self.default) + (f" ({valid})" if valid else "")

    def convert(self, value: Any) -> Any:
        """The typed value of ``value`` (a string from the command line, or a Python/TOML value);
        ValueError saying what is valid otherwise."""
        kind = self.type
        if isinstance(value, str) and kind is not str:
            value = _from_text(value.strip(), kind)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if self.default is not None and (not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)):
            raise ValueError(f"must be {_TYPE_NAMES.get(kind, kind.__name__)}")
        if kind is float and math.isnan(value):
            raise ValueError("must be a number, not nan")
        if self.choices and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(_fmt(c) for c in self.choices)}")
        if self.min is not None and value < self.min or self.max is not None and value > self.max:
            raise ValueError(f"must be in [{self.min if self.min is not None else '-inf'}, "
                             f"{self.max if self.max is not None else 'inf'}]")
        return value


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _from_text(text: str, kind: type) -> Any:
    """Parse command-line text as ``kind``; the text itself when it does not parse (convert then says why)."""
    if kind is bool:
        return True if text.lower() in _TRUE else False if text.lower() in _FALSE else text
    try:
        return kind(text) if kind in (int, float) else text
    except ValueError:
        return text


def option_specs(options: dict[str, Any]) -> dict[str, Option]:
    """Every option as an :class:`Option` (a plain default becomes ``Option(default)``)."""
    return {key: value if isinstance(value, Option) else Option(value) for key, value in options.items()}


def convert_options(owner: str, specs: dict[str, Option], values: dict[str, Any], *, table: bool = False) -> dict[str, Any]:
    """Typed ``values``; a ConfigError naming ``owner``, the key, the value and what is valid otherwise
    (``table``: ``owner`` is a config table, so a key is named as ``owner.key``, e.g. ``run.seed``)."""
    unknown = sorted(set(values) - set(specs))
    if unknown:
        valid = ", ".join(sorted(specs)) or "(none)"
        raise ConfigError(f"{owner} has no option {unknown[0]!r}; valid options: {valid}")
    typed = {}
    for key, value in values.items():
        try:
            typed[key] = specs[key].convert(value)
        except ValueError as exc:
            name = f"{owner}.{key}" if table else f"{owner}: option {key}"
            raise ConfigError(f"{name}={value!r} {exc}") from None
    return typed


@dataclass(frozen=True)
class Component:
    name: str
    description: str
    family: str
    options: dict[str, Any] = field(default_factory=dict)
    primary: str | None = None  # option set by the short form "name:value"
    plugin: str = ""  # filled in by the host: the plugin (and distribution) that registered it
    # Other names for this component: a list of names, or {alias: {option: preset value}}.
    aliases: tuple[str, ...] | dict[str, dict[str, Any]] = ()

    kind = ""

    def __post_init__(self):
        if not _NAME_RE.match(self.name):
            raise ValueError(f"component name {self.name!r} must be kebab-case (a-z, 0-9, '-', optional '+' suffix)")
        if self.family not in FAMILIES[self.kind]:
            raise ValueError(
                f"{SINGULAR[self.kind]} {self.name!r}: family {self.family!r} is not one of {FAMILIES[self.kind]}"
            )
        if self.primary is not None and self.primary not in self.options:
            raise ValueError(f"{self.name!r}: primary option {self.primary!r} is not among its options")
        for key, spec in self.specs.items():
            try:
                spec.convert(spec.default)
            except ValueError as exc:
                raise ValueError(f"{self.name!r}: default of option {key!r} {exc}") from None
        aliases = self.aliases if isinstance(self.aliases, dict) else {alias: {} for alias in self.aliases}
        for alias, presets in aliases.items():
            if alias == self.name:
                raise ValueError(f"{self.name!r}: an alias equal to the name is redundant")
            if not _NAME_RE.match(alias):
                raise ValueError(f"{self.name!r}: alias {alias!r} must be kebab-case (a-z, 0-9, '-', optional '+' suffix)")
        object.__setattr__(self, "aliases", {alias: dict(presets) for alias, presets in aliases.items()})

    @property
    def specs(self) -> dict[str, Option]:
        """Every option as an :class:`Option`."""
        return option_specs(self.options)

    @property
    def defaults(self) -> dict[str, Any]:
        return {key: spec.default for key, spec in self.specs.items()}


@dataclass(frozen=True)
class Model(Component):
    """``load(dataset: DataSource, *, device, **options) -> Denoiser | MaskedDenoiser``.

    ``train(dataset, out: Path, *, device, **options)`` (optional) trains it and writes a
    checkpoint; ``diffbench train`` calls it.

    ``datasets``: what the model runs on when neither flags nor config name datasets. Empty (the
    default): the datasets its checkpoints cover (:func:`diffbench.grid.default_datasets`).

    ``validate(**options)`` (optional) checks the files the model would load (a weights directory,
    a prompts file), quickly, and raises ConfigError naming the bad one; ``diffbench run`` calls
    it before it creates anything.
    """

    load: Callable[..., Any] = None
    train: Callable[..., Any] | None = None
    datasets: tuple[str, ...] = ()
    validate: Callable[..., Any] | None = None
    kind = "models"


@dataclass(frozen=True)
class Sampler(Component):
    """``fn(denoiser, x, timesteps, *, generator, callback=None, **options) -> Tensor``.

    ``requires`` names model capabilities the sampler needs (e.g. ``{"consistency"}``): a
    model whose denoiser lacks one gives a ``skipped`` cell. ``spacing`` is the default
    timestep spacing rule (see :func:`diffbench.process.GaussianProcess.timesteps`).
    """

    fn: Callable[..., Any] = None
    requires: frozenset = frozenset()
    spacing: str = "uniform"
    kind = "samplers"


@dataclass(frozen=True)
class Guidance(Component):
    """``apply(denoiser, **options) -> guided denoiser``; ``conditional`` guidance needs a
    class-conditional model (else the cell is skipped)."""

    apply: Callable[..., Any] = None
    conditional: bool = True
    kind = "guidance"


@dataclass(frozen=True)
class Dataset(Component):
    """``load(**options) -> diffbench.data.DataSource``.

    ``validate(**options)`` (optional) checks the paths and files the dataset would read, quickly,
    and raises ConfigError naming the missing, truncated or corrupt one; ``diffbench run`` calls
    it (then ``load``) before it creates anything.
    """

    load: Callable[..., Any] = None
    validate: Callable[..., None] | None = None
    kind = "datasets"


@dataclass(frozen=True)
class Metric(Component):
    """``compute(samples, ctx: MetricContext, **options) -> float | dict[str, float]``.

    ``samples`` is one tensor [N, *shape] of all the cell's samples; with ``streaming=True`` it is a
    :class:`diffbench.samples.SampleSet` instead, to read batch by batch (image samples are then
    never all in memory at once). ``higher_is_better`` tells ``diffbench compare`` and the plots
    which direction is better: one bool for every column the metric returns, or a dict of column
    name to bool.
    """

    compute: Callable[..., Any] = None
    higher_is_better: bool | dict[str, bool] = False
    streaming: bool = False

    def better_is_higher(self, column: str) -> bool:
        if isinstance(self.higher_is_better, dict):
            return self.higher_is_better.get(column, False)
        return self.higher_is_better
    kind = "metrics"


COMPONENT_CLASSES = {cls.kind: cls for cls in (Model, Sampler, Guidance, Dataset, Metric)}


@dataclass(frozen=True)
class Ref:
    """A user's pick of a component with option overrides, e.g. ``ddim[eta=1.0]``."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}[{','.join(f'{k}={_fmt(v)}' for k, v in self.options)}]"

    def __str__(self) -> str:
        return self.label


def _fmt(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def split_list(text: str) -> list[str]:
    """Split ``a,b[x=1,y=2],c:3`` at the commas that are not inside brackets."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    items.append(current.strip())
    return [item for item in items if item]


def parse_ref(text: str) -> tuple[str, dict[str, str], str | None]:
    """``'ddim[eta=1]'`` -> ``('ddim', {'eta': '1'}, None)``; ``'cfg:3'`` -> ``('cfg', {}, '3')``.
    Values stay text: :meth:`Registry.resolve` converts them to each option's type."""
    text = text.strip()
    match = re.fullmatch(r"([^\[\]:]+)(?::([^\[\]]+))?(?:\[(.*)\])?", text)
    if not match:
        raise ConfigError(f"cannot parse component reference {text!r}; use name, name:value or name[key=value,...]")
    name, short, body = match.group(1).strip(), match.group(2), match.group(3)
    options = {}
    for pair in split_list(body or ""):
        if "=" not in pair:
            raise ConfigError(f"in {text!r}: option {pair!r} must be key=value")
        key, value = pair.split("=", 1)
        options[key.strip()] = value.strip()
    return name, options, (short.strip() if short is not None else None)


def normalize_name(name: str) -> str:
    """The forgiving form of a typed name: lower case, ``_`` and spaces as ``-``."""
    return re.sub(r"[_\s]+", "-", name.strip().lower())


class Registry:
    """All registered components, by kind and name (and by alias)."""

    def __init__(self):
        self._by_kind: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self._aliases: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}  # alias -> its component

    def add(self, component: Component) -> None:
        if isinstance(component, Sampler) and component.family == "gaussian" and "spacing" not in component.options:
            from diffbench.process import SPACINGS  # process.py imports this module

            # Every Gaussian sampler takes the timestep spacing rule as an option.
            spacing = Option(component.spacing, choices=SPACINGS)
            component = dataclasses.replace(component, options={**component.options, "spacing": spacing})
        table = self._by_kind[component.kind]
        if component.name in table:
            other = table[component.name]
            raise ConfigError(
                f"duplicate {SINGULAR[component.kind]} name {component.name!r}: registered by "
                f"{other.plugin or '?'} and again by {component.plugin or '?'}"
            )
        for name in (component.name, *component.aliases):
            self._refuse_collision(component, name)
        for alias, presets in component.aliases.items():
            unknown = sorted(set(presets) - set(component.options))
            if unknown:
                raise ConfigError(f"{SINGULAR[component.kind]} {component.name!r}: alias {alias!r} presets unknown option "
                                  f"{unknown[0]!r}; valid options: {', '.join(sorted(component.options))}")
        table[component.name] = component
        self._aliases[component.kind].update({alias: component for alias in component.aliases})

    def _refuse_collision(self, component: Component, name: str) -> None:
        """A name or alias may mean one component only: refuse one already taken, naming both owners."""
        kind, what = component.kind, ("name" if name == component.name else "alias")
        other = self._by_kind[kind].get(name) or self._aliases[kind].get(name)
        if other is None:
            return
        taken = "the name" if name == other.name else f"an alias of {SINGULAR[kind]} {other.name!r}"
        raise ConfigError(
            f"{SINGULAR[kind]} {what} {name!r} of {component.name!r} (plugin {component.plugin or '?'}) collides with "
            f"{taken} (plugin {other.plugin or '?'})"
        )

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def all(self, kind: str) -> list[Component]:
        return [self._by_kind[kind][name] for name in self.names(kind)]

    def aliases(self, kind: str) -> dict[str, Component]:
        """Every alias of this kind and the component it names."""
        return dict(sorted(self._aliases[kind].items()))

    def _find(self, kind: str, name: str) -> tuple[Component, dict[str, Any]]:
        """The component a typed name means (its name or an alias, forgiving case and ``_``) and
        the alias's presets that differ from the component's defaults."""
        for key in dict.fromkeys((name, normalize_name(name))):
            if key in self._by_kind[kind]:
                return self._by_kind[kind][key], {}
            if key in self._aliases[kind]:
                component = self._aliases[kind][key]
                return component, {k: v for k, v in component.aliases[key].items() if component.defaults.get(k) != v}
        known = [*self.names(kind), *self._aliases[kind]]
        close = difflib.get_close_matches(normalize_name(name), known, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        valid = ", ".join(self.names(kind)) or "(none registered)"
        aliases = f" (aliases: {', '.join(self.aliases(kind))})" if self._aliases[kind] else ""
        raise ConfigError(f"unknown {SINGULAR[kind]} {name!r}; valid {kind}: {valid}{aliases}{hint}")

    def get(self, kind: str, name: str) -> Component:
        """The component named ``name`` or one of its aliases."""
        return self._find(kind, name)[0]

    def resolve(self, kind: str, text: str) -> Ref:
        """Parse a reference and check its name and options against the registry. An alias
        resolves to its component's canonical name with the alias's presets as options."""
        name, options, short = parse_ref(text)
        component, presets = self._find(kind, name)
        name = component.name
        if short is not None:
            if component.primary is None:
                raise ConfigError(f"{SINGULAR[kind]} {name!r} takes no short value ({text!r}); use {name}[key=value]")
            options = {component.primary: short, **options}
        options = convert_options(f"{SINGULAR[kind]} {name!r}", component.specs, {**presets, **options})
        return Ref(name, tuple(sorted(options.items())))

    def options(self, kind: str, ref: Ref) -> dict[str, Any]:
        """The component's defaults overridden by the reference's options."""
        return {**self.get(kind, ref.name).defaults, **dict(ref.options)}


def with_plugin(component: Component, plugin: str) -> Component:
    return dataclasses.replace(component, plugin=plugin)
