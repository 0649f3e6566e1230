"""Fused flash attention in Triton, forward and backward.

The algorithm is FlashAttention (Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient
Exact Attention with IO-Awareness", arXiv:2205.14135) in the form of FlashAttention-2 (Dao,
2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv:2307.08691): the forward pass parallelizes over query blocks and keeps an online
softmax (running max ``m``, running sum ``l``, unnormalized output) over key blocks, rescaling
the output once at the end (FA2 Algorithm 1); it stores only the output and the row
logsumexp ``L``. The backward pass recomputes the probabilities from ``L`` (FA2 Algorithm 2).
Where Algorithm 2 accumulates dQ with atomic adds, here dK/dV and dQ are two kernels (one
parallel over key blocks, one over query blocks), so every output tile has a single writer.

Tensors are [B, H, L, D] with any strides. The head dim D need not be a power of two: tiles
span BLOCK_D = next_power_of_2(D) columns and loads/stores are masked to D, so inputs are
never padded or copied. Sequence tails (L not a multiple of the block sizes) are masked the
same way, and Lq may differ from Lk (cross-attention). Matmuls accumulate in float32.

The ``TRITON_INTERPRET`` environment variable is read when ``@triton.jit`` decorates the
kernels, i.e. when this module is imported: set it to ``1`` before the import to run the
kernels on CPU tensors with the Triton interpreter (``INTERPRETED`` records which mode).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Scores are scaled by log2(e) so the kernels can use exp2 (the hardware exponential):
# exp(x) = exp2(x * log2(e)). The stored logsumexp is in natural-log units.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _block_configs() -> list[triton.Config]:
    """Autotuning candidates on GPU; one small config under the interpreter (tests stay fast
    and tiny shapes still cover several blocks and their tails)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)]
    ]


_AUTOTUNE_KEY = ["Lq", "Lk", "BLOCK_D"]  # the autotuner also keys on the tensors' dtypes


@triton.jit
def _load_tile(base, offs_l, offs_d, stride_l, stride_d, L, D):
    """Tile [len(offs_l), len(offs_d)] of an [L, D] matrix; rows >= L and columns >= D read 0."""
    ptrs = base + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_tile(base, tile, offs_l, offs_d, stride_l, stride_d, L, D):
    """Write a tile into an [L, D] matrix, skipping rows >= L and columns >= D."""
    ptrs = base + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(offs_l[:, None] < L) & (offs_d[None, :] < D))


@triton.jit
def _head_offset(stride_b, stride_h, H):
    """Element offset of this program's (batch, head) matrix; program axis 1 runs over B*H."""
    bh = tl.program_id(1)
    return (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.autotune(configs=_block_configs(), key=_AUTOTUNE_KEY)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    H, Lq, Lk, D, qk_scale,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query block of one (batch, head): FA2 Algorithm 1, lines 4-15."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K += _head_offset(skb, skh, H)
    V += _head_offset(svb, svh, H)
    q = _load_tile(Q + _head_offset(sqb, sqh, H), offs_m, offs_d, sql, sqd, Lq, D)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (line 5), log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # unnormalized output
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K, cols, offs_d, skl, skd, Lk, D)  # [BLOCK_N, BLOCK_D]
        v = _load_tile(V, cols, offs_d, svl, svd, Lk, D)  # [BLOCK_N, BLOCK_D]
        # line 8: S = Q K^T (scaled), keys past Lk masked out
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(cols[None, :] < Lk, s, float("-inf"))
        # line 9: new max, P~ = exp(S - m_new), l = exp(m_old - m_new) l + rowsum(P~)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # line 10: O = diag(exp(m_old - m_new)) O + P~ V
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # lines 12-15: O = diag(l)^-1 O and L = m + log(l), written to HBM
    _store_tile(O + _head_offset(sob, soh, H), acc / l_i[:, None], offs_m, offs_d, sol, sod, Lq, D)
    tl.store(LSE + tl.program_id(1) * Lq + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    sob, soh, sol, sod,
    sdob, sdoh, sdol, sdod,
    H, Lq, D,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """FA2 Algorithm 2, line 3: D_i = rowsum(dO_i * O_i), one query block per program."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + _head_offset(sob, soh, H), offs_m, offs_d, sol, sod, Lq, D).to(tl.float32)
    do = _load_tile(DO + _head_offset(sdob, sdoh, H), offs_m, offs_d, sdol, sdod, Lq, D).to(tl.float32)
    tl.store(DELTA + tl.program_id(1) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.autotune(configs=_block_configs(), key=_AUTOTUNE_KEY)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sdob, sdoh, sdol, sdod,
    sgb, sgh, sgl, sgd,  # strides of DK and DV (allocated alike)
    H, Lq, Lk, D, sm_scale, qk_scale,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block: FA2 Algorithm 2, lines 5-17, in transposed form (S^T = K Q^T)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Q += _head_offset(sqb, sqh, H)
    DO += _head_offset(sdob, sdoh, H)
    LSE += tl.program_id(1) * Lq
    DELTA += tl.program_id(1) * Lq
    k = _load_tile(K + _head_offset(skb, skh, H), offs_n, offs_d, skl, skd, Lk, D)  # [BLOCK_N, BLOCK_D]
    v = _load_tile(V + _head_offset(svb, svh, H), offs_n, offs_d, svl, svd, Lk, D)  # [BLOCK_N, BLOCK_D]

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Lq
        q = _load_tile(Q, rows, offs_d, sql, sqd, Lq, D)  # [BLOCK_M, BLOCK_D]
        do = _load_tile(DO, rows, offs_d, sdol, sdod, Lq, D)  # [BLOCK_M, BLOCK_D]
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)  # [BLOCK_M]
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)  # [BLOCK_M]
        # lines 9-10: P^T = exp(S^T - L), queries past Lq masked out
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t * qk_scale - lse[None, :] * LOG2E)
        p_t = tl.where(row_ok[None, :], p_t, 0.0)
        # line 11: dV += P^T dO
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        # lines 12-13: dP^T = V dO^T, dS^T = P^T * (dP^T - D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        ds_t = p_t * (dp_t - delta[None, :])
        # line 15: dK += dS^T Q
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    # line 17; the softmax scale enters S = scale * Q K^T, so dK carries it once
    _store_tile(DK + _head_offset(sgb, sgh, H), dk * sm_scale, offs_n, offs_d, sgl, sgd, Lk, D)
    _store_tile(DV + _head_offset(sgb, sgh, H), dv, offs_n, offs_d, sgl, sgd, Lk, D)


@triton.autotune(configs=_block_configs(), key=_AUTOTUNE_KEY)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sdob, sdoh, sdol, sdod,
    sgb, sgh, sgl, sgd,  # strides of DQ
    H, Lq, Lk, D, sm_scale, qk_scale,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block: FA2 Algorithm 2, line 14 (dQ += dS K) without atomics."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K += _head_offset(skb, skh, H)
    V += _head_offset(svb, svh, H)
    row_ok = offs_m < Lq
    q = _load_tile(Q + _head_offset(sqb, sqh, H), offs_m, offs_d, sql, sqd, Lq, D)  # [BLOCK_M, BLOCK_D]
    do = _load_tile(DO + _head_offset(sdob, sdoh, H), offs_m, offs_d, sdol, sdod, Lq, D)  # [BLOCK_M, BLOCK_D]
    lse2 = tl.load(LSE + tl.program_id(1) * Lq + offs_m, mask=row_ok, other=0.0) * LOG2E  # [BLOCK_M]
    delta = tl.load(DELTA + tl.program_id(1) * Lq + offs_m, mask=row_ok, other=0.0)  # [BLOCK_M]

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K, cols, offs_d, skl, skd, Lk, D)  # [BLOCK_N, BLOCK_D]
        v = _load_tile(V, cols, offs_d, svl, svd, Lk, D)  # [BLOCK_N, BLOCK_D]
        # lines 9-10: P = exp(S - L), keys past Lk masked out
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        p = tl.where(cols[None, :] < Lk, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        # lines 12-13: dP = dO V^T, dS = P * (dP - D)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        # line 14: dQ += dS K
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    _store_tile(DQ + _head_offset(sgb, sgh, H), dq * sm_scale, offs_m, offs_d, sgl, sgd, Lq, D)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    B, H, _, D = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"expected q [B, H, Lq, D] and k, v [B, H, Lk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")


def _constants(q: torch.Tensor) -> dict:
    """Compile-time constants shared by the kernels. float32 inputs use exact (IEEE) matmuls
    unless torch is allowed TF32 (torch.set_float32_matmul_precision), like torch's own matmul."""
    exact = q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return {
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[-1])),  # tl.dot needs >= 16
        "DOT_PRECISION": "ieee" if exact else "tf32",  # tf32 only affects float32 operands
    }


def _scales(head_dim: int) -> tuple[float, float]:
    """(softmax scale 1/sqrt(D), the same times log2(e) for exp2)."""
    sm_scale = 1.0 / math.sqrt(head_dim)
    return sm_scale, sm_scale * LOG2E.value


def _grid(length: int, block: str, batch_heads: int):
    """Launch grid: blocks of `length` (block size picked by the autotuner) x (batch, head) pairs."""
    return lambda meta: (triton.cdiv(length, meta[block]), batch_heads)


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O [B, H, Lq, D], logsumexp L [B, H, Lq] float32) for q [B, H, Lq, D], k/v [B, H, Lk, D]."""
    _check_inputs(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    _attn_fwd[_grid(Lq, "BLOCK_M", B * H)](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, Lq, Lk, D, _scales(D)[1], **_constants(q),
    )
    return o, lse


def flash_attention_backward(q, k, v, o, lse, do) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) from the forward's inputs, output O, logsumexp L and the output gradient dO."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    sm_scale, qk_scale = _scales(D)
    constants = _constants(q)
    delta = torch.empty_like(lse)  # [B, H, Lq]
    preprocess_block = 64
    _attn_bwd_preprocess[(triton.cdiv(Lq, preprocess_block), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Lq, D,
        BLOCK_D=constants["BLOCK_D"], BLOCK_M=preprocess_block,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(k.shape, dtype=v.dtype, device=v.device)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    _attn_bwd_dkdv[_grid(Lk, "BLOCK_N", B * H)](
        q, k, v, do, lse, delta, dk, dv, *common, *dk.stride(),
        H, Lq, Lk, D, sm_scale, qk_scale, **constants,
    )
    _attn_bwd_dq[_grid(Lq, "BLOCK_M", B * H)](
        q, k, v, do, lse, delta, dq, *common, *dq.stride(),
        H, Lq, Lk, D, sm_scale, qk_scale, **constants,
    )
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """softmax(Q K^T / sqrt(D)) V with the Triton kernels in both directions."""

    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = flash_attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        return flash_attention_backward(*ctx.saved_tensors, do)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Differentiable flash attention. q: [B, H, Lq, D], k/v: [B, H, Lk, D] -> [B, H, Lq, D]."""
    return FlashAttention.apply(q, k, v)
