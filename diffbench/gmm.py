"""Exact Gaussian-mixture math: density, sampling, and the posterior mean E[x0 | x_t].

For data x0 ~ Σ_k w_k N(μ_k, Σ_k) and x_t = α x0 + σ ε, each component stays Gaussian:
x_t | k ~ N(α μ_k, α² Σ_k + σ² I). The posterior mean (the ideal denoiser, Tweedie) is

    E[x0 | x_t] = Σ_k r_k(x_t) [μ_k + α Σ_k (α² Σ_k + σ² I)^{-1} (x_t − α μ_k)],

with responsibilities r_k ∝ w_k N(x_t; α μ_k, α² Σ_k + σ² I). Computed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GaussianMixture", "oracle_denoiser"]


@dataclass(frozen=True)
class GaussianMixture:
    weights: torch.Tensor  # [K]
    means: torch.Tensor  # [K, D]
    covs: torch.Tensor  # [K, D, D]

    @classmethod
    def isotropic(cls, weights, means, stds) -> "GaussianMixture":
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        eye = torch.eye(means.shape[1], dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        return cls(weights / weights.sum(), means, stds[:, None, None] ** 2 * eye)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _component_log_probs(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """log w_k + log N(x; α μ_k, α² Σ_k + σ² I): [N, K] for x [N, D]."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov = alpha**2 * self.covs + sigma**2 * eye  # [K, D, D]
        dist = torch.distributions.MultivariateNormal(alpha * self.means, covariance_matrix=cov)
        return dist.log_prob(x.double()[:, None, :]) + torch.log(self.weights)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of data points x [N, D] -> [N]."""
        return torch.logsumexp(self._component_log_probs(x, 1.0, 0.0), dim=1)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n points [n, D] and their component labels [n]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)  # [K, D, D]
        x = self.means[k] + torch.einsum("nij,nj->ni", chol[k], noise)
        return x.float(), k

    def posterior_mean(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x0 | x_t] for x_t [N, D] at one time (alpha, sigma scalars) or per sample ([N])."""
        x = x_t.double()
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1, 1)[:, :, 0]  # [N or 1, 1, 1]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)[:, :, 0]
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov = alpha[..., None] ** 2 * self.covs + sigma[..., None] ** 2 * eye  # [N|1, K, D, D]
        resid = x[:, None, :] - alpha * self.means  # [N, K, D]
        solved = torch.linalg.solve(cov, resid.unsqueeze(-1)).squeeze(-1)  # [N, K, D]
        comp_mean = self.means + alpha * torch.einsum("kij,nkj->nki", self.covs, solved)  # [N, K, D]
        log_det = torch.logdet(cov)  # [N|1, K]
        log_r = torch.log(self.weights) - 0.5 * (log_det + (resid * solved).sum(-1))  # [N, K]
        r = torch.softmax(log_r, dim=1)
        return (r[..., None] * comp_mean).sum(1).to(x_t.dtype)


def oracle_denoiser(mixture: GaussianMixture, process, name: str = "gmm-oracle"):
    """The exact denoiser D(x, t) = E[x0 | x_t] of ``mixture`` under a Gaussian ``process``."""
    from diffbench.denoiser import Denoiser

    def posterior_mean(x, t, cond):  # x: [B, D], t: [B] in process time
        t = t.double().cpu()
        return mixture.posterior_mean(x.cpu(), process.alpha(t), process.sigma(t)).to(x.device)

    return Denoiser(posterior_mean, process, "x0", name=name)
