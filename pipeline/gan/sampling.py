"""Images from a generator: the fixed noise of a run's sample grids, and batches of uint8 images to score or save."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.gan.models import Generator

NUM_GRID_SAMPLES = 64  # an 8x8 grid from fixed noise


def fixed_noise(latent_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """The same 64 latent vectors for every sample grid of a run."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 12345)
    return torch.randn(NUM_GRID_SAMPLES, latent_dim, generator=gen).to(device)


@torch.no_grad()
def sample_images(generator: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Generate in eval mode (BatchNorm running statistics) as uint8 on the CPU: (N, H, W) grey images, (N, C, H, W)
    with more channels.

    A generator loaded from MLflow (a torch.export program) was exported in eval mode and refuses
    mode switches; it is called as it is.
    """
    switch = isinstance(generator, Generator)
    was_training = generator.training
    if switch:
        generator.eval()
    try:
        out = generator(z)
    finally:
        if switch:
            generator.train(was_training)
    return out.squeeze(1).add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def generate_images(
    generator: nn.Module, num: int, latent_dim: int, seed: int, device: torch.device, psi: float = 1.0
) -> torch.Tensor:
    """``num`` uint8 images from noise seeded by ``seed`` (the same noise at every evaluation of a run), truncated by
    ``psi`` (pipeline.gan.views)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 54321)
    chunks = []
    for start in range(0, num, 1000):
        z = torch.randn(min(1000, num - start), latent_dim, generator=gen) * psi
        chunks.append(sample_images(generator, z.to(device)))
    return torch.cat(chunks)
