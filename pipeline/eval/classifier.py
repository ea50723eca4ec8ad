"""The dataset's own classifier, whose features score generated images (TF-GAN's ``mnist_frechet_distance`` does
the same for small grey images), and its training: Adam with a one-cycle schedule and random shifts."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.specs import DatasetSpec
from pipeline.data.split import Split, to_model_range

FEATURE_DIM = 128
EVAL_BATCH = 1000


class Classifier(nn.Module):
    """Two conv blocks and a 128-unit layer (the FID features) before the class logits, for ``spec``'s images;
    images larger than 32 px are first averaged down to 32 px (2x2 or 4x4 average pooling): a cheap evaluator
    whatever the side, which sees what a 32 px thumbnail shows."""

    def __init__(self, spec: DatasetSpec) -> None:
        super().__init__()
        scale = max(1, spec.image_size // 32)
        side = spec.image_size // scale // 4  # after two 2x2 max-pools
        self.features = nn.Sequential(
            *([nn.AvgPool2d(scale)] if scale > 1 else []),
            nn.Conv2d(spec.channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * side * side, FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, spec.num_classes)
        self.side = spec.image_size

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, side, classes): what rebuilds this network elsewhere."""
        first = next(m for m in self.features if isinstance(m, nn.Conv2d))
        return first.in_channels, self.side, self.head.out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) for images in [-1, 1]."""
        feats = self.features(x)
        return feats, self.head(self.dropout(feats))


def train_classifier(
    spec: DatasetSpec, train: Split, test: Split, epochs: int = 4, seed: int = 0, progress=print
) -> tuple[Classifier, float]:
    """Train the evaluator (Adam, one-cycle schedule, light shift augmentation) for ``epochs``, or for as many as
    the spec's ``evaluator_min_steps`` take on a small set (an image folder's); return it and its test accuracy."""
    torch.manual_seed(seed)
    model = Classifier(spec)
    batch = min(128, len(train))  # a folder of fewer images trains on all of them each step
    per_epoch = len(train) // batch
    epochs = max(epochs, -(-spec.evaluator_min_steps // per_epoch))
    steps = epochs * (len(train) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(len(train) // batch):
            idx = order[i * batch : (i + 1) * batch]
            x = to_model_range(train.images[idx])
            # Random shifts of up to 2 pixels: cheap augmentation that buys the last tenths of a percent.
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            _, logits = model(x)
            loss = F.cross_entropy(logits, train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % -(-epochs // 8) and epoch + 1 < epochs:
            continue  # at most 8 lines however many epochs a small set takes
        accuracy = classifier_accuracy(model, test)
        progress(
            f"[eval] evaluator epoch {epoch + 1}/{epochs}: test accuracy {accuracy:.4f} "
            f"({time.perf_counter() - started:.0f}s)"
        )
    return model, accuracy


@torch.no_grad()
def classifier_accuracy(model: Classifier, split: Split) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), EVAL_BATCH):
        _, logits = model(to_model_range(split.images[start : start + EVAL_BATCH]))
        correct += int((logits.argmax(1) == split.labels[start : start + EVAL_BATCH]).sum())
    return correct / len(split)
