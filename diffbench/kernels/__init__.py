"""Triton kernels (GPU, or CPU under TRITON_INTERPRET=1)."""
