"""One way to generate samples: draw x_T by sample index, bind class labels, call the sampler.

Used by the grid runner, the evidence scripts and the tests, so that "sample i" means the same
thing everywhere: its starting noise depends only on (seed, i), its class label is i mod K for a
class-conditional model, and its x_T has the scale of the process at the grid's first time.

Sampler callbacks (every family) receive one dict per step::

    {"i": step index, "x": the state after the step, "t": t_cur, "t_next": t_next,
     "denoised": the x̂0 prediction the step used (None if it used none)}

plus ``"logits"`` [B, L, V] for masked samplers; :func:`report_step` builds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from diffbench.rng import SampleGenerators

__all__ = ["Generation", "class_labels", "generate", "initial_noise", "report_step"]


@dataclass
class Generation:
    x_T: torch.Tensor  # [N, *shape] starting noise (or fully masked tokens)
    samples: torch.Tensor  # [N, *shape]
    labels: torch.Tensor | None  # [N] class labels the model was conditioned on


def initial_noise(denoiser, shape: Sequence[int], generators: SampleGenerators, t_start) -> torch.Tensor:
    """x_T [N, *shape]: N(0, s²) with s = sqrt(α² + σ²) at the grid's first time ``t_start`` — the
    std of x_t for unit-variance data, so a grid that starts below t_max (``leading`` spacing,
    EDM/VE and flow processes) starts at the right scale — or all-mask tokens for a masked model."""
    if denoiser.family == "gaussian":
        return generators.randn(shape) * denoiser.process.prior_std(t_start)
    return torch.full((len(generators), *shape), denoiser.mask_id, dtype=torch.long, device=generators.device)


def class_labels(denoiser, indices: Sequence[int], device="cpu") -> torch.Tensor | None:
    """Sample i gets class i mod K (balanced classes) for a class-conditional model, else None."""
    if not denoiser.num_classes:
        return None
    return torch.tensor(list(indices), device=device) % denoiser.num_classes


@torch.no_grad()
def generate(denoiser, sample_fn: Callable, timesteps: torch.Tensor, indices: Sequence[int], shape: Sequence[int], *,
             seed: int = 0, device="cpu", callback=None, **options) -> Generation:
    """Samples ``indices`` of run ``seed``: ``sample_fn(denoiser.conditioned(labels), x_T, timesteps,
    generator=..., callback=..., **options)`` with x_T from :func:`initial_noise`."""
    generators = SampleGenerators(seed, indices, device)
    x_T = initial_noise(denoiser, shape, generators, timesteps[0])
    labels = class_labels(denoiser, indices, device)
    bound = denoiser.conditioned(labels) if labels is not None else denoiser
    if callback is not None:
        options["callback"] = callback
    samples = sample_fn(bound, x_T.clone(), timesteps, generator=generators, **options)
    return Generation(x_T, samples, labels)


def report_step(callback, i: int, x, t_cur, t_next, denoised=None, **extra) -> None:
    """Call ``callback`` (if any) with the one step dict of the module docstring."""
    if callback is not None:
        callback({"i": i, "x": x, "t": t_cur, "t_next": t_next, "denoised": denoised, **extra})
