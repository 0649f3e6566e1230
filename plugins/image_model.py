"""Loading, training and checkpoints shared by the image networks (``unet``, ``dit``,
``flow-unet``): :class:`ImageModelPlugin` turns a network factory and its named configs into a
registered :class:`~diffbench.registry.Model`, and :class:`ClipDenoised` clips the implied x̂0
to the data range as the DDPM reference sampler does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from diffbench.checkpoints import checkpoint_files, checkpoint_name, load_checkpoint, model_checkpoint, training_output
from diffbench.denoiser import Denoiser, append_dims
from diffbench.nn.layers import random_weights
from diffbench.process import make_process
from diffbench.registry import ConfigError, Incompatible, Model
from diffbench.training import TrainConfig, denoising_loss, train

PARAMETERIZATIONS = ("eps", "v", "velocity")

RANDOM_WEIGHTS = "random"  # option checkpoint=random: untrained stand-in weights, for timing at any size


class ClipDenoised(nn.Module):
    """Wraps a network so that its implied x0 prediction is clipped to the data range [-1, 1], as
    the DDPM reference sampler does (``clip_denoised=True``; diffusers' ``clip_sample``). Without
    it a small ε-model's error at t ≈ T is amplified by σ/α ≈ 150 in x̂0 and ruins the samples."""

    def __init__(self, model: nn.Module, process, parameterization: str):
        super().__init__()
        self.model, self.process, self.parameterization = model, process, parameterization

    def forward(self, x, t, cond=None):
        out = self.model(x, t, cond)
        a, s = (append_dims(c, x) for c in (self.process.alpha(t.double()), self.process.sigma(t.double())))
        if self.parameterization == "eps":
            x0 = ((x - s * out) / a).clamp(-1, 1)
            return (x - a * x0) / s
        if self.parameterization == "velocity":  # u = α' x0 + σ' ε, x = α x0 + σ ε (any process)
            da, ds = (append_dims(c, x) for c in self.process.alpha_sigma_derivatives(t.double()))
            x0 = ((s * out - ds * x) / (da * s - ds * a)).clamp(-1, 1)
            return da * x0 + ds * (x - a * x0) / s
        x0 = (a * x - s * out).clamp(-1, 1)  # v = α ε − σ x0 (with α² + σ² = 1)
        return a * (x - a * x0) / s - s * x0


@dataclass
class ImageModelPlugin:
    """Load / train logic shared by the image networks (``unet``, ``dit``).

    ``build(config, in_channels, resolution, process, num_classes) -> nn.Module``. Checkpoints are
    named and found by :mod:`diffbench.checkpoints`: ``<name>-<dataset>[<non-default options>]``.
    """

    name: str
    configs: dict
    build: Callable
    dataset_defaults: dict  # dataset name -> default config name
    fallback_config: str
    train_defaults: dict  # dataset name -> TrainConfig keyword overrides
    # The datasets it runs on when nobody names any (Model.datasets); empty: those its checkpoints cover.
    run_datasets: tuple[str, ...] = ()
    # dataset name -> what an empty option means there besides its config (parameterization: eps unless
    # given, e.g. v on shapes); a checkpoint's name is relative to these, as to the dataset's default config.
    dataset_options: dict = field(default_factory=dict)

    def options(self) -> dict:
        """Defaults; an empty ``config`` or ``parameterization`` is the dataset's (:meth:`dataset_defaults_for`)."""
        return {"config": "", "process": "vp-linear", "parameterization": "", "class_cond": True, "checkpoint": "",
                "clip_denoised": True}

    def dataset_defaults_for(self, dataset_name: str) -> dict:
        """What the empty options mean on this dataset: its default config and parameterization."""
        return {"config": self.dataset_defaults.get(dataset_name, self.fallback_config), "parameterization": "eps",
                **self.dataset_options.get(dataset_name, {})}

    def _fill_empty(self, opts: dict, dataset_name: str) -> dict:
        return opts | {k: v for k, v in self.dataset_defaults_for(dataset_name).items() if opts[k] == ""}

    def _resolve(self, dataset, options: dict) -> dict:
        if dataset.modality != "image":
            raise Incompatible(f"{self.name} models images; {dataset.name!r} is {dataset.modality}")
        opts = self._fill_empty({**self.options(), **options}, dataset.name)
        self.validate(**opts)
        return opts

    def validate(self, *, config: str = "", parameterization: str = "", **_) -> None:
        """Refuse an unknown config or parameterization before any work (``Model.validate``)."""
        if config and config not in self.configs:
            raise ConfigError(f"{self.name}: unknown config {config!r}; valid: {', '.join(self.configs)}")
        if parameterization and parameterization not in PARAMETERIZATIONS:
            raise ConfigError(f"{self.name}: parameterization must be {', '.join(PARAMETERIZATIONS)} (or empty: the "
                              f"dataset's), got {parameterization!r}")

    def _checkpoint_defaults(self, dataset_name: str) -> dict:
        """The options a checkpoint name is relative to: the dataset's default config and options are no change."""
        return self._fill_empty(self.options(), dataset_name)

    def network(self, dataset, opts: dict):
        process = make_process(opts["process"])
        num_classes = dataset.num_classes if opts["class_cond"] else 0
        channels, resolution = dataset.shape[0], dataset.shape[-1]
        return self.build(opts["config"], channels, resolution, process, num_classes), process, num_classes

    def load(self, dataset, *, device="cpu", **options) -> Denoiser:
        opts = self._resolve(dataset, options)
        if opts["checkpoint"] == RANDOM_WEIGHTS:
            net, process, num_classes = self.network(dataset, opts)
            random_weights(net)
        else:
            net, process, num_classes, opts = self._load_checkpoint(dataset, opts, device)
        if opts["clip_denoised"]:
            net = ClipDenoised(net, process, opts["parameterization"])
        denoiser = Denoiser(net.to(device).eval(), process, opts["parameterization"], num_classes=num_classes,
                            null_class=num_classes if num_classes else None, name=self.name)
        denoiser.dataset_name = dataset.name  # lets classifier guidance find <dataset>-noisy-cnn
        return denoiser

    def _load_checkpoint(self, dataset, opts: dict, device):
        """(network with the checkpoint's weights, process, num_classes, options the checkpoint fixes)."""
        path = model_checkpoint(self.name, dataset.name, opts, self._checkpoint_defaults(dataset.name),
                                ignore=("clip_denoised",))
        weights, saved = load_checkpoint(path, device)
        opts = {**opts, **{k: saved["model"][k] for k in ("config", "process", "parameterization", "class_cond")
                           if k in saved.get("model", {})}}
        net, process, num_classes = self.network(dataset, opts)
        net.load_state_dict(weights)
        return net, process, num_classes, opts

    def train(self, dataset, out=None, *, device="cpu", steps=None, batch_size=None, lr=None, seed=0,
              label_dropout=0.1, min_snr_gamma=0.0, progress=True, init="", **options) -> Path:
        """Train with the simple loss (Ho et al. eq. 14) and label dropout for CFG; EMA weights are saved.
        ``init``: start from the weights of this checkpoint (continued training, fresh optimizer).
        ``min_snr_gamma`` > 0: Min-SNR-γ loss weighting (Hang et al. 2023; γ = 5 in the paper)."""
        opts = self._resolve(dataset, options)
        net, process, num_classes = self.network(dataset, opts)
        if init:
            net.load_state_dict(load_checkpoint(init)[0])
        x0, labels = dataset.train_set()
        defaults = {"steps": 2000, "batch_size": 128, "lr": 1e-3, **self.train_defaults.get(dataset.name, {})}
        given = {"steps": steps, "batch_size": batch_size, "lr": lr}
        cfg = TrainConfig(seed=seed, ema_decay=0.995, checkpoint_every=250,
                          **{k: int(v) if k != "lr" else float(v) for k, v in
                             {**defaults, **{k: v for k, v in given.items() if v is not None}}.items()})
        out = training_output(checkpoint_name(self.name, dataset.name, opts, self._checkpoint_defaults(dataset.name),
                                              ignore=("clip_denoised",)), out)
        loss_fn = self.loss(process, opts, num_classes, label_dropout, float(min_snr_gamma))

        record = {"dataset": dataset.name, **{k: v for k, v in opts.items() if k not in ("checkpoint", "clip_denoised")},
                  **({"init": str(init)} if init else {}),
                  **({"min_snr_gamma": float(min_snr_gamma)} if min_snr_gamma else {})}
        train(net, loss_fn, x0, labels if num_classes else None, out, record, cfg, device=device, progress=progress)
        return checkpoint_files(out)[0]

    def loss(self, process, opts: dict, num_classes: int, label_dropout: float, min_snr_gamma: float = 0.0) -> Callable:
        """``loss_fn(net, x0, labels, generator)`` for :func:`train` (subclasses swap the objective)."""
        parameterization = opts["parameterization"]

        def loss_fn(model, batch, batch_labels, generator):
            return denoising_loss(model, process, parameterization, batch, batch_labels if num_classes else None,
                                  generator, label_dropout=label_dropout if num_classes else 0.0, null_class=num_classes,
                                  min_snr_gamma=min_snr_gamma)
        return loss_fn

    def register(self, register, description: str):
        register(Model(name=self.name, family="gaussian", load=self.load, train=self.train, validate=self.validate,
                       options=self.options(), datasets=self.run_datasets, description=description))
