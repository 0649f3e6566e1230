"""Bad input, table-driven: every case exits with its code and a message naming the problem,
never with a traceback, and a refused ``run`` creates nothing.

Each case is (id, command line, exit code, fragment of the message). ``{tmp}`` in an argument is
the test's scratch directory, where the fixtures below write config files, plugin files, image
folders, CIFAR-10 files and results tables.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffbench.cli import main
from diffbench.io import DirectoryLock
from diffbench.results import ResultsWriter

RUN = ["run", "--models", "gmm-oracle", "--datasets", "gmm-2d", "--metrics", "swd", "--num-samples", "8",
       "--repeats", "1", "--quiet"]
GRID = [*RUN, "--samplers", "ddim", "--steps", "3"]  # a valid grid: each case changes one thing


def grid(**changes) -> list[str]:
    """GRID with flags replaced (``steps="0"`` -> --steps 0) or added."""
    args = list(GRID)
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


PLUGINS = {
    "syntax.py": "def broken(:\n",
    "exits.py": "import sys\nsys.exit(0)\n",
    "imports.py": "import no_such_module_anywhere\n",
    "raises.py": "raise RuntimeError('plugin is broken')\n",
    "duplicate.py": ("import diffbench\nfrom diffbench.registry import Sampler\n"
                     "@diffbench.hookimpl\ndef register_samplers(register):\n"
                     "    register(Sampler(name='ddim', description='again', family='gaussian', fn=print))\n"),
    "family.py": ("import diffbench\nfrom diffbench.registry import Sampler\n"
                  "@diffbench.hookimpl\ndef register_samplers(register):\n"
                  "    register(Sampler(name='odd', description='odd', family='quantum', fn=print))\n"),
    "wrongkind.py": ("import diffbench\n@diffbench.hookimpl\ndef register_samplers(register):\n"
                     "    register('not a component')\n"),
    "baddefault.py": ("import diffbench\nfrom diffbench.registry import Option, Sampler\n"
                      "@diffbench.hookimpl\ndef register_samplers(register):\n"
                      "    register(Sampler(name='odd', description='odd', family='gaussian', fn=print,\n"
                      "                     options={'k': Option(5, choices=(1, 2))}))\n"),
    "hookraises.py": ("import diffbench\n@diffbench.hookimpl\ndef register_samplers(register):\n"
                      "    raise KeyError('oops')\n"),
    "hookexits.py": ("import diffbench, sys\n@diffbench.hookimpl\ndef register_models(register):\n"
                     "    sys.exit(3)\n"),
    "notpython.txt": "hello\n",
}
CONFIGS = {
    "latin1.toml": "[run]\nmodels = ['caf\xe9']\n".encode("latin-1"),
    "string_run.toml": b'run = "x"\n',
    "malformed.toml": b"[run\nmodels = \n",
    "table.toml": b"[grid]\nmodels = ['mlp']\n",
    "unknown_key.toml": b"[run]\nbogus = 1\n",
    "bool_steps.toml": b"[run]\nmodels = ['gmm-oracle']\nsamplers = ['ddim']\ndatasets = ['gmm-2d']\nsteps = [true]\n",
    "bool_seed.toml": b"[run]\nmodels = ['gmm-oracle']\nsamplers = ['ddim']\ndatasets = ['gmm-2d']\nsteps = [3]\nseed = true\n",
    "float_n.toml": (b"[run]\nmodels = ['gmm-oracle']\nsamplers = ['ddim']\ndatasets = ['gmm-2d']\nsteps = [3]\n"
                     b"num_samples = 1.5\n"),
    "models_int.toml": b"[run]\nmodels = 3\nsamplers = ['ddim']\ndatasets = ['gmm-2d']\nsteps = [3]\n",
    "models_entry.toml": b"[run]\nmodels = [1]\nsamplers = ['ddim']\ndatasets = ['gmm-2d']\nsteps = [3]\n",
    "save_int.toml": (b"[run]\nmodels = ['gmm-oracle']\nsamplers = ['ddim']\ndatasets = ['gmm-2d']\nsteps = [3]\n"
                      b"save_samples = 3\n"),
    "device.toml": b"[run]\nmodels = ['gmm-oracle']\nsamplers = ['ddim']\ndatasets = ['gmm-2d']\nsteps = [3]\ndevice = 'gpu'\n",
    "empty_steps.toml": b"[run]\nmodels = ['gmm-oracle']\nsamplers = ['ddim']\ndatasets = ['gmm-2d']\nsteps = []\n",
    "float_steps.toml": b"[run]\nmodels = ['gmm-oracle']\nsamplers = ['ddim']\ndatasets = ['gmm-2d']\nsteps = [2.5]\n",
    "tol_unknown_table.toml": b"[speed]\nratio = 2\n",
    "tol_unknown_key.toml": b"[metrics]\nrelative = 0.1\n",
    "tol_bad_type.toml": b"[metrics]\nrel = 'x'\n",
    "tol_negative.toml": b"[timing]\nratio = -1\n",
    "tol_columns.toml": b"[columns]\nswd = 1\n",
    "tol_column_key.toml": b"[columns.swd]\nfoo = 1\n",
    "tol_malformed.toml": b"[metrics\n",
}

CASES = [
    # --- run: names and typed options --------------------------------------------------------------
    ("unknown-model", grid(models="nope"), 2, "unknown model 'nope'; valid models:"),
    ("unknown-sampler", grid(samplers="ddimm"), 2, "unknown sampler 'ddimm'"),
    ("unknown-dataset", grid(datasets="mnist"), 2, "unknown dataset 'mnist'"),
    ("unknown-metric", grid(metrics="fidd"), 2, "unknown metric 'fidd'"),
    ("unknown-guidance", grid(guidance="ddim"), 2, "unknown guidance 'ddim'"),
    ("eta-abc", grid(samplers="ddim[eta=abc]"), 2, "eta='abc' must be a number"),
    ("eta-negative", grid(samplers="ddim[eta=-1]"), 2, "eta='-1' must be in [0.0"),
    ("eta-nan", grid(samplers="ddim[eta=nan]"), 2, "must be a number, not nan"),
    ("variance-foo", grid(samplers="ddpm[variance=foo]"), 2, "variance='foo' must be one of small, large"),
    ("order-7", grid(samplers="dpm-solver[order=7]"), 2, "order='7' must be one of 1, 2, 3"),
    ("order-float", grid(samplers="dpm-solver[order=2.5]"), 2, "order='2.5' must be an integer"),
    ("variant-9m", grid(samplers="dpm-solver++[variant=9m]"), 2, "variant='9m' must be one of 2m, 3m, 2s"),
    ("unet-parameterization", grid(models="unet[parameterization=x0]"), 2, "unet: parameterization must be eps, v"),
    ("dit-config", grid(models="dit[config=DiT-huge]"), 2, "dit: unknown config 'DiT-huge'; valid: DiT-S/2"),
    ("flow-unet-not-flow", grid(models="flow-unet[parameterization=v]"), 2, "flow-unet is the flow-matching U-Net"),
    ("bool-option", grid(samplers="dpm-solver[lower_order_final=maybe]"), 2, "must be true or false"),
    ("spacing", grid(samplers="ddim[spacing=karas]"), 2, "spacing='karas' must be one of uniform"),
    ("unknown-option", grid(samplers="ddim[bogus=1]"), 2, "sampler 'ddim' has no option 'bogus'; valid options:"),
    ("option-no-value", grid(samplers="ddim[eta]"), 2, "option 'eta' must be key=value"),
    ("unparsable-ref", grid(samplers="ddim[eta=1"), 2, "cannot parse component reference"),
    ("no-short-form", grid(samplers="one-step:3"), 2, "takes no short value"),
    ("cfg-abc", grid(guidance="cfg:abc"), 2, "guidance 'cfg': option scale='abc' must be a number"),
    ("cfg-sigma", grid(guidance="cfg[sigma_min=-1]"), 2, "sigma_min='-1' must be in [0.0"),
    ("model-option", grid(models="gmm-oracle[process=vp-lin]"), 2, "process='vp-lin' must be one of"),
    ("dataset-option", grid(datasets="gmm-2d[modes=x]"), 2, "modes='x' must be an integer"),
    ("metric-option", grid(metrics="swd[projections=0]"), 2, "projections='0' must be in [1"),
    # --- run: axes and scalars -----------------------------------------------------------------------
    ("steps-empty", grid(steps=","), 2, "run.steps is empty"),
    ("models-empty", grid(models=","), 2, "run.models is empty"),
    ("steps-zero", grid(steps="0"), 2, "run.steps: '0' must be in [1, 100000]"),
    ("steps-negative", grid(steps="3,-5"), 2, "run.steps: '-5' must be in [1"),
    ("steps-abc", grid(steps="abc"), 2, "run.steps: 'abc' must be an integer"),
    ("steps-huge", grid(steps="1000000000"), 2, "must be in [1, 100000]"),
    ("seed-negative", grid(seed="-1"), 2, "seed=-1 must be in [0, 4611686018427387904]"),
    ("num-samples-zero", grid(num_samples="0"), 2, "num_samples=0 must be in [1"),
    ("num-samples-abc", grid(num_samples="abc"), 2, "'abc' is not a valid integer"),
    ("num-samples-too-many", grid(num_samples="100000000000"), 2, "GiB, more than the"),
    ("batch-size-negative", grid(batch_size="-1"), 2, "batch_size=-1 must be in [0"),
    ("repeats-zero", grid(repeats="0"), 2, "repeats=0 must be in [1"),
    ("device-tpu", grid(device="tpu"), 2, "'tpu' is not one of"),
    ("attention", grid(attention="flash"), 2, "'flash' is not one of"),
    ("cell-timeout-zero", grid(cell_timeout="0"), 2, "--cell-timeout"),
    ("cell-timeout-abc", grid(cell_timeout="abc"), 2, "'abc' is not a valid float"),
    ("unknown-flag", grid(frobnicate="1"), 2, "No such option '--frobnicate'"),
    # --- run: config files -----------------------------------------------------------------------------
    ("config-missing", ["run", "--config", "{tmp}/nope.toml"], 2, "nope.toml not found"),
    ("config-not-utf8", ["run", "--config", "{tmp}/latin1.toml"], 2, "not UTF-8 text"),
    ("config-run-string", ["run", "--config", "{tmp}/string_run.toml"], 2, "'run' must be a table"),
    ("config-malformed", ["run", "--config", "{tmp}/malformed.toml"], 2, "malformed TOML"),
    ("config-unknown-table", ["run", "--config", "{tmp}/table.toml"], 2, "unknown table [grid]"),
    ("config-unknown-key", ["run", "--config", "{tmp}/unknown_key.toml"], 2, "unknown key run.bogus"),
    ("config-bool-steps", ["run", "--config", "{tmp}/bool_steps.toml"], 2, "run.steps: True must be an integer"),
    ("config-bool-seed", ["run", "--config", "{tmp}/bool_seed.toml"], 2, "seed=True must be an integer"),
    ("config-float-n", ["run", "--config", "{tmp}/float_n.toml"], 2, "num_samples=1.5 must be an integer"),
    ("config-float-steps", ["run", "--config", "{tmp}/float_steps.toml"], 2, "run.steps: 2.5 must be an integer"),
    ("config-models-int", ["run", "--config", "{tmp}/models_int.toml"], 2, "run.models must be a list"),
    ("config-models-entry", ["run", "--config", "{tmp}/models_entry.toml"], 2, "entries must be strings"),
    ("config-save-int", ["run", "--config", "{tmp}/save_int.toml"], 2, "save_samples=3 must be true or false"),
    ("config-device", ["run", "--config", "{tmp}/device.toml"], 2, "device='gpu' must be one of auto, cpu, cuda"),
    ("config-empty-steps", ["run", "--config", "{tmp}/empty_steps.toml"], 2, "run.steps is required"),
    # --- run: datasets checked before anything runs ------------------------------------------------------
    ("folder-no-path", grid(datasets="image-folder"), 2, "needs option 'path'"),
    ("folder-missing", grid(datasets="image-folder[path={tmp}/nowhere]"), 2, "is not a directory"),
    ("folder-empty", grid(datasets="image-folder[path={tmp}/empty_images]"), 2, "no images"),
    ("folder-corrupt", grid(datasets="image-folder[path={tmp}/images]"), 2, "broken.png is not a readable image"),
    ("cifar-missing", grid(datasets="cifar10[path={tmp}/nowhere]"), 2, "lacks"),
    ("cifar-truncated", grid(datasets="cifar10[path={tmp}/cifar,split=test]"), 2, "test_batch.bin is truncated"),
    ("cifar-split", grid(datasets="cifar10[split=val]"), 2, "split='val' must be one of train, test"),
    # --- run: --plugin files -----------------------------------------------------------------------------
    ("plugin-missing", [*GRID, "--plugin", "{tmp}/nope.py"], 2, "nope.py: no such file"),
    ("plugin-syntax", [*GRID, "--plugin", "{tmp}/syntax.py"], 2, "SyntaxError"),
    ("plugin-exit", [*GRID, "--plugin", "{tmp}/exits.py"], 2, "raised while loading: SystemExit"),
    ("plugin-import", [*GRID, "--plugin", "{tmp}/imports.py"], 2, "ModuleNotFoundError"),
    ("plugin-raises", [*GRID, "--plugin", "{tmp}/raises.py"], 2, "RuntimeError: plugin is broken"),
    ("plugin-not-python", [*GRID, "--plugin", "{tmp}/notpython.txt"], 2, "not a Python file"),
    ("plugin-duplicate", [*GRID, "--plugin", "{tmp}/duplicate.py"], 2, "duplicate sampler name 'ddim'"),
    ("plugin-family", [*GRID, "--plugin", "{tmp}/family.py"], 2, "family 'quantum'"),
    ("plugin-wrong-kind", [*GRID, "--plugin", "{tmp}/wrongkind.py"], 2, "got str, expected Sampler"),
    ("plugin-bad-default", [*GRID, "--plugin", "{tmp}/baddefault.py"], 2, "default of option 'k' must be one of 1, 2"),
    ("plugin-hook-raises", [*GRID, "--plugin", "{tmp}/hookraises.py"], 2, "raised in register_samplers: KeyError"),
    ("plugin-hook-exits", [*GRID, "--plugin", "{tmp}/hookexits.py"], 2, "raised in register_models: SystemExit"),
    # --- run: output directories -------------------------------------------------------------------------
    ("out-is-file", [*GRID, "--out", "{tmp}/afile"], 2, "afile"),
    ("out-not-empty", [*GRID, "--out", "{tmp}/earlier"], 2, "is not empty"),
    ("out-locked", [*GRID, "--out", "{tmp}/locked"], 2, f"in use by another diffbench run (PID {os.getpid()})"),
    ("resume-corrupt-json", [*GRID, "--out", "{tmp}/corrupt", "--resume"], 2, "results.json: not valid JSON"),
    ("resume-corrupt-config", [*GRID, "--out", "{tmp}/corrupt_config", "--resume"], 2, "config.json: not valid JSON"),
    # --- list ------------------------------------------------------------------------------------------
    ("list-kind", ["list", "sampler"], 2, "'sampler' is not one of"),
    ("list-plugin-syntax", ["list", "--plugin", "{tmp}/syntax.py"], 2, "SyntaxError"),
    ("list-plugin-exit", ["list", "--plugin", "{tmp}/exits.py"], 2, "SystemExit"),
    ("list-plugin-missing", ["list", "--plugin", "{tmp}/nope.py"], 2, "no such file"),
    # --- train -----------------------------------------------------------------------------------------
    ("train-unknown-model", ["train", "--model", "nope", "--dataset", "moons"], 2, "unknown model 'nope'"),
    ("train-untrainable", ["train", "--model", "gmm-oracle", "--dataset", "gmm-2d"], 2, "cannot be trained"),
    ("train-unknown-dataset", ["train", "--model", "mlp", "--dataset", "nope"], 2, "unknown dataset 'nope'"),
    ("train-steps-abc", ["train", "--model", "mlp", "--dataset", "moons", "--set", "steps=abc"], 2,
     "steps='abc' must be an integer"),
    ("train-steps-zero", ["train", "--model", "mlp", "--dataset", "moons", "--set", "steps=0"], 2,
     "steps='0' must be in [1"),
    ("train-batch-zero", ["train", "--model", "mlp", "--dataset", "moons", "--set", "batch_size=0"], 2,
     "batch_size='0' must be in [1"),
    ("train-lr-negative", ["train", "--model", "mlp", "--dataset", "moons", "--set", "lr=-1"], 2, "lr='-1' must be in"),
    ("train-min-snr-negative", ["train", "--model", "dit", "--dataset", "digits", "--set", "min_snr_gamma=-1"], 2,
     "min_snr_gamma='-1' must be in"),
    ("train-min-snr-flow", ["train", "--model", "flow-unet", "--dataset", "digits", "--set", "min_snr_gamma=5"], 2,
     "flow-matching loss takes no weighting"),
    ("train-unknown-key", ["train", "--model", "mlp", "--dataset", "moons", "--set", "bogus=1"], 2,
     "has no option 'bogus'; valid options:"),
    ("train-no-equals", ["train", "--model", "mlp", "--dataset", "moons", "--set", "steps"], 2, "expected KEY=VALUE"),
    ("train-choice", ["train", "--model", "mlp", "--dataset", "moons", "--set", "parameterization=foo"], 2,
     "parameterization='foo' must be one of"),
    ("train-dataset-path", ["train", "--model", "unet", "--dataset", "image-folder"], 2, "needs option 'path'"),
    ("train-plugin-exit", ["train", "--model", "mlp", "--dataset", "moons", "--plugin", "{tmp}/exits.py"], 2,
     "SystemExit"),
    # --- compare ---------------------------------------------------------------------------------------
    ("compare-missing-new", ["compare", "{tmp}/tpyo", "{tmp}/base"], 2, "tpyo: no such directory"),
    ("compare-missing-base", ["compare", "{tmp}/base", "{tmp}/tpyo"], 2, "tpyo: no such directory"),
    ("compare-no-csv", ["compare", "{tmp}/empty_images", "{tmp}/base"], 2, "no results.csv"),
    ("compare-cut-mid-row", ["compare", "{tmp}/cut", "{tmp}/base"], 2, "truncated"),
    ("compare-rows-dropped", ["compare", "{tmp}/dropped", "{tmp}/base"], 2, "2 rows but results.json has 3"),
    ("compare-garbage-csv", ["compare", "{tmp}/garbage", "{tmp}/base"], 2, "results.csv: unreadable"),
    ("compare-no-columns", ["compare", "{tmp}/nocolumns", "{tmp}/base"], 2, "missing column 'model'"),
    ("compare-bad-status", ["compare", "{tmp}/badstatus", "{tmp}/base"], 2, "unknown status ('okay'"),
    ("compare-garbage-json", ["compare", "{tmp}/badjson", "{tmp}/base"], 2, "results.json: not valid JSON"),
    ("compare-missing-cell", ["compare", "{tmp}/missing_cell", "{tmp}/base"], 1, "1 regression(s)"),
    *[(f"compare-tol-{name}", ["compare", "{tmp}/base", "{tmp}/base", "--tolerances", f"{{tmp}}/{file}"], 2, fragment)
      for name, file, fragment in [
          ("missing", "nope.toml", "nope.toml: cannot read"),
          ("malformed", "tol_malformed.toml", "not valid TOML"),
          ("table", "tol_unknown_table.toml", "unknown table [speed]"),
          ("key", "tol_unknown_key.toml", "unknown key 'relative' in [metrics]"),
          ("type", "tol_bad_type.toml", "[metrics] rel must be a number >= 0, got 'x'"),
          ("negative", "tol_negative.toml", "[timing] ratio must be a number >= 0"),
          ("columns", "tol_columns.toml", "[columns.swd] must be a table"),
          ("column-key", "tol_column_key.toml", "unknown key 'foo' in [columns.swd]"),
      ]],
]


def _rows(n: int) -> list[dict]:
    return [{"model": "gmm-oracle", "sampler": "ddim", "guidance": "none", "dataset": "gmm-2d", "steps": s,
             "nfe": s, "status": "ok", "reason": "", "wall_s": 0.1, "swd": 0.5} for s in (3, 5, 8)[:n]]


def _table(directory: Path, rows: list[dict]) -> Path:
    writer = ResultsWriter(directory, rows)
    writer.metric_columns = {"swd": False}
    directory.mkdir(parents=True, exist_ok=True)
    writer.write()
    return directory


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The files every case refers to (written once)."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("bad")
    for name, text in PLUGINS.items():
        (tmp / name).write_text(text)
    for name, data in CONFIGS.items():
        (tmp / name).write_bytes(data)
    (tmp / "empty_images").mkdir()
    (tmp / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp / "images" / "good.png")
    (tmp / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp / "cifar").mkdir()
    (tmp / "cifar" / "test_batch.bin").write_bytes(bytes(3073 * 2 + 100))  # cut inside the third record
    (tmp / "afile").write_text("x")
    (tmp / "earlier").mkdir()
    (tmp / "earlier" / "results.csv").write_text("model\n")
    _table(tmp / "corrupt", _rows(1))
    (tmp / "corrupt" / "results.json").write_text('{"rows": [')
    _table(tmp / "corrupt_config", _rows(1))
    (tmp / "corrupt_config" / "config.json").write_text("{not json")
    (tmp / "locked").mkdir()
    base = _table(tmp / "base", _rows(3))
    text = (base / "results.csv").read_text()
    _table(tmp / "cut", _rows(3))
    (tmp / "cut" / "results.csv").write_text(text[: len(text) - 12])
    _table(tmp / "dropped", _rows(3))
    (tmp / "dropped" / "results.csv").write_text("\n".join(text.splitlines()[:3]) + "\n")
    _table(tmp / "garbage", _rows(3))
    (tmp / "garbage" / "results.csv").write_bytes(b"\xff\xfe\x00garbage\x00\n")
    _table(tmp / "nocolumns", _rows(3))
    (tmp / "nocolumns" / "results.csv").write_text("a,b\n1,2\n")
    _table(tmp / "badstatus", _rows(3))
    (tmp / "badstatus" / "results.csv").write_text(text.replace(",ok,", ",okay,", 1))
    _table(tmp / "badjson", _rows(3))
    (tmp / "badjson" / "results.json").write_text("[1, 2")
    _table(tmp / "missing_cell", _rows(2))
    return tmp


@pytest.mark.parametrize("case_id,args,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(scratch, monkeypatch, case_id, args, code, fragment):
    monkeypatch.chdir(scratch / "empty_images")  # no bench.toml here
    lock = DirectoryLock(scratch / "locked").acquire() if case_id == "out-locked" else None
    try:
        result = CliRunner().invoke(main, [a.replace("{tmp}", str(scratch)) for a in args])
    finally:
        if lock:
            lock.release()
    assert result.exit_code == code, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_case_table_is_large_and_covers_every_command():
    commands = {args[0] for _, args, _, _ in CASES}
    assert len(CASES) >= 60 and commands == {"run", "list", "train", "compare"}


def test_refused_run_creates_nothing(scratch, monkeypatch, tmp_path):
    """Bad input stops the run before --out exists (here: a dataset path, checked up front)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "never"
    result = CliRunner().invoke(main, [*grid(datasets="image-folder[path=/nonexistent]"), "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_leaves_no_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "gpu-run"
    result = CliRunner().invoke(main, [*grid(device="cuda"), "--out", str(out)])
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert not out.exists()


@pytest.mark.parametrize("args", [["run", "--config", "{tmp}/latin1.toml"], [*GRID, "--plugin", "{tmp}/exits.py"]],
                         ids=["non-utf8-config", "plugin-sys-exit"])
def test_real_process_prints_no_traceback(scratch, args):
    """As a user runs it: a real process, stderr included (CliRunner can hide a traceback)."""
    proc = subprocess.run([sys.executable, "-m", "diffbench.cli", *[a.replace("{tmp}", str(scratch)) for a in args]],
                          capture_output=True, text=True, cwd=scratch / "empty_images", timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr + proc.stdout


def test_overwrite_replaces_an_earlier_run_and_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")

    def run(*extra):
        return CliRunner().invoke(main, [*grid(steps="3"), "--out", out, "--in-process", *extra])

    assert run().exit_code == 0
    assert run().exit_code == 2
    assert run("--samplers", "ddpm", "--overwrite").exit_code == 0
    import pandas as pd

    assert pd.read_csv(Path(out) / "results.csv")["sampler"].tolist() == ["ddpm"]
    assert run("--samplers", "ddpm,ddim", "--resume").exit_code == 0
    assert sorted(pd.read_csv(Path(out) / "results.csv")["sampler"]) == ["ddim", "ddpm"]
