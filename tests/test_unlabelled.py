"""A folder without classes is scored: its feature extractor is trained without labels, held to its gate, cached
and orders known degradations correctly (FID and KID grow with blur, noise and collapse; precision falls for blur
and noise, recall for collapse); a folder too small to learn from says what it needs; and a sweep on such a folder
ranks its trials by a score, registers a champion and lines its children up in MLflow. Slow but the last: real
MNIST digits (a folder of them without classes), real Ray and MLflow."""

import copy
import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config.schema import DataConfig
from pipeline.data.kinds import source_of
from pipeline.data.source import SCORES_NEED
from pipeline.eval.evaluator import EXTRACTOR, cache_dir, get_evaluator
from pipeline.tools.degradations import degradation_rows, ordering_problems
from tests.conftest import run_cli, sweep_runs
from tests.image_folders import make_folder

DIGITS = 1200  # real images, no classes: 840 to learn from, 360 held out


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """A folder of 1,200 MNIST digits as PNG files with no class subfolders, prepared at 32 px grey (30% held
    out)."""
    from PIL import Image

    base = tmp_path_factory.mktemp("unlabelled")
    folder = base / "digits"
    folder.mkdir()
    mnist = source_of(DataConfig(dataset="mnist"))
    mnist.prepare(lambda line: None)
    for i, image in enumerate(mnist.load(True, lambda line: None, DIGITS).images[:DIGITS]):
        Image.fromarray(image.numpy()).save(folder / f"{i:05d}.png")
    data = DataConfig(
        dataset="images", path=str(folder), image_size=32, channels=1, test_fraction=0.3, root=str(base / "root")
    )
    source_of(data).prepare(lambda line: None)
    return data


@pytest.mark.slow
def test_a_folder_without_classes_gets_an_extractor_that_orders_known_degradations(flat):
    source = source_of(flat)
    assert not source.labelled() and source.scores_unavailable() is None
    said: list[str] = []
    evaluator = get_evaluator(flat, said.append)
    assert evaluator.kind == EXTRACTOR and any("a rotation network" in line for line in said)
    meta = json.loads((cache_dir(flat, source.spec()) / "meta.json").read_text())
    assert meta["kind"] == EXTRACTOR and meta["weights_sha256"] == evaluator.checksum
    again = get_evaluator(flat, lambda line: pytest.fail(f"trained again: {line}"))
    assert again.checksum == evaluator.checksum and (again.reference == evaluator.reference).all()
    scores = evaluator.score(source.load(True).images[:200])
    assert {"fid", "kid", "precision", "recall"} <= set(scores) and "inception_score" not in scores
    rows = degradation_rows(copy.deepcopy(evaluator), EXTRACTOR, source.load(False).images)
    assert ordering_problems(rows) == [], rows


def test_a_folder_too_small_for_an_extractor_says_what_it_needs(tmp_path):
    folder = make_folder(tmp_path / "few", 30, labelled=False, broken=False)
    data = DataConfig(dataset="images", path=str(folder), image_size=32, channels=3, root=str(tmp_path / "root"))
    source = source_of(data)
    source.prepare(lambda line: None)
    why = source.scores_unavailable()
    need = f"needs at least {SCORES_NEED[0]} to learn from and {SCORES_NEED[1]} held out"
    assert why is not None and "holds out" in why and need in why, why


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["asha", "pbt"])
def test_a_sweep_on_a_folder_without_classes_ranks_registers_and_lines_up(flat, scheduler, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {
        "data.dataset": "images",
        "data.path": flat.path,
        "data.image_size": "32",
        "data.channels": "1",
        "data.test_fraction": "0.3",
        "data.limit": "null",
        "data.root": flat.root,
        "train.epochs": "2",
        "eval.num_samples": "256",
        "train.storage_path": str(tmp_path / "runs"),
        "tracking.uri": uri,
        "tracking.champion_metric": "kid",
        "tune.metric": "kid",
        "tune.num_samples": "2",
        "tune.scheduler": scheduler,
        "tune.pbt_interval": "1",
        "tune.search_space": "{optim.lr_g: {loguniform: [1.0e-4, 1.0e-3]}}",
    }
    args = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    done = run_cli("tune", "-c", "configs/smoke.yaml", *args, "--name", f"flat-{scheduler}", timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    _, children = sweep_runs(uri)
    assert len(children) == 2
    # ASHA may stop a trial after its first epoch (KILLED in MLflow); each still reported its scores.
    assert "FINISHED" in {child.info.status for child in children}
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED"), child.data.tags
        assert {"fid", "kid", "precision", "recall"} <= set(child.data.metrics), child.data.metrics
        assert set(child.data.params) == set(children[0].data.params)  # one column per key in the compare view
    # The champion is the trial with the lowest KID: ranked by the score the sweep was told to use.
    champion = MlflowClient(uri).get_model_version_by_alias("gan-images", "champion")
    kids = sorted(child.data.metrics["kid"] for child in children)
    assert float(champion.tags["kid"]) == pytest.approx(kids[0]), (champion.tags, kids)


def test_the_scoring_network_is_chosen_checked_and_cached_apart(tmp_path):
    from pipeline.data.source import DataError

    labelled = make_folder(tmp_path / "shapes", 40, broken=False)
    data = DataConfig(dataset="images", path=str(labelled), image_size=32, channels=3, root=str(tmp_path / "root"))
    source = source_of(data)
    source.prepare(lambda line: None)
    spec = source.spec()
    assert source.labelled() and source.scored_by() == "classifier"
    rotation = source_of(DataConfig(**{**data.__dict__, "evaluator": "rotation"}))
    assert rotation.scored_by() == "rotation"
    assert cache_dir(data, spec) == cache_dir(DataConfig(**{**data.__dict__, "evaluator": "classifier"}), spec)
    assert cache_dir(rotation.data, spec) == cache_dir(data, spec).with_name(f"{spec.key}-rotation")
    # An extractor needs as many images as on a folder without classes; a classifier of 3 shapes does not.
    assert source.scores_unavailable() is None and "needs at least" in rotation.scores_unavailable()

    flat_folder = make_folder(tmp_path / "flat", 10, labelled=False, broken=False)
    flat_data = DataConfig(dataset="images", path=str(flat_folder), image_size=32, channels=3, evaluator="classifier")
    flat_source = source_of(DataConfig(**{**flat_data.__dict__, "root": str(tmp_path / "root")}))
    flat_source.prepare(lambda line: None)
    with pytest.raises(DataError, match="data.evaluator=classifier: .* has no classes .* use data.evaluator=auto"):
        flat_source.scores_unavailable()


def test_an_evaluation_scores_as_many_samples_as_its_reference_unless_told():
    import numpy as np

    from pipeline.config.schema import EvalConfig
    from pipeline.eval.evaluator import Evaluator, network

    reference = np.random.default_rng(0).normal(size=(123, 8)).astype(np.float32)
    evaluator = Evaluator(network(EXTRACTOR, (1, 32, 0)), "x", 0.9, reference, "", EXTRACTOR)
    assert evaluator.sample_count(None) == 123 and evaluator.sample_count(5000) == 5000
    assert DataConfig().evaluator == "auto"
    assert EvalConfig().num_samples is None  # the shipped default: an evaluation costs a share of an epoch
