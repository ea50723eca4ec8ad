"""Ways of looking at a generator beyond a grid of samples: the truncation trick, walks through the latent space (a
grid of rows or an animated GIF) and, beside a few samples, the training images nearest them (a memorisation check).

The latent is the DCGAN's z ~ N(0, I), with no mapping network: truncation ``psi`` scales z towards its mean, 0
(StyleGAN's trick in the only latent there is; psi = 1 leaves it, smaller trades variety for typical images), and a
walk goes along great circles between random points (spherical interpolation keeps each point's norm typical of a
Gaussian, where a straight line would pass through the unusually short vectors near 0).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.gan.sampling import generate_images

NEAREST_SAMPLES = 16  # samples shown beside their nearest training images at a run's end
NEAREST_NEIGHBOURS = 3  # training images beside each
NEAREST_POOL = 10_000  # training images searched in a streamed set (one in memory is searched whole)


def noise(num: int, latent_dim: int, seed: int, psi: float = 1.0) -> torch.Tensor:
    """``num`` latent vectors from noise seeded by ``seed``, truncated by ``psi`` (on the CPU)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 54321)
    return torch.randn(num, latent_dim, generator=gen) * psi


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points ``t`` (T,) of the way along the great circle from each row of ``a`` to ``b`` (N, D): (N, T, D), the norm
    interpolated linearly between the ends'."""
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.acos((ua * ub).sum(1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # (N, 1)
    t = t[None, :, None]
    omega, so = omega[:, None], torch.sin(omega)[:, None]
    direction = (torch.sin((1 - t) * omega) * ua[:, None] + torch.sin(t * omega) * ub[:, None]) / so
    return direction * ((1 - t) * na[:, None] + t * nb[:, None])


def walk(rows: int, steps: int, latent_dim: int, seed: int, psi: float = 1.0, loop: int = 0) -> torch.Tensor:
    """Latent walks: ``rows`` walks between two random points in ``steps`` steps each, (rows * steps, D) row by row;
    with ``loop`` > 1, instead ``rows`` walks through ``loop`` points and back to the first, ``steps`` steps between
    each two, as (loop * steps, rows, D): the frames of an animation."""
    points = noise(rows * max(loop, 2), latent_dim, seed, psi).view(max(loop, 2), rows, latent_dim)
    if loop <= 1:
        t = torch.linspace(0, 1, steps)
        return slerp(points[0], points[1], t).reshape(rows * steps, latent_dim)
    t = torch.arange(steps) / steps  # the next point is the next leg's first frame
    legs = [slerp(points[i], points[(i + 1) % loop], t) for i in range(loop)]  # each (rows, steps, D)
    return torch.cat(legs, dim=1).transpose(0, 1).contiguous()


def gif(frames: list[torch.Tensor], path: str, nrow: int, ms_per_frame: int = 80) -> None:
    """uint8 image batches (one per frame), each as a grid of ``nrow`` per row, as a looping animated GIF."""
    from PIL import Image
    from torchvision.utils import make_grid

    pictures = []
    for images in frames:
        images = images.unsqueeze(1) if images.dim() == 3 else images
        grid = make_grid(images, nrow=nrow, padding=2, pad_value=128)
        pictures.append(Image.fromarray(grid.permute(1, 2, 0).numpy()))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=ms_per_frame, loop=0)


def nearest_training(samples: torch.Tensor, training: torch.Tensor, k: int = NEAREST_NEIGHBOURS) -> torch.Tensor:
    """Each uint8 sample followed by its ``k`` nearest uint8 training images in pixel space (Euclidean), all shaped
    as the data is: ((k + 1) * N, ...), ready to lay out ``k + 1`` to a row (or twice that). The training images are
    compared a thousand at a time (memory: a thousand in float, whatever their number)."""
    flat = samples.reshape(len(samples), -1).float().to(training.device)
    pool = training.reshape(len(training), -1)
    distances = torch.cat([torch.cdist(flat, chunk.float()) for chunk in pool.split(1000)], dim=1)
    nearest = distances.topk(k, dim=1, largest=False).indices  # (N, k), on the training images' device
    # Shown as the samples are: grey training images may be held with their one channel, samples come without.
    rows = [
        torch.cat([samples[i : i + 1], training[nearest[i]].cpu().reshape(k, *samples.shape[1:])])
        for i in range(len(samples))
    ]
    return torch.cat(rows)


def nearest_grid(
    generator: nn.Module, training: torch.Tensor, latent_dim: int, seed: int, device: torch.device
) -> torch.Tensor:
    """:data:`NEAREST_SAMPLES` samples of ``generator`` (on ``device``, from noise seeded by ``seed``), each beside
    its nearest ``training`` images (uint8, wherever they are): a grid's images, eight to a row."""
    samples = generate_images(generator, NEAREST_SAMPLES, latent_dim, seed + 1, device)
    return nearest_training(samples, training)
