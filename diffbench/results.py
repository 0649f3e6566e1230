"""The results table: one row per cell, written atomically as cells finish.

``results/<run-id>/`` holds results.csv, results.json (rows + column metadata), results.md,
config.json, env.json, run.log, a PNG of each metric against NFE, and sample pictures.
"""
from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from tabulate import tabulate  # noqa: E402

from diffbench.io import atomic_write_bytes, atomic_write_text, read_json  # noqa: E402

KEY_COLUMNS = ["model", "sampler", "guidance", "dataset", "steps"]
BASE_COLUMNS = KEY_COLUMNS + [
    "spacing", "nfe", "status", "reason", "wall_s", "wall_std_s", "step_ms", "overhead_ms",
    "peak_mem_mb", "samples_per_s", "batch_size", "num_samples", "seed", "device", "attention",
]
TIMING_COLUMNS = ("wall_s", "wall_std_s", "step_ms", "overhead_ms", "samples_per_s", "peak_mem_mb")
STATUSES = ("ok", "failed", "skipped")


def _clean(value: Any) -> Any:
    """JSON-safe scalars (NaN / inf become null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultsWriter:
    """Collects rows and rewrites the tables atomically after every cell."""

    def __init__(self, out_dir: Path, rows: list[dict] | None = None):
        self.out_dir = Path(out_dir)
        self.rows: list[dict] = list(rows or [])
        self.metric_columns: dict[str, bool] = {}  # column -> higher is better

    def add(self, row: dict, metric_directions: dict[str, bool] | None = None) -> None:
        self.metric_columns.update(metric_directions or {})
        self.rows = [r for r in self.rows if [r.get(k) for k in KEY_COLUMNS] != [row.get(k) for k in KEY_COLUMNS]]
        self.rows.append(row)
        self.write()

    def frame(self) -> pd.DataFrame:
        columns = BASE_COLUMNS + sorted({c for r in self.rows for c in r} - set(BASE_COLUMNS))
        return pd.DataFrame(self.rows, columns=columns)

    def write(self) -> None:
        df = self.frame()
        atomic_write_text(self.out_dir / "results.csv", df.to_csv(index=False))
        payload = {"columns": {"metrics": self.metric_columns},
                   "rows": [{k: _clean(v) for k, v in row.items()} for row in df.to_dict("records")]}
        atomic_write_text(self.out_dir / "results.json", json.dumps(payload, indent=1))
        atomic_write_text(self.out_dir / "results.md", markdown_table(df, self.metric_columns) + "\n")


def load_rows(out_dir: Path) -> tuple[list[dict], dict[str, bool]]:
    """Rows and metric directions of an earlier run (for --resume and compare)."""
    path = Path(out_dir) / "results.json"
    data = read_json(path)
    rows = data.get("rows") if isinstance(data, dict) else None
    directions = data.get("columns", {}).get("metrics", {}) if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in KEY_COLUMNS + ["status"])
                                             for r in rows) or not isinstance(directions, dict):
        raise ValueError(f"{path}: not a diffbench results table (needs rows with {', '.join(KEY_COLUMNS)}, status)")
    return rows, directions


def display_columns(df: pd.DataFrame, metric_columns) -> list[str]:
    shown = ["model", "sampler", "guidance", "dataset", "steps", "nfe", "status", "wall_s", "step_ms", "peak_mem_mb"]
    return shown + [c for c in df.columns if c in metric_columns] + ["reason"]


def _short(df: pd.DataFrame, metric_columns) -> pd.DataFrame:
    df = df[display_columns(df, metric_columns)].copy()
    df["reason"] = df["reason"].fillna("").astype(str).str.slice(0, 60)
    return df


def markdown_table(df: pd.DataFrame, metric_columns) -> str:
    return tabulate(_short(df, metric_columns), headers="keys", tablefmt="github", showindex=False, floatfmt=".4g")


def terminal_table(df: pd.DataFrame, metric_columns) -> str:
    """The ok and failed rows in full; skipped cells counted by reason (results.csv has them all)."""
    shown = df[df["status"] != "skipped"]
    text = tabulate(_short(shown, metric_columns), headers="keys", tablefmt="simple", showindex=False, floatfmt=".4g")
    skipped = df.loc[df["status"] == "skipped", "reason"].value_counts()
    if len(skipped):
        text += "\n\nskipped cells:\n" + "\n".join(f"  {n:3d} × {reason}" for reason, n in skipped.items())
    return text


def save_figure(fig, path: Path, dpi: int) -> None:
    """Render a figure to PNG bytes and write them atomically (no truncated PNG on interrupt)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_metrics_vs_nfe(df: pd.DataFrame, metric_columns: dict[str, bool], out_dir: Path) -> list[Path]:
    """One PNG per metric: metric against NFE (log axis), a line per model/sampler/guidance/dataset."""
    ok = df[df["status"] == "ok"]
    written = []
    for column, higher in metric_columns.items():
        data = ok[ok[column].notna()] if column in ok else ok.iloc[0:0]
        if data.empty:
            continue
        fig, ax = plt.subplots(figsize=(7.2, 4.8))
        # One colour per sampler (+ guidance), one line style per model (+ dataset).
        colors = {k: plt.cm.tab20(i % 20) for i, k in enumerate(sorted(set(zip(data["sampler"], data["guidance"]))))}
        styles = {k: ("-", "--", ":", "-.")[i % 4] for i, k in enumerate(sorted(set(zip(data["model"], data["dataset"]))))}
        for (model, sampler, guidance, dataset), group in data.groupby(["model", "sampler", "guidance", "dataset"]):
            group = group.sort_values("nfe")
            label = f"{model} · {sampler}" + ("" if guidance == "none" else f" · {guidance}") + f" · {dataset}"
            ax.plot(group["nfe"], group[column], marker="o", label=label, color=colors[sampler, guidance],
                    linestyle=styles[model, dataset])
        ax.set_xscale("log")
        if (data[column] > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_ylabel(f"{column} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"{column} vs NFE")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = out_dir / f"plot_{column.replace('[', '_').replace(']', '')}_vs_nfe.png"
        save_figure(fig, path, dpi=120)
        written.append(path)
    return written


def plot_point_samples(dataset_name: str, reference, samples: dict[str, Any], out_dir: Path, max_panels: int = 24):
    """Scatter plots (histograms in 1-D) of each cell's samples next to the real data."""
    items = [("data", reference)] + list(samples.items())[: max_panels - 1]
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    lim = float(reference.abs().max()) * 1.3
    for ax, (title, pts) in zip(axes.flat, items):
        pts = pts.detach().cpu().float()
        if pts.shape[1] == 1:
            ax.hist(pts[:, 0].numpy(), bins=80, range=(-lim, lim), density=True, color="C0" if title == "data" else "C1")
        else:
            ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=1, alpha=0.5, color="C0" if title == "data" else "C1")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.suptitle(f"{dataset_name}: samples vs data")
    fig.tight_layout()
    path = out_dir / f"samples_{re.sub(r'[^A-Za-z0-9.=-]+', '-', dataset_name).strip('-')}.png"
    save_figure(fig, path, dpi=110)
    return path
