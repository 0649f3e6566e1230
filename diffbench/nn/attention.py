"""One attention entry point for every model, with a backend switch.

Backends: ``triton`` (the project's fused flash-attention kernel, see
``diffbench.kernels.attention``), ``sdpa`` (torch's scaled_dot_product_attention) and
``math`` (the explicit softmax(QK^T/sqrt(d))V reference). Models call
:func:`attention`; the runner picks the backend with :func:`use_backend`.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

BACKENDS = ("triton", "sdpa", "math")
_backend = "sdpa"


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over [B, H, L, D] tensors with the current backend."""
    if _backend == "math":
        return math_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
