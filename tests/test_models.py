import torch

from pipeline.config import ModelConfig
from pipeline.models import build_models


def test_shapes_and_sizes():
    torch.manual_seed(0)
    generator, discriminator = build_models(ModelConfig())
    z = torch.randn(5, 100)
    images = generator(z)
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1  # Tanh range
    assert discriminator(images).shape == (5,)
    # The default DCGAN's sizes (see the speed issue's FLOP figures).
    assert round(sum(p.numel() for p in generator.parameters()) / 1e6, 2) == 1.78
    assert round(sum(p.numel() for p in discriminator.parameters()) / 1e6, 2) == 0.14


def test_widths_come_from_config():
    generator, discriminator = build_models(ModelConfig(latent_dim=7, g_channels=3, d_channels=5))
    assert generator.net[0].in_channels == 7 and generator.net[0].out_channels == 12
    assert discriminator.net[0].out_channels == 5
    assert generator(torch.randn(2, 7)).shape == (2, 1, 28, 28)


def test_dcgan_init():
    torch.manual_seed(0)
    generator, discriminator = build_models(ModelConfig())
    convs = [
        m
        for m in [*generator.modules(), *discriminator.modules()]
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
    ]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.mean().item()) < 1e-3
    assert abs(weights.std().item() - 0.02) < 1e-3
    bns = [m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    scales = torch.cat([m.weight for m in bns])
    assert abs(scales.mean().item() - 1.0) < 0.01 and all((m.bias == 0).all() for m in bns)
