"""Sharded runs under torchrun (gloo, CPU): the same samples and metrics as one process for any
world size, a rank that raises or hangs ends cleanly, and all-reduced FID statistics."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from diffbench.distributed import Shard, assemble, feature_moments, moments_to_statistics

# 200 samples in batches of 48: 5 batches (the last of 8), so 2 and 3 ranks get unequal shares.
GRID = ["run", "--models", "gmm-oracle,unet", "--samplers", "ddpm,ddim", "--steps", "4",
        "--datasets", "gmm-2d,digits", "--metrics", "swd,fid,precision-recall", "--num-samples", "200",
        "--batch-size", "48", "--repeats", "1", "--save-samples", "--keep-samples", "--quiet"]
RANK_BOMB = textwrap.dedent('''
    """DDIM, except on rank 1: raises (mode=raise) or hangs (mode=hang)."""
    import os
    import time

    import diffbench
    from diffbench.registry import Option, Sampler
    from diffbench_plugins.samplers import sample_ddim


    def sample(denoiser, x, timesteps, *, generator, mode="raise"):
        if os.environ.get("RANK") == "1":
            if mode == "hang":
                time.sleep(3600)
            raise RuntimeError("boom on rank 1")
        return sample_ddim(denoiser, x, timesteps, generator=generator)


    @diffbench.hookimpl
    def register_samplers(register):
        register(Sampler(name="rank-bomb", family="gaussian", fn=sample, description="DDIM, except on rank 1",
                         options={"mode": Option("raise", choices=("raise", "hang"))}))
''')


def torchrun(nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "diffbench", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    done = subprocess.run([sys.executable, "-m", "diffbench", *GRID, "--in-process", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def assert_same_run(sharded, one, world_size: int) -> None:
    a, b = pd.read_csv(one / "results.csv"), pd.read_csv(sharded / "results.csv")
    b = b[b["sampler"] != "rank-bomb"].reset_index(drop=True)
    same = ["model", "sampler", "dataset", "status", "nfe", "swd", "fid[digits-cnn]", "fid[digits-cnn]_ci95",
            "precision[digits-cnn]", "recall[digits-cnn]", "protocol[digits-cnn]"]
    assert (a["status"] == "ok").sum() == 4  # unet on digits, gmm-oracle on gmm-2d (the others are skipped)
    pd.testing.assert_frame_equal(a[same], b[same])  # metric values exactly equal
    assert (a["world_size"] == 1).all() and (b["world_size"] == world_size).all()
    for saved in (one / "samples").glob("*.safetensors"):
        x, y = load_file(str(saved)), load_file(str(sharded / "samples" / saved.name))
        assert torch.equal(x["x_T"], y["x_T"]) and torch.equal(x["x_0"], y["x_0"]), saved.name  # bit for bit
    streamed = sorted(p.relative_to(one) for p in (one / "samples").glob("*/*.png"))  # every rank wrote its batches
    assert len(streamed) == 2 * 200 and all((one / p).read_bytes() == (sharded / p).read_bytes() for p in streamed)


def test_two_ranks_equal_one_process_and_a_raising_rank_fails_its_cell(one_process, tmp_path):
    plugin = tmp_path / "rank_bomb.py"
    plugin.write_text(RANK_BOMB)
    grid = GRID.copy()
    grid[grid.index("ddpm,ddim")] = "ddpm,ddim,rank-bomb"
    done = torchrun(2, *grid, "--plugin", plugin, "--out", tmp_path / "run")
    assert done.returncode == 1, done.stderr[-3000:]  # one cell failed
    assert_same_run(tmp_path / "run", one_process, 2)
    df = pd.read_csv(tmp_path / "run" / "results.csv")
    bombed = df[(df["sampler"] == "rank-bomb") & (df["status"] != "skipped")]
    assert len(bombed) == 2 and set(bombed["status"]) == {"failed"}
    assert bombed["reason"].str.contains("rank 1 of 2 failed:.*boom on rank 1").all()


def test_three_ranks_on_a_count_they_do_not_divide_equal_one_process(one_process, tmp_path):
    done = torchrun(3, *GRID, "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "run", one_process, 3)


def test_a_hanging_rank_ends_the_run_with_exit_1_after_the_timeout(tmp_path):
    plugin = tmp_path / "rank_bomb.py"
    plugin.write_text(RANK_BOMB)
    tic = time.monotonic()
    done = torchrun(2, "run", "--models", "gmm-oracle", "--samplers", "rank-bomb[mode=hang]", "--steps", "2",
                    "--datasets", "gmm-2d", "--metrics", "swd", "--num-samples", "64", "--batch-size", "32",
                    "--quiet", "--plugin", plugin, "--cell-timeout", "5", "--out", tmp_path / "run", timeout=240)
    assert done.returncode == 1
    assert "another rank died or did not answer within --cell-timeout 5 s" in done.stderr
    assert time.monotonic() - tic < 200  # start-up of 2 ranks on a busy 2-core machine, plus the 5 s timeout


def test_shares_cover_every_sample_once_and_reassemble_in_order():
    n, batch = 103, 10
    for world in (1, 2, 3, 7, 16):
        shards = [Shard(rank, world) for rank in range(world)]
        indices = sorted(i for s in shards for b in s.batches(n, batch) for i in b)
        assert indices == list(range(n))
        parts = [(s.batches(n, batch), torch.tensor([i for b in s.batches(n, batch) for i in b]))
                 for s in shards if s.batches(n, batch)]
        assert torch.equal(assemble(parts, n), torch.arange(n))


def _reduce_moments(rank: int, world: int, init: str, features: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    share = features[rank::world]  # an uneven share: 101 rows over 2 ranks
    moments = Shard(rank, world).all_reduce(feature_moments(share))
    if rank == 0:
        mu, sigma = moments_to_statistics(moments)
        save_file({"mu": mu, "sigma": sigma.contiguous()}, out)
    dist.destroy_process_group()


def test_all_reduced_fid_statistics_equal_those_of_the_gathered_features(tmp_path):
    from torch_fidelity.metric_fid import fid_features_to_statistics

    features = torch.randn(101, 16, generator=torch.Generator().manual_seed(0)).double() * 3 + 1
    out = tmp_path / "stats.safetensors"
    mp.spawn(_reduce_moments, args=(2, f"file://{tmp_path / 'store'}", features, str(out)), nprocs=2)
    reduced = load_file(str(out))
    gathered = fid_features_to_statistics(features)  # torch-fidelity's μ and np.cov on all features
    np.testing.assert_allclose(reduced["mu"].numpy(), gathered["mu"], rtol=1e-12)
    np.testing.assert_allclose(reduced["sigma"].numpy(), gathered["sigma"], rtol=1e-10, atol=1e-12)
