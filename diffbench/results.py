"""The results table: one row per cell, written atomically as cells finish.

``results/<run-id>/`` holds results.csv, results.json (rows + column metadata), results.md,
config.json, env.json, run.log, a PNG of each metric against NFE, and sample pictures.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
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


AXES = {"nfe": "NFE (network evaluations per sample)", "wall_s": "wall-clock per batch (s)"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")  # one per model
DASHES = ("-", "--", ":", "-.")  # only once the colours run out (more than 20 lines in one panel)


@dataclass
class Line:
    """One model · sampler · guidance curve of a panel, drawn the same way by matplotlib and the HTML report."""
    label: str
    color: tuple  # RGBA in [0, 1]
    marker: str  # matplotlib marker code
    dash: str  # matplotlib line style
    x: list
    y: list
    cells: list  # the full cell label of each point (hover text)


@dataclass
class Panel:
    """A metric on one dataset against one x axis (values of different datasets are not comparable)."""
    column: str
    higher_is_better: bool
    dataset: str
    x: str  # "nfe" or "wall_s"
    lines: list
    single_x: bool  # every point at one x value (e.g. one step count): drawn on a categorical axis

    @property
    def title(self) -> str:
        return f"{self.column} on {self.dataset}"

    @property
    def ylabel(self) -> str:
        return f"{self.column} ({'higher' if self.higher_is_better else 'lower'} is better)"

    @property
    def xlabel(self) -> str:
        return AXES[self.x] if not self.single_x else f"at {AXES[self.x].split(' (')[0]} = {self.lines[0].x[0]:g}"


def line_label(model: str, sampler: str, guidance: str) -> str:
    return f"{model} · {sampler}" + ("" if guidance == "none" else f" · {guidance}")


def metric_panels(df: pd.DataFrame, metric_columns: dict[str, bool], x: str = "nfe") -> list[Panel]:
    """Every (metric, dataset) panel of the ok rows, each line with its own colour and a marker per model."""
    ok = df[(df["status"] == "ok") & df[x].notna()]
    panels = []
    for column, higher in metric_columns.items():
        if column not in ok:
            continue
        for dataset, data in ok[ok[column].notna()].groupby("dataset", sort=True):
            groups = list(data.groupby(["model", "sampler", "guidance"], sort=True))
            palette = plt.cm.tab10 if len(groups) <= 10 else plt.cm.tab20
            markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(sorted(data["model"].unique()))}
            lines = []
            for i, ((model, sampler, guidance), group) in enumerate(groups):
                group = group.sort_values(x)
                lines.append(Line(line_label(model, sampler, guidance), palette(i % palette.N), markers[model],
                                  DASHES[(i // palette.N) % len(DASHES)], group[x].astype(float).tolist(),
                                  group[column].astype(float).tolist(),
                                  [f"{model} · {sampler} · {guidance} · {dataset} · {steps} steps"
                                   for steps in group["steps"]]))
            panels.append(Panel(column, higher, str(dataset), x, lines, data[x].nunique() == 1))
    return panels


def dodge(n_lines: int, index: int) -> float:
    """Multiplicative x offset of line ``index`` so points of different lines at one NFE stay apart
    on a log axis (at most ±8 %, far less than the gap between step counts)."""
    spread = min(0.006 * (n_lines - 1), 0.035)  # decades, total
    return 10 ** (spread * (index / max(n_lines - 1, 1) - 0.5)) if n_lines > 1 else 1.0


PLAIN = FuncFormatter(lambda value, _: f"{value:g}")


def _span_decades(axis) -> float:
    low, high = axis.get_view_interval()
    return math.log10(high / low) if low > 0 else math.inf


def _draw_panel(ax, panel: Panel) -> None:
    n = len(panel.lines)
    for i, line in enumerate(panel.lines):
        if panel.single_x:  # a categorical axis: one slot per line
            ax.plot([i], line.y, marker=line.marker, color=line.color, linestyle="none", markersize=7)
        else:
            xs = [x * dodge(n, i) for x in line.x] if panel.x == "nfe" else line.x
            ax.plot(xs, line.y, marker=line.marker, color=line.color, linestyle=line.dash, label=line.label,
                    markersize=5)
    if panel.single_x:
        ax.set_xticks(range(n), [line.label for line in panel.lines], rotation=60, ha="right", fontsize=7)
        ax.set_xlim(-0.7, n - 0.3)
    else:
        ax.set_xscale("log")
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    if all(v > 0 for line in panel.lines for v in line.y):
        ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers (0.15, 20) rather than 1.5×10⁻¹ on log axes
        axis.set_major_formatter(PLAIN)
        axis.set_minor_formatter(PLAIN if axis.get_scale() == "log" and _span_decades(axis) < 1 else NullFormatter())
    ax.set_xlabel(panel.xlabel, fontsize=8)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.set_title(panel.title, fontsize=9)
    ax.tick_params(which="both", labelsize=7)
    ax.grid(True, which="both", alpha=0.3)


def plot_file_name(column: str, x: str) -> str:
    return f"plot_{column.replace('[', '_').replace(']', '')}_vs_{'nfe' if x == 'nfe' else 'wall'}.png"


def plot_metrics(df: pd.DataFrame, metric_columns: dict[str, bool], out_dir: Path, x: str = "nfe") -> list[Path]:
    """One PNG per metric against ``x`` (NFE or wall-clock, log axes), one panel per dataset."""
    by_column: dict[str, list[Panel]] = {}
    for panel in metric_panels(df, metric_columns, x):
        by_column.setdefault(panel.column, []).append(panel)
    written = []
    for column, panels in by_column.items():
        legend_rows = max(math.ceil(len(p.lines) / 2) for p in panels)
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2 + 0.14 * legend_rows), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            _draw_panel(ax, panel)
        fig.suptitle(f"{column} vs {AXES[x].split(' (')[0]}", fontsize=10)
        fig.tight_layout()
        path = out_dir / plot_file_name(column, x)
        save_figure(fig, path, dpi=120)
        written.append(path)
    return written


def _draw_points(ax, pts, lim: float, color: str) -> None:
    """A 2-D scatter (a histogram for 1-D points) of at most a few thousand samples."""
    pts = pts.detach().cpu().float()
    if pts.shape[1] == 1:
        ax.hist(pts[:, 0].numpy(), bins=80, range=(-lim, lim), density=True, color=color, alpha=0.7)
    else:
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=1, alpha=0.5, color=color)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")


def plot_point_samples(dataset_name: str, reference, samples: dict[str, Any], out_dir: Path, max_panels: int = 24):
    """Scatter plots (histograms in 1-D) of each cell's samples next to the real data."""
    items = [("data", reference)] + list(samples.items())[: max_panels - 1]
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    lim = float(reference.abs().max()) * 1.3
    for ax, (title, pts) in zip(axes.flat, items):
        _draw_points(ax, pts, lim, "C0" if title == "data" else "C1")
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.suptitle(f"{dataset_name}: samples vs data")
    fig.tight_layout()
    path = out_dir / f"samples_{re.sub(r'[^A-Za-z0-9.=-]+', '-', dataset_name).strip('-')}.png"
    save_figure(fig, path, dpi=110)
    return path


def plot_point_cell(reference, samples, path: Path) -> None:
    """A small picture of one cell's samples (orange) over the data (blue), shown next to its row in the report."""
    fig, ax = plt.subplots(figsize=(1.6, 1.6))
    lim = float(reference.abs().max()) * 1.3
    _draw_points(ax, reference[: len(samples)], lim, "C0")
    _draw_points(ax, samples, lim, "C1")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout(pad=0.1)
    save_figure(fig, path, dpi=80)
