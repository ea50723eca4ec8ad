import json

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.config.schema import DataConfig
from pipeline.data.kinds import load
from pipeline.data.specs import MNIST
from pipeline.data.split import Split
from pipeline.eval import evaluator as metrics
from pipeline.eval.evaluator import EvaluatorError, get_evaluator
from pipeline.eval.scores import frechet_distance, inception_score, statistics


def _reference_fid(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root, to check the stable one against."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4000, 16)) @ rng.standard_normal((16, 16))
    mu, sigma = statistics(base)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    fids = []
    for level in (0.1, 0.3, 1.0, 3.0):
        noisy = base + level * rng.standard_normal(base.shape)
        fids.append(frechet_distance(*statistics(noisy), mu, sigma))
    assert fids == sorted(fids) and fids[0] > 0


def test_fid_matches_the_textbook_formula():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 8))
    b = rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 8)) + 0.5
    stats_a, stats_b = statistics(a), statistics(b)
    assert frechet_distance(*stats_a, *stats_b) == pytest.approx(_reference_fid(*stats_a, *stats_b), rel=1e-6)


def test_inception_score_bounds():
    one_class = np.zeros((1000, 10))
    one_class[:, 3] = 1.0
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    confident_all_classes = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(confident_all_classes)[0] == pytest.approx(10.0, rel=1e-6)
    uncertain = np.full((1000, 10), 0.1)
    assert inception_score(uncertain)[0] == pytest.approx(1.0, abs=1e-6)


def _block_digits(n: int, seed: int) -> Split:
    """A learnable fabricated 'dataset': class k is a bright 6x6 block at one of 10 places, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    images = torch.randint(0, 40, (n, 28, 28), generator=gen, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 5)
        images[i, 4 + r * 12 : 10 + r * 12, 2 + c * 5 : 8 + c * 5] = 250
    return Split(images, labels)


def test_evaluator_is_trained_gated_and_cached(tmp_path):
    cfg = DataConfig(dataset="mnist", root=str(tmp_path))
    messages = []
    splits = (_block_digits(1280, 0), _block_digits(500, 1))
    evaluator = get_evaluator(cfg, messages.append, splits=splits)
    assert evaluator.test_accuracy >= 0.99
    assert any("training the mnist evaluator" in m for m in messages)
    meta = json.loads((tmp_path / "evaluators" / "mnist" / "meta.json").read_text())
    assert meta["dataset"] == "mnist" and meta["test_accuracy"] == evaluator.test_accuracy
    assert len(meta["weights_sha256"]) == 64

    messages.clear()
    cached = get_evaluator(cfg, messages.append, splits=splits)
    assert messages == []  # loaded, not retrained
    assert np.allclose(cached.test_mu, evaluator.test_mu)
    scores = cached.score(splits[1].images)
    assert scores["fid"] < 1e-6  # the test split against its own statistics

    # A damaged cache is noticed (checksum) and rebuilt, never used.
    weights = tmp_path / "evaluators" / "mnist" / "evaluator.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    get_evaluator(cfg, messages.append, splits=splits)
    assert any("training the mnist evaluator" in m for m in messages)


def test_accuracy_gate_refuses_a_bad_evaluator_and_caches_nothing(tmp_path):
    gen = torch.Generator().manual_seed(0)
    noise = Split(torch.randint(0, 256, (640, 28, 28), generator=gen, dtype=torch.uint8), torch.randint(0, 10, (640,)))
    with pytest.raises(EvaluatorError, match="reached only .* test accuracy"):
        get_evaluator(DataConfig(root=str(tmp_path)), lambda _: None, splits=(noise, noise))
    assert not (tmp_path / "evaluators" / "mnist" / "meta.json").exists()


@pytest.mark.slow
def test_real_mnist_evaluator_and_reference():
    """The real evaluator of this machine's data root, which the other real-MNIST tests share (trained here if it is
    not cached yet: about 1.5 minutes on 2 cores; its training to the same bytes anywhere is the test below)."""
    cfg = DataConfig(dataset="mnist")
    evaluator = get_evaluator(cfg, lambda _: None)
    assert evaluator.test_accuracy >= MNIST.evaluator_min_accuracy
    ref = metrics.real_reference(cfg, evaluator, progress=lambda _: None)
    assert ref["test"]["inception_score"] > 9.0  # near 10: confident and balanced over the 10 digits
    assert 0 < ref["train"]["fid"] < 20
    one_digit = load(cfg, train=False)
    sevens = one_digit.images[one_digit.labels == 7][:500]
    assert evaluator.score(sevens)["inception_score"] < 1.5


TRAIN_AND_HASH = """
import hashlib, io, sys, torch
from pipeline.config.schema import DataConfig
from pipeline.data.kinds import load
from pipeline.data.split import Split
from pipeline.data.specs import MNIST
from pipeline.eval.classifier import train_classifier

cfg = DataConfig(dataset="mnist")
train, test = load(cfg), load(cfg, train=False)
small = Split(train.images[:4096], train.labels[:4096]), Split(test.images[:1000], test.labels[:1000])
model, _ = train_classifier(MNIST, *small, epochs=1, progress=lambda _: None)
buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)
print(hashlib.sha256(buffer.getvalue()).hexdigest())
"""


def test_the_evaluator_trains_to_the_same_bytes_in_two_processes():
    """Seeded training, one CPU type: two processes with nothing in common make the same weights, byte for byte
    (what lets every host that trains its own agree; the shared copy covers CPUs that round otherwise)."""
    from tests.conftest import run_python

    digests = []
    for _ in range(2):
        done = run_python("-c", TRAIN_AND_HASH)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.append(done.stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == 64
