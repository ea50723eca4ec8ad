"""The Model Registry against a real (sqlite) MLflow store: the champion alias moves only on a better FID of the
same dataset and evaluator, also when registrations race; `sample` and `evaluate` load every model URI form;
the logged generator carries its run's final FID/IS; experiments open on their training runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config.load import with_overrides
from pipeline.data.specs import MNIST
from pipeline.distributed.lifecycle import generator_facts
from pipeline.gan.models import build_generator
from pipeline.tracking.registry import CHAMPION, register_generator
from pipeline.tracking.store import start_run
from pipeline.tracking.tracker import MLflowTracker
from tests.conftest import run_together

EVALUATOR = "e" * 64


@pytest.fixture(autouse=True)
def no_leaks():
    """Nothing here may change the process environment (a leaked MLFLOW_TRACKING_URI redirects later runs)."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
    before = {k: os.environ.get(k) for k in keys}
    yield
    assert {k: os.environ.get(k) for k in keys} == before


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with one finished run that logged a (smoke-sized) generator, FID and IS at step 16. Shared
    by the tests (logging a model takes seconds); each registers under a model name of its own."""
    from pipeline.config.load import load_config
    from tests.conftest import CONFIGS

    smoke_cfg = load_config(CONFIGS / "smoke.yaml")
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    run_id = start_run(uri, "gan-pipeline", "g", {"ray_train_run": "g"})
    tracker = MLflowTracker(uri, run_id)
    tracker.log_params({"latent_dim": smoke_cfg.model.latent_dim, "dataset": "mnist"})
    tracker.log_metrics({"fid": 90.0, "inception_score": 1.5}, step=8)
    tracker.log_metrics({"fid": 80.0, "inception_score": 2.5}, step=16)
    tracker.flush()
    model_uri = tracker.log_generator(
        build_generator(smoke_cfg.model, MNIST.image_shape), generator_facts(smoke_cfg), ("fid", "inception_score")
    )
    tracker.end()
    return uri, run_id, model_uri


def tags(fid: float, evaluator: str = EVALUATOR, dataset: str = "mnist", samples: int = 1000) -> dict[str, str]:
    return {"fid": repr(fid), "dataset": dataset, "evaluator_sha256": evaluator, "eval_num_samples": str(samples)}


def champion(uri: str, name: str) -> tuple[str, float]:
    version = MlflowClient(uri).get_model_version_by_alias(name, CHAMPION)
    return str(version.version), float(version.tags["fid"])


def test_champion_moves_only_when_the_fid_improves(store):
    uri, _, model_uri = store
    first = register_generator(uri, "gan-mnist", model_uri, tags(50.0))
    assert (first.version, first.champion) == ("1", "1") and "champion moved to it from no champion" in first.message
    worse = register_generator(uri, "gan-mnist", model_uri, tags(60.0))
    assert worse.champion == "1" and "champion stays version 1 (FID 50.000 is better)" in worse.message
    equal = register_generator(uri, "gan-mnist", model_uri, tags(50.0))
    assert equal.champion == "1"  # a tie keeps the champion
    better = register_generator(uri, "gan-mnist", model_uri, tags(40.0))
    assert better.champion == "4" and "from version 1 (FID 50.000)" in better.message
    assert champion(uri, "gan-mnist") == ("4", 40.0)
    # Scored by another evaluator (or at another sample count), FIDs are not compared as they stand: the champion
    # is re-scored the new way first, the figure kept beside the ones its run measured.
    asked = []

    def rescore(version_uri: str) -> dict[str, str]:
        asked.append(version_uri)
        return {**tags(65.0, evaluator="f" * 64), "inception_score": "2.0"}

    other = register_generator(uri, "gan-mnist", model_uri, tags(70.0, evaluator="f" * 64), rescore)
    assert asked == ["models:/gan-mnist/4"] and other.champion == "4"
    assert (
        "champion version 4 re-scored with evaluator ffffffffffff at 1000 samples (was evaluator eeeeeeeeeeee, "
        "1000 samples, FID 40.000): FID 65.000; champion stays version 4 (FID 65.000 is better)" in other.message
    )
    kept = MlflowClient(uri).get_model_version("gan-mnist", "4").tags
    assert (kept["fid"], kept["evaluator_sha256"], kept["fid.ffffffffffff.1000"]) == ("40.0", EVALUATOR, "65.0")
    assert register_generator(uri, "gan-mnist", model_uri, tags(60.0, evaluator="f" * 64), rescore).champion == "6"
    assert len(asked) == 1  # the re-score is kept: not asked again
    # A re-score by another evaluator than the new version's is no comparison either: the alias stays.
    assert register_generator(uri, "gan-mnist", model_uri, tags(45.0), rescore).champion == "6"
    # Without a way to re-score it, or when that fails, a champion scored otherwise keeps the alias.
    held = register_generator(uri, "gan-mnist", model_uri, tags(10.0, samples=5000))
    assert held.champion == "6" and "scored otherwise (evaluator ffffffffffff, 1000 samples)" in held.message

    def broken(version_uri: str) -> dict[str, str]:
        raise KeyError("latent_dim")

    failed = register_generator(uri, "gan-mnist", model_uri, tags(10.0, samples=5000), broken)
    assert failed.champion == "6" and "could not be re-scored (KeyError: 'latent_dim')" in failed.message
    # Another dataset under the same name is no comparison at all: the alias follows the new one.
    assert register_generator(uri, "gan-mnist", model_uri, tags(90.0, dataset="fashion_mnist")).champion == "10"


@pytest.mark.parametrize("round_", range(3))
def test_racing_registrations_leave_the_champion_on_the_best(store, round_):
    """Sweeps ending at once: whatever the interleaving, the alias ends on the lowest FID."""
    uri, _, model_uri = store
    fids = [33.0, 21.0, 47.0, 25.0, 30.0, 22.0][round_:] + [33.0, 21.0, 47.0, 25.0, 30.0, 22.0][:round_]
    errors = run_together(
        lambda fid: register_generator(uri, f"gan-race-{round_}", model_uri, tags(fid)), [(fid,) for fid in fids]
    )
    assert not errors, errors
    assert champion(uri, f"gan-race-{round_}")[1] == min(fids)


def test_the_logged_generator_carries_the_final_fid_and_is(store):
    uri, run_id, model_uri = store
    client = MlflowClient(uri)
    model = client.get_logged_model(model_uri.split("/")[-1])
    metrics = {m.key: (m.value, m.step) for m in model.metrics}
    assert metrics == {"fid": (80.0, 16), "inception_score": (2.5, 16)}
    # The run's own histories are unchanged: no step twice.
    assert [m.step for m in client.get_metric_history(run_id, "fid")] == [8, 16]
    # What serving it needs, pinned to what logged it (named, not inferred in a subprocess).
    import mlflow
    import torch

    from pipeline.tracking.store import using_tracking_uri

    with using_tracking_uri(uri):
        location = f"{model.artifact_location}/requirements.txt"
        requirements = Path(mlflow.artifacts.download_artifacts(artifact_uri=location)).read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements.split(), requirements


@pytest.mark.parametrize("form", ["alias", "version", "run"])
def test_sample_loads_every_model_uri_form(store, tmp_path, form):
    uri, run_id, model_uri = store
    register_generator(uri, f"gan-{form}", model_uri, tags(50.0))
    model = {
        "alias": f"models:/gan-{form}@champion",
        "version": f"models:/gan-{form}/1",
        "run": f"runs:/{run_id}/generator",
    }
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", model[form], "--num", "8", "--out", str(out), "--tracking-uri", uri]) == 0
    with np.load(out) as archive:
        assert archive["images"].shape == (8, 28, 28)


def test_a_bad_model_uri_is_one_clear_error(store, tmp_path, capsys):
    uri, _, _ = store
    for bad, words in [
        ("gan-mnist@champion", "give models:/NAME@ALIAS"),
        ("models:/never-registered@champion", "no such registered model, version or alias"),
        ("models:/no-such/3", "no such registered model, version or alias"),
        ("runs:/" + "0" * 32 + "/generator", "no MLflow run"),
    ]:
        code = main(["sample", "--model", bad, "--out", str(tmp_path / "x.npz"), "--tracking-uri", uri])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err, err


def test_experiments_open_on_their_training_runs(store):
    uri, _, _ = store
    experiment = MlflowClient(uri).get_experiment_by_name("gan-pipeline")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_registered_model_names_are_checked(smoke_cfg):
    from pipeline.core.errors import ConfigError
    from pipeline.tracking.registry import registered_model_name

    assert registered_model_name(smoke_cfg) == "gan-mnist"
    assert registered_model_name(with_overrides(smoke_cfg, {"data.dataset": "fashion_mnist"})) == "gan-fashion-mnist"
    assert registered_model_name(with_overrides(smoke_cfg, {"tracking.registered_model": ""})) == ""
    with pytest.raises(ConfigError, match="tracking.registered_model: 'a/b@c'"):
        with_overrides(smoke_cfg, {"tracking.registered_model": "a/b@c"})


def test_sample_walks_the_latent_space_and_truncates_it(store, tmp_path, capsys):
    """``sample --interpolate``: a .png of 8 walks or a looping .gif; ``--truncation 0`` puts every sample at the
    noise's mean (one image, many times), ``1`` does not."""
    from PIL import Image

    uri, _, model_uri = store
    walk = tmp_path / "walk.png"
    assert main(["sample", "--model", model_uri, "--interpolate", "5", "--out", str(walk), "--tracking-uri", uri]) == 0
    with Image.open(walk) as grid:  # 8 rows of 5 images of 28 px, 2 px apart and around
        assert grid.size == (5 * 30 + 2, 8 * 30 + 2)
    loop = tmp_path / "walk.gif"
    assert main(["sample", "--model", model_uri, "--interpolate", "3", "--out", str(loop), "--tracking-uri", uri]) == 0
    with Image.open(loop) as animation:
        assert animation.n_frames == 4 * 3 and animation.size == (8 * 30 + 2, 8 * 30 + 2)
    for psi, distinct in (("0", 1), ("1", 8)):
        out = tmp_path / f"psi{psi}.npz"
        args = ["sample", "--model", model_uri, "--num", "8", "--truncation", psi, "--out", str(out)]
        assert main([*args, "--tracking-uri", uri]) == 0
        with np.load(out) as archive:
            assert len(np.unique(archive["images"].reshape(8, -1), axis=0)) == distinct
    bad = main(["sample", "--model", model_uri, "--interpolate", "4", "--out", str(tmp_path / "w.npz")])
    assert bad == 2
    flat = ["sample", "--model", model_uri, "--interpolate", "4", "--truncation", "0", "--out", str(tmp_path / "z.png")]
    assert main([*flat, "--tracking-uri", uri]) == 2  # every point would be the mean
    unconditional = ["sample", "--model", model_uri, "--class", "1", "--out", str(tmp_path / "c.npz")]
    assert main([*unconditional, "--tracking-uri", uri]) == 2
    assert "--class: a class was asked of a generator trained without classes" in capsys.readouterr().err


def test_a_conditional_generator_is_logged_loaded_and_sampled_by_class(store, tmp_path):
    """Its exported form takes the class in the noise's last column; the facts carry the class frequencies; sample
    --class K gives images of class K (the same as the live network's), and a class it does not know is refused."""
    import dataclasses

    import torch

    from pipeline.config.load import load_config
    from pipeline.gan.sampling import generate_images
    from tests.conftest import CONFIGS

    uri, _, _ = store
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.conditional=true"])
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    torch.manual_seed(0)
    generator = build_generator(cfg.model, MNIST.image_shape, weights).eval()
    run_id = start_run(uri, "gan-pipeline", "conditional", {"ray_train_run": "conditional"})
    tracker = MLflowTracker(uri, run_id)
    facts = generator_facts(dataclasses.replace(cfg)) | {"class_weights": weights.tolist()}
    model_uri = tracker.log_generator(generator, facts)
    tracker.end()
    out = tmp_path / "two.npz"
    assert (
        main(["sample", "--model", model_uri, "--num", "6", "--class", "2", "--out", str(out), "--tracking-uri", uri])
        == 0
    )
    live = generate_images(generator, 6, cfg.model.latent_dim, 0, torch.device("cpu"), label=2)
    with np.load(out) as archive:
        assert np.array_equal(archive["images"], live.numpy())
    other = generate_images(generator, 6, cfg.model.latent_dim, 0, torch.device("cpu"), label=0)
    assert not torch.equal(other, live)
    bad = main(
        ["sample", "--model", model_uri, "--class", "3", "--out", str(tmp_path / "x.npz"), "--tracking-uri", uri]
    )
    assert bad == 2
    walk = tmp_path / "walk.png"
    assert main(["sample", "--model", model_uri, "--interpolate", "3", "--out", str(walk), "--tracking-uri", uri]) == 0
