"""What a sweep needs of its config (pipeline.sweep.checks), checked before anything starts: the search space, the
scheduler and its settings, the metric it ranks by and which way, each failure one line naming the key."""

import pytest

from pipeline.config.load import build_config, load_config
from pipeline.core.errors import ConfigError
from pipeline.sweep.checks import check_sweep
from tests.conftest import CONFIGS

SPACE = "tune.search_space={optim.lr_g: {loguniform: [1.0e-5, 1.0e-2]}}"


@pytest.mark.parametrize(
    "space, words",
    [
        ("{optim.lr_gen: {loguniform: [1.0e-5, 1.0e-2]}}", "not a searchable config key"),
        ("{tune.num_samples: {choice: [1, 2]}}", "not a searchable config key"),
        ("{optim.lr_g: {logarithmic: [1.0e-5, 1.0e-2]}}", "is not a search spec"),
        ("{optim.lr_g: 0.001}", "is not a search spec"),
        ("{optim.lr_g: {loguniform: [1.0e-2, 1.0e-5]}}", "must be below high"),
        ("{optim.lr_g: {loguniform: [0, 1.0e-2]}}", "must be > 0"),
        ("{optim.lr_g: {uniform: [1.0e-5]}}", "expected [low, high]"),
        ("{model.latent_dim: {choice: []}}", "expected a non-empty list"),
        ("{model.latent_dim: {choice: [16, 0]}}", "value 0 is invalid (model.latent_dim: 0 is out of range"),
        ("{data.dataset: {choice: [mnist, cifar]}}", "value 'cifar' is invalid"),
        ("{data.evaluator: {choice: [auto, rotation]}}", "every trial is scored the same way"),
        ("{eval.num_samples: {choice: [1000, 5000]}}", "set eval.num_samples for the whole sweep"),
    ],
)
def test_malformed_search_space_is_a_clean_error(space, words):
    with pytest.raises(ConfigError) as info:
        check_sweep(load_config(CONFIGS / "smoke.yaml", [f"tune.search_space={space}"]))
    assert str(info.value).startswith("tune.search_space") and words in str(info.value)


def test_grid_needs_random_search():
    with pytest.raises(ConfigError, match="grid axes need tune.search_alg=random"):
        check_sweep(
            load_config(
                CONFIGS / "smoke.yaml", ["tune.search_alg=optuna", "tune.search_space={train.seed: {grid: [0, 1]}}"]
            )
        )


PBT_SPACE = {"optim.lr_g": {"loguniform": [1.0e-4, 1.0e-2]}, "model.latent_dim": {"choice": [32, 64]}}


@pytest.mark.parametrize(
    "tune, words",
    [
        ({"pbt_mutate": ["model.latent_dim"]}, "tune.pbt_mutate: model.latent_dim changes the networks' shapes"),
        ({"pbt_mutate": ["optim.lr_d"]}, "tune.pbt_mutate: optim.lr_d is not in tune.search_space"),
        ({"pbt_mutate": ["train.seed"]}, "tune.pbt_mutate: train.seed cannot change in the middle of a run"),
        (
            {"search_space": {**PBT_SPACE, "model.loss": {"choice": ["bce", "hinge"]}}, "pbt_mutate": ["model.loss"]},
            "tune.pbt_mutate: model.loss cannot change in the middle of a run",  # not a shape: its Adam moments
        ),
        ({"search_alg": "optuna"}, "use tune.search_alg=random"),
        ({"pbt_interval": 0.5}, "set tune.report_every_steps"),
        ({"pbt_interval": 4.0}, "leaves no decision before the last"),
        ({"pbt_factors": [0.8, -1.2]}, "tune.pbt_factors"),
        ({"pbt_quantile": 0.75}, "tune.pbt_quantile: 0.75 is out of range"),
        (
            {"search_space": {**PBT_SPACE, "train.batch_size": {"choice": [32, 64]}}},
            "train.batch_size: cannot be searched",
        ),
        ({"search_space": {"model.latent_dim": {"choice": [32, 64]}}}, "pbt needs a searched key it can mutate"),
    ],
)
def test_pbt_settings_are_checked_with_one_line_errors(tune, words):
    raw = {"train": {"epochs": 3}, "tune": {"scheduler": "pbt", "search_space": PBT_SPACE, **tune}}
    with pytest.raises(ConfigError) as error:
        check_sweep(build_config(raw))
    assert words in str(error.value) and "\n" not in str(error.value)


def test_pbt_mutates_the_searched_keys_it_can_by_default():
    from pipeline.sweep.schedulers import pbt_mutated_keys

    cfg = build_config({"train": {"epochs": 3}, "tune": {"scheduler": "pbt", "search_space": PBT_SPACE}})
    assert pbt_mutated_keys(cfg) == ["optim.lr_g"]  # model.latent_dim is searched, never mutated
    r1 = {
        **PBT_SPACE,
        "optim.r1_gamma": {"loguniform": [0.01, 10.0]},
        "model.loss": {"choice": ["bce", "hinge"]},
        "train.augment_p": {"uniform": [0.0, 1.0]},
    }
    cfg = build_config(
        {"train": {"epochs": 3, "diffaugment": "color"}, "tune": {"scheduler": "pbt", "search_space": r1}}
    )
    assert pbt_mutated_keys(cfg) == ["optim.lr_g", "optim.r1_gamma", "train.augment_p"]  # the loss: searched only
    fractional = build_config(
        {
            "train": {"epochs": 3},
            "tune": {"scheduler": "pbt", "search_space": PBT_SPACE, "pbt_interval": 0.5, "report_every_steps": 100},
        }
    )
    assert fractional.tune.pbt_interval == 0.5


def test_a_pbt_sweep_needs_a_population():
    cfg = build_config(
        {"train": {"epochs": 3}, "tune": {"scheduler": "pbt", "search_space": PBT_SPACE, "num_samples": 1}}
    )
    with pytest.raises(ConfigError, match=r"tune.num_samples: 1 \(1 trial\(s\)\) with tune.scheduler=pbt"):
        check_sweep(cfg)
    # A grid axis multiplies the trials: one sample of a two-value grid is a population of two.
    space = {**PBT_SPACE, "model.latent_dim": {"grid": [16, 32]}}
    check_sweep(
        build_config({"train": {"epochs": 3}, "tune": {"scheduler": "pbt", "search_space": space, "num_samples": 1}})
    )


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["tune.scheduler=hyperband"], "tune.scheduler: 'hyperband' is not a scheduler; choose one of asha, pbt, none"),
        (
            ["tune.metric=ssim"],
            "tune.metric: 'ssim' is not a metric that can rank trials; use one of fid, inception_score, kid, "
            "precision, recall",
        ),
        (["tune.mode=max"], "tune.mode: max with tune.metric=fid; use min (or null)"),
        (["tune.metric=inception_score", "tune.mode=min"], "tune.mode: min with tune.metric=inception_score; use max"),
        (["eval.every_epochs=2"], "eval.every_epochs: 2; a sweep on fid needs it every epoch"),
        (["tune.metric=kid", "tune.mode=max"], "tune.mode: max with tune.metric=kid; use min"),
        (["tracking.champion_metric=ssim"], "tracking.champion_metric: 'ssim' is not a metric that can rank"),
    ],
)
def test_the_scheduler_metric_and_mode_are_checked_by_the_sweep(overrides, words):
    cfg = load_config(CONFIGS / "smoke.yaml", [SPACE, *overrides])  # a valid config: only a sweep needs these
    with pytest.raises(ConfigError) as error:
        check_sweep(cfg)
    assert str(error.value).startswith(words.split(":")[0]) and words in str(error.value)


def test_a_metric_s_own_direction_is_the_default_mode():
    from pipeline.sweep.schedulers import ranking

    for metric, mode in (("fid", "min"), ("inception_score", "max")):
        cfg = load_config(CONFIGS / "smoke.yaml", [SPACE, f"tune.metric={metric}"])
        check_sweep(cfg)
        assert (ranking(cfg)[0].name, ranking(cfg)[1]) == (metric, mode)
    assert ranking(load_config(CONFIGS / "smoke.yaml", [SPACE]))[0].name == "fid"  # null: the registry's default


def test_tune_scheduler_s_doc_names_every_scheduler():
    """The config cannot import the sweep's registry: its doc of tune.scheduler names the schedulers by hand, and
    this keeps it true."""
    from pipeline.config.load import describe_fields
    from pipeline.sweep.schedulers import SCHEDULERS

    doc = next(doc for key, _, doc in describe_fields() if key == "tune.scheduler")
    assert all(name in doc for name in SCHEDULERS), doc
