"""diffbench history: runs ordered by commit, compare's baseline and tolerance band on every
trend, exactly compare's regressions marked, bad input, and the site in headless Chromium."""
import json
import math
import shutil

import pandas as pd
import pytest

from diffbench.compare import DEFAULT_TOLERANCES, compare_runs, compare_tables
from diffbench.history import band
from pages import broken_images, chromium, console_errors, open_page, save_test_screenshot

CELL = "gmm-oracle / ddim / none / gmm-2d / 4"
FAILED_CELL = "gmm-oracle / ddpm / none / gmm-2d / 8"


def _set_env(run, commit, date):
    env = json.loads((run / "env.json").read_text())
    env.update(git_commit=commit, git_commit_date=date, date=date, hostname="ci-box")
    (run / "env.json").write_text(json.dumps(env))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs whose directory names sort against their commit dates: c-base (the oldest),
    b-same (a later commit, same numbers) and a-regressed (swd of one cell 50 % worse, one cell failed)."""
    from click.testing import CliRunner

    from diffbench.cli import main

    root = tmp_path_factory.mktemp("history")
    result = CliRunner().invoke(main, ["run", "--models", "gmm-oracle", "--samplers", "ddim,ddpm", "--steps", "4,8",
                                       "--datasets", "gmm-2d", "--metrics", "swd,logp", "--num-samples", "100",
                                       "--repeats", "1", "--out", str(root / "c-base"), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    shutil.copytree(root / "c-base", root / "b-same")
    shutil.copytree(root / "c-base", root / "a-regressed")
    _set_env(root / "c-base", "aaaa0000", "2026-01-01T10:00:00+00:00")
    _set_env(root / "b-same", "bbbb0000", "2026-01-02T10:00:00+00:00")
    _set_env(root / "a-regressed", "cccc0000", "2026-01-03T10:00:00+00:00")
    df = pd.read_csv(root / "a-regressed" / "results.csv")
    cell = " / ".join(map(str, df[["model", "sampler", "guidance", "dataset", "steps"]].iloc[0]))
    assert cell == CELL
    df.loc[0, "swd"] *= 1.5
    failed = df.index[(df["sampler"] == "ddpm") & (df["steps"] == 8)]
    df["reason"] = df["reason"].astype(object)
    df.loc[failed, ["status", "reason", "swd", "logp"]] = ["failed", "sampler 'ddpm' raised RuntimeError: boom", None, None]
    df.to_csv(root / "a-regressed" / "results.csv", index=False)
    return root


def _cell(df):
    return df["model"] + " / " + df["sampler"] + " / " + df["guidance"] + " / " + df["dataset"] + " / " + df["steps"].astype(str)


def test_history_marks_exactly_what_compare_flags(cli, runs, tmp_path):
    result = cli("history", runs, "--out", tmp_path / "site")
    assert result.exit_code == 0, result.output
    assert "history of 3 runs (3 commits) over 4 cells" in result.output and "2 regression point(s)" in result.output
    table = pd.read_csv(tmp_path / "site" / "history.csv")
    assert list(table["run"].unique()) == ["c-base", "b-same", "a-regressed"]  # by commit date, not by name
    flagged = table[table["regression"]]
    assert sorted(zip(flagged["run"], _cell(flagged), flagged["column"])) == [
        ("a-regressed", CELL, "swd"), ("a-regressed", FAILED_CELL, "status")]
    assert compare_runs(runs / "a-regressed", runs / "c-base")[0] == 1
    assert compare_runs(runs / "b-same", runs / "c-base")[0] == 0
    # the band drawn is compare's: swd may get worse by abs + rel·|baseline|
    swd = table[(table["run"] == "a-regressed") & (_cell(table) == CELL) & (table["column"] == "swd")].iloc[0]
    allowed = 1e-3 + 0.02 * abs(swd["baseline"])
    assert swd["high"] == pytest.approx(swd["baseline"] + allowed) and swd["low"] == pytest.approx(swd["baseline"] - allowed)
    assert swd["value"] == pytest.approx(1.5 * swd["baseline"])
    wall = table[(table["run"] == "b-same") & (table["column"] == "wall_s")].iloc[0]
    assert wall["high"] == pytest.approx(3.0 * wall["baseline"] + 0.05) and wall["low"] == 0
    assert (tmp_path / "site" / "cells" / "gmm-oracle__ddim__none__gmm-2d__4.html").is_file()


@pytest.mark.parametrize("column, base", [("swd", 0.2), ("logp", -2.0), ("wall_s", 0.04), ("peak_mem_mb", 10.0)])
def test_band_edges_are_where_compare_starts_to_flag(column, base):
    tol = json.loads(json.dumps(DEFAULT_TOLERANCES))
    directions = {"swd": False, "logp": True}
    low, high = band(column, base, tol)
    worse_edge = low if directions.get(column) else high  # logp: higher is better, so lower is worse
    key = {"model": "m", "sampler": "s", "guidance": "none", "dataset": "d", "steps": 4, "nfe": 4, "status": "ok"}
    for nudge, flagged in ((0.999, False), (1.001, True)):
        value = base + (worse_edge - base) * nudge
        findings = compare_tables(pd.DataFrame([{**key, column: value}]), pd.DataFrame([{**key, column: base}]),
                                  directions, tol)
        assert any(f.verdict == "regression" for f in findings) is flagged, (column, nudge)
    assert math.isfinite(low) and math.isfinite(high)


def test_run_dirs_folders_and_latest_links_are_counted_once(cli, runs, tmp_path):
    (tmp_path / "latest").symlink_to(runs / "b-same", target_is_directory=True)
    result = cli("history", runs, runs / "c-base", tmp_path / "latest", "--out", tmp_path / "site",
                 "--baseline", runs / "b-same")
    assert result.exit_code == 0, result.output
    assert "history of 3 runs" in result.output and f"baseline {runs / 'b-same'}" in result.output


@pytest.mark.parametrize("arguments, message", [
    (lambda runs, tmp: [tmp / "nope"], "no such directory"),
    (lambda runs, tmp: [tmp / "empty"], "no results.csv in it"),
    (lambda runs, tmp: [runs, "--tolerances", tmp / "tol.toml"], "unknown table [speed]"),
    (lambda runs, tmp: [tmp / "corrupt"], "env.json: not valid JSON"),
])
def test_bad_input_exits_2_without_traceback(cli, runs, tmp_path, arguments, message):
    (tmp_path / "tol.toml").write_text("[speed]\nratio = 2\n")
    (tmp_path / "empty").mkdir()
    shutil.copytree(runs / "c-base", tmp_path / "corrupt")
    (tmp_path / "corrupt" / "env.json").write_text("{")
    result = cli("history", *arguments(runs, tmp_path), "--out", tmp_path / "site")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_history_site_in_headless_chromium(cli, runs, tmp_path):
    site = tmp_path / "site"
    assert cli("history", runs, "--out", site).exit_code == 0
    with chromium() as browser:
        open_page(browser, site / "index.html")
        assert len(browser.find_elements("css selector", "#cells-table tbody tr")) == 4
        assert len(browser.find_elements("css selector", "#regressions-table tbody tr")) == 2
        assert len(browser.find_elements("css selector", "#runs-table tbody tr")) == 3
        assert broken_images(browser) == [] and console_errors(browser) == []
        save_test_screenshot(browser, "history_index_screenshot.png")
        browser.find_element("link text", CELL.split(" / ")[0]).click()  # the first cell: the regressed one
        traces = browser.execute_script(
            "return Array.from(document.querySelectorAll('.js-plotly-plot')).map(g => g.data.map(t => [t.name, t.x]))")
        swd = next(chart for chart in traces if any(name == "swd" for name, _ in chart))
        marks = [x for name, x in swd if name and name.startswith("regression")]
        assert marks == [["cccc0000 · 2026-01-03"]]
        assert {name for name, _ in swd} == {"swd", "baseline", "tolerance band", None, "regression (compare would fail)"}
        assert console_errors(browser) == []
        save_test_screenshot(browser, "history_cell_screenshot.png")
