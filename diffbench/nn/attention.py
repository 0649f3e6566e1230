"""One attention entry point for every model, with a backend switch.

Backends: ``triton`` (the project's fused flash-attention kernel, see
``diffbench.kernels.attention``), ``sdpa`` (torch's scaled_dot_product_attention) and
``math`` (the explicit softmax(QK^T/sqrt(d))V reference). Models call
:func:`attention`; the runner picks the backend with :func:`use_backend`.

The Triton kernel runs on CUDA tensors, or on CPU tensors under the Triton interpreter:
``TRITON_INTERPRET=1`` set before the kernels are first imported (the first ``triton``-backend
call imports them). Where it cannot run, ``triton`` falls back to ``sdpa`` with one warning.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch
import torch.nn.functional as F

from diffbench.nn.layers import zero_module

BACKENDS = ("triton", "sdpa", "math")
_backend = "sdpa"
_warned_triton_fallback = False


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str):
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, computed in float32. q: [B, H, Lq, D], k/v: [B, H, Lk, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v.float()).to(q.dtype)


def triton_unavailable_reason(on_cuda: bool) -> str | None:
    """Why the Triton kernel cannot run on CUDA (``on_cuda``) or CPU tensors, or None if it can."""
    if not (on_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return "the tensors are not on CUDA and TRITON_INTERPRET is not 1"
    try:
        from diffbench.kernels import attention as kernels
    except ImportError as error:
        return f"triton cannot be imported ({error})"
    if not (on_cuda or kernels.INTERPRETED):
        # TRITON_INTERPRET is read when the kernels are decorated, i.e. at their first import.
        return "the kernels were imported before TRITON_INTERPRET=1 was set"
    return None


def effective_backend(device: torch.device) -> str:
    """The backend that will actually run on ``device`` (what results record)."""
    if _backend == "triton" and triton_unavailable_reason(device.type == "cuda") is not None:
        return "sdpa"
    return _backend


def _triton_kernel(q: torch.Tensor):
    """The Triton flash-attention function if it can run on q's device, else None (warns once)."""
    reason = triton_unavailable_reason(q.is_cuda)
    if reason is not None:
        return _fall_back_to_sdpa(reason)
    from diffbench.kernels import attention as kernels

    return kernels.flash_attention


def _fall_back_to_sdpa(reason: str) -> None:
    global _warned_triton_fallback
    if not _warned_triton_fallback:
        _warned_triton_fallback = True
        warnings.warn(f"attention backend 'triton' falls back to 'sdpa': {reason}", RuntimeWarning, stacklevel=4)
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over q [B, H, Lq, D] and k/v [B, H, Lk, D] with the current backend."""
    if _backend == "math":
        return math_attention(q, k, v)
    if _backend == "triton":
        kernel = _triton_kernel(q)
        if kernel is not None:
            return kernel(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class CrossAttention(torch.nn.Module):
    """Multi-head cross-attention (LDM's SpatialTransformer, PixArt-α's text blocks): queries from
    the image tokens x [B, N, dim], keys and values from a context [B, M, context_dim] (text tokens),
    through :func:`attention` so every backend, the Triton kernel's Lq ≠ Lk path included, serves
    it. The output projection starts at zero, so a new block starts as the identity branch."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(context_dim, 2 * dim)
        self.proj = zero_module(torch.nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        (b, n, d), m = x.shape, context.shape[1]
        q = self.q(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # [B, H, N, D/H]
        k, v = self.kv(context).reshape(b, m, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, M, D/H]
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, d))  # [B, N, dim]
