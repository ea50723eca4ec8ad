"""DCGAN generator and discriminator for 28x28 single-channel images."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from pipeline.config import ModelConfig

T = TypeVar("T")

IMAGE_SIZE = 28


class Generator(nn.Module):
    """Latent vector (B, latent_dim) -> image (B, 1, 28, 28) in [-1, 1]: 1x1 -> 7x7 -> 14x14 -> 28x28.

    ``extra_layers`` adds 3x3 convolutions (BatchNorm, ReLU) at 14x14 before the last layer: a deeper G,
    each doubling its FLOPs at the default width.
    """

    def __init__(self, latent_dim: int, channels: int, extra_layers: int = 0):
        super().__init__()
        self.latent_dim = latent_dim
        c = channels

        def block(conv: nn.Module) -> list[nn.Module]:
            return [conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(True)]

        self.net = nn.Sequential(
            *block(nn.ConvTranspose2d(latent_dim, c * 4, 7, 1, 0, bias=False)),
            *block(nn.ConvTranspose2d(c * 4, c * 2, 4, 2, 1, bias=False)),
            *[m for _ in range(extra_layers) for m in block(nn.Conv2d(c * 2, c * 2, 3, 1, 1, bias=False))],
            nn.ConvTranspose2d(c * 2, 1, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    """Image (B, 1, 28, 28) -> one logit per image (B,): 28x28 -> 14x14 -> 7x7 -> 1x1.

    ``norm``: "batch" (the seed's BatchNorm after the first layer), "spectral" (spectral normalisation of
    every layer's weight, Miyato et al. 2018; no BatchNorm) or "none". ``dropout`` follows each hidden
    layer. ``extra_layers`` adds 3x3 convolutions at 7x7 before the last layer (a deeper D judges the
    digit's global shape with more than one linear layer).
    """

    def __init__(self, channels: int, norm: str = "batch", dropout: float = 0.0, extra_layers: int = 0):
        super().__init__()
        c = channels
        wrap = nn.utils.parametrizations.spectral_norm if norm == "spectral" else identity

        def block(conv: nn.Conv2d, batch_norm: bool) -> list[nn.Module]:
            return [
                wrap(conv),
                *([nn.BatchNorm2d(conv.out_channels)] if batch_norm and norm == "batch" else []),
                nn.LeakyReLU(0.2, inplace=True),
                *([nn.Dropout(dropout)] if dropout > 0 else []),
            ]

        self.net = nn.Sequential(
            *block(nn.Conv2d(1, c, 4, 2, 1, bias=False), batch_norm=False),
            *block(nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), batch_norm=True),
            *[m for _ in range(extra_layers) for m in block(nn.Conv2d(c * 2, c * 2, 3, 1, 1, bias=False), True)],
            wrap(nn.Conv2d(c * 2, 1, 7, 1, 0, bias=False)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def identity(x: T) -> T:
    """Its argument, unchanged: the no-op in place of an optional wrapper (spectral norm, DDP, compile)."""
    return x


def init_weights(module: nn.Module) -> None:
    """DCGAN init (Radford et al.): conv weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        # A spectrally normalised layer keeps its raw weight under parametrizations (rescaled in forward).
        weight = (
            module.parametrizations.weight.original
            if nn.utils.parametrize.is_parametrized(module, "weight")
            else module.weight
        )
        nn.init.normal_(weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_generator(cfg: ModelConfig) -> Generator:
    """The generator ``cfg`` describes, uninitialised (to load a state dict into)."""
    return Generator(cfg.latent_dim, cfg.g_channels, cfg.g_extra_layers)


def build_models(cfg: ModelConfig) -> tuple[Generator, Discriminator]:
    """Fresh, initialised G and D (seed the RNG first for reproducible weights)."""
    generator = build_generator(cfg)
    discriminator = Discriminator(cfg.d_channels, cfg.d_norm, cfg.d_dropout, cfg.d_extra_layers)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator
