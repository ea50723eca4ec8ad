"""What a sweep needs beyond a valid config, checked before anything starts: something to search, each searched
key and value valid, its scheduler and that scheduler's settings, a metric that can rank trials and the way it is
ranked, a score every epoch, and enough trials for the scheduler. Every failure is one ConfigError naming the key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config.load import with_overrides
from pipeline.core.errors import ConfigError
from pipeline.eval.metrics import champion_metric
from pipeline.sweep.schedulers import ranking, scheduler_of
from pipeline.sweep.search_space import check_spec, trial_count

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig

NOT_SEARCHABLE = ("tune", "tracking")
# Keys every trial of a sweep shares, since its trials are ranked against each other: one evaluator per dataset
# scores them all, at one sample count.
SHARED_BY_TRIALS = ("data.evaluator", "eval.num_samples")


def check_sweep(cfg: PipelineConfig) -> None:
    """Everything a sweep needs of ``cfg`` (see the module's doc)."""
    if not cfg.tune.search_space:
        raise ConfigError(
            "tune.search_space: empty; give at least one key, e.g. optim.lr_g: {loguniform: [1.0e-5, 1.0e-2]}"
        )
    check_search_space(cfg)
    champion_metric(cfg)
    scheduler = scheduler_of(cfg)
    scheduler.validate(cfg)
    ranked, mode = ranking(cfg)
    if mode != ranked.mode:
        raise ConfigError(f"tune.mode: {mode} with tune.metric={ranked.name}; use {ranked.mode} (or null)")
    if cfg.eval.every_epochs != 1:
        raise ConfigError(
            f"eval.every_epochs: {cfg.eval.every_epochs}; a sweep on {ranked.name} needs it every epoch "
            "(ASHA compares trials at each epoch); set eval.every_epochs=1"
        )
    trials = trial_count(cfg.tune.num_samples, cfg.tune.search_space)
    if trials < scheduler.min_trials:
        raise ConfigError(
            f"tune.num_samples: {cfg.tune.num_samples} ({trials} trial(s)) with tune.scheduler={scheduler.name}; "
            f"{scheduler.too_few_trials}"
        )


def check_search_space(cfg: PipelineConfig) -> None:
    """Every searched key exists and is searchable; every spec is well formed and its values valid."""
    known = cfg.flat()
    for dotted, spec in cfg.tune.search_space.items():
        where = f"tune.search_space.{dotted}"
        if dotted not in known or dotted.split(".")[0] in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: not a searchable config key; use a dotted key such as optim.lr_g")
        if dotted in SHARED_BY_TRIALS:
            raise ConfigError(
                f"{where}: every trial is scored the same way, so that their scores rank them; set {dotted} for the "
                "whole sweep instead"
            )
        kind, args = check_spec(where, spec, cfg.tune.search_alg)
        for value in args:
            try:
                with_overrides(cfg, {dotted: value, "tune.search_space": {}})
            except ConfigError as exc:
                raise ConfigError(f"{where}.{kind}: value {value!r} is invalid ({exc})") from None
