"""The fast path of a network: reduced precision, ``torch.compile``, CUDA graphs, channels_last.

It wraps the raw network a :class:`~diffbench.denoiser.Denoiser` calls, so samplers, guidance
and NFE counting see the same ``net(x, t, cond)`` as before, and only the network changes:

* ``dtype`` (``fp32 | bf16 | fp16``): the network runs under ``torch.autocast`` in that dtype
  and returns float32. The sampler state, the schedule (float64) and every update rule stay in
  full precision, as diffusers and k-diffusion keep their latents.
* ``compile`` (``off | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs``):
  ``torch.compile(net, mode=...)``. Compilation happens on the first call of each input shape,
  i.e. in the runner's warm-up, which is timed apart (``compile_s``). The two modes that already
  capture CUDA graphs are ``reduce-overhead`` and ``max-autotune``.
* ``cuda_graphs``: one CUDA graph per input signature (shape, dtype, conditioning), captured on
  the first call after a warm-up, then replayed with the inputs copied into its static buffers.
  CUDA only.
* channels_last: convolutional networks (most parameters in convolutions) on CUDA take NHWC activations (cuDNN's tensor-core
  convolutions); on CPU the layout is left alone (NHWC is not faster there for small maps).

Device support is checked before any work (:func:`check_supported`): CUDA graphs need CUDA,
bf16 on CUDA needs a GPU with bf16 (Ampere or newer); autocast on CPU runs bf16 and fp16.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from diffbench.registry import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # torch.compile captures CUDA graphs itself


@dataclass(frozen=True)
class FastPath:
    """What to apply to a network (the run-config keys ``dtype``, ``compile``, ``cuda_graphs``)."""

    dtype: str = "fp32"
    compile: str = "off"
    cuda_graphs: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"run.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"run.compile: {self.compile!r} is not one of {', '.join(COMPILE_MODES)} "
                              "(true means 'default')")
        if self.cuda_graphs and self.compile in GRAPHED_COMPILE_MODES:
            raise ConfigError(f"run.cuda_graphs: compile mode {self.compile!r} already captures CUDA graphs; "
                              "use cuda_graphs with compile 'off', 'default' or 'max-autotune-no-cudagraphs'")

    @property
    def enabled(self) -> bool:
        return self != FastPath()

    @property
    def fixed_shapes(self) -> bool:
        """Whether the first call of a shape is expensive (compilation, graph capture), so the
        warm-up must use the timed batch's shapes."""
        return self.compile != "off" or self.cuda_graphs


def compile_mode(value) -> str:
    """A config or flag value of ``compile`` as a mode name: true -> 'default', false -> 'off'."""
    if isinstance(value, bool):
        return "default" if value else "off"
    return value


def check_supported(fast: FastPath, device: torch.device) -> None:
    """Refuse (ConfigError: exit 2 before any work) what ``device`` cannot run."""
    if fast.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"run.cuda_graphs: CUDA graphs need a CUDA device; this run is on {device.type}")
    if fast.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"run.dtype: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32")
    if fast.dtype != "fp32" and not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"run.dtype: autocast is not available on {device.type}; use fp32")


def is_convolutional(net: Callable) -> bool:
    """Whether most of the network's parameters are in 2-D convolutions (a U-Net; not a DiT,
    whose only convolution is its patch embedding)."""
    if not isinstance(net, torch.nn.Module):
        return False
    conv = sum(p.numel() for m in net.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters())
    return conv > 0.5 * sum(p.numel() for p in net.parameters())


class CUDAGraphed:
    """Replays one captured CUDA graph per input signature of ``fn(x, t, cond)``.

    The first call of a signature warms ``fn`` up on a side stream (lazy init, cuDNN and Triton
    autotuning must not happen inside a capture), captures it on static copies of the inputs,
    and returns a copy of the static output: the next replay overwrites it, and samplers keep
    earlier outputs (DPM-Solver's history)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None):
        key = (tuple(x.shape), x.dtype, None if cond is None else (tuple(cond.shape), cond.dtype))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t, cond)
        graph, static_inputs, static_out = self.graphs[key]
        for buffer, value in zip(static_inputs, (x, t, cond)):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        return static_out.clone()

    def _capture(self, x, t, cond):
        static_inputs = [None if v is None else v.clone() for v in (x, t, cond)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_inputs)
        return graph, static_inputs, static_out


class OwnedOutputs:
    """Outputs of a ``torch.compile`` mode that replays CUDA graphs, copied out of the graph's
    memory (the next replay overwrites it); each call starts a new graph step."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x, t, cond):
        torch.compiler.cudagraph_mark_step_begin()
        return self.fn(x, t, cond).clone()


class FastNet(torch.nn.Module):
    """``net(x, t, cond)`` under autocast in ``dtype`` (float32 out), optionally channels_last."""

    def __init__(self, net: Callable, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.net, self.dtype, self.channels_last = net, dtype, channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x, t, cond=None):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype == torch.float32:
            return self.net(x, t, cond)
        # No cast cache: each weight is cast once per call anyway, and a CUDA graph capture must
        # not keep casts that the cache frees when the autocast region ends.
        with torch.autocast(x.device.type, dtype=self.dtype, cache_enabled=False):
            out = self.net(x, t, cond)
        return out.float()


def accelerate(net: Callable, fast: FastPath, device: torch.device) -> tuple[Callable, bool]:
    """``net`` with the fast path applied, and whether it runs channels_last."""
    channels_last = device.type == "cuda" and is_convolutional(net)
    if not (fast.enabled or channels_last):
        return net, False
    fn = FastNet(net, DTYPES[fast.dtype], channels_last)
    if fast.compile != "off":
        fn = torch.compile(fn, mode=None if fast.compile == "default" else fast.compile)
        if fast.compile in GRAPHED_COMPILE_MODES and device.type == "cuda":
            fn = OwnedOutputs(fn)
    if fast.cuda_graphs:
        fn = CUDAGraphed(fn)
    return fn, channels_last


def apply_fast_path(denoiser, fast: FastPath, device: torch.device):
    """A copy of ``denoiser`` (any family) whose network runs the fast path; ``denoiser`` itself
    is unchanged. The copy records whether it runs ``channels_last`` (a results column)."""
    net, channels_last = accelerate(denoiser.net, fast, device)
    fast_denoiser = copy.copy(denoiser)  # shares the call counter
    fast_denoiser.net, fast_denoiser.channels_last = net, channels_last
    return fast_denoiser
