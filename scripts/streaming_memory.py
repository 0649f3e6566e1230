"""Host memory of a cell does not grow with --num-samples: peak RSS at 10,000 samples of ``shapes``
against 1,000 (issue #14: within 1.2×), metric stage (FID + class-acc) included.

Each size is one ``diffbench run`` (one cell, batches of 250) in its own process, twice: in the
supervised worker (the table's ``peak_mem_mb``: the worker's resident-set high-water mark above
its level at the start of the cell, model and data loading included) and ``--in-process`` (the
whole process's peak RSS, ``ru_maxrss`` of the child: torch, plugins and all). The model is
``shapes-gaussian``, registered by this file (``--plugin``): the exact denoiser of a class-wise
diagonal Gaussian fitted to the training images, so that 10,000 class-conditional 3×32×32 samples
cost seconds on a CPU (the U-Net takes ~12 s per batch of 250 per step here); what is measured is
host memory, not quality. Also timed: writing and reading back the 10,000 samples as the PNG
folder, against the cell's time (the cost of streaming).

    OMP_NUM_THREADS=1 python scripts/streaming_memory.py   # -> results/reports/streaming_memory.{csv,md}
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

import diffbench
from diffbench.denoiser import Denoiser
from diffbench.process import make_process
from diffbench.registry import Incompatible, Model

SIZES = (1000, 10000)


def load_shapes_gaussian(dataset, *, device="cpu"):
    """E[x0 | x_t, y] for x0 ~ N(μ_y, diag s_y²) fitted per class y to the training images."""
    if dataset.modality != "image" or not dataset.num_classes:
        raise Incompatible(f"shapes-gaussian models labelled images; {dataset.name!r} is not")
    x0, labels = dataset.train_set()
    mu = torch.stack([x0[labels == k].mean(0) for k in range(dataset.num_classes)]).to(device)  # [K, C, H, W]
    var = torch.stack([x0[labels == k].var(0) for k in range(dataset.num_classes)]).to(device)
    proc = make_process("vp-linear")

    def net(x, t, cond):  # x [B, C, H, W], t [B], cond [B]
        a, s = (proc.alpha(t).to(x)[:, None, None, None], proc.sigma(t).to(x)[:, None, None, None])
        m, v = mu[cond], var[cond]
        return m + a * v / (a**2 * v + s**2) * (x - a * m)

    return Denoiser(net, proc, "x0", num_classes=dataset.num_classes, name="shapes-gaussian")


@diffbench.hookimpl
def register_models(register):
    register(Model(name="shapes-gaussian", family="gaussian", load=load_shapes_gaussian, datasets=("shapes",),
                   description="exact denoiser of a class-wise diagonal Gaussian fit (streaming benchmark)"))


def run_cell(num_samples: int, out: Path, in_process: bool) -> tuple[float, float, float]:
    """(peak_mem_mb of the row, peak RSS of the whole process in MiB, seconds) of one run."""
    import pandas as pd

    cmd = [sys.executable, "-m", "diffbench", "run", "--plugin", __file__, "--models", "shapes-gaussian",
           "--samplers", "ddim", "--steps", "2", "--datasets", "shapes", "--metrics", "fid,class-acc",
           "--num-samples", str(num_samples), "--batch-size", "250", "--repeats", "1", "--device", "cpu",
           "--quiet", "--no-report", "--out", str(out), *(["--in-process"] if in_process else [])]
    tic = time.perf_counter()
    child = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # the rusage of this run alone (ru_maxrss in KiB on Linux)
    seconds = time.perf_counter() - tic
    assert os.waitstatus_to_exitcode(status) == 0, f"{' '.join(cmd)} failed"
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["status"] == "ok", row["reason"]
    return float(row["peak_mem_mb"]), usage.ru_maxrss / 1024, seconds


def streaming_seconds(num_samples: int, folder: Path) -> float:
    """Seconds to write num_samples shapes-sized samples as the PNG folder and read them back in batches."""
    from diffbench.samples import PNGFolder

    images = torch.rand(250, 3, 32, 32) * 2 - 1
    pngs = PNGFolder(folder, num_samples, (3, 32, 32))
    tic = time.perf_counter()
    for start in range(0, num_samples, 250):
        pngs.write(range(start, start + 250), images)
    for _ in pngs.batches(250):
        pass
    return time.perf_counter() - tic


@click.command()
@click.option("--out", "out_dir", default="results/reports", show_default=True, type=click.Path(file_okay=False))
def main(out_dir):
    import pandas as pd

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for in_process in (False, True):
            for n in SIZES:
                peak_row, peak_process, seconds = run_cell(n, Path(tmp) / f"{n}-{in_process}", in_process)
                rows.append({"mode": "in-process" if in_process else "worker", "num_samples": n,
                             "peak_mem_mb (row)": round(peak_row, 1), "peak_rss_mb (process)": round(peak_process, 1),
                             "run_s": round(seconds, 1)})
        stream_s = streaming_seconds(SIZES[-1], Path(tmp) / "pngs")
    table = pd.DataFrame(rows)
    for column in ("peak_mem_mb (row)", "peak_rss_mb (process)"):
        base = table[table.num_samples == SIZES[0]].set_index("mode")[column]
        table[f"{column} / at {SIZES[0]}"] = [round(v / base[m], 3) for m, v in zip(table["mode"], table[column])]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "streaming_memory.csv", index=False)
    run_10k = float(table[(table.num_samples == SIZES[-1]) & (table["mode"] == "in-process")]["run_s"].iloc[0])
    note = (f"\nModel shapes-gaussian (exact denoiser of a class-wise Gaussian, this script's plugin), ddim, 2 steps, "
            f"shapes 3×32×32, batches of 250, metrics fid + class-acc, CPU, OMP_NUM_THREADS=1. "
            f"`peak_mem_mb (row)`: the table's column (growth of the VmHWM while the cell makes its samples, above the loaded model and data); "
            f"`peak_rss_mb (process)`: ru_maxrss of the run's process (only meaningful in-process; in worker mode "
            f"the largest of the supervisor and the forkserver). Streaming cost: writing {SIZES[-1]} samples as "
            f"PNGs and reading them back took {stream_s:.1f} s, {stream_s / run_10k:.2f}× the in-process run's "
            f"{run_10k:.1f} s.\n")
    (out / "streaming_memory.md").write_text("# Streaming samples: host memory vs --num-samples\n\n"
                                             + table.to_markdown(index=False) + "\n" + note)
    click.echo(table.to_markdown(index=False) + note)


if __name__ == "__main__":
    main()
