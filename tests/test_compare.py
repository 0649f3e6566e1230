"""diffbench compare: exit 0 no regression, 1 regression (with what moved), 2 broken or nothing comparable."""
import shutil

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from click.testing import CliRunner

    from diffbench.cli import main

    out = tmp_path_factory.mktemp("base") / "run"
    result = CliRunner().invoke(main, ["run", "--models", "gmm-oracle", "--samplers", "ddim,ddpm", "--steps", "4",
                                       "--datasets", "gmm-2d", "--metrics", "swd,logp", "--num-samples", "100",
                                       "--repeats", "1", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _copy_with(baseline, tmp_path, edit):
    new = tmp_path / "new"
    shutil.copytree(baseline, new)
    df = pd.read_csv(new / "results.csv")
    edit(df)
    df.to_csv(new / "results.csv", index=False)
    return new


def test_identical_runs_pass(cli, baseline, tmp_path):
    result = cli("compare", _copy_with(baseline, tmp_path, lambda df: None), baseline)
    assert result.exit_code == 0, result.output
    assert "0 regression(s)" in result.output


def test_worse_quality_metric_is_a_regression(cli, baseline, tmp_path):
    def worse(df):
        df.loc[0, "swd"] *= 1.5

    result = cli("compare", _copy_with(baseline, tmp_path, worse), baseline)
    assert result.exit_code == 1
    assert "swd" in result.output and "regression" in result.output


def test_better_metric_and_small_noise_are_not_regressions(cli, baseline, tmp_path):
    def better(df):
        df.loc[0, "swd"] *= 0.5
        df.loc[1, "logp"] += 1e-4  # within tolerance
        df.loc[1, "wall_s"] *= 1.5  # timings get a wide ratio

    result = cli("compare", _copy_with(baseline, tmp_path, better), baseline)
    assert result.exit_code == 0, result.output
    assert "improved" in result.output


def test_lower_log_density_is_a_regression(cli, baseline, tmp_path):
    def worse(df):
        df.loc[1, "logp"] -= 0.5  # higher is better for logp

    assert cli("compare", _copy_with(baseline, tmp_path, worse), baseline).exit_code == 1


def test_status_and_nfe_changes_are_regressions(cli, baseline, tmp_path):
    def failed(df):
        df.loc[0, "status"] = "failed"

    def more_calls(df):
        df.loc[0, "nfe"] += 1

    assert cli("compare", _copy_with(baseline, tmp_path / "a", failed), baseline).exit_code == 1
    assert cli("compare", _copy_with(baseline, tmp_path / "b", more_calls), baseline).exit_code == 1


def test_slower_by_more_than_the_ratio_is_a_regression(cli, baseline, tmp_path):
    def slower(df):
        df["wall_s"] = df["wall_s"] * 10 + 1.0

    result = cli("compare", _copy_with(baseline, tmp_path, slower), baseline)
    assert result.exit_code == 1 and "wall_s" in result.output


def test_tolerance_file_overrides_defaults(cli, baseline, tmp_path):
    def worse(df):
        df.loc[0, "swd"] *= 1.5

    tolerances = tmp_path / "tol.toml"
    tolerances.write_text("[columns.swd]\nrel = 1.0\n")
    assert cli("compare", _copy_with(baseline, tmp_path, worse), baseline, "--tolerances", tolerances).exit_code == 0


def test_broken_or_incomparable_runs_exit_2(cli, baseline, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("compare", empty, baseline).exit_code == 2

    def other_cells(df):
        df["dataset"] = "moons"

    result = cli("compare", _copy_with(baseline, tmp_path, other_cells), baseline)
    assert result.exit_code == 2 and "nothing comparable" in result.output
