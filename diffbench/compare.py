"""``diffbench compare NEW BASELINE``: the CI regression gate.

Cells are matched on (model, sampler, guidance, dataset, steps). For every cell that was ok
in the baseline: its status must still be ok, its NFE must be identical, each quality metric
may get worse by at most ``abs + rel·|baseline|`` (tight: these are deterministic given the
seed), and each timing may grow by at most a ratio (wide: shared machines are noisy).
A metric whose rows carry a 95% interval (``<column>_ci95``, the half-width, in both tables)
is judged by it instead: a change within the interval of the difference, √(ci_new² + ci_base²),
is sampling noise and not a regression, whatever the fixed tolerance says; one beyond it is.
Exit codes: 0 no regression, 1 regression, 2 broken run or nothing comparable.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pandas as pd
from tabulate import tabulate

from diffbench.io import read_text
from diffbench.registry import ConfigError
from diffbench.results import KEY_COLUMNS, STATUSES, load_rows

DEFAULT_TOLERANCES = {
    "metrics": {"abs": 1e-3, "rel": 0.02},
    "timing": {"ratio": 3.0, "abs": 0.05},  # wall_s / step_ms may triple (plus a small absolute floor)
    "memory": {"ratio": 2.0, "abs": 64.0},  # MiB
    "columns": {},  # per-column overrides, e.g. {"fid[digits-cnn]": {"rel": 0.05}}
}
TIMING = ("wall_s", "step_ms")
MEMORY = ("peak_mem_mb",)


class BrokenRun(Exception):
    """A results directory that cannot be compared (missing or unreadable table)."""


@dataclass
class Finding:
    cell: str
    column: str
    baseline: object
    new: object
    limit: str
    verdict: str  # "regression" or "improved"


def load_table(path: str | Path) -> tuple[pd.DataFrame, dict[str, bool]]:
    """results.csv of a run directory (or the file itself) and its metric directions; BrokenRun
    naming the file when it is missing, truncated or not a results table."""
    path = Path(path)
    if not path.exists():
        raise BrokenRun(f"{path}: no such directory")
    directory = path if path.is_dir() else path.parent
    csv = directory / "results.csv"
    if not csv.is_file():
        raise BrokenRun(f"{directory}: no results.csv")
    try:
        text = read_text(csv)
        df = pd.read_csv(io.StringIO(text))
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BrokenRun(f"{csv}: unreadable ({exc})") from None
    if not text.endswith("\n"):
        raise BrokenRun(f"{csv}: truncated (the last row is incomplete)")
    missing = [c for c in KEY_COLUMNS + ["status", "nfe"] if c not in df.columns]
    if missing:
        raise BrokenRun(f"{csv}: missing column {missing[0]!r}")
    bad = df[~df["status"].isin(STATUSES) | df[KEY_COLUMNS].isna().any(axis=1)
             | ((df["status"] == "ok") & ~pd.to_numeric(df["nfe"], errors="coerce").notna())]
    if len(bad):
        raise BrokenRun(f"{csv}: row {bad.index[0] + 2} is incomplete or has an unknown status "
                        f"({bad.iloc[0]['status']!r}; valid: {', '.join(STATUSES)})")
    directions = {}
    if (directory / "results.json").is_file():
        try:
            rows, directions = load_rows(directory)
        except ValueError as exc:
            raise BrokenRun(str(exc)) from None
        if len(rows) != len(df):
            raise BrokenRun(f"{csv}: {len(df)} rows but results.json has {len(rows)} (truncated or mixed runs)")
    return df, directions


TOLERANCE_KEYS = {"metrics": ("abs", "rel"), "timing": ("ratio", "abs"), "memory": ("ratio", "abs"),
                  "columns": ("abs", "rel", "ratio")}


def _check_limits(path, table: str, limits, valid: tuple) -> dict:
    if not isinstance(limits, dict):
        raise ConfigError(f"--tolerances {path}: [{table}] must be a table of {', '.join(valid)}, got {limits!r}")
    for key, value in limits.items():
        if key not in valid:
            raise ConfigError(f"--tolerances {path}: unknown key {key!r} in [{table}]; valid keys: {', '.join(valid)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"--tolerances {path}: [{table}] {key} must be a number >= 0, got {value!r}")
    return limits


def load_tolerances(path: str | Path | None) -> dict:
    """The default tolerances overridden by a TOML file; ConfigError naming the file, table and key
    for anything that is not a known table of non-negative numbers."""
    tolerances = json.loads(json.dumps(DEFAULT_TOLERANCES))
    if path is None:
        return tolerances
    try:
        user = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--tolerances {path}: not valid TOML: {exc}") from None
    except ValueError as exc:  # unreadable or not UTF-8
        raise ConfigError(f"--tolerances {exc}") from None
    for key, value in user.items():
        if key not in tolerances:
            raise ConfigError(f"--tolerances {path}: unknown table [{key}]; valid: {', '.join(tolerances)}")
        if key == "columns":
            if not isinstance(value, dict):
                raise ConfigError(f"--tolerances {path}: [columns] must hold [columns.\"<column>\"] tables")
            for column, limits in value.items():
                tolerances["columns"][column] = _check_limits(path, f"columns.{column}", limits, TOLERANCE_KEYS[key])
        else:
            tolerances[key].update(_check_limits(path, key, value, TOLERANCE_KEYS[key]))
    return tolerances


def cell_name(row: dict) -> str:
    """How a cell is named in findings: 'model / sampler / guidance / dataset / steps'."""
    return " / ".join(str(row[k]) for k in KEY_COLUMNS)


def column_limits(tol: dict, column: str) -> dict:
    """The abs / rel / ratio limits of one column: its group's defaults, then its own overrides."""
    group = "timing" if column in TIMING else "memory" if column in MEMORY else "metrics"
    return {**tol[group], **tol["columns"].get(column, {})}


def metric_allowance(limits: dict, base: float) -> float:
    """How much a quality metric may get worse than its baseline value: abs + rel·|baseline|."""
    return limits.get("abs", 0.0) + limits.get("rel", 0.0) * abs(base)


def ratio_limit(limits: dict, base: float) -> float:
    """The largest timing / memory value allowed: baseline·ratio + abs."""
    return base * limits.get("ratio", math.inf) + limits.get("abs", 0.0)


def _worse_by(new: float, base: float, higher_is_better: bool) -> float:
    return (base - new) if higher_is_better else (new - base)


def compare_tables(new: pd.DataFrame, base: pd.DataFrame, directions: dict[str, bool], tol: dict) -> list[Finding]:
    """Every regression (and notable improvement) of ``new`` against ``base``."""
    findings = []
    new_by_key = {tuple(r[k] for k in KEY_COLUMNS): r for r in new.to_dict("records")}
    for b in base.to_dict("records"):
        if b["status"] != "ok":
            continue
        key = tuple(b[k] for k in KEY_COLUMNS)
        cell = cell_name(b)
        n = new_by_key.get(key)
        if n is None:
            findings.append(Finding(cell, "status", "ok", "missing", "cell must run", "regression"))
            continue
        if n["status"] != "ok":
            findings.append(Finding(cell, "status", "ok", f"{n['status']}: {n.get('reason', '')}"[:80], "ok", "regression"))
            continue
        if int(n["nfe"]) != int(b["nfe"]):
            findings.append(Finding(cell, "nfe", int(b["nfe"]), int(n["nfe"]), "identical", "regression"))
        for column, higher in directions.items():
            findings += _check_metric(cell, column, b, n, higher, column_limits(tol, column))
        for column in TIMING + MEMORY:
            findings += _check_ratio(cell, column, b, n, column_limits(tol, column))
    return findings


def _check_metric(cell, column, b, n, higher, limits) -> list[Finding]:
    base_v, new_v = b.get(column), n.get(column)
    if base_v is None or (isinstance(base_v, float) and math.isnan(base_v)):
        return []
    if new_v is None or (isinstance(new_v, float) and math.isnan(new_v)):
        return [Finding(cell, column, base_v, "missing", "must be reported", "regression")]
    intervals = [row.get(f"{column}_ci95") for row in (b, n)]
    if all(_is_number(ci) for ci in intervals):
        allowed = math.hypot(*intervals)  # the 95% interval of new − base, two independent estimates
        limit = f"±{allowed:.3g} (ci95)"
    else:
        allowed = metric_allowance(limits, base_v)
        limit = f"{'-' if higher else '+'}{allowed:.3g}"
    worse = _worse_by(new_v, base_v, higher)
    if worse > allowed:
        return [Finding(cell, column, base_v, new_v, limit, "regression")]
    if -worse > allowed:
        return [Finding(cell, column, base_v, new_v, limit, "improved")]
    return []


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_ratio(cell, column, b, n, limits) -> list[Finding]:
    base_v, new_v = b.get(column), n.get(column)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (base_v, new_v)):
        return []
    allowed = ratio_limit(limits, base_v)
    if new_v > allowed:
        return [Finding(cell, column, base_v, new_v, f"<= {allowed:.3g}", "regression")]
    return []


def compare_runs(new_dir, base_dir, tolerances_path=None) -> tuple[int, str]:
    """(exit code, report text)."""
    tol = load_tolerances(tolerances_path)
    try:
        new, new_directions = load_table(new_dir)
        base, base_directions = load_table(base_dir)
    except BrokenRun as exc:
        return 2, f"broken run: {exc}"
    base_ok = base[base["status"] == "ok"]
    shared = set(map(tuple, base_ok[KEY_COLUMNS].astype(str).values)) & set(map(tuple, new[KEY_COLUMNS].astype(str).values))
    if base_ok.empty or not shared:
        return 2, f"nothing comparable: no ok cell of {base_dir} appears in {new_dir}"
    findings = compare_tables(new, base, {**new_directions, **base_directions}, tol)
    regressions = [f for f in findings if f.verdict == "regression"]
    lines = [f"compared {len(base_ok)} baseline cells against {new_dir}: "
             f"{len(regressions)} regression(s), {len(findings) - len(regressions)} improvement(s)"]
    if findings:
        lines.append(tabulate([f.__dict__ for f in findings], headers="keys", tablefmt="simple", floatfmt=".4g"))
    return (1 if regressions else 0), "\n".join(lines)
