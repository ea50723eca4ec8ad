"""Ways of looking at a generator (pipeline/gan/views.py): truncated noise, spherical walks between latent points,
and the nearest training images beside samples, which must find a planted copy."""

import torch

from pipeline.gan import views


def test_truncation_scales_the_noise_towards_its_mean():
    full = views.noise(5, 16, seed=3)
    assert torch.equal(views.noise(5, 16, seed=3, psi=0.5), full * 0.5)
    assert not views.noise(5, 16, seed=3, psi=0.0).any()


def test_a_walk_runs_along_great_circles_from_one_point_to_the_next():
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    path = views.slerp(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (3, 5, 8)
    assert torch.allclose(path[:, 0], a, atol=1e-5) and torch.allclose(path[:, -1], b, atol=1e-5)
    # the norm moves linearly between the ends', never through the short vectors a straight line would
    want = (
        torch.linspace(0, 1, 5)[None] * b.norm(dim=1)[:, None]
        + (1 - torch.linspace(0, 1, 5)[None]) * a.norm(dim=1)[:, None]
    )
    assert torch.allclose(path.norm(dim=2), want, atol=1e-4)
    rows = views.walk(rows=2, steps=4, latent_dim=8, seed=0)
    assert rows.shape == (8, 8)
    frames = views.walk(rows=6, steps=3, latent_dim=8, seed=0, loop=4)
    assert frames.shape == (12, 6, 8)
    points = views.noise(24, 8, seed=0).view(4, 6, 8)
    for leg in range(4):  # each leg starts at its point and the last returns to the first
        assert torch.allclose(frames[leg * 3], points[leg], atol=1e-5)


def test_the_nearest_training_images_of_a_copied_sample_start_with_its_original():
    generator = torch.Generator().manual_seed(0)
    training = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=generator)
    samples = torch.stack([training[7], training[31].clamp(5, 250)])  # a copy, and a copy slightly changed
    shown = views.nearest_training(samples, training, k=3)
    assert shown.shape == (8, 3, 8, 8)
    assert torch.equal(shown[0], samples[0]) and torch.equal(shown[1], training[7])
    assert torch.equal(shown[4], samples[1]) and torch.equal(shown[5], training[31])
    far = [(shown[i].float() - samples[0].float()).norm() for i in (2, 3)]
    assert all(d > 0 for d in far) and far[0] <= far[1]
    grey = training[:, :1]  # grey images held with their one channel; samples of them come without it
    shown = views.nearest_training(grey[[7, 31], 0], grey, k=2)
    assert shown.shape == (6, 8, 8) and torch.equal(shown[1], grey[7, 0])


def test_a_finished_run_leaves_its_samples_beside_their_nearest_training_images(fake_split):
    from pipeline.config.load import load_config
    from pipeline.gan.hooks import Hook
    from pipeline.gan.loop import train_gan
    from tests.conftest import CONFIGS

    grids: dict = {}

    class Grids(Hook):
        def on_samples(self, images, name):
            grids[name] = images

    train_gan(load_config(CONFIGS / "smoke.yaml", ["train.epochs=1"]), fake_split, hooks=[Grids()])
    nearest = grids["samples/nearest_training.png"]
    assert nearest.shape == (views.NEAREST_SAMPLES * (views.NEAREST_NEIGHBOURS + 1), *fake_split.images.shape[1:])
    training = fake_split.images
    for row in range(views.NEAREST_SAMPLES):  # every shown neighbour is a training image
        for image in nearest[row * 4 + 1 : row * 4 + 4]:
            assert (training == image).flatten(1).all(1).any()
