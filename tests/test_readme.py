"""Every plugin example in the README runs, as written, with the command the README gives for it."""
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from diffbench.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# A fenced python block that starts with "# file.py" and implements a hook, then the README's
# `diffbench run --plugin file.py ...` command for it.
EXAMPLES = re.findall(r"```python\n# (\w+\.py)\n(.*?@diffbench\.hookimpl.*?)```.*?`(diffbench run --plugin \1[^`]*)`",
                      README, re.S)


def test_the_readme_has_a_model_and_a_sampler_example():
    assert {name for name, _, _ in EXAMPLES} >= {"my_sampler.py", "gaussian_fit.py"}


@pytest.mark.parametrize("name, code, command", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_readme_plugin_example_runs_with_its_command(name, code, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(code)
    args = shlex.split(command)[2:]  # drop "diffbench run"
    result = CliRunner().invoke(main, ["run", *args, "--num-samples", "200", "--repeats", "1", "--quiet",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(df) and (df["status"] == "ok").all(), df[["model", "sampler", "dataset", "status", "reason"]]
    assert df[[c for c in df.columns if c == "swd"]].notna().all().all()
