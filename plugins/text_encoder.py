"""A small text encoder for text-to-image diffusion, trained with the diffusion model (as Imagen's
ablations and PixArt's T5 are frozen, ours is not: there is no pretrained one offline).

* :class:`CaptionTokenizer`: whitespace words over a fixed vocabulary (the dataset's captions),
  id 0 is padding; every caption is padded to the longest one. The empty caption (all padding)
  is the unconditional input of classifier-free guidance.
* :class:`TextEncoder`: token + learned position embeddings, pre-norm Transformer blocks through
  :func:`diffbench.nn.attention.attention`, a final LayerNorm -> context [B, L, dim] for
  cross-attention (CLIP's text tower without the causal mask and pooling).
* :class:`TextConditioned`: the denoiser network seen by the host. Its condition is a caption
  index [B] (the dataset's combination label; index ``len(captions)`` is the empty caption, the
  null class), so the runner's labels, CFG's null class and label dropout work unchanged on text.
"""
from __future__ import annotations

import torch
from torch import nn

from diffbench.nn.attention import attention

PAD = "<pad>"


class CaptionTokenizer:
    def __init__(self, captions: list[str]):
        self.vocab = [PAD] + sorted({word for c in captions for word in c.split()})
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.length = max(len(c.split()) for c in captions)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """Captions -> token ids [len(captions), length]; unknown words raise KeyError with the word."""
        out = torch.zeros(len(captions), self.length, dtype=torch.long)
        for i, caption in enumerate(captions):
            words = caption.split()[: self.length]
            out[i, : len(words)] = torch.tensor([self.ids[w] for w in words], dtype=torch.long)
        return out


class TransformerBlock(nn.Module):
    """Pre-norm self-attention and MLP, each residual (Vaswani et al. 2017; pre-norm as in GPT-2)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape  # [B, L, D]
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """tokens [B, L] -> context [B, L, dim]."""

    def __init__(self, vocab_size: int, length: int, dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(0.02 * torch.randn(1, length, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.tokens(tokens) + self.positions))


class TextConditioned(nn.Module):
    """``backbone(x, t, None, context)`` conditioned on caption indices: cond [B] | None -> the
    captions' tokens (a buffer [K + 1, L], row K empty) -> :class:`TextEncoder` -> context."""

    def __init__(self, backbone: nn.Module, captions: list[str], dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        tokenizer = CaptionTokenizer(captions)
        self.backbone = backbone
        self.encoder = TextEncoder(len(tokenizer.vocab), tokenizer.length, dim, depth, heads)
        self.register_buffer("caption_tokens", tokenizer(captions + [""]), persistent=False)  # [K + 1, L]
        self.null = len(captions)

    def forward(self, x, t, cond=None):
        if cond is None:  # an unconditional call: the empty caption
            cond = torch.full((x.shape[0],), self.null, dtype=torch.long, device=x.device)
        context = self.encoder(self.caption_tokens[cond.to(x.device).long()])  # [B, L, dim]
        return self.backbone(x, t, None, context)
