"""Image metrics: FID and KID through torch-fidelity, class accuracy of conditional samples, and
the DDPM variational bound in bits/dim.

FID / KID never use a hand-written Fréchet distance: images go to
``torch_fidelity.calculate_metrics`` as torch Datasets of uint8 images, with one of two feature
extractors, both registered in torch-fidelity's registry:

* ``inception-v3-compat`` (torch-fidelity's own) from a local weights file: metric option
  ``inception_weights`` or the environment variable ``DIFFBENCH_INCEPTION_WEIGHTS``;
* a domain extractor ``<dataset>-cnn`` (penultimate features of the shipped classifier,
  :mod:`diffbench_plugins.classifier`) for the small datasets.

The column names say which was used: ``fid[digits-cnn]``, ``kid[inception-v3]``. Reference
statistics are cached by torch-fidelity under ``ctx.cache_dir / "fidelity"``, keyed by the
dataset, a hash of the reference images and the extractor.
"""
from __future__ import annotations

import hashlib
import math
import os

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

import diffbench
from diffbench.metrics import MetricContext
from diffbench.process import VPDiscrete
from diffbench.registry import Incompatible, Metric
from diffbench_plugins.classifier import checkpoint_path, load_classifier
from diffbench_plugins.image_data import to_uint8

INCEPTION_ENV = "DIFFBENCH_INCEPTION_WEIGHTS"


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor from a shipped ``<dataset>-cnn`` classifier: uint8
    [B, C, H, W] -> ('features' [B, F] penultimate activations, 'logits' [B, K])."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.net = load_classifier(name)

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits"}.get(metric, "features")

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        raise NotImplementedError

    def forward(self, x):
        feats = self.net.features(x.float() / 127.5 - 1)  # [B, F]
        out = {"features": feats, "logits": self.net.head(feats)}
        return tuple(out[name] for name in self.features_list)


def register_domain_extractor(name: str) -> None:
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, DomainFeatureExtractor)


class Uint8Images(torch.utils.data.Dataset):
    """[N, C, H, W] float images in [-1, 1] as the uint8 tensors torch-fidelity expects
    (grey images repeated to 3 channels when the extractor needs RGB)."""

    def __init__(self, images: torch.Tensor, rgb: bool = False):
        self.images = to_uint8(images.cpu())
        if rgb and self.images.shape[1] == 1:
            self.images = self.images.expand(-1, 3, -1, -1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _extractor(ctx: MetricContext, extractor: str, inception_weights: str) -> tuple[str, str, dict]:
    """(torch-fidelity extractor name, column label, extra calculate_metrics kwargs)."""
    if extractor == "auto":
        extractor = "domain" if checkpoint_path(f"{ctx.dataset.name}-cnn").with_suffix(".safetensors").exists() \
            else "inception"
    if extractor == "domain":
        name = f"{ctx.dataset.name}-cnn"
        load_classifier(name)  # raises Incompatible (with the training command) if missing
        register_domain_extractor(name)
        return name, name, {}
    if extractor == "inception":
        weights = inception_weights or os.environ.get(INCEPTION_ENV, "")
        if not weights or not os.path.isfile(weights):
            raise Incompatible("FID with Inception-v3 needs local weights (cannot download here): pass metric option "
                               f"inception_weights=PATH or set {INCEPTION_ENV} to torch-fidelity's "
                               "weights-inception-2015-12-05-6726825d.pth" + (f" (not a file: {weights})" if weights else ""))
        return "inception-v3-compat", "inception-v3", {"feature_extractor_weights_path": weights}
    raise Incompatible(f"unknown extractor {extractor!r}; valid: auto, domain, inception")


def _reference_key(ctx: MetricContext) -> str:
    digest = hashlib.sha1(to_uint8(ctx.reference.cpu()).numpy().tobytes()).hexdigest()[:12]
    return f"{ctx.dataset.name}-ref{len(ctx.reference)}-{digest}"


def fidelity(samples: torch.Tensor, ctx: MetricContext, *, fid: bool, kid: bool, extractor: str = "auto",
             inception_weights: str = "", cache: bool = True) -> dict[str, float]:
    """torch-fidelity FID and/or KID of samples against ctx.reference."""
    if ctx.dataset.modality != "image":
        raise Incompatible(f"FID/KID need images; {ctx.dataset.name!r} is {ctx.dataset.modality}")
    fe_name, label, extra = _extractor(ctx, extractor, inception_weights)
    rgb = fe_name.startswith("inception")
    n = min(len(samples), len(ctx.reference))
    result = torch_fidelity.calculate_metrics(
        input1=Uint8Images(samples, rgb), input2=Uint8Images(ctx.reference, rgb),
        input2_cache_name=f"{_reference_key(ctx)}-{label}" if cache else None,
        cache_root=str(ctx.cache_dir / "fidelity"), cache=cache,
        fid=fid, kid=kid, kid_subset_size=min(1000, n), kid_subsets=100,
        feature_extractor=fe_name, cuda=ctx.device.type == "cuda", batch_size=256,
        save_cpu_ram=True, verbose=False, rng_seed=ctx.seed, **extra,
    )
    out = {}
    if fid:
        out[f"fid[{label}]"] = float(result["frechet_inception_distance"])
    if kid:
        out[f"kid[{label}]"] = float(result["kernel_inception_distance_mean"])
    return out


def compute_fid(samples, ctx: MetricContext, extractor: str = "auto", inception_weights: str = ""):
    return fidelity(samples, ctx, fid=True, kid=False, extractor=extractor, inception_weights=inception_weights)


def compute_kid(samples, ctx: MetricContext, extractor: str = "auto", inception_weights: str = ""):
    return fidelity(samples, ctx, fid=False, kid=True, extractor=extractor, inception_weights=inception_weights)


@torch.no_grad()
def compute_class_acc(samples, ctx: MetricContext):
    """Fraction of conditional samples that the domain classifier assigns to the requested class."""
    if ctx.labels is None:
        raise Incompatible("class-acc needs class-conditional samples (the model is unconditional)")
    net = load_classifier(f"{ctx.dataset.name}-cnn", ctx.device)
    if net.head.out_features != ctx.dataset.num_classes:  # e.g. shapes-text's attribute heads (caption-acc)
        raise Incompatible(f"class-acc: {ctx.dataset.name}-cnn has {net.head.out_features} outputs, the dataset "
                           f"{ctx.dataset.num_classes} classes")
    x = to_uint8(samples).float() / 127.5 - 1  # classify what an image file would hold
    preds = torch.cat([net(x[i:i + 512].to(ctx.device)).argmax(1).cpu() for i in range(0, len(x), 512)])
    return float((preds == ctx.labels.cpu()).float().mean())


# ----- the variational bound (Ho et al. 2020, eq. 5) -----------------------------------------

def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log p(x0 | x1) per element for data on the 256-level grid of [-1, 1] (Ho et al. eq. 13):
    the Gaussian mass of the bin [x − 1/255, x + 1/255], the edge bins extended to ±∞."""
    upper = torch.where(x > 0.999, torch.ones_like(x), _normal_cdf((x + 1 / 255 - mean) / std))
    lower = torch.where(x < -0.999, torch.zeros_like(x), _normal_cdf((x - 1 / 255 - mean) / std))
    return torch.log((upper - lower).clamp(min=1e-12))


@torch.no_grad()
def vlb_terms(denoiser, x0: torch.Tensor, steps: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-image terms of L = L_T + Σ_{t>1} L_{t−1} + L_0 in nats, for the given step indices
    (0-based: index n is the notes' t = n + 1).

    L_T = KL(q(x_T|x0) ‖ N(0, I)); L_{t−1} = KL(q(x_{t−1}|x_t, x0) ‖ p_θ(x_{t−1}|x_t)), where
    p_θ has the posterior mean at x̂0 = D(x_t, t) and the posterior variance β̃_t, so the KL is
    ‖μ̃(x_t, x0) − μ̃(x_t, x̂0)‖² / (2β̃_t); L_0 = −log p_θ(x0|x1), the discretized decoder
    N(x̂0, β_1) (Ho et al. eqs. 5, 8, 13)."""
    proc = denoiser.process
    ab = proc.alphas_cumprod  # float64 [N]
    flat = lambda v: v.flatten(1).sum(1)  # noqa: E731  (sum over dims) -> [B]
    a_T = float(ab[-1].sqrt())
    prior = flat(0.5 * ((a_T * x0.double()) ** 2 + (1 - ab[-1]) - 1 - torch.log(1 - ab[-1])).expand_as(x0))
    terms = {"prior": prior.float(), "steps": []}
    for n in steps.tolist():
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        a_t, s_t = float(ab[n].sqrt()), float((1 - ab[n]).sqrt())
        x_t = a_t * x0 + s_t * eps
        x0_hat = denoiser(x_t, float(n)).clamp(-1, 1)
        if n == 0:  # decoder L_0, variance σ_1² = β_1
            terms["decoder"] = -flat(discretized_gaussian_log_likelihood(x0, x0_hat, float(proc.betas[0].sqrt())))
            continue
        beta, ab_prev = float(proc.betas[n]), float(ab[n - 1])
        coef_x0 = math.sqrt(ab_prev) * beta / (1 - float(ab[n]))  # posterior mean μ̃ = coef_x0 x0 + coef_xt x_t
        var = beta * (1 - ab_prev) / (1 - float(ab[n]))  # β̃_t
        terms["steps"].append(flat((coef_x0 * (x0 - x0_hat)) ** 2) / (2 * var))
    return terms


def compute_nll_bpd(samples, ctx: MetricContext, num_images: int = 256, num_steps: int = 50):
    """Variational upper bound on −log p(x0) in bits/dim of held-out reference images.

    Estimator: L_T and L_0 exactly (one noise draw for L_0's x_1); the sum over t = 2..N of
    L_{t−1} by stratified sampling — the N−1 indices split into ``num_steps`` equal strata, one
    uniform index per stratum weighted by the stratum's size — which is unbiased. The reference
    images are snapped to the 256-level grid first (the decoder's discretization)."""
    den = ctx.denoiser
    if den is None or getattr(den, "family", "") != "gaussian" or not isinstance(den.process, VPDiscrete):
        raise Incompatible("nll-bpd needs a Gaussian model on the discrete VP process (Ho et al. 2020's bound)")
    x0 = to_uint8(ctx.reference[:num_images]).float().to(ctx.device) / 127.5 - 1
    labels = ctx.reference_labels[:num_images].to(ctx.device) if ctx.reference_labels is not None else None
    if den.num_classes and labels is not None:
        den = den.conditioned(labels)  # the class-conditional bound log p(x0 | y)
    g = torch.Generator().manual_seed(ctx.seed)
    n_total = den.process.num_steps
    edges = torch.linspace(1, n_total, num_steps + 1).round().long()  # strata over 1..N−1
    picks = [int(lo + torch.randint(int(hi - lo), (1,), generator=g)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    weights = torch.tensor([float(hi - lo) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo])
    terms = vlb_terms(den, x0, torch.tensor([0] + picks), g)
    steps = torch.stack(terms["steps"], 1).cpu() @ weights.double().float()  # [B]
    total = terms["prior"].cpu() + terms["decoder"].cpu() + steps  # nats per image
    dims = x0[0].numel()
    return float(total.mean() / (dims * math.log(2)))


@diffbench.hookimpl
def register_metrics(register):
    fid_options = {"extractor": "auto", "inception_weights": ""}
    register(Metric(name="fid", family="image", compute=compute_fid, options=fid_options,
                    description="FID via torch-fidelity; column fid[<extractor>] (domain CNN or local Inception-v3)"))
    register(Metric(name="kid", family="image", compute=compute_kid, options=fid_options,
                    description="KID (mean over subsets) via torch-fidelity; column kid[<extractor>]"))
    register(Metric(name="class-acc", family="image", compute=compute_class_acc, higher_is_better=True,
                    description="accuracy of the shipped domain classifier on class-conditional samples"))
    register(Metric(name="nll-bpd", family="image", compute=compute_nll_bpd,
                    options={"num_images": 256, "num_steps": 50},
                    description="DDPM variational bound (Ho et al. eq. 5) in bits/dim on held-out images"))
