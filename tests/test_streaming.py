"""Image samples stream to a PNG folder and metrics read them back batch by batch: the files hold
exactly the uint8 quantisation, FID from the folder equals FID from the tensor, no tensor of all
samples is alive while metrics run, --keep-samples keeps the folder and otherwise it goes, also
when the cell fails or its worker dies."""
from __future__ import annotations

import textwrap

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch_fidelity.datasets import ImagesPathDataset

from diffbench.cli import main
from diffbench.metrics import MetricContext
from diffbench.samples import PNGFolder, from_uint8, to_uint8

PROBE = textwrap.dedent('''
    """Image metrics that report what they were given, and one that fails."""
    import gc
    import os

    import torch

    import diffbench
    from diffbench.registry import Metric, Option
    from diffbench.samples import SampleSet


    def live_tensors(shape):
        """How many live tensors have this shape."""
        gc.collect()
        return sum(type(o) is torch.Tensor and tuple(o.shape) == shape for o in gc.get_objects())


    def probe(samples, ctx):
        assert isinstance(samples, SampleSet)
        largest_read = max(len(batch) for batch in samples.batches(16))
        return {"all-samples-tensors": live_tensors((len(samples), *ctx.dataset.shape)), "largest-read": largest_read,
                "streamed-mean": float(sum(b.double().sum() for b in samples.batches(16)) / samples.load_all().numel())}


    def tensor_mean(samples, ctx):  # a plugin written against the tensor contract
        assert isinstance(samples, torch.Tensor)
        return float(samples.double().mean())


    def bomb(samples, ctx, mode="raise"):
        if mode == "exit":
            os._exit(3)
        raise ValueError("bomb")


    @diffbench.hookimpl
    def register_metrics(register):
        register(Metric(name="probe", family="image", compute=probe, streaming=True, description="what it got"))
        register(Metric(name="tensor-mean", family="image", compute=tensor_mean, description="mean pixel"))
        register(Metric(name="bomb", family="image", compute=bomb, description="fails",
                        options={"mode": Option("raise", choices=("raise", "exit"))}))
''')
CELL = ["run", "--models", "unet", "--samplers", "ddim", "--steps", "1", "--datasets", "digits", "--num-samples", "40",
        "--batch-size", "16", "--repeats", "1", "--quiet", "--no-report"]
SLUG = "unet__ddim__none__digits__1"


def test_png_folder_holds_exactly_the_uint8_quantisation_in_any_write_order(tmp_path):
    for shape in ((1, 5, 4), (3, 4, 4)):
        images = torch.rand(7, *shape, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # beyond [-1, 1] too
        folder = PNGFolder(tmp_path / str(shape[0]), 7, shape)
        folder.write(range(4, 7), images[4:])  # batches arrive in any order (ranks)
        folder.write(range(0, 4), images[:4])
        assert sorted(p.name for p in folder.directory.iterdir()) == [f"{i:06d}.png" for i in range(7)]
        assert torch.equal(folder.read_uint8(5), to_uint8(images[5]))
        assert torch.equal(folder.load_all(), from_uint8(to_uint8(images)))
        assert [len(b) for b in folder.batches(3)] == [3, 3, 1]
        assert torch.equal(to_uint8(folder.load_all()), to_uint8(images))  # the round trip is exact
    rgb = ImagesPathDataset([str(p) for p in sorted(folder.directory.iterdir())])  # torch-fidelity reads the folder
    assert torch.equal(torch.stack([rgb[i] for i in range(7)]), to_uint8(images))


def test_fid_from_the_streamed_folder_equals_fid_from_the_tensor(tmp_path):
    from diffbench_plugins.image_data import load_digits
    from diffbench_plugins.image_metrics import compute_class_acc, compute_fid

    digits = load_digits()
    reference, _ = digits.reference(300)
    train, labels = digits.train_set()
    images = (train[:300] + 0.3 * torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    folder = PNGFolder(tmp_path / "pngs", 300, (1, 8, 8))
    for start in range(0, 300, 64):
        folder.write(range(start, min(start + 64, 300)), images[start:start + 64])

    def metrics(samples):
        ctx = MetricContext(dataset=digits, reference=reference, reference_labels=None, labels=labels[:300],
                            denoiser=None, device=torch.device("cpu"), seed=0, cache_dir=tmp_path / "cache")
        return {**compute_fid(samples, ctx, ci_rounds=10), "class-acc": compute_class_acc(samples, ctx, ci_rounds=10),
                **ctx.columns}

    streamed, in_memory = metrics(folder), metrics(images)
    assert streamed == in_memory  # every value, the intervals and the protocol: exactly
    assert streamed["fid[digits-cnn]"] > 0.5  # the noise is visible: a number that could differ


def _run(tmp_path, *args, plugin=True):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return CliRunner().invoke(main, [*CELL, "--plugin", str(path), *args], catch_exceptions=False)


def test_metrics_stream_no_tensor_of_all_samples_lives_and_keep_samples_keeps_them(tmp_path):
    out = tmp_path / "run"
    done = _run(tmp_path, "--metrics", "probe,tensor-mean", "--in-process", "--keep-samples", "--out", str(out))
    assert done.exit_code == 0, done.output
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["status"] == "ok", row["reason"]
    assert row["largest-read"] == 16 and row["all-samples-tensors"] == 0  # one batch at a time, never all 40
    kept = PNGFolder(out / "samples" / SLUG, 40, (1, 8, 8))
    assert sorted(p.name for p in kept.directory.iterdir()) == [f"{i:06d}.png" for i in range(40)]
    mean = float(kept.load_all().double().mean())  # the tensor contract gets the same (dequantised) samples
    assert row["tensor-mean"] == pytest.approx(mean, abs=1e-12)
    assert row["streamed-mean"] == pytest.approx(mean, abs=1e-12)


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_samples_are_removed_after_the_cell_also_when_it_fails_or_its_worker_dies(tmp_path, mode):
    out = tmp_path / "run"
    done = _run(tmp_path, "--metrics", f"bomb[mode={mode}]", "--out", str(out),
                *(["--in-process"] if mode == "raise" else []))
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert done.exit_code == 1 and row["status"] == "failed"
    assert ("bomb" if mode == "raise" else "exited with status 3") in row["reason"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == []  # the folder went (no grid: the cell failed)
