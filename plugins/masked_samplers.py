"""Samplers for masked (absorbing-state) discrete diffusion.

Each takes a MaskedDenoiser ``D`` (``D(tokens [B, L], t) -> logits [B, L, V]``), x [B, L] full
of ``D.mask_id`` (a prompt prefix, if any, filled in) and decreasing times from 1 to 0; one
model call per round. Only masked positions are ever written: an unmasked or prompt token never
changes (MDLM's "carry-over unmasking", Sahoo et al. 2024 §3.2.2).

* ``mdlm-ancestral``: the reverse posterior of MDLM (eq. 7): from t to s < t each masked token
  is revealed with probability (α_s − α_t) / (1 − α_t), drawn from the model's distribution.
* ``llada-lowconf`` / ``llada-random``: LLaDA's sampler (Nie et al. 2025, §2.4, Algs. 4-5):
  predict every masked token, keep as many as the schedule says should be unmasked at s
  (the most confident ones, or random ones) and remask the rest; optionally in semi-
  autoregressive blocks of ``block_length`` tokens, left to right (LLaDA's semi-AR remasking).
"""
from __future__ import annotations

import torch

import diffbench
from diffbench.generate import report_step
from diffbench.registry import Option, Sampler


def with_prompt(D, x: torch.Tensor) -> torch.Tensor:
    """x [B, L] with D's prompt prefix (if any) written in."""
    x = x.clone()
    if getattr(D, "prompt", None) is not None:
        x[:, : len(D.prompt)] = D.prompt.to(x.device)
    return x


def sample_categorical(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """Tokens [B, L] from softmax(logits / temperature) by Gumbel-max; temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    u = generator.rand(logits.shape[1:], dtype=torch.float64).to(logits.device)  # [B, L, V]
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(-1)


def _alpha(D, t: float) -> float:
    return float(D.schedule.alpha(torch.tensor(t, dtype=torch.float64)))


@torch.no_grad()
def sample_mdlm_ancestral(D, x, timesteps, *, generator, callback=None, temperature=1.0):
    """MDLM ancestral sampling (Sahoo et al. 2024, eq. 7; Austin et al. 2021 for absorbing D3PM).

    p(x_s^i | x_t) = x_t^i                                         if x_t^i is unmasked,
                   = (1 − α_s)/(1 − α_t) [M] + (α_s − α_t)/(1 − α_t) p_θ(· | x_t)   if masked.
    """
    x = with_prompt(D, x)
    for i in range(len(timesteps) - 1):
        t, s = float(timesteps[i]), float(timesteps[i + 1])
        a_t, a_s = _alpha(D, t), _alpha(D, s)
        masked = x == D.mask_id  # [B, L]
        logits = D(x, t)  # [B, L, V]
        x0 = sample_categorical(logits, temperature, generator)  # [B, L]
        reveal = masked & (generator.rand_like(x.double()) < (a_s - a_t) / (1 - a_t))
        x = torch.where(reveal, x0, x)
        report_step(callback, i, x, t, s, logits=logits)
    return x


def _blocks(start: int, length: int, block_length: int, steps: int) -> list[tuple[int, int, int]]:
    """(first, end, rounds) for each block of the generated span [start, length): the steps are
    shared out as evenly as possible, earlier blocks taking the remainder."""
    block_length = block_length or length - start
    edges = list(range(start, length, block_length)) + [length]
    n = len(edges) - 1
    if steps < n:
        raise ValueError(f"block decoding of {length - start} tokens in blocks of {block_length} "
                         f"needs at least {n} steps, got {steps}")
    return [(edges[b], edges[b + 1], steps // n + (b < steps % n)) for b in range(n)]


@torch.no_grad()
def sample_llada(D, x, timesteps, *, generator, callback=None, remasking="low-confidence", temperature=1.0,
                 block_length=0):
    """LLaDA reverse process with remasking (Nie et al. 2025, Algs. 4-5, and its block decoding).

    Within a block of M0 masked tokens, a round from local time τ_t to τ_s predicts every masked
    token and keeps k = #masked − round(M0 (1 − α(τ_s))) of them — the most confident
    (p_θ of the drawn token) for ``low-confidence``, uniformly chosen ones for ``random`` —
    remasking the rest, so the masked count follows the schedule exactly. Block b runs its rounds
    over its share of ``timesteps``, rescaled to go from 1 to 0.
    """
    x = with_prompt(D, x)
    start = len(D.prompt) if getattr(D, "prompt", None) is not None else 0
    i = 0
    for first, end, rounds in _blocks(start, x.shape[1], block_length, len(timesteps) - 1):
        in_block = torch.zeros_like(x, dtype=torch.bool)
        in_block[:, first:end] = True
        m0 = ((x == D.mask_id) & in_block).sum(1)  # [B]
        t_hi, t_lo = float(timesteps[i]), float(timesteps[i + rounds])
        for _ in range(rounds):
            t, s = float(timesteps[i]), float(timesteps[i + 1])
            candidates = (x == D.mask_id) & in_block  # [B, L]
            logits = D(x, t)  # [B, L, V]
            x0 = sample_categorical(logits, temperature, generator)  # [B, L]
            if remasking == "low-confidence":
                confidence = logits.softmax(-1).gather(-1, x0[..., None])[..., 0].double()  # [B, L]
            else:
                confidence = generator.rand_like(x.double())
            confidence = confidence.masked_fill(~candidates, -torch.inf)
            keep_masked = torch.round(m0 * (1 - _alpha(D, (s - t_lo) / (t_hi - t_lo))))  # [B]
            k = candidates.sum(1) - keep_masked.long()  # [B] tokens to reveal this round
            rank = confidence.argsort(1, descending=True).argsort(1)  # [B, L]: 0 = most confident
            x = torch.where(candidates & (rank < k[:, None]), x0, x)
            report_step(callback, i, x, t, s, logits=logits)
            i += 1
    return x


def sample_llada_lowconf(D, x, timesteps, *, generator, callback=None, temperature=1.0, block_length=0):
    return sample_llada(D, x, timesteps, generator=generator, callback=callback, remasking="low-confidence",
                        temperature=temperature, block_length=block_length)


def sample_llada_random(D, x, timesteps, *, generator, callback=None, temperature=1.0, block_length=0):
    return sample_llada(D, x, timesteps, generator=generator, callback=callback, remasking="random",
                        temperature=temperature, block_length=block_length)


@diffbench.hookimpl
def register_samplers(register):
    register(Sampler(name="mdlm-ancestral", family="masked", fn=sample_mdlm_ancestral, options={"temperature": Option(1.0, min=0.0)},
                     description="MDLM ancestral sampler: reveal each masked token with prob (α_s−α_t)/(1−α_t) per step"))
    llada_options = {"temperature": Option(1.0, min=0.0), "block_length": Option(0, min=0)}
    register(Sampler(name="llada-lowconf", family="masked", fn=sample_llada_lowconf, options=llada_options,
                     aliases=("llada",),  # low-confidence remasking is LLaDA's default
                     description="LLaDA: predict all masked tokens, keep the most confident per the schedule, remask the rest"))
    register(Sampler(name="llada-random", family="masked", fn=sample_llada_random, options=llada_options,
                     description="LLaDA with random remasking: keep a random subset of predictions per the schedule"))
