"""The grid embedded in the package: `diffbench run` works from any directory, the repository's
bench.toml is the same grid, --show-config says where each value came from, and datasets
default per model."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffbench.cli import main
from diffbench.grid import DEFAULT_GRID, build_config, load_settings
from diffbench.plugins import build_registry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry():
    return build_registry()


def test_the_repository_bench_toml_is_the_embedded_default_grid():
    assert (REPO / "bench.toml").read_text() == DEFAULT_GRID.read_text()


def _show(*args):
    result = CliRunner().invoke(main, ["run", "--show-config", *args])
    assert result.exit_code == 0, result.output
    return {line.split()[0]: line for line in result.output.splitlines() if line.strip()}, result.output


def test_show_config_names_the_source_of_every_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./bench.toml: the embedded grid
    rows, _ = _show("--steps", "7")
    assert rows["models"].endswith("default") and rows["steps"].split()[1:] == ["7", "flag"]
    (tmp_path / "bench.toml").write_text('[run]\nmodels = ["mlp"]\nsamplers = ["ddim"]\nsteps = [4]\n')
    rows, output = _show()
    assert rows["models"].split()[1:] == ["mlp", "bench.toml"] and rows["num_samples"].endswith("built-in default")
    assert "mlp: checkerboard, gmm-2d, mog-1d, moons, swiss-roll" in output and "5 cells" in output


def test_datasets_default_per_model_to_what_they_declare_or_their_checkpoints_cover(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings, _ = load_settings(None, {"models": "unet,dit,gmm-oracle,mlp", "samplers": "ddim,dpm", "steps": "10,50"})
    config = build_config(registry, settings)
    pairs = sorted({(c.model.label, c.dataset.label) for c in config.cells()})
    toy = ["checkerboard", "gmm-2d", "mog-1d", "moons", "swiss-roll"]  # mlp declares none: its checkpoints
    assert pairs == [("dit", "digits"), ("gmm-oracle", "gmm-2d"), ("gmm-oracle", "mog-1d"),  # declared
                     *[("mlp", d) for d in toy], ("unet", "digits")]
    assert len(config.cells()) == 9 * 2 * 2
    named = build_config(registry, {**settings, "datasets": "moons"})  # named datasets: every model on them
    assert {c.dataset.label for c in named.cells()} == {"moons"} and len(named.cells()) == 4 * 2 * 2


def test_a_model_without_checkpoints_asks_for_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--models", "diffusers", "--show-config"])
    assert result.exit_code == 2 and "model 'diffusers' has no checkpoints" in result.output and "--datasets" in result.output
