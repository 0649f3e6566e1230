"""Guidance for masked diffusion: ``prompt-cfg``, LLaDA's unsupervised classifier-free guidance.

The unconditional model is the same network with the prompt masked out (Nie et al. 2025,
LLaDA, after Nie et al. 2024, "Scaling up masked diffusion models on text"):

    p̃(r_0 | p_0, r_t) ∝ p_θ(r_0 | p_0, r_t)^{1+w} / p_θ(r_0 | m, r_t)^w,

i.e. on logits  guided = uncond + (1 + w)(cond − uncond), so w = 0 is the plain conditional
model. Each guided call costs two model calls (2 NFE).
"""
from __future__ import annotations

import torch

import diffbench
from diffbench.registry import Guidance, Incompatible


class PromptCFGDenoiser:
    """A MaskedDenoiser whose logits are guided by contrast with the prompt-masked input."""

    def __init__(self, denoiser, scale: float):
        self.inner, self.scale = denoiser, scale

    def __getattr__(self, name):  # vocab_size, mask_id, schedule, prompt, stats, nfe, ...
        return getattr(self.inner, name)

    def conditioned(self, cond) -> "PromptCFGDenoiser":
        return PromptCFGDenoiser(self.inner.conditioned(cond), self.scale)

    def __call__(self, tokens: torch.Tensor, t, cond=None) -> torch.Tensor:
        unprompted = tokens.clone()
        unprompted[:, : len(self.inner.prompt)] = self.inner.mask_id  # m: the prompt masked out
        cond_logits = self.inner(tokens, t, cond)  # [B, L, V]
        uncond_logits = self.inner(unprompted, t, cond)
        return uncond_logits + (1 + self.scale) * (cond_logits - uncond_logits)


def apply_prompt_cfg(denoiser, scale: float = 1.0):
    if getattr(denoiser, "prompt", None) is None:
        raise Incompatible("prompt-cfg needs a prompt prefix (e.g. mdlm[prompt=...])")
    return PromptCFGDenoiser(denoiser, scale)


@diffbench.hookimpl
def register_guidance(register):
    register(Guidance(name="prompt-cfg", family="masked", apply=apply_prompt_cfg, options={"scale": 1.0},
                      primary="scale", conditional=False,
                      description="LLaDA unsupervised CFG: uncond (prompt masked) + (1+w)(cond − uncond); w=0 is no guidance"))
