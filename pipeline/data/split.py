"""A split of a dataset in memory, and the one conversion of its uint8 pixels into the networks' range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Split:
    """One split in memory: ``images`` uint8 (N, height, width) grey or (N, channels, height, width), ``labels``
    int64 (N,) (-1 where the data has no classes)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) grey or (B, C, H, W) -> float (B, C, H, W) in [-1, 1], the generator's Tanh range (torch's
    default dtype)."""
    import torch

    if images_uint8.dim() == 3:
        images_uint8 = images_uint8.unsqueeze(1)
    return images_uint8.to(torch.get_default_dtype()).div_(127.5).sub_(1.0)
