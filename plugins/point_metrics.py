"""Metrics for point clouds (toy 1-D / 2-D data): sliced Wasserstein distance, MMD, and the mean
log-density of the samples under the true density where it is known."""
from __future__ import annotations

import torch

import diffbench
from diffbench.metrics import MetricContext
from diffbench.registry import Incompatible, Metric, Option


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """SW_2 (Rabin et al. 2011): the 1-D W_2 along random directions, averaged, then sqrt.

    In 1-D, W_2 between equal-size empirical sets is the RMS gap of their sorted values;
    sets of different sizes are compared at shared quantiles.
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, py = (x.double() @ dirs).sort(0).values, (y.double() @ dirs).sort(0).values  # [N, P], [M, P]
    q = torch.linspace(0, 1, max(len(px), len(py)), dtype=torch.float64)
    px, py = (torch.quantile(p, q, dim=0) if len(p) != len(q) else p for p in (px, py))
    return float(((px - py) ** 2).mean().sqrt())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) with a sum of RBF kernels."""
    x, y = x.double(), y.double()

    def kernel(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h**2)) for h in bandwidths)

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = len(x), len(y)
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def _flat(samples: torch.Tensor, ctx: MetricContext):
    return samples.reshape(len(samples), -1).cpu(), ctx.reference.reshape(len(ctx.reference), -1).cpu()


def compute_swd(samples, ctx: MetricContext, projections: int = 256):
    x, y = _flat(samples, ctx)
    return sliced_wasserstein(x, y, projections, seed=ctx.seed)


def compute_mmd(samples, ctx: MetricContext):
    x, y = _flat(samples, ctx)
    return mmd_rbf(x[:2000], y[:2000])


def compute_logp(samples, ctx: MetricContext):
    """Mean log-density of samples under the true density; -inf samples (off the support) are
    reported as the fraction outside instead of making the mean infinite."""
    if ctx.dataset.log_prob is None:
        raise Incompatible(f"dataset {ctx.dataset.name!r} has no known density")
    logp = ctx.dataset.log_prob(samples.cpu().double())
    finite = torch.isfinite(logp)
    return {"logp": float(logp[finite].mean()) if finite.any() else float("-inf"),
            "off-support": float(1 - finite.double().mean())}


@diffbench.hookimpl
def register_metrics(register):
    register(Metric(name="swd", family="points", compute=compute_swd, options={"projections": Option(256, min=1)},
                    description="sliced Wasserstein-2 distance to held-out data (lower is better)"))
    register(Metric(name="mmd", family="points", compute=compute_mmd,
                    description="unbiased MMD² with a multi-bandwidth RBF kernel (lower is better)"))
    register(Metric(name="logp", family="points", compute=compute_logp,
                    higher_is_better={"logp": True, "off-support": False},
                    description="mean log-density of samples under the true density (higher is better); off-support: fraction with zero density"))
