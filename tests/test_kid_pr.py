"""KID and precision/recall (pipeline.eval.scores) against torch-fidelity's own implementations on the same
features, and the behaviour each must have: KID near 0 for two samples of one distribution, precision falling for
samples off the real manifold, recall falling for a collapsed sample."""

import numpy as np
import pytest
import torch

from pipeline.eval.metrics import KID, PRECISION, RECALL, Features, champion_metric, metric
from pipeline.eval.scores import kernel_inception_distance, manifold_radii, precision_recall

torch_fidelity = pytest.importorskip("torch_fidelity")


def _sets(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n, d))
    return real / np.sqrt((real**2).mean()), rng.normal(size=(n, d)) * 1.3 + 0.2


def test_kid_equals_torch_fidelitys_on_the_same_features():
    from torch_fidelity.metric_kid import kernel_poly, mmd2

    real, fake = _sets()
    ours, _ = kernel_inception_distance(fake, real, subsets=1, subset_size=len(real))  # every row: no random draw
    theirs = mmd2(kernel_poly(fake, fake), kernel_poly(fake, real), kernel_poly(real, real))
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)  # float32 kernels, float64 sums
    # Features 10x larger (a network's own scale): the kernel sees them scaled by the reference's RMS, as before.
    scaled, _ = kernel_inception_distance(10 * fake, 10 * real, subsets=1, subset_size=len(real))
    assert scaled == pytest.approx(theirs, rel=1e-4, abs=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    real = np.random.default_rng(4).normal(size=(1000, 16))
    same = np.random.default_rng(5).normal(size=real.shape)
    near, _ = kernel_inception_distance(same, real, subsets=20, subset_size=500)
    far, _ = kernel_inception_distance(same + 0.5, real, subsets=20, subset_size=500)
    farther, _ = kernel_inception_distance(same + 1.0, real, subsets=20, subset_size=500)
    assert abs(near) < 0.01 < far < farther


def test_precision_recall_equal_torch_fidelitys():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = _sets()
    ours = precision_recall(fake, real, k=3)
    theirs = calculate_precision_recall_full(torch.from_numpy(fake).float(), torch.from_numpy(real).float(), 3)
    assert ours == pytest.approx(theirs, abs=1e-9)
    radii = manifold_radii(real, 3)
    assert precision_recall(fake, real, k=3, reference_radii=radii) == ours


def test_precision_falls_off_the_manifold_and_recall_falls_for_a_collapse():
    real, _ = _sets(n=600)
    rng = np.random.default_rng(1)
    same = rng.normal(size=real.shape)
    precision, recall = precision_recall(same, real)
    off, _ = precision_recall(same * 3.0, real)  # spread far beyond the real samples
    _, collapsed = precision_recall(
        np.repeat(same[:8], len(same) // 8, axis=0) + 1e-3 * rng.normal(size=real.shape), real
    )
    assert precision > 0.6 and recall > 0.6
    assert off < precision / 2
    assert collapsed < recall / 4


def test_the_metric_registry_ranks_by_kid_precision_and_recall_each_its_way():
    assert (metric("kid").mode, metric("precision").mode, metric("recall").mode) == ("min", "max", "max")
    real, fake = _sets()
    features = Features(fake, None, real, real.mean(0), np.cov(real, rowvar=False))
    values = {**KID.compute(features), **PRECISION.compute(features), **RECALL.compute(features)}
    assert set(values) == {"kid", "kid_std", "precision", "recall"}
    assert (values["precision"], values["recall"]) == precision_recall(fake, real)


def test_the_champion_metric_is_configurable_and_checked():
    from pipeline.config.load import build_config
    from pipeline.core.errors import ConfigError

    cfg = build_config({"tracking": {"champion_metric": "recall"}})
    assert champion_metric(cfg) is RECALL
    assert champion_metric(build_config({})).name == "fid"
    with pytest.raises(ConfigError, match="tracking.champion_metric: 'ssim' is not a metric that can rank"):
        champion_metric(build_config({"tracking": {"champion_metric": "ssim"}}))


def test_a_metric_the_data_s_evaluator_does_not_compute_is_refused_before_training():
    from pipeline.core.errors import ConfigError
    from pipeline.eval.metrics import INCEPTION_SCORE, check_measured

    check_measured(KID, "tune.metric", classes=False, data="the image folder x")  # any evaluator computes KID
    check_measured(INCEPTION_SCORE, "tune.metric", classes=True, data="mnist")
    with pytest.raises(ConfigError, match="tune.metric: inception_score needs a classifier's class probabilities"):
        check_measured(INCEPTION_SCORE, "tune.metric", classes=False, data="the image folder x")
    with pytest.raises(ConfigError, match="'fid_inception' is not a metric that can rank"):
        metric("fid_inception")  # logged where the weights are, but its figures compare only with the same weights


@pytest.mark.parametrize(("n", "m", "d"), [(40, 30, 200), (300, 200, 16)])
def test_the_frechet_distance_from_the_sets_equals_the_one_from_their_statistics(n, m, d):
    """Fewer images than feature dimensions (a small folder's extractor features): FID from the sets, an n x m
    problem, equals FID from the two d x d covariances."""
    from pipeline.eval.scores import frechet_distance, frechet_distance_of_sets, statistics

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(n, d)), rng.normal(0.5, 1.5, size=(m, d)) ** 2
    want = frechet_distance(*statistics(x), *statistics(y))
    assert frechet_distance_of_sets(x, y) == pytest.approx(want, rel=1e-8)
    assert frechet_distance_of_sets(x, x) == pytest.approx(0.0, abs=1e-8 * want)


def test_kid_from_whole_kernels_equals_kid_from_each_subset_s_own(monkeypatch):
    """Small sets compute each kernel once and sum a subset's blocks through its indicators: the same KID (and
    spread) as new kernels of each subset's features."""
    import pipeline.eval.scores as scores

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(150, 40)), rng.normal(0.3, 1.2, size=(120, 40))
    whole = scores.kernel_inception_distance(x, y, subsets=20, subset_size=100)
    monkeypatch.setattr(scores, "KID_WHOLE_KERNELS", 0)
    each = scores.kernel_inception_distance(x, y, subsets=20, subset_size=100)
    assert whole[0] == pytest.approx(each[0], rel=1e-9) and whole[1] == pytest.approx(each[1], rel=1e-6)
    assert whole[1] > 0  # subsets of 100 out of 150 and 120 differ
