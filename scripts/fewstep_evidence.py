"""Few-step generation at equal NFE: diffusion solvers vs flow matching vs consistency models.

Runs ``diffbench run`` once per (models, samplers, steps) group below, each into its own
``--out`` directory, then merges the tables into results/reports/<report>.{csv,md} and plots
the metric against NFE (<report>.png). Two suites:

    OMP_NUM_THREADS=1 python scripts/fewstep_evidence.py                 # moons, MLPs, SWD -> fewstep.*
    OMP_NUM_THREADS=1 python scripts/fewstep_evidence.py --suite digits  # digits, U-Nets, FID -> fewstep_digits.*
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

# (models, samplers, steps): steps chosen so that NFE ≈ 1, 2, 4, 8, 16, 50 for each sampler
# (Heun-type samplers cost 2·steps − 1 calls, so they get 1, 2, 3, 5, 9, 25 steps).
GROUPS = {
    "diffusion": ("mlp,edm-mlp", "dpm-solver++", "1,2,4,8,16,50"),
    "diffusion-heun": ("edm-mlp", "heun", "1,2,3,5,9,25"),
    "flow-euler": ("flow-mlp,flow-mlp[ot=true],flow-mlp[reflow=true]", "flow-euler", "1,2,4,8,16,50"),
    "flow-heun": ("flow-mlp,flow-mlp[ot=true],flow-mlp[reflow=true]", "flow-heun", "1,2,3,5,9,25"),
    "consistency": ("consistency-mlp[method=cd],consistency-mlp[method=ct]",
                    "one-step,multistep-consistency,multistep-consistency:0.3", "1,2,4,8,16,50"),
}
# digits: the U-Net of plugins/unet.py trained three ways (eps diffusion on vp-linear, flow
# matching, iCT), FID with the domain classifier's features.
DIGITS_GROUPS = {
    "unet-dpm": ("unet", "dpm-solver++", "1,2,4,8,16,50"),
    "flow-unet-euler": ("flow-unet", "flow-euler", "1,2,4,8,16,50"),
    "flow-unet-heun": ("flow-unet", "flow-heun", "1,2,3,5,9,25"),
    "consistency-unet": ("consistency-unet", "one-step,multistep-consistency", "1,2,4,8,16,50"),
}
SUITES = {  # suite: (groups, dataset, metrics for diffbench run, metric column, report stem, samples)
    "moons": (GROUPS, "moons", "swd", "swd", "fewstep", 2000),
    "digits": (DIGITS_GROUPS, "digits", "fid,class-acc", "fid[digits-cnn]", "fewstep_digits", 500),
}
COLUMNS = ["model", "sampler", "steps", "nfe", "status", "swd", "wall_s", "reason"]


def run_group(name: str, models: str, samplers: str, steps: str, dataset: str, num_samples: int, runs: Path,
              resume: bool, metrics: str = "swd") -> pd.DataFrame:
    out = runs / name
    cmd = ["diffbench", "run", *(["--resume"] if resume else []), "--models", models, "--samplers", samplers, "--steps", steps, "--datasets", dataset,
           "--metrics", metrics, "--num-samples", str(num_samples), "--repeats", "1", "--device", "cpu", "--quiet",
           "--out", str(out)]
    click.echo(" ".join(cmd))
    subprocess.run(cmd, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    table = pd.read_csv(out / "results.csv")
    # one-step ignores the grid: keep only its 1-step cell.
    return table[~((table.sampler == "one-step") & (table.steps > 1))]


def data_floor(dataset: str, num_samples: int) -> float:
    """SWD between two independent draws of the data: what a perfect sampler would score."""
    from diffbench.plugins import build_registry
    from diffbench_plugins.point_metrics import sliced_wasserstein

    source = build_registry().get("datasets", dataset).load()
    return sliced_wasserstein(source.train_set(num_samples)[0], source.reference(2000)[0])


def image_floor(dataset: str, num_samples: int) -> float:
    """FID of num_samples training images against the runner's reference set (the held-out half)."""
    import torch

    from diffbench.metrics import MetricContext
    from diffbench.plugins import build_registry
    from diffbench.runner import REFERENCE_SIZE
    from diffbench_plugins.image_metrics import compute_fid

    source = build_registry().get("datasets", dataset).load()
    reference = source.reference(max(REFERENCE_SIZE, num_samples))[0]
    ctx = MetricContext(dataset=source, reference=reference, reference_labels=None, labels=None, denoiser=None,
                        device=torch.device("cpu"), seed=0)
    return next(iter(compute_fid(source.train_set()[0][:num_samples], ctx).values()))


def plot(table: pd.DataFrame, floor: float | None, dataset: str, path: Path, column: str = "swd") -> None:
    fig, ax = plt.subplots(figsize=(10, 5))
    ok = table[table.status == "ok"]
    groups = list(ok.groupby(["model", "sampler"], sort=False))
    colors = plt.get_cmap("tab20")(range(len(groups)))
    for color, ((model, sampler), rows) in zip(colors, groups):
        rows = rows.sort_values("nfe")
        ax.plot(rows.nfe, rows[column], marker="o", color=color, label=f"{model} · {sampler}")
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", lw=1, label="data vs data")
    # Diverging few-step cells (e.g. EDM Heun at NFE 3) would squash the rest: they are in the table.
    if column == "swd":
        ax.set(ylim=(0.5 * floor, 2.0))
    ax.set(xscale="log", yscale="log", xlabel="NFE (model calls)",
           ylabel=f"{column} (lower is better)", title=f"Few-step generation on {dataset}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--suite", type=click.Choice(list(SUITES)), default="moons", show_default=True)
@click.option("--dataset", default=None, help="Override the suite's dataset.")
@click.option("--num-samples", default=None, type=int, help="Override the suite's samples per cell.")
@click.option("--out", "out_dir", default="results/reports", show_default=True, type=click.Path(file_okay=False))
@click.option("--runs", "runs_dir", default="results/fewstep-runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="Reuse the finished cells of earlier runs in --runs (diffbench run --resume).")
def main(suite, dataset, num_samples, out_dir, runs_dir, resume):
    groups, suite_dataset, metrics, column, stem, suite_samples = SUITES[suite]
    dataset, num_samples = dataset or suite_dataset, num_samples or suite_samples
    out, runs = Path(out_dir), Path(runs_dir) / ("" if suite == "moons" else suite)
    out.mkdir(parents=True, exist_ok=True)
    tables = [run_group(name, *group, dataset, num_samples, runs, resume, metrics) for name, group in groups.items()]
    columns = COLUMNS if suite == "moons" else [c for c in COLUMNS if c != "swd"][:5] + [
        c for c in (column, "class-acc") if c in pd.concat(tables).columns] + ["wall_s", "reason"]
    table = pd.concat(tables, ignore_index=True).reindex(columns=columns)
    table = table.sort_values(["model", "sampler", "nfe"], kind="stable")
    floor = data_floor(dataset, num_samples) if suite == "moons" else image_floor(dataset, num_samples)
    table.to_csv(out / f"{stem}.csv", index=False)

    ok = table[table.status == "ok"]
    wide = ok.assign(row=ok.model + " · " + ok.sampler).pivot_table(index="row", columns="nfe", values=column, sort=False)
    wide = wide.reindex(sorted(wide.columns), axis=1).map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    wide.index.name, wide.columns = "model · sampler \\ NFE", [str(int(c)) for c in wide.columns]
    skipped = table[table.status != "ok"][["model", "sampler", "steps", "status", "reason"]]
    if suite == "moons":
        lines = [f"# Few-step generation on {dataset}: SWD vs NFE", "",
                 f"{num_samples} samples per cell, seed 0, SWD to 2000 held-out points (lower is better). "
                 f"Two independent draws of the data score {floor:.4f}.", "", wide.to_markdown(), ""]
    else:
        lines = [f"# Few-step generation on {dataset}: {column} vs NFE", "",
                 f"{num_samples} class-conditional samples per cell (label i % 10, no guidance), seed 0; "
                 f"{column} (lower is better) with the shipped digits classifier's features, against the "
                 f"held-out half of the data. {num_samples} training images score {floor:.3f}.", "",
                 wide.to_markdown(), ""]
        if "class-acc" in ok.columns:
            acc = ok.assign(row=ok.model + " · " + ok.sampler).pivot_table(index="row", columns="nfe",
                                                                          values="class-acc", sort=False)
            acc = acc.reindex(sorted(acc.columns), axis=1).map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
            acc.index.name, acc.columns = "model · sampler \\ NFE", [str(int(c)) for c in acc.columns]
            lines += ["class-acc (the classifier's accuracy on the requested labels, higher is better):", "",
                      acc.to_markdown(), ""]
    if len(skipped):
        lines += ["Cells that did not run:", "", skipped.to_markdown(index=False), ""]
    lines += ["Regenerate: `OMP_NUM_THREADS=1 python scripts/fewstep_evidence.py" +
              ("" if suite == "moons" else f" --suite {suite}") + "`"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(table, floor, dataset, out / f"{stem}.png", column)
    click.echo("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
