"""``caption-acc``: how well text-to-image samples show what their caption asks for (a CLIP-score
analogue for ``shapes-text``).

A shipped attribute classifier ``shapes-text-cnn`` (the :class:`ConvClassifier` of
:mod:`diffbench_plugins.classifier` with 2×2 pooling so it sees where a shape is, one softmax head
per attribute over its slice of the logits) predicts colour, shape, size and position; a sample
scores the fraction of the four it gets right. Columns: ``caption-acc[seen]`` over samples whose
combination was in the training set, ``caption-acc[held-out]`` over held-out combinations. The same
network's penultimate features are the domain extractor that FID uses on this dataset.

Train it with ``python -m diffbench_plugins.caption_metric [--steps N]``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import diffbench
from diffbench.checkpoints import training_output
from diffbench.metrics import MetricContext
from diffbench.registry import Incompatible, Metric
from diffbench.samples import SampleSet, as_sample_set, from_uint8, to_uint8
from diffbench.training import TrainConfig, train
from diffbench_plugins.classifier import ConvClassifier, load_classifier
from diffbench_plugins.text_image_data import ATTRIBUTES, attribute_indices, draw_captioned_shapes, load_shapes_text

HEAD_SIZES = [len(values) for values in ATTRIBUTES.values()]  # logits slices, one per attribute


def attribute_logits(net: ConvClassifier, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One logits tensor [B, |values|] per attribute."""
    return net(x).split(HEAD_SIZES, dim=1)


@torch.no_grad()
def predict_attributes(net: ConvClassifier, x: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> predicted attribute value indices [N, len(ATTRIBUTES)]."""
    batches = [torch.stack([lg.argmax(1) for lg in attribute_logits(net, b)], 1) for b in x.split(512)]
    return torch.cat(batches)


def attribute_loss(net, x, labels, generator) -> torch.Tensor:
    """Sum over attributes of the cross-entropy of each head."""
    targets = attribute_indices(labels)
    return sum(F.cross_entropy(lg, targets[:, i]) for i, lg in enumerate(attribute_logits(net, x)))


def train_attribute_classifier(dataset, *, steps: int = 400, batch_size: int = 64, lr: float = 2e-3, width: int = 32,
                               seed: int = 0, out=None):
    """Cross-entropy training on 8000 fresh images of every combination (held-out ones included: the
    classifier judges attributes, it is not the generative model), drawn with another seed than
    the dataset's, so the dataset's reference images stay unseen."""
    x, labels = draw_captioned_shapes(8000, dataset.shape[-1], seed=seed + 1000)
    net = ConvClassifier(x.shape[1], sum(HEAD_SIZES), width, pool=2)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=0.99, checkpoint_every=10**9)
    record = {"dataset": dataset.name, "in_channels": x.shape[1], "num_classes": sum(HEAD_SIZES), "width": width,
              "process": None, "pool": 2, "heads": dict(zip(ATTRIBUTES, HEAD_SIZES))}
    out = training_output(f"{dataset.name}-cnn", out)  # the user cache unless out (e.g. the shipped folder)
    train(net, attribute_loss, x, labels, out, record, cfg)
    return out


def caption_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, the fraction of asked attributes shown: [N]."""
    return (predicted == attribute_indices(labels)).float().mean(1)


def compute_caption_acc(samples: SampleSet | torch.Tensor, ctx: MetricContext) -> dict[str, float]:
    if "attributes" not in ctx.dataset.info or not hasattr(ctx.dataset, "held_out"):
        raise Incompatible(f"caption-acc needs a captioned dataset (shapes-text); {ctx.dataset.name!r} has no attributes")
    if ctx.labels is None:
        raise Incompatible("caption-acc needs samples conditioned on the dataset's captions (the model is "
                           "unconditional, or conditioned on its own prompts)")
    net = load_classifier(f"{ctx.dataset.name}-cnn", ctx.device)
    # judge what an image file holds (streamed samples are read back from such files), a batch at a time
    predicted = torch.cat([predict_attributes(net, from_uint8(to_uint8(x)).to(ctx.device)).cpu()
                           for x in as_sample_set(samples).batches(512)])
    scores = caption_accuracy(predicted, ctx.labels.cpu())
    held_out = torch.isin(ctx.labels.cpu(), torch.tensor(ctx.dataset.held_out, dtype=torch.long))
    groups = {"caption-acc[seen]": ~held_out, "caption-acc[held-out]": held_out}
    return {column: float(scores[group].mean()) for column, group in groups.items() if group.any()}  # no empty mean


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the shapes-text attribute classifier (caption-acc, FID features)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args(argv)
    dataset = load_shapes_text()
    tic = time.time()
    path = train_attribute_classifier(dataset, steps=args.steps, width=args.width)
    net = load_classifier(path.name)
    x, labels = dataset.reference(2000)
    per_attribute = (predict_attributes(net, x) == attribute_indices(labels)).float().mean(0)
    print(f"{path.name}: accuracy on 2000 reference images per attribute "
          f"{dict(zip(ATTRIBUTES, [round(float(a), 4) for a in per_attribute]))} ({time.time() - tic:.0f} s)")


@diffbench.hookimpl
def register_metrics(register):
    register(Metric(name="caption-acc", family="image", compute=compute_caption_acc, higher_is_better=True, streaming=True,
                    description="fraction of caption attributes (colour, shape, size, position) the shipped attribute "
                                "classifier sees; columns caption-acc[seen] / caption-acc[held-out]"))


if __name__ == "__main__":
    main()
