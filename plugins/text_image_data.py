"""The ``shapes-text`` dataset: procedural 32×32 shapes with captions built from their attributes,
"a small red triangle at the top left", for text-to-image diffusion.

Four attributes (colour × shape × size × position = 4 × 4 × 2 × 4 = 128 combinations) are drawn
independently; each image's label is its combination index (mixed radix over ``ATTRIBUTES``), so
the runner's balanced labels, CFG's null class and the metrics work as they do on class labels,
and ``info["captions"][label]`` is the text a model conditions on. One combination in
``held_out`` (default 8) is held out: never in the training set, but in the reference set and in
the labels a grid samples, so ``caption-acc`` can score compositional generalisation. The held-out
rule, (colour + 2·shape + size + position) mod ``held_out`` = 0, keeps every pair of attribute
values in training. Shapes are drawn by :func:`diffbench_plugins.image_data.render_shapes`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import diffbench
from diffbench.data import DataSource
from diffbench.registry import ConfigError, Dataset
from diffbench_plugins.image_data import SHAPE_CLASSES, render_shapes

COLOURS = {"red": (1.0, 0.2, 0.2), "green": (0.2, 0.9, 0.2), "blue": (0.25, 0.4, 1.0), "yellow": (1.0, 0.9, 0.2)}
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
             "bottom right": (0.72, 0.72)}  # (x, y) centre as a fraction of the image side
SIZES = {"small": (0.14, 0.18), "large": (0.22, 0.27)}  # half-extent range as a fraction of the side
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPE_CLASSES, "size": tuple(SIZES), "position": tuple(POSITIONS)}


def caption(values: dict[str, str]) -> str:
    return f"a {values['size']} {values['colour']} {values['shape']} at the {values['position']}"


def combinations() -> list[dict[str, str]]:
    """Every attribute combination, in label order (the last attribute varies fastest)."""
    return [dict(zip(ATTRIBUTES, values)) for values in itertools.product(*ATTRIBUTES.values())]


def attribute_indices(labels: torch.Tensor) -> torch.Tensor:
    """Combination labels [n] -> attribute value indices [n, len(ATTRIBUTES)] (mixed radix)."""
    out, rest = [], labels.clone()
    for values in reversed(ATTRIBUTES.values()):
        out.append(rest % len(values))
        rest = rest // len(values)
    return torch.stack(out[::-1], dim=1)


def held_out_labels(every: int) -> torch.Tensor:
    """Combinations never trained on: (colour + 2·shape + size + position) mod ``every`` = 0."""
    if every <= 0:
        return torch.zeros(0, dtype=torch.long)
    idx = attribute_indices(torch.arange(len(combinations())))
    key = idx[:, 0] + 2 * idx[:, 1] + idx[:, 2] + idx[:, 3]
    return torch.nonzero(key % every == 0).flatten()


def draw_captioned_shapes(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n, 3, size, size] in [-1, 1] with uniformly drawn combination labels [n]; colours
    jitter by ±0.1 per channel and centres by ±1 pixel around the named position."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(combinations()), (n,), generator=g)
    colour_i, shape_i, size_i, position_i = attribute_indices(labels).unbind(1)
    lo, hi = (torch.tensor([s[k] for s in SIZES.values()]) for k in (0, 1))
    r = size * (lo[size_i] + (hi - lo)[size_i] * torch.rand(n, generator=g))
    centre = torch.tensor(list(POSITIONS.values()))[position_i] * size + (2 * torch.rand(n, 2, generator=g) - 1)
    colour = (torch.tensor(list(COLOURS.values()))[colour_i] + 0.2 * torch.rand(n, 3, generator=g) - 0.1).clamp(0, 1)
    return render_shapes(shape_i, r, centre[:, 0], centre[:, 1], colour, size), labels


@dataclass
class CaptionedImages(DataSource):
    """Images with combination labels whose training set leaves out the ``held_out`` labels."""

    held_out: tuple[int, ...] = ()

    def train_set(self, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
        x, labels = super().train_set(n)
        seen = ~torch.isin(labels, torch.tensor(self.held_out, dtype=torch.long))
        return x[seen], labels[seen]


def load_shapes_text(num: int = 10000, size: int = 32, seed: int = 0, held_out: int = 8) -> CaptionedImages:
    if size < 16:
        raise ConfigError(f"shapes-text: option 'size' must be at least 16 (positions need room), got {size}")
    x, labels = draw_captioned_shapes(num, size, seed)
    captions = [caption(c) for c in combinations()]
    return CaptionedImages(
        name="shapes-text", modality="image", shape=(3, size, size), examples=x, labels=labels,
        num_classes=len(captions), held_out=tuple(held_out_labels(held_out).tolist()),
        info={"class_names": captions, "captions": captions, "attributes": {k: list(v) for k, v in ATTRIBUTES.items()}},
    )


@diffbench.hookimpl
def register_datasets(register):
    register(Dataset(name="shapes-text", family="image", load=load_shapes_text,
                     options={"num": 10000, "size": 32, "seed": 0, "held_out": 8},
                     description="procedural 32×32 shapes captioned by colour, shape, size and position; "
                                 "1 in `held_out` attribute combinations never trained on"))
