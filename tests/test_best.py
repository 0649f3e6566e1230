"""``diffbench best``: Pareto fronts and best settings per budget on a hand-made run table."""
import pytest
from click.testing import CliRunner

from diffbench.best import best_report, parse_budgets
from diffbench.cli import main
from diffbench.registry import ConfigError
from diffbench.results import ResultsWriter

# (sampler, steps, nfe, wall_s, fid, class-acc): a table where the fronts are known by hand.
CELLS = [
    ("ddim", 10, 10, 1.0, 5.0, 0.80),
    ("ddim", 20, 20, 2.0, 3.0, 0.85),
    ("unipc", 5, 5, 0.6, 4.0, 0.70),     # cheapest, and better than ddim@10: ddim@10 is dominated
    ("unipc", 10, 10, 1.5, 2.0, 0.90),   # best at 10 NFE, but slower than ddim@10
    ("heun", 10, 19, 1.9, 2.5, 0.95),    # dominated by unipc@10 in fid; best class-acc
]


@pytest.fixture
def run_dir(tmp_path):
    writer = ResultsWriter(tmp_path)
    for sampler, steps, nfe, wall, fid, acc in CELLS:
        writer.add({"model": "unet", "sampler": sampler, "guidance": "none", "dataset": "digits", "steps": steps,
                    "spacing": "trailing", "nfe": nfe, "status": "ok", "wall_s": wall, "fid[digits-cnn]": fid,
                    "class-acc": acc}, {"fid[digits-cnn]": False, "class-acc": True})
    writer.add({"model": "unet", "sampler": "bad", "guidance": "none", "dataset": "digits", "steps": 1,
                "spacing": "trailing", "nfe": 1, "status": "failed", "wall_s": 0.1, "fid[digits-cnn]": 0.1})
    return tmp_path


def section(text, title):
    return text.split(f"## {title}")[1].split("## ")[0]


def test_pareto_fronts_and_best_per_budget(run_dir):
    text, plot = best_report(run_dir, "fid", ["nfe=10,nfe=4", "wall=1.2"])
    vs_nfe = section(text, "unet on digits: Pareto front of fid[digits-cnn] vs nfe")
    assert [line.split("|")[3].strip() for line in vs_nfe.strip().splitlines()[2:]] == ["unipc", "unipc"]
    vs_wall = section(text, "unet on digits: Pareto front of fid[digits-cnn] vs wall")
    assert "| ddim " not in vs_wall and vs_wall.count("| unipc ") == 2  # ddim@10 is slower than unipc@5 and worse
    budgets = [[c.strip() for c in line.split("|")]
               for line in section(text, "unet on digits: best setting per budget").strip().splitlines()[2:]]
    assert budgets[0][1:3] == ["nfe<=10", "unipc"] and budgets[0][5] == "10"
    assert budgets[1][2] == "(none within budget)"  # nfe<=4: the failed 1-NFE cell does not count
    assert budgets[2][1:3] == ["wall<=1.2", "unipc"] and budgets[2][5] == "5"
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_higher_is_better_metrics_pick_the_maximum(run_dir):
    text, _ = best_report(run_dir, "class-acc", ["nfe=19"])
    assert section(text, "unet on digits: best setting per budget").strip().splitlines()[2].split("|")[2].strip() == "heun"


@pytest.mark.parametrize("text", ["nfe", "nfe=", "steps=10", "nfe=-1", "nfe=abc", "wall=1s"])
def test_malformed_budgets_are_refused(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_budgets([text])


def test_cli_exit_codes(run_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["best", str(run_dir), "--metric", "fid", "--budget", "nfe=10"])
    assert ok.exit_code == 0 and "best setting per budget" in ok.output
    missing = runner.invoke(main, ["best", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a directory" in missing.output
    unknown = runner.invoke(main, ["best", str(run_dir), "--metric", "swd"])
    assert unknown.exit_code == 2 and "valid: fid[digits-cnn], class-acc" in unknown.output
    bad = runner.invoke(main, ["best", str(run_dir), "--budget", "nfe=ten"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
