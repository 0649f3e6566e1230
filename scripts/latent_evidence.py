"""Evidence for latent diffusion and text conditioning: writes results/reports/latent.md and plots.

 1. The autoencoder: PSNR and FID (domain extractor) of reconstructions of held-out images, per dataset.
 2. Latent vs pixel models on ``shapes`` (class-conditional, DDIM 25 steps, cfg 3): FID, class-acc,
    sampling and decoding wall per sample, peak memory, and the training budget of each checkpoint.
 3. ``shapes-text``: caption-acc (seen / held-out) and FID against the CFG scale (0, 1, 3, 7.5) at
    25 DDIM steps, and against NFE for DDIM and DPM-Solver++ at cfg 3.

Every number comes from the grid runner (``GridRunner``, the code path of ``diffbench run``).

    python scripts/latent_evidence.py [--num-samples 128] [--out results/reports]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from diffbench.checkpoints import checkpoint_files, find_checkpoint  # noqa: E402
from diffbench.grid import build_config  # noqa: E402
from diffbench.metrics import MetricContext  # noqa: E402
from diffbench.plugins import build_registry  # noqa: E402
from diffbench.runner import GridRunner  # noqa: E402
from diffbench_plugins.image_data import load_shapes  # noqa: E402
from diffbench_plugins.image_metrics import compute_fid  # noqa: E402
from diffbench_plugins.text_image_data import load_shapes_text  # noqa: E402
from diffbench_plugins.vae import load_autoencoder, psnr, reconstruct  # noqa: E402

CAPTION = ["caption-acc[seen]", "caption-acc[held-out]"]


def grid(registry, out: Path, **axes) -> pd.DataFrame:
    config = build_config(registry, {"repeats": 1, "batch_size": 256, **axes})
    return GridRunner(registry, config, out, progress=False).run()


def reconstruction_table(n: int, cache: Path) -> pd.DataFrame:
    vae, scale = load_autoencoder("vae-shapes")
    rows = []
    for dataset in (load_shapes(), load_shapes_text()):
        x, _ = dataset.reference(2 * n)
        real, held = x[:n], x[n:]
        ctx = MetricContext(dataset=dataset, reference=held, reference_labels=None, labels=None, denoiser=None,
                            device=torch.device("cpu"), seed=0, cache_dir=cache)
        recon = reconstruct(vae, real)
        (column, recon_fid), = compute_fid(recon, ctx).items()
        rows.append({"dataset": dataset.name, "images": n, "psnr_db": psnr(recon, real), "extractor": column,
                     "fid of reconstructions": recon_fid, "fid of the real images (floor)": compute_fid(real, ctx)[column],
                     "scaling_factor": scale})
    return pd.DataFrame(rows)


def training_budget(model: str, dataset: str) -> str:
    path = find_checkpoint(f"{model}-{dataset}")
    if path is None:
        return "?"
    train = json.loads(checkpoint_files(path)[1].read_text())["train"]
    return f"{train['steps']} × {train['batch_size']}"


def plot_lines(df: pd.DataFrame, x: str, ys: list[str], by: str, path: Path, logx: bool = False) -> None:
    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.4))
    for ax, y in zip(axes, ys):
        for name, part in df.groupby(by):
            part = part.sort_values(x)
            ax.plot(part[x], part[y], marker="o", label=str(name))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--out", default="results/reports")
    parser.add_argument("--work", default="/tmp/latent-evidence", help="where the grid runs write their tables")
    args = parser.parse_args(argv)
    out, work, n = Path(args.out), Path(args.work), args.num_samples
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    registry = build_registry()
    fid = "fid[shapes-text-cnn]"

    recon = reconstruction_table(500, work / "cache")

    pixel = grid(registry, work / "pixel", models=["unet", "dit", "ldm-unet", "ldm-dit"], samplers=["ddim"],
                 guidance=["cfg:3.0"], steps=[25], datasets=["shapes"], metrics=["fid", "class-acc"], num_samples=n)
    pixel["decode_ms_per_sample"] = pixel.get("decode_ms", 0.0) / pixel["batch_size"]
    pixel["sampling_ms_per_sample"] = 1e3 * pixel["wall_s"] / pixel["batch_size"]
    pixel["training (steps × batch)"] = [training_budget(m, "shapes") for m in pixel["model"]]

    scales = grid(registry, work / "cfg", models=["ldm-unet", "ldm-dit"], samplers=["ddim"],
                  guidance=["none", "cfg:0.0", "cfg:1.0", "cfg:3.0", "cfg:7.5"], steps=[25], datasets=["shapes-text"],
                  metrics=["fid", "caption-acc"], num_samples=n)
    scales["cfg_scale"] = [float(g.split("=")[1].rstrip("]")) if "=" in g else float("nan") for g in scales["guidance"]]
    nfe = grid(registry, work / "nfe", models=["ldm-unet", "ldm-dit"], samplers=["ddim", "dpm-solver++"],
               guidance=["cfg:3.0"], steps=[5, 10, 25], datasets=["shapes-text"], metrics=["fid", "caption-acc"],
               num_samples=n)

    guided = scales.dropna(subset=["cfg_scale"])
    plot_lines(guided, "cfg_scale", [*CAPTION, fid], "model", out / "latent_cfg.png")
    nfe["model · sampler"] = nfe["model"] + " · " + nfe["sampler"]
    plot_lines(nfe, "nfe", [*CAPTION, fid], "model · sampler", out / "latent_nfe.png", logx=True)

    columns = ["model", "status", "fid[shapes-cnn]", "class-acc", "sampling_ms_per_sample", "decode_ms_per_sample",
               "peak_mem_mb", "autoencoder", "latent_scale", "training (steps × batch)"]
    sections = [
        "# Latent diffusion and text conditioning on CPU\n",
        f"Generated by `python scripts/latent_evidence.py --num-samples {n}` (one thread, shared 2-core CPU: "
        "compare timings as ratios within a table). FID uses the shipped domain extractors "
        "(`shapes-cnn`, `shapes-text-cnn`) through torch-fidelity, "
        f"{n} samples against {max(2000, n)} held-out images.\n",
        "## 1. Autoencoder (vae-shapes) reconstructions\n",
        "500 held-out images per dataset, reconstructed through the posterior mean; FID against 500 other "
        "held-out images, next to the FID of the 500 real images themselves (the floor at this sample size).\n",
        recon.to_markdown(index=False, floatfmt=".4g"),
        "\n## 2. Latent vs pixel on shapes (class-conditional, DDIM 25 steps, cfg 3)\n",
        "`sampling_ms_per_sample` is the sampler's wall (network calls on latents for ldm-*) per sample; "
        "`decode_ms_per_sample` the autoencoder decoding, timed apart; peak memory covers both.\n",
        pixel[[c for c in columns if c in pixel.columns]].to_markdown(index=False, floatfmt=".4g"),
        "\n## 3. shapes-text: guidance scale (DDIM, 25 steps)\n",
        "![caption-acc and FID vs CFG scale](latent_cfg.png)\n",
        scales[["model", "guidance", "status", *CAPTION, fid]].to_markdown(index=False, floatfmt=".4g"),
        "\n## 4. shapes-text: NFE (cfg 3)\n",
        "![caption-acc and FID vs NFE](latent_nfe.png)\n",
        nfe[["model", "sampler", "steps", "nfe", "status", *CAPTION, fid]].to_markdown(index=False, floatfmt=".4g"),
    ]
    (out / "latent.md").write_text("\n".join(sections) + "\n")
    for name, df in {"latent_recon": recon, "latent_pixel": pixel, "latent_cfg": scales, "latent_nfe": nfe}.items():
        df.to_csv(out / f"{name}.csv", index=False)
    print((out / "latent.md").read_text())


if __name__ == "__main__":
    main()
