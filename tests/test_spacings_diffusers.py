"""diffusers' timestep grids as named diffbench spacings: one test per row of the mapping table
in docs/samplers.md (scheduler + timestep_spacing + steps_offset -> spacing), compared exactly
with the scheduler's own ``timesteps`` on the linear VP schedule (N = 1000)."""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, SASolverScheduler, UniPCMultistepScheduler)

from diffbench.process import SPACINGS, VPDiscrete, make_process

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
SINGLE = (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler)
MULTISTEP = (DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler, SASolverScheduler)
# (schedulers, timestep_spacing, steps_offset, diffbench spacing): the table of docs/samplers.md.
MAPPING = [
    (SINGLE, "leading", 0, "leading"),
    (SINGLE, "leading", 1, "leading-offset"),
    (SINGLE, "trailing", 0, "trailing"),
    ((DDIMScheduler, DDPMScheduler), "linspace", 0, "linspace-rounded"),
    ((EulerDiscreteScheduler,), "linspace", 0, "uniform"),
    (MULTISTEP, "leading", 0, "leading-multistep"),
    (MULTISTEP, "leading", 1, "leading-multistep-offset"),
    (MULTISTEP, "linspace", 0, "linspace-multistep"),
    (MULTISTEP, "trailing", 0, "trailing"),
]
ROWS = [(cls, spacing, offset, ours) for classes, spacing, offset, ours in MAPPING for cls in classes]


@pytest.mark.parametrize("steps", [7, 10, 25, 50])
@pytest.mark.parametrize("cls,spacing,offset,ours", ROWS,
                         ids=[f"{c.__name__}-{s}-{o}" for c, s, o, _ in ROWS])
def test_named_spacing_is_the_diffusers_grid(cls, spacing, offset, ours, steps):
    scheduler = cls(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    grid = VPDiscrete.linear().timesteps(steps, ours)
    # diffusers keeps timesteps in float32 (fractional ones for Euler "linspace"): compare there.
    assert torch.equal(grid[:-1].float(), scheduler.timesteps.float()) and grid[-1] == -1.0


@pytest.mark.parametrize("process", ["vp-continuous", "edm", "flow"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_gives_a_strictly_decreasing_grid_ending_at_data(process, spacing):
    proc = make_process(process)
    grid = proc.timesteps(10, spacing)
    assert len(grid) == 11 and bool((grid[1:] < grid[:-1]).all()) and grid[-1] == proc.t_data
