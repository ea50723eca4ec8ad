"""DiffAugment (Zhao et al. 2020): the same differentiable augmentation of the images D sees, real and generated, in
D's step and of G's images in G's, so that D cannot memorise a small set and G's gradients pass through.

Three kinds, each applied to an image with probability ``p``, always in this order: colour (brightness, saturation,
contrast), translation (up to 1/8 of the side, zero padded) and cutout (a square of half the side set to zero, its
centre anywhere in the image, clipped at the border), each as the paper's official code draws it. Every random
number is drawn by the caller for the whole global batch (:func:`draw`), so a run's augmentations do not depend on
how many workers share it, and everything stays on the device: no host round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Per image, the columns of its draws: 0-2 whether colour, translation and cutout apply; 3-5 brightness, saturation
# and contrast; 6-7 the translation (rows, columns); 8-9 the cutout's top and left.
DRAWS = 10


def draw(count: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) draws for ``count`` images' augmentations: (count, DRAWS)."""
    return torch.rand(count, DRAWS, device=device, generator=generator)


def augment(images: torch.Tensor, u: torch.Tensor, p: float | torch.Tensor, kinds: tuple[str, ...]) -> torch.Tensor:
    """``images`` (N, C, H, W) in [-1, 1] augmented by ``kinds`` with the draws ``u`` (N, DRAWS), each kind on an
    image where its apply draw is below ``p``; differentiable in ``images``."""
    x = images
    if "color" in kinds:
        x = _color(x, u, p)
    if "translation" in kinds:
        x = _translation(x, u, p)
    if "cutout" in kinds:
        x = _cutout(x, u, p)
    return x


def _on(u: torch.Tensor, column: int, p: float | torch.Tensor) -> torch.Tensor:
    """(N, 1, 1, 1): 1.0 where the kind of apply draw ``column`` is on for that image, else 0.0."""
    return (u[:, column] < p).to(u.dtype)[:, None, None, None]


def _color(x: torch.Tensor, u: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    y = x + (u[:, 3, None, None, None] - 0.5).to(x.dtype)  # brightness
    if y.shape[1] > 1:  # saturation: only colour images have any
        mean = y.mean(dim=1, keepdim=True)
        y = mean + (y - mean) * (u[:, 4, None, None, None] * 2).to(x.dtype)
    mean = y.mean(dim=[1, 2, 3], keepdim=True)
    y = mean + (y - mean) * (u[:, 5, None, None, None] + 0.5).to(x.dtype)  # contrast
    return torch.where(_on(u, 0, p).bool(), y, x)


def _translation(x: torch.Tensor, u: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    shift_h, shift_w = max(1, int(h / 8 + 0.5)), max(1, int(w / 8 + 0.5))  # rounded as the official code does
    on = _on(u, 1, p).flatten().long()
    dy = ((u[:, 6] * (2 * shift_h + 1)).long() - shift_h) * on
    dx = ((u[:, 7] * (2 * shift_w + 1)).long() - shift_w) * on
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None]  # (N, H): the source row of each target row
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None]
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
    rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    index = torch.arange(n, device=x.device)[:, None, None]
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    moved = x.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return (moved * inside.to(x.dtype)).contiguous(memory_format=layout)  # D's layout, as it came


def _cutout(x: torch.Tensor, u: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    _, _, h, w = x.shape
    on = _on(u, 2, p).flatten().bool()
    size_h, size_w = int(h / 2 + 0.5), int(w / 2 + 0.5)
    # The centre anywhere (the official code's offsets), the square clipped by the masks below.
    top = (u[:, 8] * (h + 1 - size_h % 2)).long() - size_h // 2
    left = (u[:, 9] * (w + 1 - size_w % 2)).long() - size_w // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size_h)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size_w)
    hole = in_rows[:, :, None] & in_cols[:, None, :] & on[:, None, None]
    return x * (~hole)[:, None].to(x.dtype)


ADA_INTERVAL = 4  # steps between adjustments of an adaptive probability (ADA's)


class AdaptiveP:
    """ADA's augmentation probability (Karras et al. 2020, ``train.augment_target``): D's real logits are watched
    (:meth:`observe`), and every :data:`ADA_INTERVAL` steps r_t = E[sign D(x)] over every worker's real images
    since the last adjustment moves p by ``batch * ADA_INTERVAL / speed`` towards more augmentation when r_t is above
    the target (D is sure of the real images: it is overfitting) and less when below; p stays in [0, 1]. p and the
    sums live on the device: no host round trip per step."""

    def __init__(self, p: float, target: float, batch: int, speed: int, device: torch.device):
        self.p = torch.tensor(p, dtype=torch.float64, device=device)
        self.target = target
        self.step_size = batch * ADA_INTERVAL / speed
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum of signs, count of logits
        self.r_t = torch.full((), float("nan"), dtype=torch.float64, device=device)  # the last adjustment's

    def observe(self, real_logits: torch.Tensor) -> None:
        logits = real_logits.detach()
        self.sums[0] += logits.sign().sum(dtype=torch.float64)  # exact: bf16 counts only to 256
        self.sums[1] += logits.numel()  # a number, not a tensor copied to the device

    def share(self, mean_over_workers: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The sums since the last adjustment averaged over the workers, on each (a checkpoint's moment: rank 0's
        copy is then every worker's, and the next adjustment's mean is what it would have been)."""
        self.sums = mean_over_workers(self.sums)

    def adjust(self, mean_over_workers: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One adjustment from the sums since the last, over every worker (the same p on each); then the sums
        restart."""
        sums = mean_over_workers(self.sums)
        self.r_t = sums[0] / sums[1].clamp(min=1)
        self.p = (self.p + torch.sign(self.r_t - self.target) * self.step_size).clamp(0.0, 1.0)
        self.sums.zero_()

    def to_dict(self) -> dict[str, float | list[float]]:
        return {"p": float(self.p), "sums": self.sums.tolist(), "r_t": float(self.r_t)}

    def load(self, saved: dict[str, Any]) -> None:
        self.p.fill_(saved["p"])
        self.sums.copy_(torch.tensor(saved["sums"], dtype=torch.float64))
        self.r_t.fill_(saved["r_t"])
