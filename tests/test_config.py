import pytest

from pipeline.config.load import build_config, describe_fields, load_config, read_yaml, with_overrides
from pipeline.core.errors import ConfigError
from tests.conftest import CONFIGS, run_cli

SHIPPED = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_with_the_values_it_sets(path):
    """Every key a shipped YAML sets arrives with that value (none dropped, renamed or re-read as another
    type), and the loaded config survives the dict round trip that checkpoints and Ray's workers use."""
    raw = read_yaml(path)
    cfg = load_config(path)
    assert raw, f"{path.name} sets nothing"
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            if (section, key) == ("scaling", "num_workers") and isinstance(value, list):
                got = [got, cfg.scaling.max_workers]  # an elastic range: [min, max]
            if (section, key) == ("scaling", "cpus_per_worker") and isinstance(value, list):
                got = [got, cfg.scaling.max_cpus_per_worker]  # elastic threads: [min, max]
            assert got == value, f"{path.name}: {section}.{key}"
    assert build_config(cfg.to_dict()) == cfg


def test_mnist_config_is_the_seed_dcgan():
    cfg = load_config(CONFIGS / "mnist.yaml")
    assert cfg.data.dataset == "mnist"
    assert cfg.model.latent_dim == 100
    assert (cfg.optim.lr_g, cfg.optim.lr_d, cfg.optim.beta1, cfg.optim.beta2) == (2e-4, 2e-4, 0.5, 0.999)
    assert cfg.train.batch_size == 128


def test_overrides_are_typed_and_win():
    cfg = load_config(CONFIGS / "mnist.yaml", ["optim.lr_g=1e-3", "data.limit=1000", "scaling.use_gpu=false"])
    assert cfg.optim.lr_g == pytest.approx(1e-3)
    assert cfg.data.limit == 1000
    assert cfg.scaling.use_gpu == "false"
    assert load_config(None, ["data.limit=null"]).data.limit is None


def test_every_field_has_a_doc():
    rows = describe_fields()
    assert {"data.dataset", "optim.lr_g", "scaling.use_gpu", "train.seed"} <= {key for key, _, _ in rows}
    assert all(doc.strip() for _, _, doc in rows)


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("optim.lr_gen=1e-3", "optim.lr_gen", "unknown key"),
        ("optimizer.lr_g=1e-3", "optimizer", "unknown section"),
        ("optim.lr_g=fast", "optim.lr_g", "expected a number"),
        ("train.epochs=2.5", "train.epochs", "expected an integer"),
        ("train.epochs=true", "train.epochs", "expected an integer"),
        ("optim.lr_g=0", "optim.lr_g", "must be > 0"),
        ("optim.lr_d=-1e-4", "optim.lr_d", "must be > 0"),
        ("model.latent_dim=0", "model.latent_dim", "must be >= 1"),
        ("train.batch_size=0", "train.batch_size", "must be >= 1"),
        ("train.epochs=0", "train.epochs", "must be >= 1"),
        ("data.dataset=cifar10", "data.dataset", "one of mnist, fashion_mnist"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu", "one of auto, true, false"),
        ("scaling.placement_strategy=RANDOM", "scaling.placement_strategy", "one of PACK, SPREAD, STRICT_SPREAD"),
        ("scaling.resource_wait_s=0", "scaling.resource_wait_s", "must be > 0"),
        ("data.limit=100", "train.batch_size", "larger than the training set"),
    ],
)
def test_bad_values_raise_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "mnist.yaml", [override])
    message = str(info.value)
    assert message.startswith(key) and words in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "args, words",
    [
        (["--set", "optim.lr_g=0"], "optim.lr_g: 0.0 is out of range; must be > 0.0"),
        (["--set", "optim.nope=1"], "optim.nope: unknown key"),
        (
            ["--set", "data.dataset=svhn"],
            "data.dataset: 'svhn' is not valid; expected one of mnist, fashion_mnist",
        ),
        (["--set", "lr=1"], "expected section.key=value"),
    ],
)
def test_cli_bad_config_exits_2_with_one_line(args, words):
    result = run_cli("train", "--config", "configs/mnist.yaml", *args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert "training on" not in result.stdout  # stopped before any work


def test_cli_missing_and_malformed_files(tmp_path):
    missing = run_cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "not found" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr_g: [1e-3\n")
    malformed = run_cli("train", "--config", str(bad))
    assert malformed.returncode == 2 and "malformed YAML at line" in malformed.stderr
    assert "Traceback" not in malformed.stderr


def test_search_space_accepts_the_documented_forms():
    cfg = load_config(
        CONFIGS / "smoke.yaml",
        [
            "tune.search_space={optim.lr_g: {loguniform: [1.0e-5, 1.0e-2]}, model.latent_dim: {choice: [8, 16]},"
            " optim.beta1: {uniform: [0.0, 0.9]}, train.seed: {grid: [0, 1]}, model.g_channels: {randint: [4, 8]}}"
        ],
    )
    assert set(cfg.tune.search_space) == {
        "optim.lr_g",
        "model.latent_dim",
        "optim.beta1",
        "train.seed",
        "model.g_channels",
    }


def _drawn_points(cfg, storage) -> list[dict]:
    """The trials the sweep's search algorithm draws, in order (what Tune would start)."""
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.sweep.search_space import tune_space
    from pipeline.sweep.tune import make_search_alg

    assert make_search_alg(cfg) is None  # random search: Tune makes its generator, as here
    search_alg = BasicVariantGenerator(max_concurrent=0)  # 0: no limit, every trial drawn at once
    search_alg.add_configurations(
        [
            Experiment(
                "s",
                lambda config: None,
                config=tune_space(cfg.tune.search_space),
                num_samples=cfg.tune.num_samples,
                storage_path=storage,
            )
        ]
    )
    points = []
    while (trial := search_alg.next_trial()) is not None:
        points.append(trial.config)
    return points


def test_the_same_seed_draws_the_same_trials(tmp_path):
    # The local sweep's space; Tune's random points come from numpy, which random.seed never reached: two sweeps
    # with one seed drew different trials, so a before/after comparison compared different trials.
    cfg = load_config(CONFIGS / "local.yaml")
    first, again = _drawn_points(cfg, str(tmp_path)), _drawn_points(cfg, str(tmp_path))
    assert len(first) == cfg.tune.num_samples == 4 and first == again
    assert len({p["optim"]["lr_g"] for p in first}) == 4  # random points, not one point four times
    other = _drawn_points(with_overrides(cfg, {"train.seed": cfg.train.seed + 1}), str(tmp_path))
    assert other != first


def test_cli_tune_with_malformed_space_exits_2():
    result = run_cli(
        "tune", "-c", "configs/smoke.yaml", "--set", "tune.search_space={optim.lr_g: {loguniform: [1, 0]}}"
    )
    assert result.returncode == 2 and "must be below high" in result.stderr and "Traceback" not in result.stderr


def test_cli_tune_with_a_name_that_cannot_name_a_sweep_exits_2():
    result = run_cli("tune", "-c", "configs/smoke.yaml", "--name", "team/sweep")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --name: 'team/sweep' cannot name a sweep" in result.stderr


def test_docs_config_md_is_what_the_code_generates():
    """docs/config.md is generated from the code (every key's default and doc, the metrics, the schedulers): written
    by `python -m pipeline config --markdown`, and stale as soon as a key, a doc, a metric or a scheduler changes."""
    from pipeline.tools.reference import config_markdown

    page = (CONFIGS.parent / "docs" / "config.md").read_text()
    assert page == config_markdown(), "docs/config.md is stale: python -m pipeline config --markdown > docs/config.md"
    assert all(f"`{key}`" in page for key, _, _ in describe_fields())


def test_with_overrides_changes_a_copy_and_validates_it():
    base = load_config(CONFIGS / "smoke.yaml")
    changed = with_overrides(base, {"optim.lr_g": 1e-3, "data.limit": None, "tune.search_space": {}})
    assert changed.optim.lr_g == 1e-3 and changed.data.limit is None
    assert base.optim.lr_g != 1e-3 and base.data.limit == 512  # the original is untouched
    with pytest.raises(ConfigError, match="optim.lr_gen: unknown key"):
        with_overrides(base, {"optim.lr_gen": 1.0})
    with pytest.raises(ConfigError, match="train.epochs: 0 is out of range"):
        with_overrides(base, {"train.epochs": 0})
