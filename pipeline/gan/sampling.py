"""Images from a generator: the fixed noise of a run's sample grids, and batches of uint8 images to score or save."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.gan.models import Generator, with_classes

NUM_GRID_SAMPLES = 64  # an 8x8 grid from fixed noise
GRID_CLASSES = 16  # rows of a conditional generator's grid, one per class


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


def generate_images(  # noqa: PLR0913 - the sample's every choice, each with its default
    generator: nn.Module,
    num: int,
    latent_dim: int,
    seed: int,
    device: torch.device,
    psi: float = 1.0,
    class_weights: torch.Tensor | list[float] | None = None,
    label: int | None = None,
) -> torch.Tensor:
    """``num`` uint8 images from noise seeded by ``seed`` (the same noise at every evaluation of a run), truncated by
    ``psi`` (pipeline.gan.views). A conditional generator's classes: all ``label`` where given, else drawn (seeded
    too) from ``class_weights`` (a loaded model's facts) or the generator's own training-set frequencies."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 54321)
    labels = sample_classes(generator, num, seed, class_weights, label)
    chunks = []
    for start in range(0, num, 1000):
        z = torch.randn(min(1000, num - start), latent_dim, generator=gen) * psi
        z = with_classes(z, labels[start : start + len(z)] if labels is not None else None)
        chunks.append(sample_images(generator, z.to(device)))
    return torch.cat(chunks)


def sample_classes(
    generator: nn.Module, num: int, seed: int, weights: torch.Tensor | list[float] | None, label: int | None
) -> torch.Tensor | None:
    """The classes of ``num`` samples of a conditional generator (None for an unconditional one)."""
    if weights is None:
        weights = getattr(generator, "class_weights", None)
    if weights is None:
        if label is not None:
            raise ValueError("a class was asked of a generator trained without classes (model.conditional=false)")
        return None
    weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
    if label is not None:
        if not 0 <= label < len(weights):
            raise ValueError(f"class {label}: this generator knows classes 0 to {len(weights) - 1}")
        return torch.full((num,), label, dtype=torch.int64)
    return torch.multinomial(weights, num, True, generator=torch.Generator().manual_seed(seed + 777))


def grid_noise(generator: nn.Module, latent_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """A run's sample grids' input: the fixed noise; for a conditional generator, a row per class (the first
    :data:`GRID_CLASSES`), each the same 8 noise vectors, so a column shows one noise across the classes."""
    z = fixed_noise(latent_dim, seed, device)
    classes = getattr(generator, "classes", 0)
    if not classes:
        return z
    shown = min(classes, GRID_CLASSES)
    labels = torch.arange(shown, device=device).repeat_interleave(8)
    return with_classes(z[:8].repeat(shown, 1), labels)
