"""The FID protocol: torch-fidelity's numbers from shared features, bootstrap intervals that
behave like sampling error, protocol and warning columns, and compare judging by the interval."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch_fidelity

from diffbench.compare import compare_runs
from diffbench.metrics import MetricContext
from diffbench.results import ResultsWriter
from diffbench_plugins import image_metrics
from diffbench_plugins.image_data import load_digits

DIGITS = load_digits()


def context(reference, tmp_path, labels=None):
    return MetricContext(dataset=DIGITS, reference=reference, reference_labels=None, labels=labels, denoiser=None,
                         device=torch.device("cpu"), seed=0, cache_dir=tmp_path)


def test_fid_kid_precision_recall_equal_torch_fidelity_calculate_metrics(tmp_path):
    reference, _ = DIGITS.reference(600)
    samples = DIGITS.train_set()[0][:500]
    ctx = context(reference, tmp_path)
    ours = {**image_metrics.compute_fid(samples, ctx, ci_rounds=0), **image_metrics.compute_kid(samples, ctx, ci_rounds=0),
            **image_metrics.compute_precision_recall(samples, ctx)}
    image_metrics.register_domain_extractor("digits-cnn")
    theirs = torch_fidelity.calculate_metrics(
        input1=image_metrics.Uint8Images(samples), input2=image_metrics.Uint8Images(reference), fid=True, kid=True,
        prc=True, kid_subset_size=500, feature_extractor="digits-cnn", cuda=False, save_cpu_ram=True, verbose=False, rng_seed=0)
    assert ours["fid[digits-cnn]"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["kid[digits-cnn]"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["precision[digits-cnn]"] == pytest.approx(theirs["precision"])
    assert ours["recall[digits-cnn]"] == pytest.approx(theirs["recall"])


def test_class_acc_interval_is_the_binomial_one(tmp_path):
    """For a mean of n Bernoulli(p) the bootstrap 95% half-width is ≈ 1.96 √(p(1−p)/n)."""
    reference, labels = DIGITS.reference(800)
    wrong = labels.clone()
    wrong[::3] = (wrong[::3] + 1) % 10  # a third of the requested classes do not match the images
    ctx = context(reference, tmp_path, labels=wrong)
    p = image_metrics.compute_class_acc(reference, ctx, ci_rounds=400)
    assert 0.55 < p < 0.72
    assert ctx.columns["class-acc_ci95"] == pytest.approx(1.96 * math.sqrt(p * (1 - p) / 800), rel=0.2)


def test_fid_interval_shrinks_like_one_over_root_n_and_is_recorded_with_the_protocol(tmp_path):
    reference, _ = DIGITS.reference(800)
    train = DIGITS.train_set()[0]
    widths = {}
    for n in (200, 800):
        ctx = context(reference, tmp_path)
        image_metrics.compute_fid(train[:n], ctx)
        widths[n] = ctx.columns["fid[digits-cnn]_ci95"]
        assert ctx.columns["protocol[digits-cnn]"] == (f"extractor=digits-cnn; dims=128; generated={n}; reference=800; "
                                                        "reference_split=held-out-half; seed=0")
    assert 1.4 < widths[200] / widths[800] < 3.5  # √4 = 2 (FID's bias term adds to the small-n side)


def test_fewer_samples_than_feature_dimensions_is_a_warning(tmp_path):
    reference, _ = DIGITS.reference(800)
    ctx = context(reference, tmp_path)
    few = reference[:100]
    image_metrics.compute_fid(few, ctx)
    image_metrics.compute_kid(few, ctx, ci_rounds=0)  # the features are shared: one warning
    assert ctx.warnings == ["digits-cnn: 100 generated samples < 128 feature dimensions: the covariance is "
                            "rank-deficient, FID/KID are not stable"]


def test_run_rows_carry_protocol_interval_and_warnings(cli, tmp_path):
    result = cli("run", "--models", "unet", "--samplers", "ddim", "--steps", "2", "--datasets", "digits",
                 "--metrics", "fid", "--num-samples", "100", "--repeats", "1", "--quiet", "--in-process", "--out", "r")
    assert result.exit_code == 0, result.output
    row = pd.read_csv(tmp_path / "r" / "results.csv").iloc[0]
    assert row["fid[digits-cnn]_ci95"] > 0 and "generated=100" in row["protocol[digits-cnn]"]
    assert "100 generated samples < 128 feature dimensions" in row["warnings"]


def write_run(path, fid, ci=None):
    row = {"model": "unet", "sampler": "ddim", "guidance": "none", "dataset": "digits", "steps": 10, "nfe": 10,
           "status": "ok", "reason": "", "fid[digits-cnn]": fid}
    if ci is not None:
        row["fid[digits-cnn]_ci95"] = ci
    path.mkdir()
    ResultsWriter(path).add(row, {"fid[digits-cnn]": False})
    return path


@pytest.mark.parametrize("new_fid, new_ci, expected", [
    (10.5, 0.6, 0),  # +0.5 is far beyond the fixed 2 % tolerance but inside √(0.4² + 0.6²) = 0.72
    (10.8, 0.6, 1),  # beyond the interval: a regression
    (9.2, 0.6, 0),  # better by more than the interval: an improvement, not a regression
    (10.5, None, 1),  # no interval in the new table: the fixed tolerance (0.2 + 0.001) applies
])
def test_compare_judges_a_metric_by_its_interval(tmp_path, new_fid, new_ci, expected):
    base = write_run(tmp_path / "base", 10.0, 0.4)
    new = write_run(tmp_path / "new", new_fid, new_ci)
    code, report = compare_runs(new, base)
    assert code == expected, report
    if new_ci is not None and new_fid != 10.5:
        assert "±0.721 (ci95)" in report
