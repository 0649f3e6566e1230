"""Convergence order of the ODE samplers on the Gaussian-mixture oracle (diffbench.convergence)."""
import pandas as pd
import pytest
import torch

from diffbench.convergence import DEFAULT_SAMPLERS, run_convergence

# Trajectories that pass near the boundary between two modes (std 0.15, 1.5 apart) make the ODE
# stiff there: up to ~64 steps the local orders are still rising (e.g. DPM-Solver++ 3M: 2.5,
# 2.9, 3.0, 3.0 from 32 to 512 steps). So the grid goes to 256 and the order is fitted over
# 64–256 steps.
STEPS = (16, 32, 64, 128, 256)


@pytest.fixture(scope="module")
def convergence(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny [32, 2] tensors: threading only adds overhead
    try:
        out = tmp_path_factory.mktemp("convergence")
        return out, run_convergence(out, steps=STEPS, num_samples=32)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("sampler", list(DEFAULT_SAMPLERS))
def test_fitted_order_matches_theory(convergence, sampler):
    _, table = convergence
    rows = table[table.sampler == sampler]
    assert tuple(rows.steps) == STEPS
    assert rows.error.is_monotonic_decreasing
    assert abs(rows.order.iloc[0] - DEFAULT_SAMPLERS[sampler]) <= 0.3, rows.to_string()


def test_nfe_column_counts_model_calls(convergence):
    _, table = convergence
    nfe = table.set_index(["sampler", "steps"]).nfe
    assert nfe["ddim", 32] == 32 and nfe["dpm-solver++[variant=2m]", 32] == 32
    assert nfe["heun", 32] == 2 * 32 - 1
    assert nfe["dpm-solver[method=singlestep,order=3]", 32] == 3 * 31 + 1


def test_writes_csv_markdown_and_plot(convergence):
    out, table = convergence
    assert pd.read_csv(out / "convergence.csv").shape == table.shape
    assert "dpm-solver++[variant=3m,d2_weighting=taylor]" in (out / "convergence.md").read_text()
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_third_order_beats_first_order_by_orders_of_magnitude(convergence):
    _, table = convergence
    err = table.set_index(["sampler", "steps"]).error
    assert err["dpm-solver++[variant=3m,d2_weighting=taylor]", 256] < 1e-2 * err["ddim", 256]
    assert err["dpm-solver[method=singlestep,order=3]", 256] < 1e-3 * err["ddim", 256]
