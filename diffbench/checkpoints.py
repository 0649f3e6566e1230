"""Checkpoints: safetensors (weights) + JSON (config), never unpickled, and the one place that
says where they live.

A model's checkpoint is named after the train command that makes it: ``diffbench train --model M
--dataset D --set k=v`` writes ``M-D[k=v]`` (only options that change the network or its
training objective and differ from the model's defaults appear, sorted), e.g. ``unet-digits``,
``flow-mlp-moons[ot=true]``. :func:`locate_checkpoint` looks in the user cache first
(``$DIFFBENCH_CACHE/checkpoints``, default ``~/.cache/diffbench/checkpoints``), then among the
checkpoints shipped as package data. Training writes to the user cache only (never into the
installed package or a source tree) unless given an explicit ``--out``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save as safetensors_bytes

from diffbench.io import atomic_write_bytes, atomic_write_text
from diffbench.registry import Incompatible, Ref

__all__ = ["CACHE_ENV", "changed_options", "checkpoint_files", "checkpoint_name", "checkpoint_stem", "find_checkpoint",
           "load_checkpoint", "locate_checkpoint", "model_checkpoint", "save_checkpoint", "shipped_dir", "train_command",
           "training_output", "user_cache"]

CACHE_ENV = "DIFFBENCH_CACHE"
LOAD_ONLY_OPTIONS = ("checkpoint",)  # options of every model that do not change what is trained


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` and ``path.json`` atomically; returns the .safetensors path."""
    weights, config_file = checkpoint_files(path)
    weights.parent.mkdir(parents=True, exist_ok=True)

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(weights, safetensors_bytes(tensors))
    atomic_write_text(config_file, json.dumps(config, indent=2, sort_keys=True))
    return weights


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``(tensors, config)`` written by :func:`save_checkpoint`."""
    weights, config = checkpoint_files(path)
    if not weights.is_file():
        raise FileNotFoundError(f"no checkpoint at {weights}")
    return load_file(str(weights), device=str(device)), json.loads(config.read_text()) if config.is_file() else {}


def checkpoint_stem(path: str | Path) -> Path:
    """The path without a .safetensors / .json suffix (``with_suffix`` would cut a name with a
    dot in it, e.g. ``...[scale=0.5]``)."""
    path = Path(path)
    return path.with_name(path.name[: -len(path.suffix)]) if path.suffix in (".safetensors", ".json") else path


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """``(<stem>.safetensors, <stem>.json)``: the weights and the config of a checkpoint."""
    stem = checkpoint_stem(path)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def user_cache() -> Path:
    """Where ``diffbench train`` writes checkpoints: ``$DIFFBENCH_CACHE/checkpoints`` or ``~/.cache/diffbench/checkpoints``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "diffbench") / "checkpoints"


def shipped_dir() -> Path:
    """The checkpoints shipped with the built-in plugins (package data of ``diffbench_plugins``)."""
    import diffbench_plugins

    return Path(diffbench_plugins.__file__).parent / "checkpoints"


def checkpoint_name(model: str, dataset: str, options: Mapping[str, Any] | None = None,
                    defaults: Mapping[str, Any] | None = None, *, ignore: tuple[str, ...] = ()) -> str:
    """``M-D[k=v,...]``: the checkpoint of ``diffbench train --model M --dataset D --set k=v ...``.

    Only options that are in ``defaults``, differ from it and are not load-only (``checkpoint``
    and ``ignore``, e.g. ``clip_denoised``) appear; ``/`` in a value becomes ``_``.
    """
    changed = changed_options(options or {}, defaults or {}, ignore)
    safe = {k: re.sub(r"[/\\]", "_", v) if isinstance(v, str) else v for k, v in sorted(changed.items())}
    return Ref(f"{model}-{dataset}", tuple(safe.items())).label


def changed_options(options: Mapping[str, Any], defaults: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> dict:
    """The options of ``options`` that the model declares (in ``defaults``), that are not
    load-only and that differ from their defaults: what a checkpoint's name and train command show."""
    return {k: v for k, v in options.items()
            if k in defaults and k not in (*LOAD_ONLY_OPTIONS, *ignore) and v != defaults[k]}


def train_command(model: str, dataset: str, options: Mapping[str, Any], defaults: Mapping[str, Any],
                  ignore: tuple[str, ...] = ()) -> str:
    """The ``diffbench train`` command that makes the checkpoint for these (non-default) options."""
    sets = [f"--set {k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in changed_options(options, defaults, ignore).items()]
    return " ".join([f"diffbench train --model {model} --dataset {dataset}", *sets])


def model_checkpoint(model: str, dataset: str, options: Mapping[str, Any], defaults: Mapping[str, Any], *,
                     ignore: tuple[str, ...] = (), shipped: Path | None = None) -> Path:
    """:func:`locate_checkpoint` for a model's options: the name and the train command come from
    the options that differ from ``defaults``; ``options["checkpoint"]``, if set, is used as is."""
    return locate_checkpoint(checkpoint_name(model, dataset, options, defaults, ignore=ignore),
                             explicit=options.get("checkpoint") or "", shipped=shipped,
                             train_hint=train_command(model, dataset, options, defaults, ignore))


def locate_checkpoint(name: str, *, explicit: str | Path = "", train_hint: str = "",
                      shipped: Path | None = None) -> Path:
    """The path (without suffix) of checkpoint ``name``: ``explicit`` if given, else the user
    cache's, else the shipped one (``shipped``: a third-party plugin's own folder). Raises
    :class:`~diffbench.registry.Incompatible` (a skipped cell) naming where it looked and
    ``train_hint``, the command that makes it."""
    candidates = [checkpoint_stem(explicit)] if explicit else [user_cache() / name, (shipped or shipped_dir()) / name]
    for path in candidates:
        if checkpoint_files(path)[0].is_file():
            return path
    looked = " or ".join(f"{p}.safetensors" for p in candidates)
    raise Incompatible(f"no checkpoint {name!r} at {looked}" + (f"; run: {train_hint}" if train_hint else ""))


def find_checkpoint(name: str, *, shipped: Path | None = None) -> Path | None:
    """Like :func:`locate_checkpoint`, but None when there is none."""
    try:
        return locate_checkpoint(name, shipped=shipped)
    except Incompatible:
        return None


def training_output(name: str, out: str | Path | None = None) -> Path:
    """Where training writes checkpoint ``name``: ``out`` if given (e.g. a file to ship), else the user cache."""
    return checkpoint_stem(out) if out else user_cache() / name
