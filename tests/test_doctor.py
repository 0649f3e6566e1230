"""`diffbench doctor`: its steps run as time-limited subprocesses, and its summary turns the
benchmark tables into one met / not met line per target of issue #15, with the number."""
from __future__ import annotations

import pandas as pd

from diffbench.doctor import Step, attention_targets, pipeline_targets, run_doctor, run_step, summary


def attention_row(case, backend, pass_name, tflops, head_dim=128, q_len=4096):
    return {"case": case, "backend": backend, "pass": pass_name, "tflops": tflops, "status": "ok",
            "head_dim": head_dim, "q_len": q_len}


def attention_table():
    return pd.DataFrame([
        attention_row("seq4k-d128", "triton", "fwd", 460.0), attention_row("seq4k-d128", "sdpa-flash", "fwd", 500.0),
        attention_row("seq4k-d128", "triton", "fwd+bwd", 300.0), attention_row("seq4k-d128", "sdpa-flash", "fwd+bwd", 400.0),
        attention_row("seq1k-d128", "triton", "fwd", 400.0, q_len=1024),  # too short for the 450 target
        attention_row("dit-xl2-256tok", "triton", "fwd", 180.0, 72, 256),
        attention_row("dit-xl2-256tok", "sdpa-flash", "fwd", 150.0, 72, 256),
        attention_row("dit-xl2-256tok", "sdpa-cudnn", "fwd", 200.0, 72, 256),  # the best SDPA backend counts
    ])


def test_attention_targets_use_the_best_sdpa_backend_and_the_worst_shape():
    fwd, model_shapes, backward = attention_targets(attention_table())
    assert (fwd["status"], fwd["value"]) == ("met", "460 TFLOP/s")
    assert (model_shapes["status"], model_shapes["value"]) == ("not met", "0.9× (worst shape)")  # 180 / 200
    assert (backward["status"], backward["value"]) == ("not met", "0.75× (worst shape)")  # 300 / 400


def test_pipeline_targets_at_batch_64():
    table = pd.DataFrame({"model": ["DiT-XL/2"] * 3, "batch": [8, 64, 64], "speedup": [0.5, 1.42, 1.31],
                          "max_abs_diff": [1.0, 0.02, 0.8], "max_abs_output": [10.0, 10.0, 10.0],
                          "overhead_pct": [40.0, 2.5, 1.0]})
    speed, agreement, overhead = pipeline_targets(table)
    assert (speed["status"], speed["value"]) == ("met", "1.31× (worst scheduler)")  # batch 8 does not count
    assert (agreement["status"], agreement["value"]) == ("not met", "0.08")  # 0.8 / 10 > 5 %
    assert (overhead["status"], overhead["value"]) == ("met", "2.5 %")


def test_steps_are_skipped_with_the_missing_module_failed_with_the_exit_code_or_timed_out(tmp_path):
    skipped = run_step(Step("x", ["json.tool"], needs=("no_such_module_xyz",)), tmp_path, 60)
    assert skipped["status"] == "skipped" and "no_such_module_xyz" in skipped["reason"]
    failed = run_step(Step("y", ["json.tool", str(tmp_path / "missing.json")]), tmp_path, 60)
    assert failed["status"] == "failed" and "exit 2" in failed["reason"]
    slow = run_step(Step("z", ["timeit", "-n", "1", "import time; time.sleep(30)"], timeout_s=2), tmp_path, 60)
    assert slow["status"] == "failed" and "timed out after 2 s" in slow["reason"] and slow["seconds"] < 10
    assert run_step(Step("w", ["json.tool", "--help"]), tmp_path, 5)["status"] == "skipped"  # budget spent
    assert run_step(Step("v", ["json.tool", "--help"]), tmp_path, 60)["status"] == "ok"


def test_summary_on_cuda_reports_each_target_from_the_tables(tmp_path):
    attention_table().to_csv(tmp_path / "gpu.csv", index=False)
    steps = [{"step": "gpu-tests", "status": "ok", "seconds": 30.0, "reason": ""}]
    text = summary(tmp_path, "gpu", steps, on_cuda=True)
    assert "| GPU tests (pytest -m gpu) pass" in text and "| met " in text
    assert "0.9× (worst shape)" in text and "| not checked | no measurement" in text  # no pipeline table


def test_smoke_doctor_without_cuda_says_so_and_checks_no_gpu_target(tmp_path):
    said = []
    path = run_doctor(tmp_path, cpu_only=True, only=["no-such-step"], echo=said.append)
    text = path.read_text()
    assert path.name == "cpu-doctor.md" and "no CUDA" in said[0]
    assert "no GPU number exists from this run" in text
    assert text.count("no CUDA") >= 6 and "| met" not in text
