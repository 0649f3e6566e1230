"""Loading, training and checkpoints shared by the image networks (``unet``, ``dit``,
``flow-unet``): :class:`ImageModelPlugin` turns a network factory and its named configs into a
registered :class:`~diffbench.registry.Model`, and :class:`ClipDenoised` clips the implied x̂0
to the data range as the DDPM reference sampler does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from diffbench.checkpoints import load_checkpoint
from diffbench.denoiser import Denoiser, _per_sample
from diffbench.process import make_process
from diffbench.registry import Incompatible, Model
from diffbench.training import TrainConfig, denoising_loss, train, train_command

SHIPPED = Path(__file__).parent / "checkpoints"
USER_CACHE = Path.home() / ".cache" / "diffbench" / "checkpoints"


class ClipDenoised(nn.Module):
    """Wraps a network so that its implied x0 prediction is clipped to the data range [-1, 1], as
    the DDPM reference sampler does (``clip_denoised=True``; diffusers' ``clip_sample``). Without
    it a small ε-model's error at t ≈ T is amplified by σ/α ≈ 150 in x̂0 and ruins the samples."""

    def __init__(self, model: nn.Module, process, parameterization: str):
        super().__init__()
        self.model, self.process, self.parameterization = model, process, parameterization

    def forward(self, x, t, cond=None):
        out = self.model(x, t, cond)
        a, s = (_per_sample(c, x) for c in (self.process.alpha(t.double()), self.process.sigma(t.double())))
        if self.parameterization == "eps":
            x0 = ((x - s * out) / a).clamp(-1, 1)
            return (x - a * x0) / s
        if self.parameterization == "velocity":  # u = α' x0 + σ' ε, x = α x0 + σ ε (any process)
            da, ds = (_per_sample(c, x) for c in self.process.alpha_sigma_derivatives(t.double()))
            x0 = ((s * out - ds * x) / (da * s - ds * a)).clamp(-1, 1)
            return da * x0 + ds * (x - a * x0) / s
        x0 = (a * x - s * out).clamp(-1, 1)  # v = α ε − σ x0 (with α² + σ² = 1)
        return a * (x - a * x0) / s - s * x0


@dataclass
class ImageModelPlugin:
    """Load / train logic shared by the image networks (``unet``, ``dit``).

    ``build(config, in_channels, resolution, process, num_classes) -> nn.Module``. Checkpoints are
    ``<name>-<dataset>[-<config>-<parameterization>-<process>].safetensors`` (suffix only when
    not the dataset's default), in the user cache (``diffbench train``) or shipped with the package.
    """

    name: str
    configs: dict
    build: Callable
    dataset_defaults: dict  # dataset name -> default config name
    fallback_config: str
    train_defaults: dict  # dataset name -> TrainConfig keyword overrides

    def options(self) -> dict:
        return {"config": "", "process": "vp-linear", "parameterization": "eps", "class_cond": True, "checkpoint": "",
                "clip_denoised": True}

    def _resolve(self, dataset, options: dict) -> dict:
        if dataset.modality != "image":
            raise Incompatible(f"{self.name} models images; {dataset.name!r} is {dataset.modality}")
        opts = {**self.options(), **options}
        opts["config"] = opts["config"] or self.dataset_defaults.get(dataset.name, self.fallback_config)
        if opts["config"] not in self.configs:
            raise Incompatible(f"{self.name}: unknown config {opts['config']!r}; valid: {', '.join(self.configs)}")
        if opts["parameterization"] not in ("eps", "v", "velocity"):
            raise Incompatible(f"{self.name}: parameterization must be eps, v or velocity, "
                               f"got {opts['parameterization']!r}")
        return opts

    def checkpoint_path(self, dataset_name: str, opts: dict) -> Path:
        keys, base = ("parameterization", "process", "class_cond"), self.options()
        default = (opts["config"] == self.dataset_defaults.get(dataset_name, self.fallback_config)
                   and all(opts[k] == base[k] for k in keys))
        stem = f"{self.name}-{dataset_name}" + ("" if default else
                                                f"-{opts['config'].replace('/', '')}-{opts['parameterization']}-"
                                                f"{opts['process']}" + ("" if opts["class_cond"] else "-uncond"))
        for root in (USER_CACHE, SHIPPED):
            if (root / f"{stem}.safetensors").exists():
                return root / stem
        return USER_CACHE / stem

    def network(self, dataset, opts: dict):
        process = make_process(opts["process"])
        num_classes = dataset.num_classes if opts["class_cond"] else 0
        channels, resolution = dataset.shape[0], dataset.shape[-1]
        return self.build(opts["config"], channels, resolution, process, num_classes), process, num_classes

    def load(self, dataset, *, device="cpu", **options) -> Denoiser:
        opts = self._resolve(dataset, options)
        path = Path(opts["checkpoint"]).with_suffix("") if opts["checkpoint"] else self.checkpoint_path(dataset.name, opts)
        if not path.with_suffix(".safetensors").exists():
            raise Incompatible(f"no {self.name} checkpoint for {dataset.name!r} at {path}.safetensors; "
                               f"run: {train_command(self.name, dataset.name, options, self.options())}")
        weights, saved = load_checkpoint(path, device)
        opts = {**opts, **{k: saved["model"][k] for k in ("config", "process", "parameterization", "class_cond")
                           if k in saved.get("model", {})}}
        net, process, num_classes = self.network(dataset, opts)
        net.load_state_dict(weights)
        if opts["clip_denoised"]:
            net = ClipDenoised(net, process, opts["parameterization"])
        denoiser = Denoiser(net.to(device).eval(), process, opts["parameterization"], num_classes=num_classes,
                            null_class=num_classes if num_classes else None, name=self.name)
        denoiser.dataset_name = dataset.name  # lets classifier guidance find <dataset>-noisy-cnn
        return denoiser

    def train(self, dataset, out=None, *, device="cpu", steps=None, batch_size=None, lr=None, seed=0,
              label_dropout=0.1, progress=True, init="", **options) -> Path:
        """Train with the simple loss (Ho et al. eq. 14) and label dropout for CFG; EMA weights are saved.
        ``init``: start from the weights of this checkpoint (continued training, fresh optimizer)."""
        opts = self._resolve(dataset, options)
        net, process, num_classes = self.network(dataset, opts)
        if init:
            net.load_state_dict(load_checkpoint(Path(init).with_suffix(""))[0])
        x0, labels = dataset.train_set()
        defaults = {"steps": 2000, "batch_size": 128, "lr": 1e-3, **self.train_defaults.get(dataset.name, {})}
        given = {"steps": steps, "batch_size": batch_size, "lr": lr}
        cfg = TrainConfig(seed=seed, ema_decay=0.995, checkpoint_every=250,
                          **{k: int(v) if k != "lr" else float(v) for k, v in
                             {**defaults, **{k: v for k, v in given.items() if v is not None}}.items()})
        out = Path(out) if out else self.checkpoint_path(dataset.name, opts)
        loss_fn = self.loss(process, opts, num_classes, label_dropout)

        record = {"dataset": dataset.name, **{k: v for k, v in opts.items() if k not in ("checkpoint", "clip_denoised")},
                  **({"init": str(init)} if init else {})}
        train(net, loss_fn, x0, labels if num_classes else None, out, record, cfg, device=device, progress=progress)
        return out.with_suffix(".safetensors")

    def loss(self, process, opts: dict, num_classes: int, label_dropout: float) -> Callable:
        """``loss_fn(net, x0, labels, generator)`` for :func:`train` (subclasses swap the objective)."""
        parameterization = opts["parameterization"]

        def loss_fn(model, batch, batch_labels, generator):
            return denoising_loss(model, process, parameterization, batch, batch_labels if num_classes else None,
                                  generator, label_dropout=label_dropout if num_classes else 0.0, null_class=num_classes)
        return loss_fn

    def register(self, register, description: str):
        register(Model(name=self.name, family="gaussian", load=self.load, train=self.train,
                       options=self.options(), description=description))
