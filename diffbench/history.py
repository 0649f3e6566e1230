"""``diffbench history RESULTS_DIR...``: every cell's metrics and timings across commits.

Runs (run directories, or folders holding them) are ordered by commit date, then run date,
from their env.json. Each is compared against one baseline run with ``diffbench compare``'s
own rules and tolerances (compare.compare_tables, column_limits, metric_allowance, ratio_limit),
so a point is marked on the site exactly when the CI gate would flag it. Written to OUT:

    history.csv          one row per run × cell × column (value, baseline, tolerance band, regression)
    index.html           the runs, the flagged regressions, and every cell with a link to its page
    cells/<cell>.html    one chart per metric and timing over commits: baseline, band, regressions
    assets/plotly.min.js plotly's offline bundle, shared by the pages (no network needed)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from diffbench.compare import (MEMORY, TIMING, cell_name, column_limits, compare_tables, load_tolerances,
                               metric_allowance, ratio_limit)
from diffbench.grid import cell_slug
from diffbench.io import atomic_write_text
from diffbench.report import ReportError, Run, chart_html, load_run, plotly_js, render
from diffbench.results import KEY_COLUMNS
from diffbench.timing import git_commit_date

HISTORY_COLUMNS = ["run", "commit", "commit_date", "run_date", "machine", *KEY_COLUMNS, "status", "column", "value",
                   "baseline", "low", "high", "regression"]
REGRESSION_RED = "#d62728"


@dataclass
class Point:
    """One run of the history, with what identifies it on the commit axis."""
    run: Run
    commit: str
    commit_date: str
    run_date: str
    machine: str
    name: str  # the run's id in history.csv: its directory name, or its path where names repeat

    @property
    def label(self) -> str:
        return f"{self.commit[:8]} · {self.commit_date[:10]}"


def find_runs(paths) -> list[Run]:
    """Run directories among ``paths``: each path is a run (has results.csv) or a folder of runs."""
    runs, seen = [], set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"RESULTS_DIR {path}: no such directory")
        candidates = [path] if (path / "results.csv").is_file() else sorted(
            p for p in path.iterdir() if p.is_dir() and (p / "results.csv").is_file())
        if not candidates:
            raise ReportError(f"RESULTS_DIR {path}: no results.csv in it or in its sub-directories")
        for candidate in candidates:
            if candidate.resolve() not in seen:  # results/latest is a link to a run already listed
                seen.add(candidate.resolve())
                runs.append(load_run(candidate))
    return runs


def history_point(run: Run) -> Point:
    """Commit, commit date, run date and machine of a run (older env.json files lack some: look them up)."""
    commit = run.env.get("git_commit") or "unknown"
    mtime = datetime.fromtimestamp((run.path / "results.csv").stat().st_mtime, timezone.utc)
    run_date = run.env.get("date") or mtime.isoformat(timespec="seconds")
    commit_date = run.env.get("git_commit_date") or git_commit_date(commit) or run_date
    machine = run.env.get("hostname") or f"{run.env.get('platform', 'unknown')} ({run.env.get('cpu_count', '?')} CPUs)"
    return Point(run, commit, commit_date, run_date, machine, run.name)


def _value(row: dict | None, column: str) -> float | None:
    value = None if row is None else row.get(column)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def band(column: str, base: float | None, tol: dict) -> tuple[float | None, float | None]:
    """The values compare lets pass for ``column`` given its baseline value (None, None without one)."""
    if base is None:
        return None, None
    if column == "nfe":
        return base, base  # NFE must stay identical
    limits = column_limits(tol, column)
    if column in TIMING + MEMORY:
        return 0.0, ratio_limit(limits, base)
    allowed = metric_allowance(limits, base)  # worse by more: regression; better by more: "improved"
    return base - allowed, base + allowed


def history_table(points: list[Point], baseline: Run, tol: dict) -> pd.DataFrame:
    """Long table: one row per run × cell × column, with the baseline, its band and compare's verdict.
    A cell that stopped being ok (failed, skipped or missing) gets a ``status`` row marked as a regression."""
    directions = {c: h for p in points for c, h in p.run.directions.items()} | baseline.directions
    columns = ["nfe", *directions, *TIMING, *MEMORY]
    base_rows = {cell_name(r): r for r in baseline.table.to_dict("records") if r["status"] == "ok"}
    records = []
    for point in points:
        run = {"run": point.name, "commit": point.commit, "commit_date": point.commit_date,
               "run_date": point.run_date, "machine": point.machine}
        findings = {(f.cell, f.column): f for f in compare_tables(point.run.table, baseline.table, directions, tol)
                    if f.verdict == "regression"}
        for row in point.run.table.to_dict("records"):
            cell = cell_name(row)
            for column in columns:
                base = _value(base_rows.get(cell), column)
                low, high = band(column, base, tol)
                records.append({**run, **{k: row[k] for k in KEY_COLUMNS}, "status": row["status"], "column": column,
                                "value": _value(row, column), "baseline": base, "low": low, "high": high,
                                "regression": (cell, column) in findings})
        for (cell, column), finding in findings.items():
            if column == "status":
                records.append({**run, **{k: base_rows[cell][k] for k in KEY_COLUMNS}, "column": "status",
                                "status": str(finding.new).split(":")[0], "value": None, "baseline": None,
                                "low": None, "high": None, "regression": True})
    return pd.DataFrame(records, columns=HISTORY_COLUMNS)


def trend_figure(data: pd.DataFrame, column: str, labels: list[str]) -> go.Figure:
    """One column of one cell over the runs: points, the baseline, its tolerance band, regressions in red."""
    fig = go.Figure()
    base, low, high = data["baseline"].iloc[0], data["low"].iloc[0], data["high"].iloc[0]
    if pd.notna(base):
        fig.add_trace(go.Scatter(x=labels, y=[low] * len(labels), mode="lines", line=dict(width=0),
                                 hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=labels, y=[high] * len(labels), mode="lines", line=dict(width=0),
                                 fill="tonexty", fillcolor="rgba(52, 81, 178, 0.12)", name="tolerance band",
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=labels, y=[base] * len(labels), mode="lines", name="baseline",
                                 line=dict(color="#3451b2", dash="dash", width=1.5), hoverinfo="skip"))
    ok = data[data["value"].notna()]
    fig.add_trace(go.Scatter(x=ok["label"], y=ok["value"], mode="lines+markers", name=column,
                             line=dict(color="#2b2d42"), marker=dict(size=8, color="#2b2d42"),
                             customdata=ok[["commit", "run", "machine"]].values,
                             hovertemplate="%{customdata[0]}<br>run %{customdata[1]} on %{customdata[2]}<br>"
                                           "%{y:.4g}<extra></extra>"))
    flagged = data[data["regression"]]
    if len(flagged):
        fig.add_trace(go.Scatter(
            x=flagged["label"], y=flagged["value"].fillna(base if pd.notna(base) else 0.0), mode="markers",
            name="regression (compare would fail)", marker=dict(symbol="x", size=15, color=REGRESSION_RED,
                                                              line=dict(width=1, color=REGRESSION_RED)),
            customdata=flagged[["commit", "status"]].values,
            hovertemplate="regression at %{customdata[0]}<br>status %{customdata[1]}<br>%{y:.4g}<extra></extra>"))
    fig.update_layout(title=dict(text=column, font=dict(size=14)), legend=dict(orientation="h", y=-0.25),
                      showlegend=True)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=labels, title="commit · date")
    fig.update_yaxes(title=column)
    return fig


def cell_pages(table: pd.DataFrame, labels: list[str], out_dir: Path) -> list[dict]:
    """Write cells/<cell>.html for every cell; return the index rows."""
    index = []
    for key, data in table.groupby(KEY_COLUMNS, sort=True):
        slug = cell_slug(key)
        charts = [chart_html(trend_figure(column_data, column, labels), height=340)
                  for column, column_data in data.groupby("column", sort=False)
                  if column != "status" and column_data["value"].notna().any()]
        regressions = data[data["regression"]]
        latest = data[data["label"] == data["label"].iloc[-1]]["status"].iloc[0]
        cell = dict(zip(KEY_COLUMNS, key))
        atomic_write_text(out_dir / "cells" / f"{slug}.html",
                          render("history_cell.html.j2", cell=cell, name=" / ".join(map(str, key)), charts=charts,
                                 regressions=regressions.to_dict("records")))
        index.append({**cell, "href": f"cells/{slug}.html", "latest": latest, "charts": len(charts),
                      "regressions": int(regressions[["label", "column"]].drop_duplicates().shape[0])})
    return index


def build_history(paths, out_dir: Path, *, baseline: str | None = None, tolerances: str | None = None) -> str:
    """Write history.csv and the site under ``out_dir``; return a one-paragraph summary."""
    runs = find_runs(paths)
    points = sorted((history_point(r) for r in runs), key=lambda p: (p.commit_date, p.run_date))
    names = [p.name for p in points]
    for point in points:
        if names.count(point.name) > 1:
            point.name = str(point.run.path)
    base = load_run(baseline) if baseline else points[0].run
    tol = load_tolerances(tolerances)
    table = history_table(points, base, tol)
    labels = [p.label if [q.label for q in points].count(p.label) == 1 else  # several runs of one commit
              f"{p.label} · run {p.run_date[:16].replace('T', ' ')} {p.name}" for p in points]
    table["label"] = table["run"].map({p.name: label for p, label in zip(points, labels)})
    atomic_write_text(out_dir / "history.csv", table.drop(columns="label").to_csv(index=False))
    atomic_write_text(out_dir / "assets" / "plotly.min.js", plotly_js())
    cells = cell_pages(table, labels, out_dir)
    flagged = table[table["regression"]].drop_duplicates(["run", *KEY_COLUMNS, "column"])
    flagged = flagged.iloc[flagged["column"].isin(TIMING + MEMORY).argsort(kind="stable")]  # quality first, then timing
    runs_rows = [{"label": label, "commit": p.commit, "commit_date": p.commit_date, "run_date": p.run_date,
                  "machine": p.machine, "path": str(p.run.path), "baseline": p.run.path.resolve() == base.path.resolve(),
                  "ok": int((p.run.table["status"] == "ok").sum()), "cells": len(p.run.table),
                  "regressions": int((flagged["run"] == p.name).sum())} for p, label in zip(points, labels)]
    atomic_write_text(out_dir / "index.html", render(
        "history_index.html.j2", runs=runs_rows, cells=cells, baseline=str(base.path),
        regressions=flagged.to_dict("records"), tolerances=tol))
    return (f"history of {len(points)} runs ({len({p.commit for p in points})} commits) over {len(cells)} cells "
            f"against baseline {base.path}: {len(flagged)} regression point(s) flagged\n"
            f"  -> {out_dir / 'index.html'}, {out_dir / 'history.csv'}")
