"""Evidence for the image models, FID and guidance: writes results/reports/image_evidence.md.

Tables (FID with the shipped domain extractor, torch-fidelity; N samples vs N held-out images):
 1. FID of each shipped model (DDIM, 50 NFE, CFG off) next to pure noise, an under-trained
    checkpoint (trained on the fly, few steps) and the floor (FID between two disjoint real halves).
 2. class-acc (and FID) vs classifier-free guidance scale w ∈ {0, 1, 3}.
 3. FID vs NFE (10, 20, 50) for ddpm, ddim and dpm-solver-pp (when present).

    python scripts/image_evidence.py [--num-samples 500] [--datasets digits,shapes] [--models unet,dit]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffbench.checkpoints import find_checkpoint
from diffbench.generate import class_labels, generate
from diffbench.metrics import MetricContext
from diffbench_plugins import samplers as sampler_module
from diffbench_plugins.dit import DIT_PLUGIN
from diffbench_plugins.guidance import apply_cfg, apply_classifier
from diffbench_plugins.image_data import load_digits, load_shapes
from diffbench_plugins.image_metrics import compute_class_acc, compute_fid
from diffbench_plugins.unet import UNET_PLUGIN

DATASETS = {"digits": load_digits, "shapes": load_shapes}
PLUGINS = {"unet": UNET_PLUGIN, "dit": DIT_PLUGIN}
SAMPLERS = {"ddpm": (sampler_module.sample_ddpm, "uniform"), "ddim": (sampler_module.sample_ddim, "uniform")}
if hasattr(sampler_module, "sample_dpm_solver_pp"):
    SAMPLERS["dpm-solver-pp"] = (sampler_module.sample_dpm_solver_pp, "uniform-logsnr")


@torch.no_grad()
def sample_images(den, shape, n: int, steps: int, sampler: str = "ddim", cfg: float | None = None, seed: int = 0,
                  batch: int = 250):
    """n samples through diffbench.generate (label i % K, noise from (seed, i)). Returns (samples, labels, nfe, seconds)."""
    fn, spacing = SAMPLERS[sampler]
    guided = apply_cfg(den, cfg) if cfg is not None else den
    timesteps = den.process.timesteps(steps, spacing)
    out, start, tic = [], den.nfe, time.perf_counter()
    for lo in range(0, n, batch):
        out.append(generate(guided, fn, timesteps, range(lo, min(n, lo + batch)), shape, seed=seed).samples.clamp(-1, 1))
    n_batches = -(-n // batch)
    return torch.cat(out), class_labels(den, range(n)), (den.nfe - start) // n_batches, time.perf_counter() - tic


def ctx_for(ds, reference, ref_labels, labels, cache):
    return MetricContext(dataset=ds, reference=reference, reference_labels=ref_labels, labels=labels, denoiser=None,
                         device=torch.device("cpu"), seed=0, cache_dir=cache)


def fid_of(ds, samples, reference, cache):
    return next(iter(compute_fid(samples, ctx_for(ds, reference, None, None, cache)).values()))


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--datasets", default="digits,shapes")
    parser.add_argument("--models", default="unet,dit")
    parser.add_argument("--undertrained-steps", type=int, default=100)
    parser.add_argument("--quick-datasets", default="",
                        help="datasets for which only the shipped models' FID row is computed (CPU budget)")
    parser.add_argument("--out", default="results/reports/image_evidence.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.num_samples
    cache = Path(tempfile.mkdtemp(prefix="diffbench-evidence-"))
    sections = [f"# Image models: evidence\n\nFID columns use the shipped domain extractor "
                f"(`<dataset>-cnn`, torch-fidelity); {n} generated samples vs {n} held-out images. "
                f"Samples: label i % K, noise from (seed 0, i). Written by "
                f"`OMP_NUM_THREADS=1 python scripts/image_evidence.py {' '.join(sys.argv[1:])}`.\n"]
    rows_main, rows_cfg, rows_nfe = [], [], []
    for ds_name in args.datasets.split(","):
        ds = DATASETS[ds_name]()
        reference, ref_labels = ds.reference(n)
        train_x, _ = ds.train_set()
        floor = fid_of(ds, train_x[:n], reference, cache)
        noise = torch.randn((n, *ds.shape), generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
        rows_main.append((ds_name, "real train half (floor)", "-", floor))
        rows_main.append((ds_name, "Gaussian noise", "-", fid_of(ds, noise, reference, cache)))
        for model in args.models.split(","):
            plugin = PLUGINS[model]
            den = plugin.load(ds)
            x, labels, nfe, secs = sample_images(den, ds.shape, n, 50, "ddim")
            rows_main.append((ds_name, f"{model} (shipped)", nfe, fid_of(ds, x, reference, cache)))
            if ds_name in args.quick_datasets.split(","):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                plugin.train(ds, Path(tmp) / "under", steps=args.undertrained_steps, progress=False)
                under = plugin.load(ds, checkpoint=str(Path(tmp) / "under"))
            xu, *_ = sample_images(under, ds.shape, n, 50, "ddim")
            rows_main.append((ds_name, f"{model} ({args.undertrained_steps} training steps)", nfe,
                              fid_of(ds, xu, reference, cache)))
            for w in (0.0, 1.0, 3.0):
                xg, labels, nfe_g, _ = sample_images(den, ds.shape, n, 50, "ddim", cfg=w)
                acc = compute_class_acc(xg, ctx_for(ds, reference, ref_labels, labels, cache))
                rows_cfg.append((ds_name, model, f"cfg:{w:g}", nfe_g, acc, fid_of(ds, xg, reference, cache)))
            if find_checkpoint(f"{ds_name}-noisy-cnn") is not None:
                for s in (1.0, 3.0):
                    xg, labels, nfe_g, _ = sample_images(apply_classifier(den, s), ds.shape, n, 50, "ddim")
                    acc = compute_class_acc(xg, ctx_for(ds, reference, ref_labels, labels, cache))
                    rows_cfg.append((ds_name, model, f"classifier:{s:g}", nfe_g, acc, fid_of(ds, xg, reference, cache)))
            for sampler in SAMPLERS:
                for steps in (10, 20, 50):
                    xs, _, nfe_s, secs = sample_images(den, ds.shape, n, steps, sampler)
                    rows_nfe.append((ds_name, model, sampler, nfe_s, fid_of(ds, xs, reference, cache), secs))
            print(f"{ds_name}/{model} done", flush=True)
    sections.append("## FID at 50 NFE (DDIM, no guidance) vs baselines\n\n"
                    + md_table(["dataset", "samples from", "NFE", "FID[domain]"], rows_main))
    sections.append("## Guidance (DDIM, 50 steps): classifier-free (one batched NFE per step) and classifier\n\n"
                    + md_table(["dataset", "model", "guidance", "NFE", "class-acc", "FID[domain]"], rows_cfg))
    sections.append("## FID vs NFE (no guidance)\n\n"
                    + md_table(["dataset", "model", "sampler", "NFE", "FID[domain]", "wall s"], rows_nfe))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(sections) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
