"""Guidance plugins: ``none`` (the model as it is)."""
from __future__ import annotations

import diffbench
from diffbench.registry import Guidance


@diffbench.hookimpl
def register_guidance(register):
    register(Guidance(name="none", family="any", apply=lambda denoiser: denoiser, conditional=False,
                      description="no guidance: the model's own (conditional, if it is) prediction"))
