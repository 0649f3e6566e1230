"""Sharded runs under ``torchrun``: torch.distributed plumbing for the grid runner.

``torchrun --nproc-per-node N -m diffbench run ...`` starts N copies of the run; torchrun sets
RANK / WORLD_SIZE / MASTER_ADDR, and :func:`from_env` joins them into one process group (gloo
on CPU, nccl on CUDA, with a gloo side group for the Python objects that are gathered). As in
DiT's ``sample_ddp.py`` and EDM's ``generate.py``, every rank runs every cell, but only its share
of the cell's batches: the single-process run's partition of sample indices into batches
``[0, B), [B, 2B), ...`` is kept, and rank r runs batches r, r+W, r+2W, ... Since x_T and every
noise draw of sample i depend only on (seed, i) (:mod:`diffbench.rng`) and each batch holds
the same samples as in a one-process run, the gathered samples are bit-for-bit those of a
one-process run, whatever the world size. Rank 0 assembles them, computes the metrics and
writes the table; the other ranks only sample.

Cells run in-process on each rank (no supervised worker): a collective inside a forked worker
would need its own process group, and a worker killed mid-collective would leave its peers
waiting. Under torchrun the isolation comes from torchrun itself (its agent ends every rank
when one dies) and from timeouts on the collectives (``--cell-timeout``): a rank that raises
in a cell makes that cell a ``failed`` row on rank 0; a rank that dies or hangs ends the run
with :class:`DistributedError` (exit 1) once the timeout passes.

Multi-node runs use torchrun's rendezvous unchanged, e.g. on every node:
``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m diffbench run ...``
(--out must then be on a filesystem rank 0 can write; only rank 0 writes).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(BaseException):
    """A collective failed or timed out: a rank died or hung. Derives from BaseException, like
    KeyboardInterrupt, because it ends the run rather than one cell (the process group is broken)."""


class RankFailed(Exception):
    """Another rank raised in this cell: the cell fails on rank 0 with that rank's reason."""


@dataclass
class Shard:
    """This process's place in a run: rank ``rank`` of ``world_size`` (0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    objects: Any = None  # the gloo process group used for gathering Python objects
    timeout_s: float = 0.0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def batches(self, num_samples: int, batch_size: int) -> list[range]:
        """This rank's batches of the one-process partition of range(num_samples): r, r+W, ..."""
        starts = range(0, num_samples, batch_size)
        return [range(s, min(s + batch_size, num_samples)) for s in starts][self.rank::self.world_size]

    def _collective(self, fn, *args):
        try:
            fn(*args, group=self.objects)
        except (RuntimeError, ValueError) as exc:  # gloo: a peer closed the connection, or timed out
            raise DistributedError(f"rank {self.rank} of {self.world_size}: another rank died or did not answer "
                                   f"within --cell-timeout {self.timeout_s:g} s ({exc})") from None

    def _all_gather(self, value) -> list:
        out = [None] * self.world_size
        self._collective(dist.all_gather_object, out, value)
        return out

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        return value if self.world_size == 1 else self._all_gather(value if self.is_root else None)[0]

    def gather(self, produce: Callable[[], Any], key: str) -> list | None:
        """Run ``produce()`` on every rank; rank 0 gets every rank's result (in rank order), the
        others None. If a rank raised, it re-raises its own exception and every other rank raises
        RankFailed with its reason, so all ranks leave the cell together. ``key`` (the cell) must
        agree across ranks: a rank that skipped ahead is a bug, and ends the run."""
        try:
            local, error = produce(), None
        except Exception as exc:  # noqa: BLE001  (re-raised below, on this rank, unchanged)
            local, error = None, exc
        if self.world_size == 1:
            if error is not None:
                raise error
            return [local]
        status = self._all_gather((key, None if error is None else f"{type(error).__name__}: {error}"))
        if any(part_key != key for part_key, _ in status):
            raise DistributedError(f"ranks disagree on the cell: {sorted({k for k, _ in status})}")
        if error is not None:
            raise error
        failed = [(rank, why) for rank, (_, why) in enumerate(status) if why]
        if failed:
            raise RankFailed(f"rank {failed[0][0]} of {self.world_size} failed: {failed[0][1]}")
        parts = [None] * self.world_size if self.is_root else None
        self._collective(dist.gather_object, local, parts, 0)
        return parts

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all ranks, in place, on every rank (CPU tensors: the gloo group);
        e.g. :func:`feature_moments` for FID statistics of features spread over ranks."""
        if self.world_size > 1:
            self._collective(dist.all_reduce, tensor)
        return tensor

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def from_env(device: torch.device, timeout_s: float) -> Shard:
    """Join torchrun's process group (when launched by torchrun), else a one-process Shard.
    Collectives time out after ``timeout_s`` seconds."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Shard()
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    objects = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else None
    return Shard(dist.get_rank(), dist.get_world_size(), objects, timeout_s)


def assemble(parts: list[tuple[list[range], torch.Tensor]], num_samples: int) -> torch.Tensor:
    """Rows [num_samples, ...] from each rank's (batches, rows of those batches in order)."""
    first = next(rows for _, rows in parts if len(rows))
    out = torch.empty((num_samples, *first.shape[1:]), dtype=first.dtype)
    for batches, rows in parts:
        index = torch.tensor([i for batch in batches for i in batch], dtype=torch.long)
        out[index] = rows.cpu()
    return out


# ----- feature statistics for FID across ranks (Heusel et al. 2017: FID needs only μ and Σ) ------

def feature_moments(features: torch.Tensor) -> torch.Tensor:
    """[n, F] features -> [F + 1, F + 1] float64 sums: [[n, Σf], [Σf, Σ f fᵀ]] (one all-reduce)."""
    f1 = torch.cat([torch.ones(len(features), 1, dtype=torch.float64), features.double()], 1)  # [n, F+1]
    return f1.T @ f1


def moments_to_statistics(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ [F], Σ [F, F]) with the unbiased covariance Σ = (Σ f fᵀ − n μ μᵀ) / (n − 1), as np.cov."""
    n, sums, outer = moments[0, 0], moments[0, 1:], moments[1:, 1:]
    mu = sums / n
    return mu, (outer - n * torch.outer(mu, mu)) / (n - 1)
