"""DiffAugment (pipeline/gan/augment.py): each kind does what it says on draws chosen by hand, nothing where its
probability is 0, and gradients pass through to the images; the adaptive probability (ADA) follows its rule."""

import pytest
import torch

from pipeline.gan.augment import DRAWS, AdaptiveP, augment, draw


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


def test_the_adaptive_probability_follows_the_sign_of_real_logits():
    """ADA's rule: p rises by batch * interval / speed after intervals where E[sign D(x)] is above the target,
    falls where below, stays in [0, 1], and continues from its saved state."""
    from pipeline.gan.augment import ADA_INTERVAL, AdaptiveP

    ada = AdaptiveP(0.5, 0.6, batch=10, speed=100, device=torch.device("cpu"))
    step = 10 * ADA_INTERVAL / 100
    for _ in range(ADA_INTERVAL):
        ada.observe(torch.tensor([1.0, 2.0, 3.0, -1.0]))  # r_t = 0.5: under the target
    ada.adjust(lambda t: t)
    assert float(ada.r_t) == 0.5 and float(ada.p) == pytest.approx(0.5 - step)
    ada.observe(torch.tensor([1.0, 2.0, 3.0, 4.0, -1.0]))  # r_t = 0.6, the target: p stays
    ada.adjust(lambda t: t)
    assert float(ada.p) == pytest.approx(0.5 - step) and float(ada.r_t) == pytest.approx(0.6)
    ada.observe(torch.tensor([1.0, 1.0, 1.0, -1.0]))  # 0.5 within one interval, then 1.0: over the target
    ada.observe(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    ada.adjust(lambda t: t)
    assert float(ada.p) == pytest.approx(0.5) and float(ada.r_t) == 0.75
    for _ in range(5):
        ada.observe(torch.ones(3))
        ada.adjust(lambda t: t)
    assert float(ada.p) == 1.0  # clamped
    ada.observe(-torch.ones(2))
    saved = ada.to_dict()
    again = AdaptiveP(0.0, 0.6, batch=10, speed=100, device=torch.device("cpu"))
    again.load(saved)
    again.adjust(lambda t: t)
    ada.adjust(lambda t: t)
    assert float(again.p) == float(ada.p) == pytest.approx(1.0 - step) and float(again.r_t) == -1.0


def test_an_adaptive_run_logs_its_probability_and_needs_diffaugment(fake_split):
    from pipeline.config.load import load_config
    from pipeline.core.errors import ConfigError
    from pipeline.gan.hooks import On
    from pipeline.gan.loop import train_gan
    from tests.conftest import CONFIGS

    settings = ["train.epochs=2", "train.diffaugment=translation", "train.augment_p=0.2", "train.augment_speed=256"]
    reports: list = []
    cfg = load_config(CONFIGS / "smoke.yaml", [*settings, "train.augment_target=0.6"])
    result = train_gan(cfg, fake_split, hooks=[On(report=reports.append)])
    # 4 steps of 64 an epoch: one adjustment each, by 64 * 4 / 256 = 1, so p is 0 or 1 after the first
    assert [r.metrics["augment_p"] for r in reports] == [r.checkpoint["ada"]["p"] for r in reports]
    assert reports[-1].metrics["augment_p"] == float(result.state.ada.p)
    assert all(r.metrics["augment_p"] in (0.0, 1.0) for r in reports)  # moved from its start, 0.2
    assert all(-1 <= r.metrics["augment_r_t"] <= 1 for r in reports)
    fixed = train_gan(load_config(CONFIGS / "smoke.yaml", settings), fake_split)
    assert fixed.state.ada is None
    with pytest.raises(ConfigError, match="train.augment_target: 0.6 without train.diffaugment"):
        load_config(CONFIGS / "smoke.yaml", ["train.augment_target=0.6"])
    with pytest.raises(ConfigError, match="train.augment_p at 1 .*set train.augment_p=0, where ADA starts"):
        load_config(CONFIGS / "smoke.yaml", ["train.augment_target=0.6", "train.diffaugment=color"])


def test_ada_counts_bf16_verdicts_exactly():
    """Under autocast D's logits are bf16, which counts whole numbers exactly only to 256: the signs are summed in
    float64."""
    ada = AdaptiveP(0.0, 0.6, batch=10, speed=100, device=torch.device("cpu"))
    ada.observe(torch.ones(1001, dtype=torch.bfloat16))
    assert ada.sums.tolist() == [1001.0, 1001.0]
