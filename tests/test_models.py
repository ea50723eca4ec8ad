import pytest
import torch

from pipeline.config.schema import ModelConfig
from pipeline.data.specs import MNIST
from pipeline.gan.models import build_models


def test_shapes_and_sizes():
    torch.manual_seed(0)
    generator, discriminator = build_models(ModelConfig(), MNIST.image_shape)
    z = torch.randn(5, 100)
    images = generator(z)
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1  # Tanh range
    assert discriminator(images).shape == (5,)
    # The default DCGAN's sizes (see the speed issue's FLOP figures).
    assert round(sum(p.numel() for p in generator.parameters()) / 1e6, 2) == 1.78
    assert round(sum(p.numel() for p in discriminator.parameters()) / 1e6, 2) == 0.14


def test_widths_come_from_config():
    generator, discriminator = build_models(ModelConfig(latent_dim=7, g_channels=3, d_channels=5), MNIST.image_shape)
    assert generator.net[0].in_channels == 7 and generator.net[0].out_channels == 12
    assert discriminator.net[0].out_channels == 5
    assert generator(torch.randn(2, 7)).shape == (2, 1, 28, 28)


def test_dcgan_init():
    torch.manual_seed(0)
    generator, discriminator = build_models(ModelConfig(), MNIST.image_shape)
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


def test_spectral_norm_discriminator_has_unit_spectral_norm_and_no_batchnorm():
    torch.manual_seed(0)
    _, discriminator = build_models(ModelConfig(d_norm="spectral", d_dropout=0.3), MNIST.image_shape)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules())
    assert sum(isinstance(m, torch.nn.Dropout) for m in discriminator.modules()) == 2
    convs = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    # The raw weights got the DCGAN init; the effective ones are rescaled towards spectral norm 1 by the
    # power iteration that runs in each training-mode forward.
    raw = torch.cat([m.parametrizations.weight.original.flatten() for m in convs])
    assert abs(raw.std().item() - 0.02) < 2e-3
    discriminator.train()
    for _ in range(30):
        discriminator(torch.randn(4, 1, 28, 28))
    sigma = torch.linalg.matrix_norm(convs[1].weight.detach().flatten(1), ord=2).item()
    assert sigma == pytest.approx(1.0, rel=0.05)


def test_seed_discriminator_unchanged_by_default():
    _, discriminator = build_models(ModelConfig(), MNIST.image_shape)
    kinds = [type(m).__name__ for m in discriminator.net]
    assert kinds == ["Conv2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d"]


def test_deeper_discriminator():
    _, discriminator = build_models(ModelConfig(d_extra_layers=2, d_channels=8), MNIST.image_shape)
    convs = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in convs] == [(4, 4), (4, 4), (3, 3), (3, 3), (7, 7)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules()) == 3
    assert discriminator(torch.randn(3, 1, 28, 28)).shape == (3,)


def test_seed_generator_unchanged_by_default_and_deeper_generator():
    generator, _ = build_models(ModelConfig(), MNIST.image_shape)
    kinds = [type(m).__name__ for m in generator.net]
    assert kinds == ["ConvTranspose2d", "BatchNorm2d", "ReLU"] * 2 + ["ConvTranspose2d", "Tanh"]
    deeper, _ = build_models(ModelConfig(g_extra_layers=2, g_channels=8), MNIST.image_shape)
    convs = [m for m in deeper.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert [m.kernel_size for m in convs] == [(7, 7), (4, 4), (3, 3), (3, 3), (4, 4)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in deeper.modules()) == 4
    assert deeper(torch.randn(3, 100)).shape == (3, 1, 28, 28)


@pytest.mark.parametrize(
    "side, plan", [(28, (7, 2)), (12, (3, 2)), (32, (4, 3)), (64, (4, 4)), (128, (4, 5)), (20, (5, 2))]
)
def test_the_networks_have_as_many_stride_2_layers_as_the_side_allows(side, plan):
    from pipeline.gan.models import network_plan

    assert network_plan((1, side, side)) == plan
    with pytest.raises(ValueError, match="a square whose side divides by 4"):
        network_plan((1, side, side + 4))


@pytest.mark.parametrize("side", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_networks_scale_with_the_images_and_keep_every_option(side, channels):
    """Generator and discriminator for 32-128 px images of 1 or 3 channels: the shapes follow, the widths halve
    (G) and double (D) per block, and spectral norm, dropout and extra layers still apply."""
    torch.manual_seed(0)
    cfg = ModelConfig(latent_dim=16, g_channels=4, d_channels=4, g_extra_layers=1, d_extra_layers=1)
    generator, discriminator = build_models(cfg, (channels, side, side))
    images = generator(torch.randn(3, 16))
    assert images.shape == (3, channels, side, side)
    assert discriminator(images).shape == (3,)
    stride_2 = [m for m in generator.net if isinstance(m, torch.nn.ConvTranspose2d)]
    blocks = {32: 3, 64: 4, 128: 5}[side]
    assert [m.out_channels for m in stride_2] == [4 * 2 ** (blocks - i) for i in range(blocks)] + [channels]
    spectral = ModelConfig(latent_dim=16, d_channels=4, d_norm="spectral", d_dropout=0.3, d_extra_layers=1)
    _, critic = build_models(spectral, (channels, side, side))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in critic.modules())
    assert sum(isinstance(m, torch.nn.Dropout) for m in critic.modules()) == blocks + 1
    assert critic(images.detach()).shape == (3,)
