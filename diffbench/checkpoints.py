"""Checkpoints as safetensors (weights) + JSON (config): loading never unpickles anything."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save as safetensors_bytes

from diffbench.io import atomic_write_bytes, atomic_write_text


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` and ``path.json`` atomically; returns the .safetensors path."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path.with_suffix(".safetensors"), safetensors_bytes(tensors))
    atomic_write_text(path.with_suffix(".json"), json.dumps(config, indent=2, sort_keys=True))
    return path.with_suffix(".safetensors")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``(tensors, config)`` written by :func:`save_checkpoint`."""
    path = Path(path).with_suffix("")
    weights, config = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not weights.is_file():
        raise FileNotFoundError(f"no checkpoint at {weights}")
    return load_file(str(weights), device=str(device)), json.loads(config.read_text()) if config.is_file() else {}



