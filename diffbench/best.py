"""The best setting per budget: Pareto fronts of quality against NFE and wall-clock from a finished run.

A *setting* is one (sampler, spacing, guidance, steps) cell of a (dataset, model) pair; quality is
one metric column. A setting is on the Pareto front when no other setting of the same pair is at
least as cheap (NFE, or wall-clock seconds per batch) and strictly better in quality, or strictly
cheaper and at least as good. The best setting under a budget is the best-quality ok cell whose
cost is within it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from tabulate import tabulate  # noqa: E402

from diffbench.compare import load_table  # noqa: E402
from diffbench.registry import ConfigError  # noqa: E402
from diffbench.results import BASE_COLUMNS, save_figure  # noqa: E402

COSTS = {"nfe": "nfe", "wall": "wall_s"}  # budget key -> column
SETTING = ["sampler", "spacing", "guidance", "steps"]
GROUP = ["dataset", "model"]


def parse_budgets(texts) -> list[tuple[str, float]]:
    """``nfe=10``, ``wall=2.5`` (seconds per batch), comma-separated or repeated."""
    budgets = []
    for text in (part.strip() for t in texts for part in t.split(",") if part.strip()):
        match = re.fullmatch(r"(\w+)=([0-9.eE+-]+)", text)
        if not match or match.group(1) not in COSTS:
            raise ConfigError(f"--budget: {text!r} is not KEY=NUMBER with KEY one of {', '.join(COSTS)} "
                              f"(e.g. nfe=10 or wall=2.5)")
        try:
            value = float(match.group(2))
        except ValueError:
            raise ConfigError(f"--budget: {match.group(2)!r} in {text!r} is not a number") from None
        if not value > 0:
            raise ConfigError(f"--budget: {text!r} must be positive")
        budgets.append((match.group(1), value))
    return budgets


def metric_column(df: pd.DataFrame, directions: dict[str, bool], metric: str | None) -> str:
    """The metric column named ``metric`` exactly or as a prefix (``fid`` -> ``fid[digits-cnn]``)."""
    columns = [c for c in directions if c in df.columns] or [c for c in df.columns if c not in BASE_COLUMNS]
    if not columns:
        raise ConfigError("the run has no metric columns")
    if metric is None:
        return columns[0]
    matches = [c for c in columns if c == metric] or [c for c in columns if c.split("[")[0] == metric]
    if len(matches) != 1:
        why = "is ambiguous" if matches else "is not a metric of this run"
        raise ConfigError(f"--metric {metric!r} {why}; valid: {', '.join(columns)}")
    return matches[0]


def pareto_front(rows: pd.DataFrame, cost: str, quality: str, higher_is_better: bool) -> pd.DataFrame:
    """The rows no other row dominates in (cost, quality), sorted by cost."""
    score = -rows[quality] if higher_is_better else rows[quality]  # lower is better
    order = rows.assign(_score=score).sort_values([cost, "_score"])
    best, keep = math.inf, []
    for index, row in order.iterrows():
        if row["_score"] < best:
            keep.append(index)
            best = row["_score"]
    return rows.loc[keep]


def best_within(rows: pd.DataFrame, cost: str, budget: float, quality: str, higher_is_better: bool):
    """The best-quality row with cost ≤ budget, or None."""
    within = rows[rows[cost] <= budget]
    if within.empty:
        return None
    return within.loc[within[quality].idxmax() if higher_is_better else within[quality].idxmin()]


def _plot(ok: pd.DataFrame, quality: str, higher: bool, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (key, cost) in zip(axes, COSTS.items()):
        ax.scatter(ok[cost], ok[quality], s=12, color="0.7", label="all ok cells")
        for (dataset, model), rows in ok.groupby(GROUP, sort=False):
            front = pareto_front(rows, cost, quality, higher)
            ax.plot(front[cost], front[quality], "o-", label=f"{model} · {dataset}")
            for _, r in front.iterrows():
                ax.annotate(f"{r['sampler']}·{r['guidance']}", (r[cost], r[quality]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("NFE" if key == "nfe" else "wall-clock per batch (s)")
        ax.set_ylabel(f"{quality} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"Pareto front: {quality} vs {key}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def best_report(run_dir, metric: str | None = None, budget_texts=()) -> tuple[str, Path]:
    """The text report (Pareto fronts and best settings per budget) and the plot written into run_dir.

    Without budgets, every NFE of the run is a budget. Raises ConfigError for bad input."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR {str(run_dir)!r} is not a directory")
    budgets = parse_budgets(budget_texts)
    try:
        df, directions = load_table(run_dir)
    except Exception as exc:  # BrokenRun: no or unreadable results.csv
        raise ConfigError(str(exc)) from None
    quality = metric_column(df, directions, metric)
    higher = bool(directions.get(quality, False))
    ok = df[(df["status"] == "ok") & df[quality].notna()].copy()
    if ok.empty:
        raise ConfigError(f"{run_dir}: no ok cell has a {quality} value")
    ok["spacing"] = ok["spacing"].fillna("")
    budgets = budgets or [("nfe", float(n)) for n in sorted(ok["nfe"].unique())]

    sections = [f"# Best settings in {run_dir} by {quality} ({'higher' if higher else 'lower'} is better)"]
    columns = GROUP + SETTING + ["nfe", "wall_s", quality]
    for (dataset, model), rows in ok.groupby(GROUP, sort=False):
        for key, cost in COSTS.items():
            front = pareto_front(rows, cost, quality, higher)[columns]
            sections.append(f"## {model} on {dataset}: Pareto front of {quality} vs {key}\n\n"
                            + tabulate(front, headers="keys", tablefmt="github", showindex=False, floatfmt=".4g"))
        picks = []
        for key, value in budgets:
            row = best_within(rows, COSTS[key], value, quality, higher)
            picks.append({"budget": f"{key}<={value:g}", **({c: row[c] for c in SETTING + ["nfe", "wall_s", quality]}
                                                         if row is not None else {"sampler": "(none within budget)"})})
        sections.append(f"## {model} on {dataset}: best setting per budget\n\n"
                        + tabulate(pd.DataFrame(picks).fillna(""), headers="keys", tablefmt="github", showindex=False,
                                   floatfmt=".4g"))
    plot = run_dir / "pareto.png"
    _plot(ok, quality, higher, plot)
    return "\n\n".join(sections) + "\n", plot
