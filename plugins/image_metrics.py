"""Image metrics: FID and KID through torch-fidelity, class accuracy of conditional samples, and
the DDPM variational bound in bits/dim.

FID / KID / precision-recall never use a hand-written distance: torch-fidelity extracts the
features of uint8 images (once per cell, shared by the three) and computes each metric from
them, with one of two feature extractors, both registered in torch-fidelity's registry:

* ``inception-v3-compat`` (torch-fidelity's own) from a local weights file: metric option
  ``inception_weights`` or the environment variable ``DIFFBENCH_INCEPTION_WEIGHTS``;
* a domain extractor ``<dataset>-cnn`` (penultimate features of the shipped classifier,
  :mod:`diffbench_plugins.classifier`) for the small datasets.

The column names say which was used: ``fid[digits-cnn]``, ``kid[inception-v3]``. Reference
features are cached under ``ctx.cache_dir / "fidelity"``, keyed by the dataset, a hash of the
reference images and the extractor.

The protocol goes into the row (``protocol[<extractor>]``: extractor, feature dimensions, numbers
of generated and reference images, reference split, seed), with a 95% bootstrap interval of FID,
KID and class-acc over the generated samples (``fid[...]_ci95``, the half-width: how far a value
may move from resampling alone; ``diffbench compare`` treats a change inside it as noise), and a
``warnings`` entry when there are fewer images than feature dimensions.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

import diffbench
from diffbench.checkpoints import find_checkpoint
from diffbench.io import atomic_write_bytes
from diffbench.metrics import MetricContext
from diffbench.process import VPDiscrete
from diffbench.registry import Incompatible, Metric, Option
from diffbench.samples import SampleSet, as_sample_set, from_uint8, to_uint8
from diffbench_plugins.classifier import load_classifier

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
        feats = self.net.features(from_uint8(x))  # [B, F]
        out = {"features": feats, "logits": self.net.head(feats)}
        return tuple(out[name] for name in self.features_list)


def register_domain_extractor(name: str) -> None:
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, DomainFeatureExtractor)


class Uint8Images(torch.utils.data.Dataset):
    """The images [C, H, W] of a SampleSet as the uint8 tensors torch-fidelity expects (grey images
    repeated to 3 channels when the extractor needs RGB), read ``batch_size`` at a time: its data
    loader asks for them in order, so one batch is in memory at a time."""

    def __init__(self, images: SampleSet | torch.Tensor, rgb: bool = False, batch_size: int = 256):
        self.images, self.rgb, self.batch_size = as_sample_set(images), rgb, batch_size
        self._batch_index, self._batch = None, None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        index, offset = divmod(i, self.batch_size)
        if index != self._batch_index:
            start = index * self.batch_size
            batch = to_uint8(self.images.read(start, start + self.batch_size).cpu())  # [B, C, H, W]
            self._batch_index, self._batch = index, batch.expand(-1, 3, -1, -1) if self.rgb and batch.shape[1] == 1 \
                else batch
        return self._batch[offset]


def _extractor(ctx: MetricContext, extractor: str, inception_weights: str) -> tuple[str, str, dict]:
    """(torch-fidelity extractor name, column label, extra calculate_metrics kwargs)."""
    if extractor == "auto":
        extractor = "domain" if find_checkpoint(f"{ctx.dataset.name}-cnn") is not None else "inception"
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


def reference_split(dataset) -> str:
    """Where the reference images come from (part of the FID protocol)."""
    if dataset.draw is not None:
        return "fresh-draws"
    return "held-out-half" if dataset.reference_is_held_out else "training-set"


@dataclass
class Features:
    """Features of one extractor: ``generated`` [N, F] and ``reference`` [M, F] (float32, CPU)."""

    label: str
    generated: torch.Tensor
    reference: torch.Tensor


def _extract(images: SampleSet | torch.Tensor, fe_name: str, ctx: MetricContext, rgb: bool,
             extra: dict) -> torch.Tensor:
    """torch-fidelity's own feature extraction of N images [C, H, W] in [-1, 1] -> [N, F]."""
    layer = FEATURE_EXTRACTORS_REGISTRY[fe_name].get_default_feature_layer_for_metric("fid")
    cuda = ctx.device.type == "cuda"
    extractor = create_feature_extractor(fe_name, [layer], cuda=cuda, verbose=False, **extra)
    return get_featuresdict_from_dataset(Uint8Images(images, rgb), extractor, batch_size=256, cuda=cuda,
                                         save_cpu_ram=True, verbose=False)[layer]


def features(samples: SampleSet | torch.Tensor, ctx: MetricContext, extractor: str, inception_weights: str) -> Features:
    """Features of the samples and of ctx.reference (cached on disk); computed once per cell and
    extractor. Records the protocol column, and a warning when there are fewer samples than feature
    dimensions (the covariance is then rank-deficient: FID is not a stable number)."""
    if ctx.dataset.modality != "image":
        raise Incompatible(f"FID/KID need images; {ctx.dataset.name!r} is {ctx.dataset.modality}")
    fe_name, label, extra = _extractor(ctx, extractor, inception_weights)
    memo = ctx.memo.get(("features", label))
    if memo is not None and memo[0] is samples:
        return memo[1]
    rgb = fe_name.startswith("inception")
    cache = ctx.cache_dir / "fidelity" / f"{_reference_key(ctx)}-{label}.safetensors"
    if cache.is_file():
        reference = load_file(str(cache))["features"]
    else:
        reference = _extract(ctx.reference, fe_name, ctx, rgb, extra)
        atomic_write_bytes(cache, save({"features": reference.contiguous()}))
    result = Features(label, _extract(samples, fe_name, ctx, rgb, extra), reference)
    ctx.memo[("features", label)] = (samples, result)
    (n, dims), m = result.generated.shape, len(reference)
    ctx.columns[f"protocol[{label}]"] = (f"extractor={label}; dims={dims}; generated={n}; reference={m}; "
                                         f"reference_split={reference_split(ctx.dataset)}; seed={ctx.seed}")
    if min(n, m) < dims:
        ctx.warnings.append(f"{label}: {min(n, m)} {'generated' if n < m else 'reference'} samples < {dims} "
                            f"feature dimensions: the covariance is rank-deficient, FID/KID are not stable")
    return result


def bootstrap_ci95(statistic, n: int, rounds: int, seed: int) -> float:
    """Half-width of the 95% percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13) of
    ``statistic(indices)`` over n samples resampled with replacement ``rounds`` times."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([statistic(torch.randint(n, (n,), generator=g)) for _ in range(rounds)], dtype=torch.float64)
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(high - low) / 2


def record_ci95(ctx: MetricContext, column: str, statistic, n: int, ci_rounds: int) -> None:
    """The bootstrap half-width of ``column`` goes to the row's ``<column>_ci95`` (none if ci_rounds is 0)."""
    if ci_rounds:
        ctx.columns[f"{column}_ci95"] = bootstrap_ci95(statistic, n, ci_rounds, ctx.seed)


def compute_fid(samples, ctx: MetricContext, extractor: str = "auto", inception_weights: str = "",
                ci_rounds: int = 100):
    """torch-fidelity's FID (Heusel et al. 2017) of the samples against ctx.reference."""
    f = features(samples, ctx, extractor, inception_weights)
    reference = fid_features_to_statistics(f.reference)

    def fid(index):
        stats = fid_features_to_statistics(f.generated[index])
        return fid_statistics_to_metric(stats, reference, verbose=False)[KEY_METRIC_FID]

    n = len(f.generated)
    record_ci95(ctx, f"fid[{f.label}]", fid, n, ci_rounds)
    return {f"fid[{f.label}]": fid(torch.arange(n))}


def compute_kid(samples, ctx: MetricContext, extractor: str = "auto", inception_weights: str = "",
                ci_rounds: int = 20):
    """torch-fidelity's KID (Bińkowski et al. 2018): mean unbiased MMD² over 100 subsets. Its
    bootstrap rounds use 5 subsets each (each subset costs as much as a whole FID): fewer rounds,
    and a slightly wider interval than the 100-subset mean's."""
    f = features(samples, ctx, extractor, inception_weights)
    subset = min(1000, len(f.generated), len(f.reference))

    def kid(index, subsets=100):
        return kid_features_to_metric(f.generated[index], f.reference, kid_subsets=subsets, kid_subset_size=subset,
                                      rng_seed=ctx.seed, verbose=False)[KEY_METRIC_KID_MEAN]

    n = len(f.generated)
    record_ci95(ctx, f"kid[{f.label}]", lambda index: kid(index, subsets=5), n, ci_rounds)
    return {f"kid[{f.label}]": kid(torch.arange(n))}


def compute_precision_recall(samples, ctx: MetricContext, extractor: str = "auto", inception_weights: str = "",
                             neighborhood: int = 3):
    """Improved precision and recall (Kynkäänniemi et al. 2019) through torch-fidelity: the share of
    samples inside the k-NN manifold of the reference, and of reference images inside the samples'."""
    f = features(samples, ctx, extractor, inception_weights)
    out = prc_features_to_metric(f.generated, f.reference, prc_neighborhood=neighborhood, save_cpu_ram=True,
                                 verbose=False)
    return {f"precision[{f.label}]": out[KEY_METRIC_PRECISION], f"recall[{f.label}]": out[KEY_METRIC_RECALL]}


@torch.no_grad()
def compute_class_acc(samples, ctx: MetricContext, ci_rounds: int = 100):
    """Fraction of conditional samples that the domain classifier assigns to the requested class."""
    if ctx.labels is None:
        raise Incompatible("class-acc needs class-conditional samples (the model is unconditional)")
    net = load_classifier(f"{ctx.dataset.name}-cnn", ctx.device)
    if net.head.out_features != ctx.dataset.num_classes:  # e.g. shapes-text's attribute heads (caption-acc)
        raise Incompatible(f"class-acc: {ctx.dataset.name}-cnn has {net.head.out_features} outputs, the dataset "
                           f"{ctx.dataset.num_classes} classes")
    # classify what an image file holds (streamed samples are read back from such files)
    preds = torch.cat([net(from_uint8(to_uint8(x)).to(ctx.device)).argmax(1).cpu()
                       for x in as_sample_set(samples).batches(512)])
    correct = (preds == ctx.labels.cpu()).double()  # [N]
    record_ci95(ctx, "class-acc", lambda index: float(correct[index].mean()), len(correct), ci_rounds)
    return float(correct.mean())


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
    if getattr(den, "decoder", None) is not None:
        raise Incompatible("nll-bpd bounds log p of pixels; a latent model's bound would be on its latents")
    x0 = from_uint8(to_uint8(ctx.reference[:num_images])).to(ctx.device)
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
    feature_options = {"extractor": Option("auto", choices=("auto", "domain", "inception")), "inception_weights": ""}
    ci_rounds = {"ci_rounds": Option(100, min=0)}  # bootstrap rounds of the _ci95 column (0: none)
    register(Metric(name="fid", family="image", streaming=True, compute=compute_fid,
                    options={**feature_options, **ci_rounds},
                    description="FID via torch-fidelity; column fid[<extractor>] (domain CNN or local Inception-v3), "
                                "bootstrap 95% interval in fid[<extractor>]_ci95"))
    register(Metric(name="kid", family="image", streaming=True, compute=compute_kid,
                    options={**feature_options, "ci_rounds": Option(20, min=0)},
                    description="KID (mean over subsets) via torch-fidelity; column kid[<extractor>] (+ _ci95)"))
    register(Metric(name="precision-recall", family="image", streaming=True, compute=compute_precision_recall,
                    higher_is_better=True, options={**feature_options, "neighborhood": Option(3, min=1)},
                    description="improved precision / recall (Kynkäänniemi et al. 2019) via torch-fidelity"))
    register(Metric(name="class-acc", family="image", streaming=True, compute=compute_class_acc, higher_is_better=True,
                    options=ci_rounds, description="accuracy of the shipped domain classifier on class-conditional "
                                                   "samples (+ class-acc_ci95)"))
    register(Metric(name="nll-bpd", family="image", streaming=True, compute=compute_nll_bpd,
                    options={"num_images": Option(256, min=1), "num_steps": Option(50, min=1)},
                    description="DDPM variational bound (Ho et al. eq. 5) in bits/dim on held-out images"))
