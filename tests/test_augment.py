"""DiffAugment (pipeline/gan/augment.py): each kind does what it says on draws chosen by hand, nothing where its
probability is 0, and gradients pass through to the images."""

import torch

from pipeline.gan.augment import DRAWS, augment, draw


def _draws(n, **columns):
    u = torch.full((n, DRAWS), 0.5)
    for column, value in columns.items():
        u[:, int(column[1:])] = value
    return u


def test_translation_moves_each_image_its_own_way_and_pads_with_zeros():
    x = torch.arange(32, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    # shift range for a side of 4: 1/8 of it, at least 1 -> offsets -1, 0, 1; draw 0.9 -> +1, 0.0 -> -1, 0.5 -> 0
    moved = augment(
        x, _draws(2, c1=0.0, c6=torch.tensor([0.9, 0.5]), c7=torch.tensor([0.0, 0.9])), 1.0, ("translation",)
    )
    want = torch.zeros(2, 1, 4, 4)
    want[0, 0, 1:, :3] = x[0, 0, :3, 1:]  # down a row, left a column
    want[1, 0, :, 1:] = x[1, 0, :, :3]  # right a column
    assert torch.equal(moved, want)
    rgb = torch.rand(2, 3, 8, 8)  # D's layout kept (with one channel both layouts are the same)
    assert augment(rgb, _draws(2, c1=0.0), 1.0, ("translation",)).is_contiguous()
    last = rgb.contiguous(memory_format=torch.channels_last)
    assert augment(last, _draws(2, c1=0.0), 1.0, ("translation",)).is_contiguous(memory_format=torch.channels_last)


def test_cutout_zeroes_a_square_of_half_the_side_clipped_at_the_border():
    x = torch.ones(3, 3, 8, 8)
    # Its centre anywhere (offsets 0..8 for a side of 8, minus 2): the middle, the top-left corner, the right edge.
    cut = augment(
        x, _draws(3, c2=0.0, c8=torch.tensor([0.5, 0.0, 0.5]), c9=torch.tensor([0.5, 0.0, 0.99])), 1.0, ("cutout",)
    )
    assert torch.equal(cut[0, :, 2:6, 2:6], torch.zeros(3, 4, 4)) and cut[0].sum() == 3 * (64 - 16)
    assert torch.equal(cut[1, :, :2, :2], torch.zeros(3, 2, 2)) and cut[1].sum() == 3 * (64 - 4)
    assert torch.equal(cut[2, :, 2:6, 6:], torch.zeros(3, 4, 2)) and cut[2].sum() == 3 * (64 - 8)


def test_colour_is_the_official_brightness_saturation_and_contrast():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    brighter = augment(x, _draws(2, c0=0.0, c3=1.0, c4=0.5, c5=0.5), 1.0, ("color",))
    assert torch.allclose(brighter, x + 0.5, atol=1e-6)  # +0.5 brightness; saturation and contrast x1
    grey = augment(x, _draws(2, c0=0.0, c3=0.5, c4=0.0, c5=0.5), 1.0, ("color",))
    assert torch.allclose(grey, x.mean(dim=1, keepdim=True).expand_as(x), atol=1e-6)  # saturation x 2r = 0
    flat = augment(x, _draws(2, c0=0.0, c3=0.5, c4=0.5, c5=0.0), 1.0, ("color",))
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    assert torch.allclose(flat, mean + (x - mean) * 0.5, atol=1e-6)  # contrast x (r + 0.5)


def test_nothing_changes_where_the_probability_is_zero_and_gradients_pass():
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    u = draw(4, torch.device("cpu"), torch.Generator().manual_seed(0))
    kinds = ("color", "translation", "cutout")
    assert torch.equal(augment(x, u, 0.0, kinds), x)
    out = augment(x, u, 1.0, kinds)
    assert not torch.equal(out, x)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_an_augmenting_run_trains_and_bad_settings_are_refused(fake_split):
    import pytest

    from pipeline.config.load import load_config
    from pipeline.core.errors import ConfigError
    from pipeline.gan.loop import train_gan
    from tests.conftest import CONFIGS

    settings = ["train.epochs=1", "train.diffaugment=color,translation,cutout", "train.augment_p=0.5"]
    result = train_gan(load_config(CONFIGS / "smoke.yaml", settings), fake_split)
    assert result.step == 4 and all(torch.isfinite(p).all() for p in result.state.generator.parameters())
    for given in ("colour", "cutout,cutout", "color,", ","):
        with pytest.raises(ConfigError, match="train.diffaugment: .* give each of color, translation, cutout"):
            load_config(CONFIGS / "smoke.yaml", [f"train.diffaugment={given}"])
    with pytest.raises(ConfigError, match="train.cuda_graphs: true with train.diffaugment"):
        load_config(
            CONFIGS / "smoke.yaml",
            ["train.diffaugment=cutout", "train.cuda_graphs=true", "scaling.use_gpu=true", "scaling.num_workers=1"],
        )
