"""Small CNN classifiers for the image datasets, shipped as safetensors checkpoints.

* ``<dataset>-cnn`` (``digits-cnn``, ``shapes-cnn``): a classifier of clean images. Its
  penultimate features are the domain feature extractor for FID / KID (registered with
  torch-fidelity in :mod:`diffbench_plugins.image_metrics`) and its predictions give ``class-acc``.
* ``<dataset>-noisy-cnn``: the same network conditioned on the diffusion time and trained on noisy
  x_t of the discrete VP (linear) process, for classifier guidance (Dhariwal & Nichol 2021, §4).

Train them with ``python -m diffbench_plugins.classifier DATASET [--noisy] [--steps N]``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffbench.checkpoints import checkpoint_files, load_checkpoint, locate_checkpoint, training_output
from diffbench.denoiser import append_dims
from diffbench.nn.embeddings import time_input, timestep_embedding
from diffbench.nn.layers import group_norm
from diffbench.process import make_process
from diffbench.training import TrainConfig, sample_train_times, train



class ConvClassifier(nn.Module):
    """x [B, C, H, W] (in [-1, 1]) -> logits [B, K]; ``features(x)`` -> [B, 4·width·pool²].

    Three conv stages (width, 2·width, 4·width channels; 2× average pooling between them), then
    average pooling over a ``pool`` × ``pool`` grid (1: global; 2 keeps which quadrant a feature is
    in). With ``process`` given, a sinusoidal embedding of the diffusion time is added after every
    conv (noise-conditional classifier)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, process=None, pool: int = 1):
        super().__init__()
        self.process, self.pool = process, pool
        widths = (width, width, 2 * width, 2 * width, 4 * width)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.convs.append(nn.Conv2d(cin, w, 3, padding=1))
            self.norms.append(group_norm(w, 8))
            cin = w
        self.time = (nn.ModuleList(nn.Linear(64, w) for w in widths) if process is not None else None)
        self.head = nn.Linear(cin * pool * pool, num_classes)

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        temb = timestep_embedding(time_input(self.process, t), 64) if self.time is not None else None  # [B, 64]
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = conv(h)
            if temb is not None:
                h = h + self.time[i](temb)[:, :, None, None]
            h = F.silu(norm(h))
            if i in (1, 3) and h.shape[-1] > 2:  # 2× downsampling after stages 1 and 2
                h = F.avg_pool2d(h, 2)
        return F.adaptive_avg_pool2d(h, self.pool).flatten(1)  # [B, 4·width·pool²]

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x, t))


def load_classifier(name: str, device="cpu", checkpoint: str | Path = "") -> ConvClassifier:
    """Load ``<dataset>-cnn`` or ``<dataset>-noisy-cnn`` (or the file ``checkpoint``); Incompatible if none exists."""
    dataset = name.split("-")[0]
    path = locate_checkpoint(name, explicit=checkpoint, train_hint=f"python -m diffbench_plugins.classifier {dataset}"
                             + (" --noisy" if "noisy" in name else ""))
    weights, config = load_checkpoint(path, device)
    m = config["model"]
    process = make_process(m["process"]) if m.get("process") else None
    net = ConvClassifier(m["in_channels"], m["num_classes"], m["width"], process, m.get("pool", 1))
    net.load_state_dict(weights)
    return net.to(device).eval().requires_grad_(False)


def train_classifier(dataset, *, noisy: bool = False, steps: int = 800, batch_size: int = 128, lr: float = 2e-3,
                     width: int = 32, process: str = "vp-linear", seed: int = 0, device="cpu", out=None) -> Path:
    """Cross-entropy training on the dataset's training half (the reference half stays held out)."""
    x0, labels = dataset.train_set()
    proc = make_process(process) if noisy else None
    net = ConvClassifier(x0.shape[1], dataset.num_classes, width, proc)
    name = f"{dataset.name}-noisy-cnn" if noisy else f"{dataset.name}-cnn"

    def loss_fn(model, batch, batch_labels, generator):
        if proc is None:
            # Light augmentation (±1 pixel shifts) so features do not latch onto exact pixels.
            shift = tuple(torch.randint(-1, 2, (2,), generator=generator).tolist())
            return F.cross_entropy(model(torch.roll(batch, shift, dims=(2, 3))), batch_labels)
        t = sample_train_times(proc, len(batch), generator, batch.device)
        eps = torch.randn(batch.shape, generator=generator, device=batch.device)
        x_t = append_dims(proc.alpha(t), batch) * batch + append_dims(proc.sigma(t), batch) * eps
        return F.cross_entropy(model(x_t, t.float()), batch_labels)

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=0.99, checkpoint_every=10**9)
    record = {"dataset": dataset.name, "in_channels": x0.shape[1], "num_classes": dataset.num_classes,
              "width": width, "process": process if noisy else None}
    out = training_output(name, out)
    train(net, loss_fn, x0, labels, out, record, cfg, device=device)
    return checkpoint_files(out)[0]


@torch.no_grad()
def accuracy(net: ConvClassifier, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | None = None) -> float:
    preds = torch.cat([net(x[i:i + 512], None if t is None else t[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((preds == labels).float().mean())


def main(argv=None):
    from diffbench_plugins.image_data import load_digits, load_shapes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["digits", "shapes"])
    parser.add_argument("--noisy", action="store_true", help="noise-conditional classifier (classifier guidance)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--out", default=None, help="checkpoint path without suffix (default: the user cache)")
    args = parser.parse_args(argv)
    dataset = {"digits": load_digits, "shapes": load_shapes}[args.dataset]()
    tic = time.time()
    path = train_classifier(dataset, noisy=args.noisy, steps=args.steps, width=args.width, out=args.out)
    net = load_classifier(path.stem, checkpoint=path)
    x, y = dataset.reference(10**6)
    t = None
    if args.noisy:  # accuracy at a moderate noise level, t = N/4
        t = torch.full((len(x),), 250.0)
        proc = net.process
        x = append_dims(proc.alpha(t.double()), x) * x + append_dims(proc.sigma(t.double()), x) * torch.randn_like(x)
    print(f"{path.name}: held-out accuracy {accuracy(net, x, y, t):.4f} ({time.time() - tic:.0f} s)")


if __name__ == "__main__":
    main()
