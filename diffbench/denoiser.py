"""One denoiser contract for every model: D(x, t, cond) -> predicted x0.

A model declares its parameterization and the process it was trained on; :class:`Denoiser`
converts the raw network output to the x0 prediction and derives ε, the score or the
flow velocity from it. Samplers talk only to ``D`` and ``D.process``. Every network call
is counted (``D.nfe``), so results report NFE rather than "steps".

With x_t = α x0 + σ ε the conversions are (Salimans & Ho 2022 for v; Lipman et al. 2023
for the velocity u = α' x0 + σ' ε; Song et al. 2021 for the score ∇log p = −ε/σ):

    eps:         x0 = (x − σ ε̂) / α
    x0 / consistency:  x0 = output
    v = α ε − σ x0:    x0 = (α x − σ v) / (α² + σ²)
    velocity u:        x0 = (σ' x − σ u) / (α σ' − σ α')
    score s:           x0 = (x + σ² s) / α
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from diffbench.process import GaussianProcess

__all__ = ["PARAMETERIZATIONS", "Denoiser", "MaskedDenoiser", "append_dims"]

PARAMETERIZATIONS = ("eps", "x0", "v", "velocity", "score", "consistency")


class NetworkError(Exception):
    """The model's network raised, or returned something that is not an output for its input.
    Raised where the network is called, so the runner blames the model, not the sampler,
    guidance or metric that happened to call the denoiser."""


def call_network(net: Callable, x: torch.Tensor, t_batch: torch.Tensor, cond, same_shape: bool) -> torch.Tensor:
    """``net(x, t_batch, cond)``, checked: a tensor of x's shape (``same_shape``) or with x's shape
    as its leading dimensions (logits [B, L, V] for tokens [B, L])."""
    try:
        out = net(x, t_batch, cond)
    except Exception as exc:
        raise NetworkError(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor):
        raise NetworkError(f"network returned {type(out).__name__}, expected a tensor")
    if (tuple(out.shape) if same_shape else tuple(out.shape[:x.ndim])) != tuple(x.shape):
        raise NetworkError(f"network returned shape {list(out.shape)} for input of shape {list(x.shape)}")
    if not out.is_floating_point():
        raise NetworkError(f"network returned dtype {out.dtype}, expected a floating-point tensor")
    return out


@dataclass
class CallStats:
    """Model calls and the time spent in them, shared by a denoiser and its bound copies."""

    nfe: int = 0
    model_seconds: float = 0.0
    _cuda_events: list = field(default_factory=list)

    def reset(self) -> None:
        self.nfe, self.model_seconds, self._cuda_events = 0, 0.0, []

    def timed_call(self, net: Callable, x: torch.Tensor, t, cond, same_shape: bool = True):
        """One counted, checked network call (:func:`call_network`) with t broadcast to the batch as
        float32; its time is recorded with CUDA events (read later, no sync) or perf_counter.
        A host time becomes a device fill (a scalar) or an asynchronous copy: a blocking
        host-to-device copy would synchronise every sampler step."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 0:
            t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        else:
            t_batch = t.to(device=x.device, dtype=torch.float32, non_blocking=True)
        self.nfe += 1
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = call_network(net, x, t_batch, cond, same_shape)
            end.record()
            self._cuda_events.append((start, end))
            return out
        tic = time.perf_counter()
        out = call_network(net, x, t_batch, cond, same_shape)
        self.model_seconds += time.perf_counter() - tic
        return out

    def model_time(self) -> float:
        """Seconds spent in the network; CUDA events are read only here (no per-step sync)."""
        if self._cuda_events:
            torch.cuda.synchronize()
            self.model_seconds += sum(a.elapsed_time(b) for a, b in self._cuda_events) / 1e3
            self._cuda_events = []
        return self.model_seconds


def append_dims(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
    """A [B] float64 coefficient as a tensor broadcastable against x, in x's dtype; a 0-d one as
    a Python float (host schedule scalars must not be copied to the device: that synchronises)."""
    if coef.ndim == 0 and coef.device.type == "cpu":
        return float(coef)
    coef = coef.to(device=x.device, dtype=x.dtype, non_blocking=True)
    return coef.reshape(-1, *([1] * (x.ndim - 1))) if coef.ndim == 1 else coef


class Denoiser:
    """Wraps ``net(x [B,...], t [B], cond [B] | None) -> raw output`` into ``D(x, t, cond) -> x0``.

    ``t`` is a float (or 0-d / [B] tensor) in the process's own time. ``capabilities`` lists
    what a sampler may require (``"consistency"`` for consistency heads). ``num_classes`` > 0
    marks a class-conditional model; ``null_class`` is its unconditional label (for CFG).
    """

    family = "gaussian"

    def __init__(
        self,
        net: Callable,
        process: GaussianProcess,
        parameterization: str,
        *,
        num_classes: int = 0,
        null_class: int | None = None,
        capabilities=(),
        name: str = "",
    ):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")
        self.net = net
        self.process = process
        self.parameterization = parameterization
        self.num_classes = num_classes
        self.null_class = null_class
        self.capabilities = frozenset(capabilities) | ({"consistency"} if parameterization == "consistency" else set())
        self.name = name
        self.cond = None
        self.stats = CallStats()

    @property
    def nfe(self) -> int:
        return self.stats.nfe

    def conditioned(self, cond) -> "Denoiser":
        """A view of this denoiser with ``cond`` bound (sharing the call counter)."""
        view = copy.copy(self)
        view.cond = cond
        return view

    def raw(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """One counted network call at time t (broadcast to the batch)."""
        return self.stats.timed_call(self.net, x, t, self.cond if cond is None else cond)

    def __call__(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        return self.to_x0(x, t, self.raw(x, t, cond))

    def to_x0(self, x: torch.Tensor, t, out: torch.Tensor) -> torch.Tensor:
        """Convert a raw network output at (x, t) into the x0 prediction (formulas above)."""
        out = out.to(x.dtype)
        p = self.parameterization
        if p in ("x0", "consistency"):
            return out
        a, s = (append_dims(c, x) for c in (self.process.alpha(t), self.process.sigma(t)))
        if p == "eps":
            return (x - s * out) / a
        if p == "v":
            return (a * x - s * out) / (a**2 + s**2)
        if p == "score":
            return (x + s**2 * out) / a
        da, ds = (append_dims(c, x) for c in self.process.alpha_sigma_derivatives(t))
        return (ds * x - s * out) / (a * ds - s * da)  # velocity

    # Derived predictions: each is one counted model call.
    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """ε̂ = (x − α x̂0) / σ."""
        a, s = (append_dims(c, x) for c in (self.process.alpha(t), self.process.sigma(t)))
        return (x - a * self(x, t, cond)) / s

    def score(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """∇ log p_t(x) = −ε̂ / σ = (α x̂0 − x) / σ²."""
        a, s = (append_dims(c, x) for c in (self.process.alpha(t), self.process.sigma(t)))
        return (a * self(x, t, cond) - x) / s**2

    def velocity(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """dx/dt of the probability-flow path: u = α' x̂0 + σ' ε̂."""
        a, s = (append_dims(c, x) for c in (self.process.alpha(t), self.process.sigma(t)))
        da, ds = (append_dims(c, x) for c in self.process.alpha_sigma_derivatives(t))
        x0 = self(x, t, cond)
        return da * x0 + ds * (x - a * x0) / s


class MaskedDenoiser:
    """Masked (absorbing-state) discrete diffusion: ``net(tokens [B,L], t [B], cond) -> logits [B,L,V]``.

    ``mask_id`` is the absorbing token; ``schedule`` gives the masking probability at time t:
    ``schedule.alpha(t)`` is the probability that a token is still unmasked at t (α(0) = 1,
    α(1) = 0) and ``schedule.weight(t) = −α'(t) / (1 − α(t))`` the ELBO weight. ``prompt``
    (token ids [P] or None) is a prefix that samplers write into every sample and never change.
    Calls are counted like :class:`Denoiser`.
    """

    family = "masked"

    def __init__(self, net: Callable, *, vocab_size: int, mask_id: int, schedule=None, num_classes: int = 0,
                 capabilities=(), name: str = "", prompt: torch.Tensor | None = None):
        self.net = net
        self.vocab_size, self.mask_id, self.schedule, self.prompt = vocab_size, mask_id, schedule, prompt
        self.num_classes = num_classes
        self.null_class = None
        self.capabilities = frozenset(capabilities)
        self.name = name
        self.cond = None
        self.stats = CallStats()

    nfe = Denoiser.nfe
    conditioned = Denoiser.conditioned

    def __call__(self, tokens: torch.Tensor, t, cond=None) -> torch.Tensor:
        """Logits [B, L, V] (float32): one counted network call."""
        return self.stats.timed_call(self.net, tokens, t, self.cond if cond is None else cond, same_shape=False).float()
