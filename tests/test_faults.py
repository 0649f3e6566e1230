"""Injected faults: each misbehaving cell is a ``failed`` row naming the component at fault, the
other cells are untouched (identical to a clean run), and the run exits 1.

The fault plugin (written to a file, loaded with ``--plugin``) wraps the exact GMM denoiser and
DDIM, so every cell is cheap; faults are chosen by option.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from diffbench.cli import main

FAULT_PLUGIN = '''
import math, os, signal, sys, time
import torch
import diffbench
from diffbench.registry import Metric, Model, Option, Sampler
from diffbench_plugins.gmm_oracle import load_gmm_oracle
from diffbench_plugins.samplers import sample_ddim

MODEL_FAULTS = ("nan", "inf", "raise", "shape", "none", "int")
SAMPLER_FAULTS = ("none", "short", "dtype", "exit", "hang", "crash", "segv", "alloc", "slow")


def load_faulty(dataset, *, device="cpu", fault="nan", at=1):
    denoiser = load_gmm_oracle(dataset, device=device)
    exact, calls = denoiser.net, [0]

    def net(x, t, cond):
        calls[0] += 1
        out = exact(x, t, cond)
        if calls[0] < at:
            return out
        if fault == "raise":
            raise RuntimeError(f"network broke on call {calls[0]}")
        if fault in ("nan", "inf"):
            out = out.clone()
            out[0, 0] = float(fault)
            return out
        return {"shape": out[:, :1], "none": None, "int": out.long()}[fault]

    denoiser.net = net
    return denoiser


def faulty_sampler(denoiser, x, timesteps, *, generator, callback=None, fault="none"):
    if fault == "exit":
        sys.exit(0)
    if fault == "hang":
        time.sleep(3600)
    if fault == "crash":
        os._exit(3)
    if fault == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if fault == "slow":
        time.sleep(1.0)
    if fault == "alloc":
        ballast = torch.ones(2**28 // 4)  # 256 MiB, touched
        del ballast
    out = sample_ddim(denoiser, x, timesteps, generator=generator)
    return {"none": None, "short": out[:-1], "dtype": out.long()}.get(fault, out)


def faulty_metric(samples, ctx, returns="nan"):
    return {"nan": float("nan"), "inf": math.inf, "text": "good", "tensor": torch.tensor(0.5)}[returns]


@diffbench.hookimpl
def register_models(register):
    register(Model(name="faulty", description="the exact GMM denoiser with an injected fault", family="gaussian",
                   load=load_faulty, options={"fault": Option("nan", choices=MODEL_FAULTS), "at": Option(1, min=1)}))


@diffbench.hookimpl
def register_samplers(register):
    register(Sampler(name="faulty-sampler", description="DDIM with an injected fault", family="gaussian",
                     fn=faulty_sampler, options={"fault": Option("none", choices=SAMPLER_FAULTS)}))


@diffbench.hookimpl
def register_metrics(register):
    register(Metric(name="faulty-metric", description="returns a bad value", family="points", compute=faulty_metric,
                    options={"returns": Option("nan", choices=("nan", "inf", "text", "tensor"))}))
'''
COMMON = ["--datasets", "gmm-2d", "--steps", "4", "--num-samples", "16", "--batch-size", "8", "--repeats", "1",
          "--metrics", "swd", "--quiet"]
CLEAN_CELL = ("gmm-oracle", "ddim")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "fault_plugin.py"
    path.write_text(FAULT_PLUGIN)
    return path


def _run(out, plugin, *args):
    result = CliRunner().invoke(main, ["run", "--plugin", str(plugin), "--out", str(out), *COMMON, *args])
    assert "Traceback" not in result.output
    return result, pd.read_csv(out / "results.csv").set_index(["model", "sampler"])


@pytest.fixture(scope="module")
def clean(plugin, tmp_path_factory):
    result, df = _run(tmp_path_factory.mktemp("clean") / "out", plugin, "--models", "gmm-oracle",
                      "--samplers", "ddim", "--in-process")
    assert result.exit_code == 0, result.output
    return df.loc[CLEAN_CELL]


MODEL_CASES = {  # model reference -> what the failed row's reason must say
    "faulty[fault=nan]": "2 of 16 samples are not finite",  # sample 0 of each batch of 8
    "faulty[fault=inf]": "2 of 16 samples are not finite",
    "faulty[at=3,fault=raise]": "model 'faulty' (plugin file ",  # the model's network, although ddim called it
    "faulty[fault=shape]": "model 'faulty' (plugin file ",
    "faulty[fault=none]": "network returned NoneType, expected a tensor",
    "faulty[fault=int]": "network returned dtype torch.int64",
}


def test_model_faults_blame_the_model(plugin, clean, tmp_path):
    result, df = _run(tmp_path / "out", plugin, "--models", ",".join(["gmm-oracle", *MODEL_CASES]),
                      "--samplers", "ddim")
    assert result.exit_code == 1, result.output
    for model, fragment in MODEL_CASES.items():
        row = df.loc[(model, "ddim")]
        assert row["status"] == "failed" and fragment in row["reason"], (model, row["reason"])
        assert "sampler 'ddim' (plugin" not in row["reason"] and "host error" not in row["reason"]
    assert "RuntimeError: network broke on call 3" in df.loc[("faulty[at=3,fault=raise]", "ddim"), "reason"]
    assert "shape [16, 1]" in df.loc[("faulty[fault=shape]", "ddim"), "reason"] or \
        "shape [8, 1]" in df.loc[("faulty[fault=shape]", "ddim"), "reason"]
    _assert_clean_cell_intact(df, clean)


SAMPLER_CASES = {  # sampler reference -> what the failed row's reason must say
    "faulty-sampler[fault=none]": "sampler 'faulty-sampler' (plugin file ",
    "faulty-sampler[fault=short]": "returned shape [7, 2], expected [8, 2] (8 samples)",
    "faulty-sampler[fault=dtype]": "returned dtype torch.int64, expected torch.float32",
    "faulty-sampler[fault=exit]": "called sys.exit(0)",
    "faulty-sampler[fault=hang]": "took longer than --cell-timeout 20 s",
    "faulty-sampler[fault=crash]": "exited with status 3",
    "faulty-sampler[fault=segv]": "was killed by SIGSEGV",
}


def test_sampler_faults_and_worker_crashes_fail_only_their_cell(plugin, clean, tmp_path):
    samplers = ["faulty-sampler[fault=crash]", "ddim", "faulty-sampler[fault=alloc]", *SAMPLER_CASES]
    result, df = _run(tmp_path / "out", plugin, "--models", "gmm-oracle", "--samplers", ",".join(dict.fromkeys(samplers)),
                      "--cell-timeout", "20")
    assert result.exit_code == 1, result.output
    for sampler, fragment in SAMPLER_CASES.items():
        row = df.loc[("gmm-oracle", sampler)]
        assert row["status"] == "failed" and fragment in row["reason"], (sampler, row["reason"])
        assert "host error" not in row["reason"]
    assert "returned NoneType" in df.loc[("gmm-oracle", "faulty-sampler[fault=none]"), "reason"]
    # A 256 MiB allocation inside the cell shows in its peak memory (the worker's VmHWM, reset per cell).
    alloc = df.loc[("gmm-oracle", "faulty-sampler[fault=alloc]")]
    assert alloc["status"] == "ok" and alloc["peak_mem_mb"] >= 250, alloc["peak_mem_mb"]
    assert df.loc[CLEAN_CELL, "peak_mem_mb"] < 200
    _assert_clean_cell_intact(df, clean)  # the cell after a crashed worker ran in a fresh one


@pytest.mark.parametrize("returns,fragment", [("nan", "returned nan for column"), ("inf", "returned inf"),
                                              ("text", "returned str 'good' for column")])
def test_a_bad_metric_value_fails_the_cell_naming_the_metric(plugin, tmp_path, returns, fragment):
    result, df = _run(tmp_path / "out", plugin, "--models", "gmm-oracle", "--samplers", "ddim",
                      "--metrics", f"swd,faulty-metric[returns={returns}]", "--in-process")
    assert result.exit_code == 1
    row = df.loc[CLEAN_CELL]
    assert row["status"] == "failed" and "metric 'faulty-metric'" in row["reason"] and fragment in row["reason"]


def test_a_nan_model_never_gives_an_ok_row_in_process_too(plugin, tmp_path):
    result, df = _run(tmp_path / "out", plugin, "--models", "faulty[fault=nan]", "--samplers", "ddim", "--in-process")
    assert result.exit_code == 1 and df["status"].tolist() == ["failed"]
    assert pd.isna(df["swd"]).all() if "swd" in df else True


def _assert_clean_cell_intact(df, clean):
    row = df.loc[CLEAN_CELL]
    assert row["status"] == "ok" and row["nfe"] == clean["nfe"]
    assert row["swd"] == clean["swd"]


def test_kill_9_then_resume_keeps_finished_cells(plugin, tmp_path):
    """kill -9 of the supervisor mid-grid: the kernel drops the --out lock, finished rows are on
    disk, and --resume runs only the rest."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "diffbench.cli", "run", "--plugin", str(plugin), "--out", str(out), *COMMON,
            "--models", "gmm-oracle", "--samplers", "ddim,faulty-sampler[fault=slow]", "--steps", "3,4,5"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not _rows_on_disk(out):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _rows_on_disk(out)
    assert 1 <= len(done) < 6
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 6 and (df["status"] == "ok").all()
    kept = {(r["sampler"], r["steps"]): r["wall_s"] for r in done}
    assert all(df.set_index(["sampler", "steps"]).loc[key, "wall_s"] == wall for key, wall in kept.items())


def _rows_on_disk(out):
    try:
        return json.loads((out / "results.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


def test_a_diverging_training_stops_without_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ck" / "mlp-moons"
    result = CliRunner().invoke(main, ["train", "--model", "mlp", "--dataset", "moons", "--out", str(out),
                                       "--set", "steps=60", "--set", "lr=1e30"])
    assert result.exit_code == 1, result.output
    assert "training loss became NaN or Inf" in result.output and "no checkpoint written" in result.output
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
