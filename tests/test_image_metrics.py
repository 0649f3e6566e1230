"""FID / KID through torch-fidelity with the shipped domain extractors, class accuracy and the DDPM bound."""
from __future__ import annotations

import math

import pytest
import torch

from diffbench.checkpoints import find_checkpoint
from diffbench.denoiser import Denoiser
from diffbench.metrics import MetricContext
from diffbench.process import VPDiscrete
from diffbench.registry import Incompatible
from diffbench_plugins import image_metrics
from diffbench_plugins.image_data import load_digits

DIGITS = load_digits()
needs_cnn = pytest.mark.skipif(find_checkpoint("digits-cnn") is None,
                               reason="digits-cnn checkpoint not shipped")


def context(reference, labels=None, tmp_path=None, denoiser=None, ref_labels=None):
    return MetricContext(dataset=DIGITS, reference=reference, reference_labels=ref_labels, labels=labels,
                         denoiser=denoiser, device=torch.device("cpu"), seed=0, cache_dir=tmp_path)


@needs_cnn
def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(tmp_path):
    ref, _ = DIGITS.reference(800)
    ctx = context(ref, tmp_path=tmp_path)
    same = image_metrics.compute_fid(ref, ctx)
    assert list(same) == ["fid[digits-cnn]"] and abs(same["fid[digits-cnn]"]) < 1e-3
    noise = torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train, _ = DIGITS.train_set()
    real = image_metrics.compute_fid(train[:800], ctx)["fid[digits-cnn]"]  # other real digits: small
    fake = image_metrics.compute_fid(noise, ctx)["fid[digits-cnn]"]
    assert fake > 20 * real > 0
    assert list((tmp_path / "fidelity").iterdir())  # reference statistics were cached
    # KID's unbiased estimator of a set against itself is slightly negative (the k(x, x) terms
    # enter only the cross term): O(1/n), far below noise's.
    kid = image_metrics.compute_kid(ref, ctx)["kid[digits-cnn]"]
    assert -0.02 < kid <= 0 and image_metrics.compute_kid(noise, ctx)["kid[digits-cnn]"] > 0.3


def test_inception_without_weights_is_incompatible(tmp_path, monkeypatch):
    monkeypatch.delenv(image_metrics.INCEPTION_ENV, raising=False)
    ref, _ = DIGITS.reference(16)
    with pytest.raises(Incompatible, match=image_metrics.INCEPTION_ENV):
        image_metrics.compute_fid(ref, context(ref, tmp_path=tmp_path), extractor="inception")


@needs_cnn
def test_class_acc_of_real_digits_is_high_and_of_shuffled_labels_chance():
    ref, labels = DIGITS.reference(500)
    assert image_metrics.compute_class_acc(ref, context(ref, labels)) > 0.9
    shuffled = labels[torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    assert image_metrics.compute_class_acc(ref, context(ref, shuffled)) < 0.25
    with pytest.raises(Incompatible):
        image_metrics.compute_class_acc(ref, context(ref, None))


def test_discretized_decoder_bins_sum_to_one():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, std in [(0.0, 0.05), (0.9, 0.3), (-1.2, 0.01)]:
        logp = image_metrics.discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), std)
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_nll_bpd_of_an_oracle_on_constant_data_is_prior_plus_decoder(tmp_path):
    """Data = one constant image c: the oracle x̂0 = c makes every L_{t−1} zero, so the bound is
    L_T + L_0 in closed form; a biased denoiser gets a larger bound."""
    proc = VPDiscrete.linear(100)
    c = 64 / 127.5 - 1  # on the 8-bit grid
    ref = torch.full((8, 1, 8, 8), c)
    oracle = Denoiser(lambda x, t, cond: torch.full_like(x, c), proc, "x0")
    bpd = image_metrics.compute_nll_bpd(ref, context(ref, tmp_path=tmp_path, denoiser=oracle), num_steps=10)
    ab_T = float(proc.alphas_cumprod[-1])
    prior = 0.5 * (ab_T * c**2 + (1 - ab_T) - 1 - math.log(1 - ab_T))
    std = math.sqrt(float(proc.betas[0]))
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    decoder = -math.log(cdf(1 / 255 / std) - cdf(-1 / 255 / std))
    assert bpd == pytest.approx((prior + decoder) / math.log(2), rel=1e-4)
    biased = Denoiser(lambda x, t, cond: torch.full_like(x, c + 0.05), proc, "x0")
    assert image_metrics.compute_nll_bpd(ref, context(ref, tmp_path=tmp_path, denoiser=biased), num_steps=10) > bpd + 1


def test_nll_bpd_needs_a_discrete_vp_model(tmp_path):
    from diffbench.process import FlowProcess

    ref = torch.zeros(4, 1, 8, 8)
    flow = Denoiser(lambda x, t, c: x, FlowProcess(), "velocity")
    with pytest.raises(Incompatible, match="discrete VP"):
        image_metrics.compute_nll_bpd(ref, context(ref, tmp_path=tmp_path, denoiser=flow))
