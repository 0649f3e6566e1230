"""Metrics for generated token sequences.

* ``gen-nll``: NLL per token of the samples under the true source (markov-text), with the
  fraction of transitions off the chain's sparse support.
* ``entropy``: unigram entropy of the samples (nats); repetitive collapse drives it down.
* ``distinct-n``: distinct n-grams / all n-grams over the samples (Li et al. 2016).
* ``elbo-ppl``: exp of the model's ELBO bound on NLL per token of held-out data (an upper
  bound on its perplexity; Sahoo et al. 2024 §4), Monte Carlo over t with a fixed seed.
"""
from __future__ import annotations

import math

import torch

import diffbench
from diffbench.metrics import MetricContext
from diffbench.registry import Incompatible, Metric, Option

T_MIN = 1e-3  # as in training: the ELBO integral over t is taken on [T_MIN, 1]


def _tokens(samples: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
    samples = samples.long().cpu()
    if samples.ndim != 2 or ctx.dataset.modality != "text":
        raise Incompatible(f"text metrics need token sequences [N, L]; got {ctx.dataset.modality} {tuple(samples.shape)}")
    return samples


def compute_gen_nll(samples, ctx: MetricContext):
    if "nll" not in ctx.dataset.info:
        raise Incompatible(f"dataset {ctx.dataset.name!r} has no known likelihood")
    x = _tokens(samples, ctx)
    if (x >= ctx.dataset.info["vocab_size"]).any() or (x < 0).any():
        raise ValueError("samples contain ids outside the vocabulary (unrevealed mask tokens?)")
    return {"gen-nll": float(ctx.dataset.info["nll"](x).mean()),
            "off-chain": float(ctx.dataset.info["chain"].off_support(x).mean())}


def unigram_entropy(x: torch.Tensor) -> float:
    """H = −Σ_v p_v log p_v of the token frequencies p (nats)."""
    p = torch.bincount(x.flatten()).double() / x.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def compute_entropy(samples, ctx: MetricContext):
    return unigram_entropy(_tokens(samples, ctx))


def distinct_n(x: torch.Tensor, n: int) -> float:
    grams = x.unfold(1, n, 1).reshape(-1, n)  # [N·(L−n+1), n]
    return len(torch.unique(grams, dim=0)) / len(grams)


def compute_distinct(samples, ctx: MetricContext, n: int = 2):
    return distinct_n(_tokens(samples, ctx), n)


@torch.no_grad()
def elbo_per_token(denoiser, x0: torch.Tensor, draws: int, seed: int, device="cpu", batch_size: int = 512) -> float:
    """Monte-Carlo continuous-time ELBO (nats per token) of sequences x0 [N, L]:
    E_t E_{x_t} [w(t) Σ_{masked i} −log p_θ(x_0^i | x_t)] / L, with ``draws`` stratified t per sequence."""
    from diffbench_plugins.mdlm import masked_elbo_terms

    g = torch.Generator().manual_seed(seed)
    u = (torch.rand((), generator=g, dtype=torch.float64) + torch.arange(draws) / draws) % 1  # [draws]
    t = (T_MIN + (1 - T_MIN) * u).repeat(len(x0))  # [N·draws]
    x = x0.repeat_interleave(draws, 0)  # [N·draws, L]
    masks_u = torch.rand(x.shape, generator=g)  # [N·draws, L]
    total = sum(float(masked_elbo_terms(denoiser, *(v[j:j + batch_size].to(device) for v in (x, t, masks_u))).sum())
                for j in range(0, len(x), batch_size))
    return total / x.numel()


def compute_elbo_ppl(samples, ctx: MetricContext, sequences: int = 256, draws: int = 16):
    if getattr(ctx.denoiser, "family", None) != "masked":
        raise Incompatible("elbo-ppl needs a masked diffusion model")
    reference = _tokens(ctx.reference[:sequences], ctx)
    nats = elbo_per_token(ctx.denoiser, reference, draws, ctx.seed, ctx.device)
    return {"elbo-nll": nats, "elbo-ppl": math.exp(nats)}


@diffbench.hookimpl
def register_metrics(register):
    register(Metric(name="gen-nll", family="text", compute=compute_gen_nll,
                    higher_is_better={"gen-nll": False, "off-chain": False},
                    description="NLL per token (nats) of samples under the true source; off-chain: share of transitions off the sparse chain"))
    register(Metric(name="entropy", family="text", compute=compute_entropy, higher_is_better=True,
                    description="unigram entropy of the samples in nats (low = repetitive collapse)"))
    register(Metric(name="distinct-n", family="text", compute=compute_distinct, options={"n": Option(2, min=1)},
                    higher_is_better=True, description="distinct n-grams / all n-grams over the samples"))
    register(Metric(name="elbo-ppl", family="text", compute=compute_elbo_ppl, options={"sequences": Option(256, min=1), "draws": Option(16, min=1)},
                    higher_is_better=False,
                    description="model perplexity bound exp(ELBO per token) on held-out text, MC over t (fixed seed)"))
