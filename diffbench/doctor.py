"""``diffbench doctor``: one command that checks the GPU fast path the moment a GPU is there.

With CUDA (≤ 8 minutes on one H100/H200) it runs, each as a subprocess with its own time limit:
the GPU tests (``pytest -m gpu``), ``bench attention``, ``bench dit-step``, ``bench pipeline``
(DiT-XL/2, random weights, 32×32×4 latents, batch 8 and 64, CFG, bf16 + compile + Triton
attention against diffusers' loop) and a short GPU grid (the default grid, plus DiT-XL/2-sized
cells with random weights, eager fp32 and bf16 + compile + Triton). It then writes
``<out>/<gpu>-doctor.md``: a line per step and a line per target of issue #15 (met / not met,
the number). Without CUDA it says so and runs the CPU subset: the kernel's CPU tests (Triton
interpreter, tiny shapes), ``bench pipeline`` on a small DiT, and a tiny grid eager fp32 vs
bf16 + compile (with ``cfg:1.0`` next to ``none``); GPU targets are reported as not checked.

A step whose Python modules are missing (a bare image with torch, triton, pandas, click,
tabulate and pytest only) is skipped with the names of the missing modules; see docs/gpu.md.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
GRID_MODULES = ("tqdm", "psutil", "matplotlib", "safetensors")  # what `diffbench run` imports
# The test suite imports every plugin (digits: scikit-learn) and diffusers at collection time.
TEST_MODULES = ("pytest", *GRID_MODULES, "sklearn", "diffusers")
DIT_XL = "dit[config=DiT-XL/2,checkpoint=random]"  # 256 tokens on the 32×32 shapes images, as at 256 px


@dataclass
class Step:
    name: str
    args: list[str]  # after `python -m`
    needs: tuple[str, ...] = ()  # importable modules
    timeout_s: int = 120
    env: dict = field(default_factory=dict)
    needs_path: Path | None = None  # e.g. the tests/ folder of a repository checkout


def missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _cli(*args) -> list[str]:
    return ["diffbench.cli", *map(str, args)]


def _grid(out: Path, name: str, *args, timeout_s: int = 150, env: dict | None = None) -> Step:
    return Step(f"grid-{name}", _cli("run", "--out", out / name, "--quiet", *args), GRID_MODULES, timeout_s, env or {})


def default_grid_metrics() -> str:
    """The default grid's metrics, without FID where torch-fidelity is missing."""
    metrics = ["swd", "mmd", "logp", "class-acc", "gen-nll", "entropy"]
    return ",".join(metrics + ([] if missing(["torch_fidelity"]) else ["fid"]))


def gpu_steps(out: Path, grids: Path) -> list[Step]:
    dit = ["--models", DIT_XL, "--samplers", "ddim,dpm-solver++", "--guidance", "none,cfg:4.0", "--steps", "50",
           "--datasets", "shapes", "--metrics", "", "--num-samples", "64", "--batch-size", "64", "--repeats", "3",
           "--device", "cuda"]
    return [
        Step("gpu-tests", ["pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(REPO / "tests")], TEST_MODULES,
             150, needs_path=REPO / "tests"),
        Step("bench-attention", _cli("bench", "attention", "--out", out), ("triton", "tqdm"), 150),
        Step("bench-dit-step", _cli("bench", "dit-step", "--out", out, "--batch-size", 64), ("triton", "tqdm"), 60),
        Step("bench-pipeline", _cli("bench", "pipeline", "--out", out, "--batch-sizes", "8,64", "--steps", 50,
                                    "--dtype", "bf16", "--compile", "default", "--attention", "triton"),
             ("diffusers", "tqdm", "psutil"), 150),
        _grid(grids, "default", "--config", REPO / "bench.toml", "--device", "cuda", "--metrics", default_grid_metrics(),
              "--repeats", 2),
        _grid(grids, "dit-xl2-fp32", *dit, "--attention", "sdpa"),
        _grid(grids, "dit-xl2-fast", *dit, "--dtype", "bf16", "--compile", "--attention", "triton"),
    ]


# One intra-op thread per CPU step: on a shared CPU, two spinning OpenMP threads per process
# slow tiny ops down ~30× (the steps measure ratios within a run, not the CPU's peak).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def cpu_steps(out: Path, grids: Path) -> list[Step]:
    tiny = ["--models", "unet", "--samplers", "ddim", "--guidance", "none,cfg:1.0,cfg:3.0", "--steps", "10",
            "--datasets", "digits", "--metrics", "class-acc", "--num-samples", "64", "--repeats", "3", "--device", "cpu"]
    return [
        Step("cpu-kernel-tests", ["pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_attention_kernel.py")],
             ("pytest", "triton"), 300, needs_path=REPO / "tests"),
        Step("bench-pipeline", _cli("bench", "pipeline", "--out", out, "--config", "DiT-tiny/2", "--latent-size", 16,
                                    "--batch-sizes", 8, "--steps", 20, "--dtype", "fp32", "--compile", "off",
                                    "--attention", "sdpa", "--device", "cpu", "--repeats", 5), ("diffusers", "tqdm", "psutil"), 900,
             ONE_THREAD),
        _grid(grids, "cpu-fp32", *tiny, timeout_s=600, env=ONE_THREAD),
        _grid(grids, "cpu-bf16-compile", *tiny, "--dtype", "bf16", "--compile", timeout_s=1200, env=ONE_THREAD),
    ]


def run_step(step: Step, log_dir: Path, time_left_s: float) -> dict:
    """Run one step as ``python -m ...``; its output goes to ``<log_dir>/<name>.log``."""
    row = {"step": step.name, "status": "skipped", "seconds": 0.0, "reason": ""}
    absent = missing(step.needs)
    if absent:
        return {**row, "reason": f"missing Python modules: {', '.join(absent)} (docs/gpu.md: carry wheels)"}
    if step.needs_path is not None and not step.needs_path.exists():
        return {**row, "reason": f"{step.needs_path} not found (run from a repository checkout)"}
    if time_left_s < 10:
        return {**row, "reason": "the time budget is spent"}
    timeout = min(step.timeout_s, time_left_s)
    log = log_dir / f"{step.name}.log"
    tic = time.perf_counter()
    with log.open("w") as handle:
        try:
            code = subprocess.run([sys.executable, "-m", *step.args], stdout=handle, stderr=subprocess.STDOUT,
                                  env={**os.environ, **step.env}, cwd=REPO, timeout=timeout).returncode
            status, reason = ("ok", "") if code == 0 else ("failed", f"exit {code}, see {log}")
        except subprocess.TimeoutExpired:
            status, reason = "failed", f"timed out after {timeout:.0f} s, see {log}"
    return {**row, "status": status, "seconds": time.perf_counter() - tic, "reason": reason}


# --- targets ---------------------------------------------------------------------------------

def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _target(name: str, value: float | None, threshold: float, unit: str, higher: bool = True,
            note: str = "") -> dict:
    if value is None or pd.isna(value):
        return {"target": name, "status": "not checked", "value": note or "no measurement"}
    met = value >= threshold if higher else value <= threshold
    return {"target": name, "status": "met" if met else "not met", "value": f"{value:.3g}{unit}" + (f" ({note})" if note else "")}


def attention_targets(table: pd.DataFrame | None) -> list[dict]:
    """Issue #15's kernel targets from the ``bench attention`` table (bf16)."""
    names = ("Triton attention fwd ≥ 450 TFLOP/s at d=128, seq ≥ 4096, bf16",
             "Triton fwd ≥ 1.0× the best SDPA backend on DiT-XL/2 and ADM shapes",
             "Triton fwd+bwd ≥ 0.8× the best SDPA backend (all shapes)")
    if table is None:
        return [_target(n, None, 0, "") for n in names]
    ok = table[table["status"] == "ok"]
    triton, sdpa = ok[ok["backend"] == "triton"], ok[ok["backend"].str.startswith("sdpa")]
    best_sdpa = sdpa.groupby(["case", "pass"])["tflops"].max()
    ratio = triton.set_index(["case", "pass"])["tflops"].div(best_sdpa).dropna()
    long_d128 = triton[(triton["pass"] == "fwd") & (triton["head_dim"] == 128) & (triton["q_len"] >= 4096)]
    model_cases = [c for c in ratio.index if c[1] == "fwd" and c[0].startswith(("dit-", "adm-"))]
    backward = [c for c in ratio.index if c[1] == "fwd+bwd"]
    return [
        _target(names[0], long_d128["tflops"].max() if len(long_d128) else None, 450, " TFLOP/s"),
        _target(names[1], ratio[model_cases].min() if model_cases else None, 1.0, "×", note="worst shape"),
        _target(names[2], ratio[backward].min() if backward else None, 0.8, "×", note="worst shape"),
    ]


def pipeline_targets(table: pd.DataFrame | None) -> list[dict]:
    """DiT-XL/2 sampling against diffusers' loop, and the sampler's host overhead, at batch 64."""
    names = ("DiT-XL/2 50-step CFG ≥ 1.3× diffusers' loop in images/s (bf16 + compile + Triton), batch 64",
             "same outputs as diffusers' loop within bf16 tolerance (max |diff| ≤ 5 % of max |x|), batch 64",
             "sampler host overhead ≤ 3 % of model time per step at batch 64")
    rows = None if table is None else table[(table["batch"] == 64) & (table["model"] == "DiT-XL/2")]
    if rows is None or rows.empty:
        return [_target(n, None, 0, "") for n in names]
    return [
        _target(names[0], rows["speedup"].min(), 1.3, "×", note="worst scheduler"),
        _target(names[1], (rows["max_abs_diff"] / rows["max_abs_output"]).max(), 0.05, "", higher=False),
        _target(names[2], rows["overhead_pct"].max(), 3.0, " %", higher=False),
    ]


def grid_ratios(eager: pd.DataFrame | None, fast: pd.DataFrame | None) -> list[dict]:
    """Measured ratios of the CPU grids: fast path vs eager per cell, and cfg:1.0 vs none."""
    lines = []
    if eager is not None and fast is not None:
        keys = ["model", "sampler", "guidance", "dataset", "steps"]
        both = eager.merge(fast, on=keys, suffixes=("_eager", "_fast"))
        both = both[(both["status_eager"] == "ok") & (both["status_fast"] == "ok")]
        for _, r in both.iterrows():
            lines.append({"target": f"bf16 + compile speedup, {r['model']} {r['guidance']} {r['dataset']}",
                          "status": "measured", "value": f"{r['wall_s_eager'] / r['wall_s_fast']:.3g}× "
                                                         f"(compile {r['compile_s_fast']:.1f} s apart)"})
    if eager is not None:
        ok = eager[eager["status"] == "ok"].set_index(["model", "dataset", "guidance"])["wall_s"]
        for model, dataset, guidance in ok.index:
            if guidance in ("cfg:1.0", "cfg[scale=1.0]") and (model, dataset, "none") in ok.index:
                lines.append({"target": f"cfg:1.0 wall ÷ none wall, {model} {dataset} (≈ 2.5× before the shortcut)",
                              "status": "measured",
                              "value": f"{ok[model, dataset, guidance] / ok[model, dataset, 'none']:.3g}×"})
    return lines


def summary(out: Path, slug: str, steps: list[dict], on_cuda: bool) -> str:
    """The doctor's report: the steps, then a line per target."""
    from diffbench.timing import environment_fingerprint

    grids = out / f"{slug}-grids"
    targets = [{"target": "GPU tests (pytest -m gpu) pass", "status": "not checked", "value": ""}]
    for row in steps:
        if row["step"] == "gpu-tests":
            targets[0] = {**targets[0], "status": {"ok": "met", "failed": "not met"}.get(row["status"], "not checked"),
                          "value": row["reason"]}
    if on_cuda:
        targets += attention_targets(_read(out / f"{slug}.csv"))
    else:
        targets += [_target(t["target"], None, 0, "", note="no CUDA: GPU targets are not checked")
                    for t in attention_targets(None)]
    pipeline = _read(out / f"{slug}-pipeline.csv")
    targets += pipeline_targets(pipeline) if on_cuda else [
        _target(t["target"], None, 0, "", note="no CUDA") for t in pipeline_targets(None)]
    if pipeline is not None:
        targets += [{"target": f"diffbench ÷ diffusers loop, {r.model} {r.latent} batch {r.batch} {r.scheduler} "
                               f"{r.dtype} on {r.device}",
                     "status": "measured", "value": f"{r.speedup:.3g}× ({r.diffbench_ms_per_step:.4g} vs "
                                                    f"{r.diffusers_ms_per_step:.4g} ms/step, max |diff| "
                                                    f"{r.max_abs_diff:.2g} of {r.max_abs_output:.3g})"}
                    for r in pipeline.itertuples()]
    eager, fast = ("dit-xl2-fp32", "dit-xl2-fast") if on_cuda else ("cpu-fp32", "cpu-bf16-compile")
    targets += grid_ratios(_read(grids / eager / "results.csv"), _read(grids / fast / "results.csv"))
    env = environment_fingerprint(torch.device("cuda" if on_cuda else "cpu"))
    header = (f"# diffbench doctor on {env['gpu'] or 'CPU (no CUDA: the CPU subset; no GPU number exists from this run)'}"
              f"\n\ntorch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, python {env['python']}, "
              f"commit {env['git_commit']}\n")
    return (header + "\n## Steps\n\n" + pd.DataFrame(steps).to_markdown(index=False, floatfmt=".1f")
            + "\n\n## Targets (issue #15)\n\n" + pd.DataFrame(targets).to_markdown(index=False) + "\n")


def run_doctor(out: str | Path = "results/kernels", budget_s: float = 480.0, cpu_only: bool = False,
               only: list[str] | None = None, echo=print) -> Path:
    """Run the steps for this machine within ``budget_s``; returns the summary's path."""
    from diffbench.kernels.bench import device_slug

    on_cuda = torch.cuda.is_available() and not cpu_only
    slug = device_slug(torch.device("cuda" if on_cuda else "cpu"))
    out = Path(out).resolve()  # the steps run in the repository root
    grids, logs = out / f"{slug}-grids", out / f"{slug}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not on_cuda:
        echo("no CUDA device: running the CPU subset; GPU targets are not checked and no GPU number comes from this run")
    plan = (gpu_steps if on_cuda else cpu_steps)(out, grids)
    if only:
        plan = [s for s in plan if s.name in only]
    start, rows = time.perf_counter(), []
    for step in plan:
        echo(f"[{time.perf_counter() - start:5.0f} s] {step.name} ...")
        rows.append(run_step(step, logs, budget_s - (time.perf_counter() - start)))
        echo(f"         {rows[-1]['status']} {rows[-1]['reason']}")
    # A rerun of some steps (--only) keeps the other steps' rows of the last run.
    steps_file = out / f"{slug}-doctor-steps.csv"
    if only and steps_file.is_file():
        rows = [r for r in pd.read_csv(steps_file, keep_default_na=False).to_dict("records")
                if r["step"] not in {s.name for s in plan}] + rows
    pd.DataFrame(rows, columns=["step", "status", "seconds", "reason"]).to_csv(steps_file, index=False)
    path = out / f"{slug}-doctor.md"
    path.write_text(summary(out, slug, rows, on_cuda))
    return path
