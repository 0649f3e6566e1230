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


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Tests use tiny tensors: one intra-op thread is faster and immune to a busy machine
    (with two spinning OpenMP threads per process a 2-core box slows tiny ops ~30x)."""
    import torch

    torch.set_num_threads(1)
