"""Few-step generation at equal NFE: diffusion solvers vs flow matching vs consistency models.

Runs ``diffbench run`` once per (models, samplers, steps) group below, each into its own
``--out`` directory, then merges the tables into results/reports/fewstep.{csv,md} and plots
SWD against NFE (results/reports/fewstep.png). Usage:

    OMP_NUM_THREADS=1 python scripts/fewstep_evidence.py [--dataset moons] [--num-samples 2000]
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
COLUMNS = ["model", "sampler", "steps", "nfe", "status", "swd", "wall_s", "reason"]


def run_group(name: str, models: str, samplers: str, steps: str, dataset: str, num_samples: int, runs: Path,
              resume: bool) -> pd.DataFrame:
    out = runs / name
    cmd = ["diffbench", "run", *(["--resume"] if resume else []), "--models", models, "--samplers", samplers, "--steps", steps, "--datasets", dataset,
           "--metrics", "swd", "--num-samples", str(num_samples), "--repeats", "1", "--device", "cpu", "--quiet",
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


def plot(table: pd.DataFrame, floor: float, dataset: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 5))
    ok = table[table.status == "ok"]
    groups = list(ok.groupby(["model", "sampler"], sort=False))
    colors = plt.get_cmap("tab20")(range(len(groups)))
    for color, ((model, sampler), rows) in zip(colors, groups):
        rows = rows.sort_values("nfe")
        ax.plot(rows.nfe, rows.swd, marker="o", color=color, label=f"{model} · {sampler}")
    ax.axhline(floor, color="gray", ls="--", lw=1, label="data vs data")
    # Diverging few-step cells (e.g. EDM Heun at NFE 3) would squash the rest: they are in the table.
    ax.set(xscale="log", yscale="log", ylim=(0.5 * floor, 2.0), xlabel="NFE (model calls)",
           ylabel="SWD (lower is better)", title=f"Few-step generation on {dataset}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--dataset", default="moons", show_default=True)
@click.option("--num-samples", default=2000, show_default=True)
@click.option("--out", "out_dir", default="results/reports", show_default=True, type=click.Path(file_okay=False))
@click.option("--runs", "runs_dir", default="results/fewstep-runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="Reuse the finished cells of earlier runs in --runs (diffbench run --resume).")
def main(dataset, num_samples, out_dir, runs_dir, resume):
    out, runs = Path(out_dir), Path(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = [run_group(name, *group, dataset, num_samples, runs, resume) for name, group in GROUPS.items()]
    table = pd.concat(tables, ignore_index=True)[COLUMNS].sort_values(["model", "sampler", "nfe"], kind="stable")
    floor = data_floor(dataset, num_samples)
    table.to_csv(out / "fewstep.csv", index=False)

    ok = table[table.status == "ok"]
    wide = ok.assign(row=ok.model + " · " + ok.sampler).pivot_table(index="row", columns="nfe", values="swd", sort=False)
    wide = wide.reindex(sorted(wide.columns), axis=1).map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    wide.index.name, wide.columns = "model · sampler \\ NFE", [str(int(c)) for c in wide.columns]
    skipped = table[table.status != "ok"][["model", "sampler", "steps", "status", "reason"]]
    lines = [f"# Few-step generation on {dataset}: SWD vs NFE", "",
             f"{num_samples} samples per cell, seed 0, SWD to 2000 held-out points (lower is better). "
             f"Two independent draws of the data score {floor:.4f}.", "",
             wide.to_markdown(), ""]
    if len(skipped):
        lines += ["Cells that did not run:", "", skipped.to_markdown(index=False), ""]
    lines += ["Regenerate: `OMP_NUM_THREADS=1 python scripts/fewstep_evidence.py`"]
    (out / "fewstep.md").write_text("\n".join(lines) + "\n")
    plot(table, floor, dataset, out / "fewstep.png")
    click.echo("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
