"""Flow matching: the ``flow-mlp`` model and ODE samplers that integrate a velocity field.

Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) learns the velocity
u_θ(x_t, t) of the linear path x_t = (1 − t)·x0 + t·ε (``FlowProcess``: α = 1 − t, σ = t) by
regressing the conditional velocity ε − x0; sampling solves dx/dt = u_θ(x, t) from t = 1 to 0.
Two ways to straighten the learnt paths, so that fewer solver steps are needed: minibatch
optimal-transport pairing of noise and data (``ot=true``; OT-CFM, Tong et al. 2023) and reflow
(``reflow=true``; Liu et al. 2023, §2.2: retrain on the pairs (ODE solution, noise) of a trained flow).

The samplers speak only to ``denoiser.velocity`` in the process's own time, so they run on
any Gaussian process (for a flow model they integrate u_θ itself). NFE for ``steps``:

    flow-euler      steps
    flow-heun       2·steps − 1   (the last step, into clean data, is x̂0 = D(x, t): see _solve)
    flow-midpoint   2·steps − 1
    flow-dopri5     what the step-size controller needed (6 per accepted or rejected step + 2)
"""
from __future__ import annotations

from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

import diffbench
from diffbench.checkpoints import checkpoint_files, checkpoint_name, load_checkpoint, model_checkpoint, training_output
from diffbench.denoiser import Denoiser
from diffbench.generate import report_step
from diffbench.process import FlowProcess
from diffbench.registry import ConfigError, Incompatible, Model, Option, Sampler
from diffbench.training import TrainConfig, drop_labels, train
from diffbench_plugins.mlp import MLPDenoiserNet
from diffbench_plugins.image_model import ImageModelPlugin
from diffbench_plugins.unet import UNET_PLUGIN

DEFAULTS = {"hidden": 128, "depth": 3, "ot": False, "reflow": False}


# --- training -------------------------------------------------------------------------------


def ot_pairing(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Indices j(i) that re-pair the noise with the data by an exact minibatch OT assignment
    (Tong et al. 2023, §3.2): argmin over permutations of Σ_i ‖x0_i − ε_j(i)‖²."""
    cost = torch.cdist(x0.flatten(1).double(), eps.flatten(1).double()) ** 2  # [B, B]
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols, device=x0.device)


def flow_matching_loss(net, x0: torch.Tensor, generator: torch.Generator, ot: bool = False,
                       eps: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                       label_dropout: float = 0.0, null_class: int | None = None) -> torch.Tensor:
    """Conditional flow matching (Lipman et al. 2023, eq. 23 with σ_min = 0; Liu et al. 2023, eq. 1):
    E_{t ~ U[0,1], x0, ε} ‖u_θ(x_t, t) − (ε − x0)‖² with x_t = (1 − t) x0 + t ε. ``eps`` given: a
    fixed coupling (reflow); otherwise fresh independent noise, re-paired by OT with ``ot``.
    ``labels``: class-conditional, each replaced by ``null_class`` with probability ``label_dropout``
    (CFG training, Ho & Salimans 2022); OT re-pairs the noise only, so labels stay with their x0."""
    labels = drop_labels(labels, label_dropout, null_class, generator)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if ot:
        eps = eps[ot_pairing(x0, eps)]
    t = torch.rand(len(x0), generator=generator, device=x0.device, dtype=x0.dtype)
    t_ = t.reshape(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - t_) * x0 + t_ * eps
    return torch.mean((net(x_t, t, labels) - (eps - x0)) ** 2)


def fit(net, loss_fn, x0, out: Path, record: dict, cfg: TrainConfig, device, progress: bool) -> Path:
    """diffbench.training.train on unlabelled points; returns the checkpoint path."""
    train(net, loss_fn, x0, None, out, record, cfg, device=device, progress=progress)
    return checkpoint_files(out)[0]


# --- the flow-mlp model ---------------------------------------------------------------------


def _build(dataset, hidden: int, depth: int) -> MLPDenoiserNet:
    if dataset.modality != "points":
        raise Incompatible(f"flow-mlp models point data; {dataset.name!r} is {dataset.modality}")
    return MLPDenoiserNet(dataset.shape[0], FlowProcess(), hidden, depth)


def load_flow_mlp(dataset, *, device="cpu", checkpoint="", **options) -> Denoiser:
    opts = {**DEFAULTS, **options}
    net = _build(dataset, opts["hidden"], opts["depth"])
    path = model_checkpoint("flow-mlp", dataset.name, {**opts, "checkpoint": checkpoint}, DEFAULTS)
    weights, _ = load_checkpoint(path, device)
    net.load_state_dict(weights)
    return Denoiser(net.to(device).eval(), net.process, "velocity", name="flow-mlp")


def reflow_couplings(base: Denoiser, n: int, dim: int, steps: int, seed: int) -> torch.Tensor:
    """Reflow's training pairs (Liu et al. 2023, Alg. 1): noise ε and the base flow's ODE solution
    x̂0 = Φ(ε) (flow-heun, ``steps`` steps), stacked as [n, 2, D] = (x̂0, ε)."""
    eps = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    x0 = sample_flow_heun(base, eps.clone(), base.process.timesteps(steps))
    return torch.stack([x0, eps], 1)


def train_flow_mlp(dataset, out=None, *, device="cpu", steps=3000, batch_size=512, lr=2e-3, seed=0, progress=True,
                   reflow_steps=32, **options) -> Path:
    """Flow matching on 20k points (OT-CFM with ``ot=true``); ~1–2 min on one CPU thread. With
    ``reflow=true``: fine-tune the trained flow (with the same ``ot``) on 20k of its own couplings."""
    opts = {**DEFAULTS, **options}
    net = _build(dataset, opts["hidden"], opts["depth"])
    out = training_output(checkpoint_name("flow-mlp", dataset.name, opts, DEFAULTS), out)
    if opts["reflow"]:
        base = load_flow_mlp(dataset, device=device, **{**opts, "reflow": False})
        data = reflow_couplings(base, 20000, dataset.shape[0], int(reflow_steps), int(seed)).to(device)
        net.load_state_dict(base.net.state_dict())
    else:
        data, _ = dataset.train_set(20000)

    def loss_fn(model, batch, labels, generator):
        if opts["reflow"]:
            return flow_matching_loss(model, batch[:, 0], generator, eps=batch[:, 1])
        return flow_matching_loss(model, batch, generator, ot=opts["ot"])

    cfg = TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=float(lr), seed=int(seed), ema_decay=0.995)
    record = {"dataset": dataset.name, **opts, **({"reflow_steps": int(reflow_steps)} if opts["reflow"] else {})}
    return fit(net, loss_fn, data, out, record, cfg, device, progress)


# --- the flow-unet model: the U-Net of plugins/unet.py on the flow path --------------------


class FlowImagePlugin(ImageModelPlugin):
    """``unet``'s load/train/checkpoint logic with FlowProcess + velocity by default and the CFM
    loss above (``ot=true``: minibatch OT pairing). Checkpoint ``flow-unet-<dataset>[ot=true]``."""

    def options(self) -> dict:
        return {**super().options(), "process": "flow", "parameterization": "velocity", "ot": False}

    def validate(self, *, process: str = "flow", parameterization: str = "velocity", **options) -> None:
        super().validate(parameterization=parameterization, **options)
        if process != "flow" or parameterization != "velocity":
            raise ConfigError(f"{self.name} is the flow-matching U-Net (process=flow, parameterization=velocity); "
                              f"for other processes use unet")

    def loss(self, process, opts: dict, num_classes: int, label_dropout: float, min_snr_gamma: float = 0.0):
        if min_snr_gamma:
            raise Incompatible(f"{self.name}: min_snr_gamma weights the diffusion loss of unet / dit; "
                               f"the flow-matching loss takes no weighting (leave it 0)")
        ot = opts["ot"]

        def loss_fn(model, batch, labels, generator):
            return flow_matching_loss(model, batch, generator, ot=ot, labels=labels if num_classes else None,
                                      label_dropout=label_dropout if num_classes else 0.0, null_class=num_classes)
        return loss_fn


# The U-Net's configs, per-dataset defaults and training budgets; only the objective differs.
FLOW_UNET_PLUGIN = FlowImagePlugin(**{**vars(UNET_PLUGIN), "name": "flow-unet"})


# --- ODE samplers ---------------------------------------------------------------------------


def _solve(denoiser, x, timesteps, step, callback):
    """Apply ``step(denoiser, x, t_cur, t_next)`` along the grid. The step into clean data (σ = 0) is
    x = x̂0 = D(x, t_cur): exactly Euler's step for flow and EDM (x − t·u, resp. x − σ(x − D)/σ), and
    the DDIM limit where the velocity is singular at clean data (VP: σ' → ∞; VP-discrete's jump to
    t = −1). It also never asks for the velocity at σ = 0, which is 0/0 for a general process."""
    process, ts = denoiser.process, timesteps.tolist()
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        x = denoiser(x, t_cur) if float(process.sigma(t_next)) == 0 else step(denoiser, x, t_cur, t_next)
        report_step(callback, i, x, t_cur, t_next)
    return x


def velocity_euler_step(denoiser, x, t_cur, t_next):
    """x + h·u(x, t_cur), h = t_next − t_cur (the rectified-flow sampler of Liu et al. 2023, §2.1)."""
    return x + (t_next - t_cur) * denoiser.velocity(x, t_cur)


def velocity_heun_step(denoiser, x, t_cur, t_next):
    """Explicit trapezoid: Euler predictor, then the mean of the slopes at both ends (EDM Alg. 1)."""
    h = t_next - t_cur
    d = denoiser.velocity(x, t_cur)
    return x + 0.5 * h * (d + denoiser.velocity(x + h * d, t_next))


def velocity_midpoint_step(denoiser, x, t_cur, t_next):
    """Explicit midpoint (RK2): x + h·u(x + (h/2)·u(x, t_cur), t_cur + h/2)."""
    h = t_next - t_cur
    return x + h * denoiser.velocity(x + 0.5 * h * denoiser.velocity(x, t_cur), t_cur + 0.5 * h)


@torch.no_grad()
def sample_flow_euler(denoiser, x, timesteps, *, generator=None, callback=None):
    """Euler's method on dx/dt = u(x, t), first order."""
    return _solve(denoiser, x, timesteps, velocity_euler_step, callback)


@torch.no_grad()
def sample_flow_heun(denoiser, x, timesteps, *, generator=None, callback=None):
    """Heun's method on dx/dt = u(x, t), second order; 2 calls per step, 1 on the step to data."""
    return _solve(denoiser, x, timesteps, velocity_heun_step, callback)


@torch.no_grad()
def sample_flow_midpoint(denoiser, x, timesteps, *, generator=None, callback=None):
    """The midpoint method on dx/dt = u(x, t), second order; 2 calls per step, 1 on the step to data."""
    return _solve(denoiser, x, timesteps, velocity_midpoint_step, callback)


# Dormand & Prince (1980), RK5(4)7FM: nodes c, stage weights A, 5th-order weights B5 (FSAL: the
# last stage of a step is the first of the next) and the 4th-order embedded weights B4.
DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DOPRI_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _dopri_step(f, x, t, h, k1):
    """One Dormand–Prince step from (x, t) with slope k1 = f(x, t): (x5, error estimate x5 − x4, k7)."""
    ks = [k1]
    for c, a in zip(DOPRI_C[1:], DOPRI_A[1:]):
        xi = x + h * sum(aj * kj for aj, kj in zip(a, ks) if aj != 0.0)
        ks.append(f(xi, t + c * h))
    x5 = xi  # the 7th stage is evaluated at the 5th-order solution (FSAL)
    err = h * sum((b5 - b4) * k for b5, b4, k in zip(DOPRI_A[6] + (0.0,), DOPRI_B4, ks))
    return x5, err, ks[-1]


def stop_time(process, t_eps: float) -> float:
    """Where the adaptive ODE solve ends before the final x̂0 step: the process's t_min, or a fraction
    t_eps of the time range above clean data when t_min is clean data itself (flow), where the
    velocity of a general process is 0/0."""
    if process.t_min != process.t_data:
        return process.t_min
    return process.t_data + t_eps * (process.t_max - process.t_data)


@torch.no_grad()
def sample_flow_dopri5(denoiser, x, timesteps, *, generator=None, callback=None, rtol=1e-5, atol=1e-5, t_eps=1e-4,
                       max_nfe=10000):
    """Adaptive Dormand–Prince 5(4) (Hairer, Nørsett & Wanner, Solving ODEs I, §II.4–5) from
    timesteps[0] to ``stop_time`` then the exact-to-O(t_eps²) step x0 = D(x, t_stop).

    Error control on the worst sample's RMS of err / (atol + rtol·max(|x|, |x_new|)) (so the batch
    shares one step sequence); step factor 0.9·err^(−1/5) clipped to [0.2, 10]. The first step
    size is (t_stop − t_max)/steps: ``steps`` only seeds the controller.
    """
    process = denoiser.process
    t_start, t_stop = float(timesteps[0]), stop_time(process, t_eps)
    t, h = t_start, (t_stop - t_start) / (len(timesteps) - 1)
    nfe_start = denoiser.nfe  # the counter is shared across batches: count this solve only
    k1, i = denoiser.velocity(x, t), 0
    while t - t_stop > 1e-12 * (t_start - t_stop):
        if denoiser.nfe - nfe_start > max_nfe:
            raise RuntimeError(f"flow-dopri5: more than max_nfe={max_nfe} evaluations (rtol={rtol}, atol={atol})")
        h = max(h, t_stop - t)  # h < 0: never step past t_stop
        x_new, err, k7 = _dopri_step(denoiser.velocity, x, t, h, k1)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err_norm = float((err / scale).flatten(1).pow(2).mean(1).sqrt().max())
        if err_norm <= 1.0:
            report_step(callback, i, x_new, t, t + h)
            t, x, k1, i = t + h, x_new, k7, i + 1
        h *= min(10.0, max(0.2, 0.9 * err_norm ** -0.2 if err_norm > 0 else 10.0))
    return denoiser(x, t_stop)


@diffbench.hookimpl
def register_models(register):
    register(Model(name="flow-mlp", family="gaussian", load=load_flow_mlp, train=train_flow_mlp,
                   options={**DEFAULTS, "checkpoint": ""},
                   description="flow matching (velocity on the linear path) with the residual MLP for toy points; "
                               "ot=true: minibatch OT-CFM; reflow=true: rectified on its own couplings"))
    FLOW_UNET_PLUGIN.register(register, "flow matching (velocity on the linear path, CFM loss; ot=true: OT-CFM) with "
                                        "the U-Net of plugins/unet.py; class-conditional with a null class for CFG")


@diffbench.hookimpl
def register_samplers(register):
    register(Sampler(name="flow-euler", family="gaussian", fn=sample_flow_euler,
                     description="Euler on the velocity ODE dx/dt = u(x, t) in process time (NFE = steps)"))
    register(Sampler(name="flow-heun", family="gaussian", fn=sample_flow_heun,
                     description="Heun (trapezoid) on the velocity ODE; last step x0 (NFE = 2*steps-1)"))
    register(Sampler(name="flow-midpoint", family="gaussian", fn=sample_flow_midpoint,
                     description="explicit midpoint (RK2) on the velocity ODE; last step x0 (NFE = 2*steps-1)"))
    register(Sampler(name="flow-dopri5", family="gaussian", fn=sample_flow_dopri5, primary="rtol",
                     options={"rtol": Option(1e-5, min=0.0), "atol": Option(1e-5, min=0.0), "t_eps": Option(1e-4, min=0.0, max=1.0),
                              "max_nfe": Option(10000, min=1)}, aliases=("dopri5", "rk45"),
                     description="adaptive Dormand-Prince 5(4) on the velocity ODE (NFE = actual evaluations)"))
