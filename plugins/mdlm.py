"""The ``mdlm`` model: masked (absorbing-state) discrete diffusion for text.

Forward process (Austin et al. 2021, D3PM absorbing state; Sahoo et al. 2024, MDLM §2): each
token is kept with probability α(t) and replaced by the mask token otherwise, independently:

    q(x_t^i | x_0^i) = α(t) [x_t^i = x_0^i] + (1 − α(t)) [x_t^i = M],   α(0) = 1, α(1) = 0.

A bidirectional Transformer predicts x_0 at the masked positions, and is trained on the
continuous-time ELBO (MDLM eq. 10; LLaDA eq. 3 for the linear schedule, where w = 1/t):

    −log p_θ(x_0) ≤ E_{t ~ U(0,1)} E_{x_t} [ w(t) Σ_{i: x_t^i = M} −log p_θ(x_0^i | x_t) ],
    w(t) = −α'(t) / (1 − α(t)).

The network never outputs the mask token (MDLM's "zero masking probabilities"): its logits
cover the ``vocab_size`` real tokens and ``mask_id = vocab_size``. Time conditioning is optional
(MDLM §3.2 and Ou et al. 2024 show the optimal x_0 predictor does not depend on t); shipped
checkpoints are time-independent, so any schedule can be used at sampling time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import diffbench
from diffbench.checkpoints import checkpoint_files, checkpoint_name, load_checkpoint, model_checkpoint, training_output
from diffbench.denoiser import MaskedDenoiser
from diffbench.nn.attention import attention
from diffbench.nn.embeddings import timestep_embedding
from diffbench.registry import Incompatible, Model, Option
from diffbench.training import TrainConfig, train

ARCH_DEFAULTS = {"hidden": 64, "depth": 2, "heads": 4, "time_cond": False}
T_MIN = 1e-3  # training times are drawn in [T_MIN, 1]: w(t) = 1/t would blow up at 0


# ----------------------------------------------------------------------------------------------
# Masking schedules: α(t) = probability that a token is still unmasked at time t.


class LinearSchedule:
    """α(t) = 1 − t (LLaDA; MDLM's log-linear): w(t) = 1/t."""

    name = "linear"

    def alpha(self, t):
        return 1 - t

    def weight(self, t):
        return 1 / t


class CosineSchedule:
    """α(t) = cos(πt/2) (MDLM Table 1's cosine): w(t) = (π/2) sin(πt/2) / (1 − cos(πt/2))."""

    name = "cosine"

    def alpha(self, t):
        return torch.cos(math.pi / 2 * torch.as_tensor(t, dtype=torch.float64))

    def weight(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return (math.pi / 2) * torch.sin(math.pi / 2 * t) / (1 - torch.cos(math.pi / 2 * t))


SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule}


def make_schedule(name: str):
    if name not in SCHEDULES:
        raise ValueError(f"unknown masking schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, schedule, mask_id: int, u: torch.Tensor):
    """x_t ~ q(x_t | x_0): mask where the uniform draws u [B, L] fall below 1 − α(t) [B]."""
    masked = u < (1 - schedule.alpha(t.double())).float()[:, None]  # [B, L]
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def masked_elbo_terms(denoiser, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One-sample ELBO estimate per sequence [B] (nats): w(t) Σ_{masked i} −log p(x_0^i | x_t).

    ``denoiser`` is a MaskedDenoiser (or anything with its ``schedule``, ``mask_id`` and
    ``(tokens, t) -> logits`` call); t [B] in (0, 1], u [B, L] uniform draws for the masks.
    """
    x_t, masked = mask_tokens(x0, t, denoiser.schedule, denoiser.mask_id, u)
    logits = denoiser(x_t, t)  # [B, L, V]
    nll = F.cross_entropy(logits.transpose(1, 2).float(), x0, reduction="none")  # [B, L]
    w = denoiser.schedule.weight(t.double()).float()  # [B]
    return w * (nll * masked).sum(1)


def low_discrepancy_times(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """t_i = T_MIN + (1 − T_MIN)·((u + i/n) mod 1): stratified times, one per sample (MDLM §3.5)."""
    u = torch.rand((), generator=generator, device=device)
    return T_MIN + (1 - T_MIN) * ((u + torch.arange(n, device=device) / n) % 1)


# ----------------------------------------------------------------------------------------------
# The network: a small bidirectional Transformer (pre-LN, rotary positions as in LLaDA's backbone).


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021): rotate feature pairs of x [B, H, L, D] by
    angles proportional to the position, so q·k depends on relative offsets."""
    L, D = x.shape[-2], x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)  # [D/2]
    angles = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * freqs  # [L, D/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, h):  # h: [B, L, H]
        B, L, H = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(rotary(q), rotary(k), v)  # [B, heads, L, H/heads], no causal mask: bidirectional
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, H))
        return h + self.mlp(self.norm2(h))


class MaskedTransformer(nn.Module):
    """tokens [B, L] (ids in [0, V], V = mask), t [B] -> logits [B, L, V] over the real tokens."""

    def __init__(self, vocab_size: int, hidden: int = 64, depth: int = 2, heads: int = 4, time_cond: bool = False):
        super().__init__()
        self.tok = nn.Embedding(vocab_size + 1, hidden)  # + 1: the mask token
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) if time_cond else None
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, vocab_size))

    def forward(self, tokens, t, cond=None):
        h = self.tok(tokens)  # [B, L, H]
        if self.time is not None:
            h = h + self.time(timestep_embedding(1000 * t, h.shape[-1]))[:, None]  # [B, 1, H]
        for block in self.blocks:
            h = block(h)
        return self.out(h)  # [B, L, V]


# ----------------------------------------------------------------------------------------------
# Plugin: load / train


TRAINED_DEFAULTS = {"schedule": "linear", **ARCH_DEFAULTS}  # the options a checkpoint is named by


def _check_text(dataset):
    if dataset.modality != "text":
        raise Incompatible(f"mdlm models token sequences; {dataset.name!r} is {dataset.modality}")


def _arch(options: dict) -> dict:
    return {k: options.get(k, v) for k, v in ARCH_DEFAULTS.items()}


def load_mdlm(dataset, *, device="cpu", schedule="linear", prompt="", checkpoint="", **arch):
    """The trained model as a MaskedDenoiser; ``prompt`` (text) is encoded with the dataset's
    vocabulary and kept as the prefix of every sample."""
    _check_text(dataset)
    arch = _arch(arch)
    options = {"schedule": schedule, "checkpoint": checkpoint, **arch}
    try:
        path = model_checkpoint("mdlm", dataset.name, options, TRAINED_DEFAULTS)
    except Incompatible:
        if checkpoint or arch["time_cond"]:
            raise
        # A time-independent x0 predictor serves every schedule (the ELBO does not depend on it).
        path = model_checkpoint("mdlm", dataset.name, {**options, "schedule": "linear"}, TRAINED_DEFAULTS)
    weights, config = load_checkpoint(path, device)
    model = config["model"]
    if model["signature"] != dataset.info["signature"]:
        raise Incompatible(f"mdlm checkpoint {path.name} was trained on {model['signature']}, "
                           f"not {dataset.info['signature']}")
    net = MaskedTransformer(model["vocab_size"], **_arch(model))
    net.load_state_dict(weights)
    prompt_ids = dataset.info["encode"](prompt) if prompt else None
    if prompt_ids is not None and len(prompt_ids) >= dataset.shape[0]:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves nothing to generate (seq_len {dataset.shape[0]})")
    return MaskedDenoiser(net.to(device).eval(), vocab_size=model["vocab_size"], mask_id=model["vocab_size"],
                          schedule=make_schedule(schedule), prompt=prompt_ids, name="mdlm")


def train_mdlm(dataset, out=None, *, device="cpu", steps=1500, batch_size=128, lr=2e-3, seed=0, progress=True,
               schedule="linear", prompt="", checkpoint="", **arch):
    """Train on the ELBO (module docstring). The shipped checkpoints: 1500 steps, batch 128 (markov-text)
    or 64 (char-text), ~0.06 s/step on one free CPU core; 8.5 min each on a busy 2-core machine."""
    _check_text(dataset)
    arch = _arch(arch)
    vocab_size, seq_len = dataset.info["vocab_size"], dataset.shape[0]
    net = MaskedTransformer(vocab_size, **arch)
    sched = make_schedule(schedule)
    x0, _ = dataset.train_set(20000)
    out = training_output(checkpoint_name("mdlm", dataset.name, {"schedule": schedule, **arch}, TRAINED_DEFAULTS),
                          out or checkpoint)

    def loss_fn(model, batch, labels, generator):
        denoiser = MaskedDenoiser(model, vocab_size=vocab_size, mask_id=vocab_size, schedule=sched)
        t = low_discrepancy_times(len(batch), generator, batch.device)  # [B]
        u = torch.rand(batch.shape, generator=generator, device=batch.device)  # [B, L]
        return masked_elbo_terms(denoiser, batch, t, u).mean() / seq_len  # nats per token

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=0.995)
    config = {"dataset": dataset.name, "signature": dataset.info["signature"], "vocab_size": vocab_size,
              "seq_len": seq_len, "schedule": schedule, **arch}
    train(net, loss_fn, x0, None, out, config, cfg, device=device, progress=progress)
    return checkpoint_files(out)[0]


@diffbench.hookimpl
def register_models(register):
    register(Model(name="mdlm", family="masked", load=load_mdlm, train=train_mdlm,
                   options={"schedule": Option("linear", choices=tuple(SCHEDULES)), "prompt": "", "checkpoint": "", **ARCH_DEFAULTS},
                   description="masked (absorbing-state) diffusion LM: bidirectional Transformer on the MDLM ELBO (shipped checkpoints)"))
