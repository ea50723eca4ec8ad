"""The pictures a run leaves: image grids and matplotlib figures, written as PNG files (the tracker logs them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8) -> None:
    """uint8 images (N, H, W) grey or (N, C, H, W) -> a PNG grid with ``nrow`` images per row."""
    from torchvision.utils import save_image

    if images.dim() == 3:
        images = images.unsqueeze(1)
    save_image(images.float().div(255.0), path, nrow=nrow, padding=2, pad_value=0.5)


@contextlib.contextmanager
def figure(path: str, xlabel: str, ylabel: str, size: tuple[float, float] = (7, 4)) -> Iterator[Any]:
    """A matplotlib axes to draw on; labelled, gridded and saved as a PNG at ``path`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
