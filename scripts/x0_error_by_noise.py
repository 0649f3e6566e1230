"""How well an image model predicts x0 from x_t = α x0 + σ ε on held-out images, per noise level.

An ε-model's x̂0 = (x_t − σ ε̂) / α multiplies its ε error by σ / α (≈ 150 at t ≈ T on vp-linear), so
at low SNR its x̂0 is noise, and the [-1, 1] clipping the samplers apply (``clip_denoised``) turns
that noise grey; a v-model predicts x̂0 = α x_t − σ v̂ without the amplification (Salimans & Ho
2022, §4). Prints, per t, the mean squared error of the clipped x̂0 and its mean on the true
background pixels (-1 in the data), as a Markdown table (docs/checkpoints.md):

    OMP_NUM_THREADS=1 python scripts/x0_error_by_noise.py unet plugins/checkpoints/unet-shapes OTHER_CHECKPOINT ...
"""
from __future__ import annotations

import click
import torch

from diffbench.plugins import build_registry

TIMES = (20, 100, 300, 500, 700, 850, 950, 999)


@torch.no_grad()
def x0_errors(denoiser, x0, labels, generator) -> list[tuple[float, float]]:
    """[(mse of clipped x̂0, mean clipped x̂0 on background pixels)] at each of TIMES."""
    background = (x0 <= -0.999).all(1, keepdim=True).expand_as(x0)  # [B, C, H, W]
    rows = []
    for t in TIMES:
        t = torch.tensor(float(t), dtype=torch.float64)
        a, s = float(denoiser.process.alpha(t)), float(denoiser.process.sigma(t))
        x_t = a * x0 + s * torch.randn(x0.shape, generator=generator)
        x0_hat = denoiser(x_t, t, labels).clamp(-1, 1)
        rows.append((float((x0_hat - x0).pow(2).mean()), float(x0_hat[background].mean())))
    return rows


@click.command()
@click.argument("model")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--dataset", default="shapes", show_default=True)
@click.option("--num", default=64, show_default=True, help="held-out images")
def main(model: str, checkpoints: tuple[str, ...], dataset: str, num: int):
    registry = build_registry()
    data = registry.get("datasets", dataset).load()
    x0, labels = data.reference(num)
    columns = {}
    for path in checkpoints:
        denoiser = registry.get("models", model).load(data, checkpoint=path, clip_denoised=False)
        generator = torch.Generator().manual_seed(0)
        columns[f"{path} ({denoiser.parameterization})"] = x0_errors(denoiser, x0, labels, generator)
    process = denoiser.process
    print("| t | SNR | " + " | ".join(f"{name}: x̂0 mse / background" for name in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for i, t in enumerate(TIMES):
        snr = float(process.alpha(torch.tensor(float(t))) ** 2 / process.sigma(torch.tensor(float(t))) ** 2)
        cells = " | ".join(f"{col[i][0]:.3f} / {col[i][1]:+.2f}" for col in columns.values())
        print(f"| {t} | {snr:.2g} | {cells} |")


if __name__ == "__main__":
    main()
