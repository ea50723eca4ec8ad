"""A feature extractor for images without classes, trained on the training split with no labels: a conv net at the
images' own side (no pooling down to a thumbnail) whose conv blocks' channel means score generated images.

Two self-supervised objectives are offered; ``scripts/score_degradations.py`` measures which one orders known
degradations correctly (docs/scores.md):

- ``rotation`` (RotNet, Gidaris et al., 2018): predict which of four quarter turns an image was given. To tell an
  upright image from a turned one, the features must encode shapes, edges and where things are.
- ``contrastive`` (SimCLR, Chen et al., 2020, small): two random views of an image (shift, flip, brightness and
  contrast; no blur, so that blur stays visible to the features) must be nearer each other than any other image.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.split import Split, to_model_range

FEATURE_DIM = 128
EVAL_BATCH = 500
OBJECTIVES = ("rotation", "contrastive")


class Extractor(nn.Module):
    """Stride-2 conv blocks (32, 64, 128, 256 channels) down to 4 px or less at the images' own side, then a
    128-unit layer and the objective's head (four rotations, or a projection for the contrastive loss).

    Its features are each conv block's channel means and spatial standard deviations, each block's means and its
    deviations scaled to a root-mean-square entry of 1 over the reference images (:meth:`calibrate`): early blocks
    see edges, texture and noise, later ones shapes, and each part counts alike. The 128-unit layer alone ordered
    FID correctly but not precision under blur or noise (docs/scores.md)."""

    def __init__(self, channels: int, side: int, objective: str = "rotation") -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width, size, inputs = 32, side, channels
        while size > 4:
            blocks.append(
                nn.Sequential(nn.Conv2d(inputs, width, 4, 2, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True))
            )
            inputs, width, size = width, min(2 * width, 256), size // 2
        self.blocks = nn.ModuleList(blocks)
        self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(inputs * size * size, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 4 if objective == "rotation" else 64)
        self.register_buffer("scales", torch.ones(2 * len(blocks)))  # per block's means and stds: 1 / their RMS
        self.objective = objective
        self.channels, self.side = channels, side

    @property
    def shape(self) -> tuple[int, int, str]:
        """(channels, side, objective): what rebuilds this network elsewhere."""
        return self.channels, self.side, self.objective

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, head outputs) for images in [-1, 1]."""
        parts = []
        for block in self.blocks:
            x = block(x)
            parts += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        features = torch.cat([part * scale for part, scale in zip(parts, self.scales, strict=True)], dim=1)
        return features, self.head(self.bottleneck(x))

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> None:
        """Scale each block's means, and its deviations, to a root-mean-square entry of 1 over the uint8 ``images``
        (a batch at a time: 10,000 images of 128 px would not fit in memory at once)."""
        self.eval()
        self.scales.fill_(1.0)
        sizes = [block[0].out_channels for block in self.blocks for _ in range(2)]
        squares = torch.zeros(len(sizes), dtype=torch.float64)
        for start in range(0, len(images), EVAL_BATCH):
            features, _ = self(to_model_range(images[start : start + EVAL_BATCH]))
            for i, part in enumerate(features.split(sizes, dim=1)):
                squares[i] += part.double().pow(2).sum() / sizes[i]
        self.scales.copy_((squares / len(images)).sqrt().clamp_min(1e-12).reciprocal())


def rotations(x: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image in its four quarter turns, and which turn each is; with ``gen``, each image in one random turn
    (a quarter of the work per image)."""
    if gen is None:
        turned = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        return turned, torch.arange(4).repeat_interleave(len(x))
    which = torch.randint(4, (len(x),), generator=gen)
    turned = torch.stack([torch.rot90(image, int(k), dims=(1, 2)) for image, k in zip(x, which, strict=True)])
    return turned, which


def views(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random view of each image: shifted by up to an eighth of its side (wrapping), flipped half the time,
    brightness and contrast jittered by up to 20%."""
    n, side = len(x), x.shape[-1]
    out = torch.empty_like(x)
    shifts = torch.randint(-(side // 8), side // 8 + 1, (n, 2), generator=gen)
    for i in range(n):
        out[i] = torch.roll(x[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    contrast = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    brightness = 0.4 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + brightness).clamp(-1, 1)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent: each view's match is the other view of its image, among all 2N - 1 others."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(a)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(similarity, targets)


def objective_loss(model: Extractor, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if model.objective == "rotation":
        turned, which = rotations(x, gen)
        return F.cross_entropy(model(turned)[1], which)
    return contrastive_loss(model(views(x, gen))[1], model(views(x, gen))[1])


def train_extractor(
    train: Split,
    test: Split,
    objective: str = "rotation",
    steps: int = 600,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> tuple[Extractor, float]:
    """Train the extractor on ``train``'s images (labels unused) for ``steps`` batches of 64 (Adam, one-cycle);
    return it and its held-out figure: rotation accuracy on ``test`` (0.25 is chance), or, for ``contrastive``,
    the share of test images whose nearest other view is their own."""
    torch.manual_seed(seed)
    shape = train.images.shape  # (N, H, W) grey or (N, C, H, W)
    model = Extractor(1 if len(shape) == 3 else shape[1], shape[-1], objective)
    batch = min(64, len(train))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        model.train()
        x = to_model_range(train.images[torch.randint(len(train), (batch,), generator=gen)])
        loss = objective_loss(model, x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 6) == 0 or step + 1 == steps:
            progress(
                f"[eval] extractor ({objective}) step {step + 1}/{steps}: loss {loss.item():.3f} "
                f"({time.perf_counter() - started:.0f}s)"
            )
    return model, held_out(model, test, seed)


@torch.no_grad()
def held_out(model: Extractor, split: Split, seed: int = 0) -> float:
    """How well the objective does on images it did not train on (see :func:`train_extractor`)."""
    model.eval()
    x = to_model_range(split.images[:EVAL_BATCH])
    if model.objective == "rotation":
        turned, which = rotations(x)
        return float((model(turned)[1].argmax(1) == which).float().mean())
    gen = torch.Generator().manual_seed(seed)
    a = F.normalize(model(views(x, gen))[1], dim=1)
    b = F.normalize(model(views(x, gen))[1], dim=1)
    return float(((a @ b.T).argmax(1) == torch.arange(len(x))).float().mean())
