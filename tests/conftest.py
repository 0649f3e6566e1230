import pytest
from click.testing import CliRunner

from diffbench.cli import main


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """Invoke the diffbench CLI in-process from an empty working directory (no bench.toml)."""
    monkeypatch.chdir(tmp_path)

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke
