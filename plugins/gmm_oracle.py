"""The ``gmm-oracle`` model: the exact denoiser E[x0 | x_t] of a Gaussian-mixture dataset.

It is the ground truth every sampler can be checked against: with a perfect denoiser, the
only error left in a sample is the sampler's discretisation error.
"""
from __future__ import annotations

import diffbench
from diffbench.gmm import oracle_denoiser
from diffbench.process import PROCESSES, make_process
from diffbench.registry import Incompatible, Model, Option


def load_gmm_oracle(dataset, *, device="cpu", process="vp-linear"):
    if dataset.mixture is None:
        raise Incompatible(f"gmm-oracle needs a Gaussian-mixture dataset (mog-1d, gmm-2d); {dataset.name!r} is not one")
    return oracle_denoiser(dataset.mixture, make_process(process))


@diffbench.hookimpl
def register_models(register):
    register(Model(name="gmm-oracle", family="gaussian", load=load_gmm_oracle,
                   description="exact posterior-mean denoiser of a Gaussian mixture, under any Gaussian process",
                   options={"process": Option("vp-linear", choices=tuple(PROCESSES))}, datasets=("gmm-2d", "mog-1d")))
