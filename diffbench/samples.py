"""A cell's samples as metrics read them (:class:`SampleSet`), and the folder that image samples
stream to while the cell runs, so that host memory is bounded by the batch size, not by
``--num-samples`` (50,000 samples for a published FID).

Image samples are written batch by batch as they are made, as one PNG per sample:
``samples/<cell>/<i:06d>.png`` (:class:`PNGFolder`). Why this layout: it is the one DiT's
``sample_ddp.py`` writes (every rank saves its own samples as ``{index:06d}.png``; ADM-style
evaluators pack the folder into an .npz) and one torch-fidelity reads as it is
(``fidelity --fid --input1 samples/<cell> --input2 ...``); naming files by sample index lets every
rank of a sharded run write its own batches without coordination, and gives the same folder for
any world size; one file per sample gives random access; PNG is lossless, so what metrics read back
is exactly :func:`to_uint8`, the quantisation reference images get too (FID does not move). npz
shards would be faster to write but no tool reads them without a converter.

Points and token sequences (N × a few numbers) stay in memory as sampled (:class:`TensorSamples`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["SampleSet", "TensorSamples", "PNGFolder", "as_sample_set", "to_uint8", "from_uint8", "streams"]

PNG_CHANNELS = (1, 2, 3, 4)  # PIL modes L, LA, RGB, RGBA


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 in [0, 255]: the quantisation of every image metric, of
    reference images and of the streamed sample files (an image file holds no more)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1]; ``to_uint8(from_uint8(x)) == x`` exactly."""
    return x.float() / 127.5 - 1


def streams(dataset) -> bool:
    """Whether a cell on ``dataset`` (a DataSource) streams its samples to disk: images with channels
    a PNG holds. Points and token sequences are small and stay in memory, float as sampled."""
    shape = tuple(dataset.shape)
    return dataset.modality == "image" and len(shape) == 3 and shape[0] in PNG_CHANNELS


class SampleSet:
    """The samples of a cell, for metrics: ``len(s)``, ``s.read(start, stop)`` (samples start to
    stop, clipped to len(s), [n, *shape] as a float tensor in the data's range: [-1, 1] for images),
    ``s.batches(n)`` (in order, ``n`` at a time) and ``s.load_all()`` (every sample at once: only for
    metrics that need them all together; it costs memory in proportion to the number of samples)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), batch_size):
            yield self.read(start, min(start + batch_size, len(self)))

    def load_all(self) -> torch.Tensor:
        return self.read(0, len(self))


class TensorSamples(SampleSet):
    """Samples held in memory: [N, *shape]."""

    def __init__(self, samples: torch.Tensor):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.samples[start:stop]

    def load_all(self) -> torch.Tensor:
        return self.samples


def as_sample_set(samples: SampleSet | torch.Tensor) -> SampleSet:
    """A SampleSet as it is, a tensor [N, *shape] wrapped (streaming metrics called with a tensor)."""
    return samples if isinstance(samples, SampleSet) else TensorSamples(samples)


class PNGFolder(SampleSet):
    """``num_samples`` images of shape [C, H, W] as ``<directory>/<i:06d>.png``: written by
    :meth:`write` in any order, by any process (each file appears whole, by rename), read back as
    float in [-1, 1]."""

    def __init__(self, directory: str | Path, num_samples: int, shape: Sequence[int]):
        self.directory, self.num_samples, self.shape = Path(directory), num_samples, tuple(shape)

    def __len__(self) -> int:
        return self.num_samples

    def path(self, index: int) -> Path:
        return self.directory / f"{index:06d}.png"

    def write(self, indices: Sequence[int], images: torch.Tensor) -> None:
        """Quantise images [B, C, H, W] in [-1, 1] and write sample ``indices[b]`` of each."""
        self.directory.mkdir(parents=True, exist_ok=True)
        pixels = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()  # [B, H, W, C]
        for index, hwc in zip(indices, pixels):
            tmp = self.directory / f".{index:06d}.png.tmp"
            Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(tmp, format="png", compress_level=1)
            os.replace(tmp, self.path(index))

    def read_uint8(self, index: int) -> torch.Tensor:
        """Sample ``index`` as the uint8 [C, H, W] tensor in its file."""
        with Image.open(self.path(index)) as image:
            hwc = np.asarray(image).reshape(self.shape[1], self.shape[2], self.shape[0])
        return torch.from_numpy(hwc.copy()).permute(2, 0, 1)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return from_uint8(torch.stack([self.read_uint8(i) for i in range(start, min(stop, len(self)))]))
