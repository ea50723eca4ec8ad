"""The Inception FID's plumbing, with a file of the TF-FID Inception-v3's architecture and random weights (CI cannot
reach the real ones): the pin refuses other weights unless named by digest, a file is loaded with weights_only,
the project's FID equals torch-fidelity's own computation on the same images, and a run scores with the weights,
records their digest and resize protocol, shares them through the tracking store (a host without them gets them
there) and goes on with one line when they cannot be had."""

import pytest
import torch

torch_fidelity = pytest.importorskip("torch_fidelity")

from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402

from pipeline.core.files import file_sha256  # noqa: E402
from pipeline.eval.inception import Inception, InceptionError, fetch_weights, resize  # noqa: E402
from pipeline.eval.scores import frechet_distance, statistics  # noqa: E402


class _Payload:
    """Unpickled in full, this would call a function (a harmless one here): what weights_only refuses."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


class _Untrained(FeatureExtractorInceptionV3):
    def load_state_dict(self, state_dict, strict=True):  # keep the random initialisation
        return None


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A weights file of the TF-FID Inception-v3's architecture with random weights, and its digest."""
    folder = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    torch.save({}, folder / "empty.pth")
    network = _Untrained("inception-v3-compat", ["2048"], str(folder / "empty.pth"))
    path = folder / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path, file_sha256(path)


def _images(n, seed):
    """Smooth random colour images, 32 px (what a GAN's samples are like more than white noise)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand((n, 3, 4, 4), generator=g)
    return (torch.nn.functional.interpolate(small, size=32, mode="bilinear") * 255).round().to(torch.uint8)


def test_the_pin_refuses_other_weights_unless_named_by_their_digest(random_weights, tmp_path):
    path, digest = random_weights
    with pytest.raises(InceptionError, match="not the published pt_inception-2015-12-05-6726825d.pth"):
        fetch_weights(str(path), None, tmp_path / "cache")
    with pytest.raises(InceptionError, match="not eval.inception_sha256="):
        fetch_weights(str(path), "0" * 64, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("sha256-*"))  # nothing refused was kept
    kept, got = fetch_weights(str(path), digest, tmp_path / "cache")
    assert got == digest and kept.name == f"sha256-{digest}.pt"
    with pytest.raises(InceptionError, match="is not a file"):
        fetch_weights(str(tmp_path / "missing.pth"), digest, tmp_path / "cache")
    torch.save({"weights": _Payload()}, tmp_path / "evil.pth")  # a pickle that would run code when loaded in full
    with pytest.raises(InceptionError, match="is not a weights file"):
        fetch_weights(str(tmp_path / "evil.pth"), file_sha256(tmp_path / "evil.pth"), tmp_path / "cache")


def test_the_projects_inception_fid_equals_torch_fidelitys_on_the_same_images(random_weights, tmp_path):
    path, digest = random_weights
    kept, _ = fetch_weights(str(path), digest, tmp_path / "cache")
    a, b = resize(_images(32, 1)), resize(_images(32, 2))  # 32 a side: Inception on a CPU is CI's slowest part
    assert a.shape == (32, 3, 299, 299) and a.dtype == torch.uint8
    inception = Inception(kept, digest)
    inception.reference(a)
    ours = inception.score(b)["fid_inception"]
    again = frechet_distance(*statistics(inception.features(b)), inception.mu, inception.sigma)
    assert ours == again

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(b),
        input2=Images(a),
        fid=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(kept),
        cuda=False,
        cache=False,
        verbose=False,
        batch_size=32,
    )["frechet_inception_distance"]
    assert ours > 0 and abs(ours - theirs) / theirs < 1e-3, (ours, theirs)


def _host(root, default_root):
    """A host's data root: MNIST's files and its evaluator copied, no Inception weights."""
    import shutil

    shutil.copytree(default_root / "MNIST", root / "MNIST")
    shutil.copytree(default_root / "evaluators" / "mnist", root / "evaluators" / "mnist")
    return root


@pytest.mark.slow
def test_a_run_scores_with_the_weights_shares_them_through_the_store_and_goes_on_without(random_weights, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.config.schema import DataConfig
    from pipeline.data.source import default_root
    from pipeline.eval.evaluator import get_evaluator
    from tests.conftest import run_cli

    path, digest = random_weights
    get_evaluator(DataConfig(dataset="mnist"), lambda line: None)  # this machine's MNIST evaluator, to copy
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def train(name, root, store, *settings):
        common = {
            "train.epochs": "1",
            "train.storage_path": str(tmp_path / "runs"),
            "tracking.uri": store,
            "tracking.registered_model": "",
            "data.root": str(_host(tmp_path / root, default_root())),
            "eval.inception_samples": "8",
            "eval.inception_sha256": digest,
        }
        args = [x for key, value in common.items() for x in ("--set", f"{key}={value}")]
        args += [x for setting in settings for x in ("--set", setting)]
        done = run_cli("train", "-c", "configs/smoke.yaml", *args, "--name", name, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        run = MlflowClient(store).search_runs(
            [MlflowClient(store).get_experiment_by_name("gan-pipeline").experiment_id],
            filter_string=f"tags.`mlflow.runName` = '{name}'",
        )[0]
        return done.stdout + done.stderr, run

    said, run = train("with-weights", "host-a", uri, f"eval.inception_weights={path}")
    assert f"registered the Inception weights (sha256 {digest[:12]})" in said
    assert (
        run.data.tags["inception_sha256"] == digest
        and run.data.tags["inception_resize"] == "clean-fid-bicubic-299-uint8"
    )
    assert run.data.metrics["fid_inception"] > 0 and "fid" in run.data.metrics
    # Another host, no weights of its own and no setting: the store's copy, checked, and the same digest recorded.
    said, run = train("from-the-store", "host-b", uri, "eval.inception_weights=download")  # no internet needed
    assert "registered the Inception weights" not in said and "Inception FID: off" not in said
    assert run.data.tags["inception_sha256"] == digest and run.data.metrics["fid_inception"] > 0


def test_weights_that_cannot_be_had_turn_the_inception_fid_off_with_one_line(tmp_path):
    """A run's preparation without the weights: one line saying how to provide them, and no payload (the run
    scores everything else: tests/test_train.py's scorer runs without one)."""
    from pipeline.config.load import build_config
    from pipeline.tracking.evaluators import shared_inception

    said: list[str] = []
    missing = tmp_path / "missing.pth"
    cfg = build_config({"data": {"root": str(tmp_path)}, "eval": {"inception_weights": str(missing)}})
    assert shared_inception(cfg, None, said.append) is None
    assert len(said) == 1 and "Inception FID: off (eval.inception_weights:" in said[0] and "is not a file" in said[0]
    assert "pt_inception-2015-12-05-6726825d.pth in eval.inception_weights, or 'download'" in said[0]
    assert shared_inception(build_config({}), None, said.append) is None and len(said) == 1  # not asked: silent
