"""The plugin contract: throwaway plugins, errors that name the plugin, and a real third-party
package installed with pip and discovered through its entry point."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diffbench
from diffbench.plugins import PluginError, build_registry
from diffbench.registry import Dataset, Sampler

FIXTURE = Path(__file__).parent / "fixtures" / "example_plugin"


def _noop_sampler(denoiser, x, timesteps, *, generator, callback=None):
    return x


class ThrowawayPlugin:
    @diffbench.hookimpl
    def register_samplers(self, register):
        register(Sampler(name="throwaway", description="returns its input", family="gaussian", fn=_noop_sampler))


def test_throwaway_plugin_is_registered_with_metadata():
    registry = build_registry([ThrowawayPlugin()])
    sampler = registry.get("samplers", "throwaway")
    assert sampler.description == "returns its input"
    assert sampler.defaults == {"spacing": "uniform"}  # every Gaussian sampler takes a spacing
    assert "ddim" in registry.names("samplers")  # built-ins arrive through the same entry points


def test_duplicate_names_name_both_plugins():
    class Duplicate:
        @diffbench.hookimpl
        def register_samplers(self, register):
            register(Sampler(name="ddim", description="a clash", family="gaussian", fn=_noop_sampler))

    with pytest.raises(PluginError, match=r"duplicate sampler name 'ddim'.*samplers.*Duplicate"):
        build_registry([Duplicate()])


def test_a_plugin_that_raises_while_registering_is_named():
    class Broken:
        @diffbench.hookimpl
        def register_datasets(self, register):
            raise RuntimeError("cannot find my data")

    with pytest.raises(PluginError, match="Broken.*raised in register_datasets: RuntimeError: cannot find my data"):
        build_registry([Broken()])


def test_invalid_component_is_rejected_with_the_plugin_name():
    class BadName:
        @diffbench.hookimpl
        def register_datasets(self, register):
            register(Dataset(name="Bad_Name", description="x", family="points", load=lambda: None))

    with pytest.raises(PluginError, match="BadName.*kebab-case"):
        build_registry([BadName()])


def test_plugin_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken_plugin.py"
    path.write_text("import nonexistent_module_xyz\n")
    with pytest.raises(PluginError, match="broken_plugin.py raised while loading: ModuleNotFoundError"):
        build_registry([path])


@pytest.fixture(scope="module")
def installed_fixture(tmp_path_factory):
    """pip-install the fixture package into a target directory (a real install, no network)."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "example_plugin"
    shutil.copytree(FIXTURE, source)  # setuptools builds in place: keep the source tree clean
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, cwd=tmp_path_factory.getbasetemp(),
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    return env


def test_installed_third_party_plugin_is_listed(installed_fixture, tmp_path):
    out = subprocess.run([sys.executable, "-m", "diffbench.cli", "list", "samplers"], env=installed_fixture,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "example-euler" in out.stdout and "ddim" in out.stdout


def test_installed_third_party_plugin_runs_in_a_grid(installed_fixture, tmp_path):
    cmd = [sys.executable, "-m", "diffbench.cli", "run", "--models", "gmm-oracle", "--samplers", "example-euler,ddim",
           "--datasets", "gmm-2d", "--steps", "20", "--metrics", "example-norm,swd", "--num-samples", "200",
           "--repeats", "1", "--out", tmp_path / "out", "--quiet"]
    out = subprocess.run([str(c) for c in cmd], env=installed_fixture, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    import pandas as pd

    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(df["status"]) == ["ok", "ok"]
    # x0-form Euler and DDIM (η = 0) are the same update: identical samples, identical metric.
    assert df["example-norm"].iloc[0] == pytest.approx(df["example-norm"].iloc[1], rel=1e-5)
