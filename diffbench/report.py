"""``diffbench report RUN_DIR``: one self-contained HTML page of a run.

RUN_DIR/report.html holds the run's configuration and environment, the results table (sortable,
filterable, failed and skipped cells with their reasons, each cell's samples next to its row),
every metric against NFE and against wall-clock as interactive plotly charts (plotly.js is
embedded: no server, no network), the per-dataset sample pictures and any Pareto front
(``pareto*.png``) found in the run directory. Images are embedded as data URIs, so the page can
be mailed or attached to a CI job on its own.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2
import markupsafe
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from diffbench.compare import BrokenRun, load_table
from diffbench.grid import cell_slug
from diffbench.io import atomic_write_text
from diffbench.results import AXES, KEY_COLUMNS, Panel, dodge, metric_panels

TEMPLATES = Path(__file__).parent / "templates"
TIMING_SHOWN = ("wall_s", "step_ms", "peak_mem_mb")
PLOTLY_MARKERS = {"o": "circle", "s": "square", "^": "triangle-up", "D": "diamond", "v": "triangle-down",
                  "P": "cross", "X": "x", "*": "star", "h": "hexagon", "<": "triangle-left", ">": "triangle-right",
                  "p": "pentagon"}
PLOTLY_DASHES = {"-": "solid", "--": "dash", ":": "dot", "-.": "dashdot"}
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"scale": 2}}


class ReportError(Exception):
    """A directory that cannot be reported on (missing, no results, corrupt JSON)."""


@dataclass
class Run:
    """A finished (or interrupted) run directory, read back."""
    path: Path
    table: pd.DataFrame
    directions: dict[str, bool]  # metric column -> higher is better
    config: dict
    env: dict

    @property
    def name(self) -> str:
        return self.path.resolve().name


def read_json(path: Path, *, required: bool = False) -> dict:
    """A JSON object from ``path`` ({} when it is absent and not required); ReportError when corrupt."""
    if not path.is_file():
        if required:
            raise ReportError(f"{path}: missing")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory (results.csv + results.json, config.json, env.json) or raise ReportError."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"RUN_DIR {path}: {'not a directory' if path.exists() else 'no such directory'}")
    read_json(path / "results.json")  # a corrupt results.json is an error even though the CSV is read
    try:
        table, directions = load_table(path)
    except BrokenRun as exc:
        raise ReportError(str(exc)) from None
    if table.empty:
        raise ReportError(f"{path}/results.csv: no rows (did the run finish any cell?)")
    bad = sorted(set(table["status"].dropna()) - {"ok", "failed", "skipped"})
    if bad:
        raise ReportError(f"{path}/results.csv: unknown status {bad[0]!r}; valid: ok, failed, skipped")
    return Run(path, table, directions, read_json(path / "config.json"), read_json(path / "env.json"))


# ---- shared page pieces (also used by diffbench.history) ---------------------------------------
@lru_cache(maxsize=1)
def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(["html"]),
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = format_number
    env.globals["asset"] = lambda name: markupsafe.Markup((TEMPLATES / name).read_text())  # inlined CSS / JS
    env.globals["slug"] = row_slug
    return env


def render(template: str, **context) -> str:
    return templates().get_template(template).render(**context)


def row_slug(row: dict) -> str:
    """The cell id its files are named by (samples/<slug>.png, history's cells/<slug>.html)."""
    return cell_slug([row[k] for k in KEY_COLUMNS])


def format_number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def plotly_js() -> str:
    """The plotly.js bundle shipped inside plotly's Python package (no CDN)."""
    return get_plotlyjs()


def chart_html(fig: go.Figure, height: int = 380) -> str:
    fig.update_layout(height=height, margin=dict(l=60, r=20, t=50, b=50), template="plotly_white",
                      font=dict(family="system-ui, sans-serif", size=12), hoverlabel=dict(namelength=-1))
    return fig.to_html(full_html=False, include_plotlyjs=False, config=PLOTLY_CONFIG)


def css_color(rgba) -> str:
    return "rgb({:.0f},{:.0f},{:.0f})".format(*(255 * c for c in rgba[:3]))


# ---- the run page -------------------------------------------------------------------------------
def panel_figure(panel: Panel) -> go.Figure:
    """The interactive twin of results.plot_metrics' panel: same colours, markers and NFE dodge."""
    fig = go.Figure()
    n = len(panel.lines)
    for i, line in enumerate(panel.lines):
        if panel.single_x:
            xs = [line.label] * len(line.y)
        else:
            xs = [x * dodge(n, i) for x in line.x] if panel.x == "nfe" else line.x
        fig.add_trace(go.Scatter(
            x=xs, y=line.y, name=line.label, mode="markers" if panel.single_x else "lines+markers",
            marker=dict(symbol=PLOTLY_MARKERS[line.marker], size=9, color=css_color(line.color)),
            line=dict(color=css_color(line.color), dash=PLOTLY_DASHES[line.dash]),
            customdata=list(zip(line.cells, line.x)),
            hovertemplate=f"%{{customdata[0]}}<br>{panel.x} = %{{customdata[1]:.4g}}<br>"
                          f"{panel.column} = %{{y:.4g}}<extra></extra>"))
    log_y = all(v > 0 for line in panel.lines for v in line.y)
    fig.update_layout(title=dict(text=panel.title, font=dict(size=14)), showlegend=not panel.single_x,
                      legend=dict(font=dict(size=10)))
    fig.update_xaxes(title=panel.xlabel, type="category" if panel.single_x else "log")
    fig.update_yaxes(title=panel.ylabel, type="log" if log_y else "linear")
    return fig


def chart_rows(run: Run) -> list[dict]:
    """Per (metric, dataset): the chart against NFE next to the chart against wall-clock."""
    by_axis = {x: {(p.column, p.dataset): p for p in metric_panels(run.table, run.directions, x)} for x in AXES}
    return [{"title": by_axis["nfe"][key].title, "charts": [chart_html(panel_figure(by_axis[x][key]))
                                                            for x in AXES if key in by_axis[x]]}
            for key in by_axis["nfe"]]


def best_rows(table: pd.DataFrame, directions: dict[str, bool]) -> set[tuple[int, str]]:
    """(row index, metric) of the best ok value of each metric on each dataset (bold in the table)."""
    best = set()
    ok = table[table["status"] == "ok"]
    for column, higher in directions.items():
        if column not in ok:
            continue
        for _, data in ok[ok[column].notna()].groupby("dataset"):
            best.add((data[column].idxmax() if higher else data[column].idxmin(), column))
    return best


def cell_samples(run: Run, row: dict) -> dict:
    """The cell's sample picture (image grid or scatter) and text samples, if the run wrote them."""
    slug = row_slug(row)
    picture, text = run.path / "samples" / f"{slug}.png", run.path / "samples" / f"{slug}.txt"
    return {"image": data_uri(picture) if picture.is_file() else None,
            "text": text.read_text(errors="replace")[:2000] if text.is_file() else None}


def table_context(run: Run) -> dict:
    table = run.table
    metrics = [c for c in run.directions if c in table.columns]
    best = best_rows(table, run.directions)
    rows = []
    for index, row in zip(table.index, table.to_dict("records")):
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        rows.append({**clean, "samples": cell_samples(run, clean), "best": {c for c in metrics if (index, c) in best}})
    filters = {k: sorted(table[k].dropna().astype(str).unique()) for k in ("model", "sampler", "guidance", "dataset",
                                                                            "status")}
    arrows = {c: "↑" if run.directions[c] else "↓" for c in metrics}
    has_samples = any(r["samples"]["image"] or r["samples"]["text"] for r in rows)
    return {"rows": rows, "has_samples": has_samples, "metrics": metrics, "arrows": arrows,
            "timings": [c for c in TIMING_SHOWN if c in table], "filters": filters}


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html and return its path (ReportError on a bad directory)."""
    run = load_run(run_dir)
    counts = run.table["status"].value_counts().to_dict()
    pictures = {kind: [{"title": p.stem.replace("_", " "), "src": data_uri(p)} for p in sorted(run.path.glob(pattern))]
                for kind, pattern in (("pareto", "pareto*.png"), ("samples", "samples_*.png"))}
    html = render("report.html.j2", run=run, counts={s: counts.get(s, 0) for s in ("ok", "skipped", "failed")},
                  charts=chart_rows(run), pictures=pictures, plotly_js=plotly_js(), **table_context(run))
    path = run.path / "report.html"
    atomic_write_text(path, html)
    return path
