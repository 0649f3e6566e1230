"""The Triton flash-attention kernel against the float32 math reference, forward and gradients.

Tolerance (the rule of FlashAttention's own tests): for the output and each gradient, the
kernel's max error against the float32 reference is at most twice the error of torch's
attention computed in the same dtype, plus a tiny floor for float32 (where that error is ~0).

CPU: the kernels run under the Triton interpreter in a subprocess (this file run as a
script). TRITON_INTERPRET must be set before ``import triton``: triton's own library
functions (the combine functions behind tl.max/tl.sum) are decorated at that import, and a
process switched to the interpreter cannot compile GPU kernels (the GPU tests below, or
torch.compile elsewhere in the suite). Setting it in this module would leak to every test
file pytest collects, and would not work if one of them imported triton first.
GPU: real sizes in-process, bfloat16 included; skipped without CUDA.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import diffbench.nn.attention as nn_attention
from diffbench.nn.attention import math_attention

FP32_FLOOR = 1e-5  # relative to the reference's magnitude
OUTPUTS = ("out", "dq", "dk", "dv")

# (B, H, Lq, Lk, D): self and cross attention; lengths not multiples of the interpreter's
# 16-wide blocks; head dims that are not powers of two (40, 72) and one that is (64).
CPU_SHAPES = {
    "self-d64": (1, 2, 48, 48, 64),
    "self-d72-tail": (1, 2, 33, 33, 72),
    "cross-d40-lq>lk": (2, 1, 50, 37, 40),
    "cross-d72-77keys": (1, 2, 20, 77, 72),
}
CPU_DTYPES = ("float32", "float16")  # the interpreter computes bfloat16 wrongly


def torch_attention_in_dtype(q, k, v):
    """softmax(Q K^T / sqrt(D)) V with every op in the inputs' dtype: torch's low-precision path."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return scores.softmax(dim=-1) @ v


def outputs_and_grads(attention, q, k, v, do) -> list[torch.Tensor]:
    """[O, dQ, dK, dV] of attention(q, k, v) with output gradient do."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def random_qkv_do(shape, device, seed=0) -> list[torch.Tensor]:
    B, H, Lq, Lk, D = shape
    generator = torch.Generator(device).manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=generator, device=device) for L in (Lq, Lk, Lk, Lq)]


def attention_errors(flash_attention, shape, dtype: torch.dtype, device: str) -> dict[str, list[float]]:
    """Max abs errors against the float32 math reference of the kernel and of torch in dtype,
    for [O, dQ, dK, dV], plus the reference's max magnitudes."""
    inputs = random_qkv_do(shape, device)
    reference = outputs_and_grads(math_attention, *inputs)
    low = [x.to(dtype) for x in inputs]

    def errors(results):
        return [(r.float() - ref).abs().max().item() for r, ref in zip(results, reference)]

    return {
        "kernel": errors(outputs_and_grads(flash_attention, *low)),
        "torch": errors(outputs_and_grads(torch_attention_in_dtype, *low)),
        "scale": [ref.abs().max().item() for ref in reference],
    }


def assert_within_tolerance(errors: dict[str, list[float]], dtype: torch.dtype) -> None:
    for name, kernel, torch_error, scale in zip(OUTPUTS, errors["kernel"], errors["torch"], errors["scale"]):
        floor = FP32_FLOOR * max(1.0, scale) if dtype == torch.float32 else 0.0
        assert kernel <= 2 * torch_error + floor, (
            f"{name}: kernel error {kernel:.2e} > 2 x torch {dtype} error {torch_error:.2e} + {floor:.1e}")


def interpreter_facts() -> dict:
    """Everything the CPU tests check, computed under the Triton interpreter (script mode)."""
    from diffbench.kernels.attention import INTERPRETED, flash_attention, flash_attention_forward

    assert INTERPRETED, "run with TRITON_INTERPRET=1"
    errors = {f"{name}-{dtype}": attention_errors(flash_attention, shape, getattr(torch, dtype), "cpu")
              for name, shape in CPU_SHAPES.items() for dtype in CPU_DTYPES}

    # Logsumexp saved for the backward: L = logsumexp(Q K^T / sqrt(D)) per query row.
    q, k, v, _ = random_qkv_do(CPU_SHAPES["cross-d40-lq>lk"], "cpu")
    _, lse = flash_attention_forward(q, k, v)
    lse_error = (lse - torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)).abs().max()

    # Strided inputs as models produce them: q, k, v from one packed [B, L, 3, H, D] projection
    # and a transposed output gradient; the kernel reads the strides, nothing is copied.
    B, H, L, D = 1, 2, 33, 40
    qkv = torch.randn(B, L, 3, H, D)
    strided = [x.transpose(1, 2) for x in qkv.unbind(2)] + [torch.randn(B, L, H, D).transpose(1, 2)]
    strided_difference = max((a - b).abs().max().item() for a, b in zip(
        outputs_and_grads(flash_attention, *strided),
        outputs_and_grads(flash_attention, *(x.contiguous() for x in strided))))

    # The module's "triton" backend is this kernel, gradients included.
    with nn_attention.use_backend("triton"):
        dispatched = outputs_and_grads(nn_attention.attention, q, k, v, torch.ones_like(q))
    direct = outputs_and_grads(flash_attention, q, k, v, torch.ones_like(q))
    dispatch_difference = max((a - b).abs().max().item() for a, b in zip(dispatched, direct))

    return {"errors": errors, "lse_error": lse_error.item(), "strided_difference": strided_difference,
            "dispatch_difference": dispatch_difference}


@pytest.fixture(scope="module")
def interpreter() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape_name", CPU_SHAPES)
def test_interpreted_kernel_matches_reference(interpreter, shape_name, dtype):
    assert_within_tolerance(interpreter["errors"][f"{shape_name}-{dtype}"], getattr(torch, dtype))


def test_interpreted_kernel_stores_logsumexp(interpreter):
    assert interpreter["lse_error"] < 1e-5


def test_interpreted_kernel_reads_strided_inputs(interpreter):
    assert interpreter["strided_difference"] < 1e-6


def test_triton_backend_dispatches_to_kernel(interpreter):
    assert interpreter["dispatch_difference"] == 0.0


def test_triton_backend_falls_back_to_sdpa_with_one_warning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(nn_attention, "_warned_triton_fallback", False)
    q, k, v, _ = random_qkv_do((1, 2, 9, 7, 40), "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with nn_attention.use_backend("triton"):
            outputs = [nn_attention.attention(q, k, v) for _ in range(2)]
    assert [str(w.message) for w in caught] == [
        "attention backend 'triton' falls back to 'sdpa': the tensors are not on CUDA and TRITON_INTERPRET is not 1"]
    for out in outputs:
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_benchmark_needs_cuda(tmp_path):
    from diffbench.kernels.bench import run_attention_benchmark

    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run_attention_benchmark(tmp_path)


# ---- GPU: real sizes, compiled kernels -------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU_SHAPES = {
    **{f"self-1024-d{d}": (2, 4, 1024, 1024, d) for d in (40, 64, 72, 80, 128, 160)},
    "dit-256-d72": (4, 16, 256, 256, 72),
    **{f"sd-cross-4096x77-d{d}": (2, 8, 4096, 77, d) for d in (40, 80, 160)},
    "tails-1000x333-d72": (1, 2, 1000, 333, 72),
}


@pytest.fixture(scope="module")
def compiled_flash_attention():
    from diffbench.kernels.attention import INTERPRETED, flash_attention

    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 in this process: GPU tests need compiled kernels")
    return flash_attention


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape_name", GPU_SHAPES)
def test_gpu_kernel_matches_reference(compiled_flash_attention, shape_name, dtype):
    errors = attention_errors(compiled_flash_attention, GPU_SHAPES[shape_name], getattr(torch, dtype), "cuda")
    assert_within_tolerance(errors, getattr(torch, dtype))


@pytest.mark.gpu
@gpu
def test_gpu_benchmark_smoke_writes_tables(compiled_flash_attention, tmp_path):
    from diffbench.kernels.bench import AttentionCase, gpu_slug, run_attention_benchmark

    table = run_attention_benchmark(tmp_path, cases=[AttentionCase("tiny", 2, 4, 256, 77, 72)])
    assert set(table["backend"]) == {"triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "math"}
    assert (table.loc[table["backend"] == "triton", "tflops"] > 0).all()
    assert (tmp_path / f"{gpu_slug()}.csv").exists() and (tmp_path / f"{gpu_slug()}.md").exists()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_dit_forward_triton_equals_sdpa(compiled_flash_attention, dtype):
    """A DiT-S/2 forward through the Triton kernel agrees with SDPA within the low-precision rule:
    its error against an fp32 SDPA forward is at most twice SDPA's own error in that dtype."""
    from diffbench.nn.attention import use_backend
    from diffbench.process import VPDiscrete
    from diffbench_plugins.dit import build_dit

    torch.manual_seed(0)
    model = build_dit("DiT-S/2", in_channels=4, resolution=32, process=VPDiscrete.linear(), num_classes=10).cuda()
    x, t, y = torch.randn(4, 4, 32, 32, device="cuda"), torch.full((4,), 300.0, device="cuda"), torch.arange(4).cuda()
    with torch.no_grad(), use_backend("sdpa"):
        reference = model(x, t, y)
        low = model.to(getattr(torch, dtype))
        sdpa_out = low(x.to(low.x_embedder.weight.dtype), t, y).float()
    with torch.no_grad(), use_backend("triton"):
        triton_out = low(x.to(low.x_embedder.weight.dtype), t, y).float()
    sdpa_error = (sdpa_out - reference).abs().max()
    assert (triton_out - reference).abs().max() <= 2 * sdpa_error + 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_dit_step_benchmark_needs_cuda(tmp_path):
    from diffbench.kernels.bench import run_dit_step_benchmark

    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run_dit_step_benchmark(tmp_path)


if __name__ == "__main__":
    print(json.dumps(interpreter_facts()))
