"""diffbench report: report.html of a run (table, charts, samples), lines that stay apart in
the plots, bad input, and the page in a real browser (headless Chromium)."""
import json
import re
import shutil

import pandas as pd
import pytest

from diffbench.report import load_run, panel_figure
from diffbench.results import dodge, metric_panels
from pages import broken_images, chromium, console_errors, open_page, save_test_screenshot, small_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("report") / "run")


def test_run_ends_with_a_self_contained_report(run_dir):
    html = (run_dir / "report.html").read_text()
    df = pd.read_csv(run_dir / "results.csv")
    assert len(df) == 24 and set(df["status"]) == {"ok", "skipped", "failed"}
    assert html.count("<tr class=\"status-") == len(df)
    assert html.count('class="badge failed"') == (df["status"] == "failed").sum() == 6
    assert "deliberately broken sampler" in html  # failed rows keep their reason
    assert "gmm-oracle needs a Gaussian-mixture dataset" in html  # and skipped rows theirs
    markup = re.sub(r"<script>.*?</script>", "", html, flags=re.S)  # inlined code (plotly.js) aside
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", markup)  # nothing fetched from the network
    assert "Plotly.newPlot" in html and html.count("data:image/png;base64,") >= 8  # charts, per-cell pictures


def test_no_report_flag_skips_it(tmp_path):
    out = small_run(tmp_path / "run", "--no-report")
    assert (out / "results.csv").is_file() and not (out / "report.html").exists()


def test_report_command_rewrites_it_with_a_pareto_picture(cli, run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink()
    shutil.copy(copy / "plot_swd_vs_nfe.png", copy / "pareto_swd.png")  # what `diffbench best` leaves
    result = cli("report", copy)
    assert result.exit_code == 0, result.output
    html = (copy / "report.html").read_text()
    assert 'id="pareto"' in html and "pareto swd" in html


def test_two_models_with_one_sampler_get_their_own_colour_and_marker(run_dir):
    run = load_run(run_dir)
    panels = metric_panels(run.table, run.directions, "nfe")
    gmm = next(p for p in panels if p.column == "swd" and p.dataset == "gmm-2d")
    assert [line.label for line in gmm.lines] == ["gmm-oracle · ddim", "gmm-oracle · heun", "mlp · ddim", "mlp · heun"]
    assert len({line.color for line in gmm.lines}) == 4
    assert {line.marker for line in gmm.lines[:2]} == {"o"} and {line.marker for line in gmm.lines[2:]} == {"s"}
    # the interactive chart: same NFE, different x after the dodge, and the true NFE in the hover data
    fig = panel_figure(gmm)
    first_x = [trace.x[0] for trace in fig.data if trace.name.endswith("ddim")]
    assert first_x[0] != first_x[1] and all(abs(x / 4 - 1) < 0.05 for x in first_x)
    assert fig.data[0].customdata[0][1] == 4
    walls = metric_panels(run.table, run.directions, "wall_s")
    assert {(p.column, p.dataset) for p in walls} == {(p.column, p.dataset) for p in panels}


def test_dodge_is_symmetric_and_small():
    offsets = [dodge(5, i) for i in range(5)]
    assert offsets == sorted(offsets) and len(set(offsets)) == 5
    assert offsets[2] == pytest.approx(1.0) and offsets[0] * offsets[4] == pytest.approx(1.0)
    assert 0.9 < dodge(100, 0) < dodge(100, 99) < 1.1
    assert dodge(1, 0) == 1.0


def test_single_nfe_uses_a_categorical_axis(run_dir):
    run = load_run(run_dir)
    only_4 = run.table[run.table["steps"] == 4]
    panel = next(p for p in metric_panels(only_4, run.directions, "nfe") if p.dataset == "moons")
    assert panel.single_x is False  # heun spends 7 NFE on 4 steps, ddim 4
    only_ddim = only_4[only_4["sampler"] == "ddim"]
    panel = next(p for p in metric_panels(only_ddim, run.directions, "nfe") if p.dataset == "gmm-2d")
    assert panel.single_x and panel.xlabel == "at NFE = 4"
    assert panel_figure(panel).layout.xaxis.type == "category"


@pytest.mark.parametrize("breakage, message", [
    (lambda d: shutil.rmtree(d), "no such directory"),
    (lambda d: (d / "results.csv").unlink(), "no results.csv"),
    (lambda d: (d / "results.json").write_text("{not json"), "results.json: not valid JSON"),
    (lambda d: (d / "env.json").write_text("[1, 2"), "env.json: not valid JSON"),
    (lambda d: (d / "results.csv").write_text(""), "results.csv: unreadable"),
])
def test_bad_run_dir_exits_2_without_traceback(cli, run_dir, tmp_path, breakage, message):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    breakage(copy)
    result = cli("report", copy)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_report_in_headless_chromium(run_dir):
    df = pd.read_csv(run_dir / "results.csv")
    with chromium() as browser:
        open_page(browser, run_dir / "report.html")
        rows = "#results-table tbody tr"
        assert len(browser.find_elements("css selector", rows)) == len(df)
        assert broken_images(browser) == []
        # every chart drew its points: vs NFE and vs wall-clock for swd and mmd on gmm-2d and moons
        assert browser.execute_script("return document.querySelectorAll('.js-plotly-plot .scatterlayer').length") == 8

        def column(name):  # the shown rows' values of a column ("" where a row has none)
            return browser.execute_script(
                f"return Array.from(document.querySelectorAll('{rows}')).filter(r => !r.hidden).map(r => {{"
                f"const c = r.querySelector('td[data-col=\"{name}\"]'); return !c ? '' : c.dataset.value ?? c.textContent.trim(); }})")

        swd_header = "#results-table th[data-col=swd]"
        browser.find_element("css selector", swd_header).click()
        numbers = [float(v) for v in column("swd") if v != ""]
        assert numbers == sorted(numbers) and len(numbers) == df["swd"].notna().sum()
        assert column("swd")[-1] == ""  # cells without a value sort last
        browser.find_element("css selector", swd_header).click()
        assert [float(v) for v in column("swd") if v != ""] == sorted(numbers, reverse=True)
        reasons = browser.execute_script("return Array.from(document.querySelectorAll('td.reason')).map(c => c.colSpan)")
        spanned = len(json.loads((run_dir / "results.json").read_text())["columns"]["metrics"]) + 3  # + 3 timings
        assert reasons == [spanned] * (df["status"] != "ok").sum()  # one cell holds the reason

        browser.execute_script("const s = document.querySelector('select[data-filter=status]');"
                               "s.value = 'failed'; s.dispatchEvent(new Event('input', {bubbles: true}));")
        assert column("status") == ["failed"] * (df["status"] == "failed").sum()
        assert browser.find_element("css selector", "[data-count]").text == f"6 of {len(df)} shown"
        browser.execute_script("const s = document.querySelector('select[data-filter=status]');"
                               "s.value = ''; s.dispatchEvent(new Event('input', {bubbles: true}));")
        assert console_errors(browser) == []
        save_test_screenshot(browser, "report_screenshot.png")
    env = json.loads((run_dir / "env.json").read_text())
    assert {"git_commit", "git_commit_date", "date", "hostname"} <= set(env)
