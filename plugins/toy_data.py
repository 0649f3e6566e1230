"""Toy datasets with known structure: 1-D and 2-D Gaussian mixtures (exact density and exact
denoiser) and the classic 2-D point clouds (moons, swiss roll, checkerboard)."""
from __future__ import annotations

import math

import torch

import diffbench
from diffbench.data import DataSource
from diffbench.gmm import GaussianMixture
from diffbench.registry import Dataset

# The 1-D mixture of the notes' NumPy demo: three well-separated modes of unequal weight.
MOG_1D = GaussianMixture.isotropic([0.3, 0.5, 0.2], [[-2.0], [0.5], [2.5]], [0.3, 0.4, 0.25])


def gmm_2d(modes: int = 8, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """`modes` equal-weight isotropic Gaussians on a circle (the usual 2-D GMM benchmark)."""
    angles = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture.isotropic(torch.ones(modes), means, torch.full((modes,), std))


def _mixture_source(name: str, mixture: GaussianMixture) -> DataSource:
    return DataSource(
        name=name, modality="points", shape=(mixture.dim,), draw=mixture.sample,
        num_classes=0, mixture=mixture, log_prob=mixture.log_prob,
    )


def draw_moons(n: int, g: torch.Generator, noise: float = 0.05):
    """Two interleaving half circles (as scikit-learn's make_moons), standardised."""
    upper = torch.rand(n, generator=g) < 0.5
    angle = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=g)
    return (pts - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5]), None


def draw_swiss_roll(n: int, g: torch.Generator, noise: float = 0.05):
    """The 2-D swiss roll: radius grows with angle from 1.5π to 4.5π; scaled to unit spread."""
    angle = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    pts = torch.stack([angle * angle.cos(), angle * angle.sin()], 1) / 7.0
    return pts + noise * torch.randn(n, 2, generator=g), None


def draw_checkerboard(n: int, g: torch.Generator):
    """Uniform on the black squares of a 4×4 checkerboard over [-2, 2]²: density 1/8 there."""
    cells = torch.randint(0, 8, (n,), generator=g)
    row = cells // 2
    col = 2 * (cells % 2) + (row % 2)
    pts = torch.stack([col, row], 1).float() + torch.rand(n, 2, generator=g)
    return pts - 2.0, None


def checkerboard_log_prob(x: torch.Tensor) -> torch.Tensor:
    inside = (x.abs() < 2).all(dim=1)
    cell = torch.floor(x + 2).long()
    black = (cell[:, 0] + cell[:, 1]) % 2 == 0  # the squares draw_checkerboard fills
    return torch.where(inside & black, torch.full_like(x[:, 0], math.log(1 / 8)), torch.full_like(x[:, 0], -math.inf))


@diffbench.hookimpl
def register_datasets(register):
    register(Dataset(name="mog-1d", description="1-D mixture of three Gaussians (the notes' NumPy demo); exact density",
                     family="points", load=lambda: _mixture_source("mog-1d", MOG_1D)))
    register(Dataset(name="gmm-2d", description="2-D mixture of Gaussians on a circle; exact density and denoiser",
                     family="points", options={"modes": 8, "radius": 2.0, "std": 0.15},
                     load=lambda modes, radius, std: _mixture_source("gmm-2d", gmm_2d(modes, radius, std))))
    register(Dataset(name="moons", description="two interleaving half circles (2-D point cloud)", family="points",
                     load=lambda: DataSource(name="moons", modality="points", shape=(2,), draw=draw_moons)))
    register(Dataset(name="swiss-roll", description="2-D swiss roll point cloud", family="points",
                     load=lambda: DataSource(name="swiss-roll", modality="points", shape=(2,), draw=draw_swiss_roll)))
    register(Dataset(name="checkerboard", description="uniform on a 4x4 checkerboard's black squares; exact density",
                     family="points",
                     load=lambda: DataSource(name="checkerboard", modality="points", shape=(2,),
                                             draw=draw_checkerboard, log_prob=checkerboard_log_prob)))
