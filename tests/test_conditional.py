"""A class-conditional GAN (model.conditional): G's input carries each image's class, D projects its features on the
class's embedding; trained, its classes follow the training set's frequencies, its grids show a row per class, a
sample can be asked of one class, and data without classes is refused."""

import copy

import pytest
import torch

from pipeline.config.load import load_config
from pipeline.core.errors import ConfigError
from pipeline.data.split import Split
from pipeline.gan.hooks import Hook, On
from pipeline.gan.loop import train_gan
from pipeline.gan.models import ClassAffine, build_models, with_classes
from pipeline.gan.sampling import generate_images, sample_classes
from tests.conftest import CONFIGS


@pytest.mark.parametrize("conditioning", ["embedding", "batchnorm"])
def test_the_class_changes_what_g_makes_and_how_d_judges(conditioning):
    settings = ["model.conditional=true", "model.d_norm=spectral", f"model.g_conditioning={conditioning}"]
    cfg = load_config(CONFIGS / "smoke.yaml", settings)
    weights = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    torch.manual_seed(0)
    generator, discriminator = build_models(cfg.model, (1, 28, 28), weights)
    generator.eval(), discriminator.eval()
    z = torch.randn(4, cfg.model.latent_dim)
    same = with_classes(z, torch.zeros(4, dtype=torch.int64))
    other = with_classes(z, torch.ones(4, dtype=torch.int64))
    assert same.shape == (4, cfg.model.latent_dim + 1)
    if conditioning == "batchnorm":  # each class's gain and shift start at 0: a fresh G is the unconditional one
        affines = [m for m in generator.modules() if isinstance(m, ClassAffine)]
        assert len(affines) == 2 and not hasattr(generator, "embed")
        assert torch.equal(generator(same), generator(other))
        for affine in affines:
            torch.nn.init.normal_(affine.gain.weight, 0.0, 0.1), torch.nn.init.normal_(affine.shift.weight, 0.0, 0.1)
    assert generator(same).shape == (4, 1, 28, 28) and not torch.allclose(generator(same), generator(other))
    images = generator(same).detach()
    logits = discriminator(images, torch.zeros(4, dtype=torch.int64))
    assert logits.shape == (4,) and not torch.allclose(logits, discriminator(images, torch.full((4,), 2)))
    assert torch.equal(generator.class_weights, weights)
    with pytest.raises(ValueError, match="class frequencies"):
        build_models(cfg.model, (1, 28, 28))


def test_sampled_classes_follow_the_frequencies_or_the_one_asked():
    class G(torch.nn.Module):
        class_weights = torch.tensor([0.7, 0.0, 0.3], dtype=torch.float64)

    drawn = sample_classes(G(), 4000, 0, None, None)
    assert set(drawn.tolist()) == {0, 2} and abs(float((drawn == 0).double().mean()) - 0.7) < 0.03
    assert sample_classes(G(), 5, 0, None, 1).tolist() == [1] * 5
    with pytest.raises(ValueError, match="knows classes 0 to 2"):
        sample_classes(G(), 5, 0, None, 3)
    with pytest.raises(ValueError, match="trained without classes"):
        sample_classes(torch.nn.Identity(), 5, 0, None, 1)


@pytest.mark.parametrize("conditioning", ["embedding", "batchnorm"])
def test_a_conditional_run_trains_resumes_exactly_and_draws_a_row_per_class(fake_split, tmp_path, conditioning):
    from pipeline.core import checkpoint

    grids: dict = {}

    class Grids(Hook):
        def on_samples(self, images, name):
            grids[name] = images

    settings = [
        "train.epochs=2",
        "model.conditional=true",
        f"model.g_conditioning={conditioning}",
        "tune.report_every_steps=3",
    ]
    cfg = load_config(CONFIGS / "smoke.yaml", settings)
    reports: list = []
    keep = On(report=lambda report: reports.append(copy.deepcopy(report.checkpoint)))  # its tensors train on
    result = train_gan(cfg, fake_split, hooks=[Grids(), keep])
    counts = torch.bincount(fake_split.labels, minlength=10).double()
    assert torch.equal(result.state.generator.class_weights, counts / counts.sum())
    assert grids["samples/epoch_002.png"].shape == (10 * 8, 28, 28)  # ten classes, a row of 8 each
    images = generate_images(result.generator, 8, cfg.model.latent_dim, 0, torch.device("cpu"), label=3)
    assert images.shape == (8, 28, 28)
    assert reports[0]["step"] == 3 and reports[0]["epoch_partial"] is not None
    path = checkpoint.save(tmp_path / "inside.pt", reports[0])  # inside the first epoch
    resumed = train_gan(cfg, fake_split, resume=checkpoint.load(path))
    for key, value in result.state.generator.state_dict().items():
        assert torch.equal(value, resumed.state.generator.state_dict()[key]), key


def test_data_without_classes_is_refused(fake_split):
    unlabelled = Split(fake_split.images, torch.full_like(fake_split.labels, -1))
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.conditional=true"])
    with pytest.raises(ConfigError, match="model.conditional: true, but .* has no classes"):
        train_gan(cfg, unlabelled)
    with pytest.raises(ConfigError, match="train.cuda_graphs: true with model.conditional"):
        load_config(
            CONFIGS / "smoke.yaml",
            ["model.conditional=true", "train.cuda_graphs=true", "scaling.use_gpu=true", "scaling.num_workers=1"],
        )


def test_class_accuracy_is_the_share_of_samples_classified_as_asked_and_the_scorer_asks_it():
    import numpy as np

    from pipeline.eval.metrics import CLASS_ACCURACY, Features
    from pipeline.eval.scoring import Scorer

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    empty = np.zeros((0, 2))
    features = Features(np.zeros((4, 2)), probs, empty, np.zeros(2), np.eye(2), asked=np.array([0, 1, 1, 1]))
    assert CLASS_ACCURACY.compute(features) == {
        "class_accuracy": 0.75,
        "class_accuracy_0": 1.0,
        "class_accuracy_1": 2 / 3,
    }
    features.asked = None
    assert CLASS_ACCURACY.compute(features) == {}  # an unconditional generator's samples

    class Evaluator:
        def score(self, images, asked=None):
            self.asked = asked
            return {}

    cfg = load_config(CONFIGS / "smoke.yaml", ["model.conditional=true"])
    torch.manual_seed(0)
    generator, _ = build_models(cfg.model, (1, 28, 28), torch.tensor([0.2, 0.8], dtype=torch.float64))
    evaluator = Evaluator()
    Scorer(evaluator, 50, cfg.model.latent_dim, 7)(generator, torch.device("cpu"))
    assert torch.equal(evaluator.asked, sample_classes(generator, 50, 7, None, None))
    assert 0 < int(evaluator.asked.sum()) < 50  # both classes


@pytest.mark.parametrize("fresh", [True, False])
def test_d_judges_each_fake_by_the_class_its_noise_carries(fake_split, monkeypatch, fresh):
    """In D's step and in G's, the labels D is given with generated images are the classes in the noise G made
    them from (a swap of D's fakes' and G's classes would train each against the wrong class)."""
    from pipeline.gan import models

    made: list = []  # (G's output, the classes in its input)
    checked = {"fakes": 0}
    real_g, real_d = models.Generator.forward, models.Discriminator.forward

    def g_forward(self, z):
        out = real_g(self, z)
        made.append((out.detach(), z[:, self.latent_dim].long()))
        return out

    def d_forward(self, x, labels=None):
        for images, classes in made[-2:]:
            if x.shape == images.shape and torch.equal(x.detach(), images):
                assert torch.equal(labels, classes), "D was given other classes than the fakes' noise carries"
                checked["fakes"] += 1
        return real_d(self, x, labels)

    monkeypatch.setattr(models.Generator, "forward", g_forward)
    monkeypatch.setattr(models.Discriminator, "forward", d_forward)
    settings = ["train.epochs=1", "model.conditional=true", f"train.g_fresh_noise={str(fresh).lower()}"]
    result = train_gan(load_config(CONFIGS / "smoke.yaml", settings), fake_split)
    assert checked["fakes"] >= 2 * result.step  # D's fakes and G's, every step
