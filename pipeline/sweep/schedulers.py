"""The sweep's schedulers, one registry entry each: ``tune.scheduler`` names an entry of :data:`SCHEDULERS`.

An entry says everything the rest of the package asks of a scheduler: the checks of its config values, the Ray
Tune scheduler it makes, how the sweep's first line describes it, whether its trials hand Tune a checkpoint at
every report, which config keys change in the middle of a run, and what it adds to the sweep's summary. Adding
a scheduler is one entry here plus its config values (``tune.*`` in pipeline.config.schema); nothing else in the
package branches on ``tune.scheduler``.

Every scheduler works on our ``progress`` (epochs trained, a fraction between the reports inside an epoch)
and never stops or pauses a trial at its final report: the training is done then, and stopping would only
cut its final logging (generator model, last checkpoint) short.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ConfigError
from pipeline.distributed.hooks import EXPLOIT_TAG
from pipeline.eval.metrics import DEFAULT_RANKING, Metric, metric
from pipeline.gan.models import SHAPE_KEYS
from pipeline.sweep.search_space import spec_kind, tune_domain
from pipeline.sweep.tune_internals import WithoutFailedTrials, perturbations, save_sweep_state

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


@dataclass(frozen=True)
class Summary:
    """What a scheduler adds to the end of a sweep (besides what it logs on the parent run)."""

    text: str | None = None  # printed after the trials table


def _no_checks(cfg: PipelineConfig) -> None:
    return None


def _no_live_keys(cfg: PipelineConfig) -> list[str]:
    return []


def _no_summary(cfg: PipelineConfig, parent: Any, children: Sequence[Any], best: dict[str, Any] | None) -> Summary:
    return Summary()


@dataclass(frozen=True)
class Scheduler:
    name: str
    doc: str  # one line for `config --keys`
    make: Callable[[PipelineConfig], Any]  # cfg -> the Tune scheduler (None: Tune's FIFO, every trial to its end)
    describe: Callable[[PipelineConfig], str]  # cfg -> how the sweep's first line says what it does
    validate: Callable[[PipelineConfig], None] = _no_checks  # cfg -> ConfigError for bad values (with a search space)
    min_trials: int = 1  # fewer trials than this in a sweep are refused ...
    too_few_trials: str = ""  # ... with this reason and fix
    needs_checkpoints: bool = False  # each report hands Tune a checkpoint (PBT copies them between trials)
    live_keys: Callable[[PipelineConfig], list[str]] = _no_live_keys  # cfg -> searched keys that change mid-run
    # (cfg, the parent run's tracker, the child runs, the best row or None) -> what the summary adds
    summarise: Callable[..., Summary] = field(default=_no_summary)


def ranking(cfg: PipelineConfig) -> tuple[Metric, str]:
    """The metric a sweep ranks its trials by (``tune.metric``; null: the registry's default) and which way
    (``tune.mode``; null: the metric's own)."""
    entry = metric(cfg.tune.metric or DEFAULT_RANKING.name)
    return entry, cfg.tune.mode or entry.mode


def scheduler_of(cfg: PipelineConfig) -> Scheduler:
    """The entry ``tune.scheduler`` names; a ConfigError naming the known ones otherwise."""
    if cfg.tune.scheduler not in SCHEDULERS:
        raise ConfigError(
            f"tune.scheduler: {cfg.tune.scheduler!r} is not a scheduler; choose one of {', '.join(SCHEDULERS)}"
        )
    return SCHEDULERS[cfg.tune.scheduler]


def _final_report_passes(base: type, final_epoch: int) -> type:
    """``base`` (a Tune scheduler class) that lets every result of the final epoch pass, decides without the
    trials that failed, and saves the sweep's state as soon as PBT has copied a trial (a driver killed before
    Tune's next periodic save would otherwise resume without the copy it began)."""
    from ray.tune.schedulers import TrialScheduler

    class FinalReportPasses(base):  # type: ignore[valid-type, misc]
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            if result.get("progress", 0) >= final_epoch:
                return TrialScheduler.CONTINUE
            exploits = perturbations(self)
            decision = super().on_trial_result(WithoutFailedTrials(tune_controller), trial, result)
            if perturbations(self) != exploits:
                save_sweep_state(tune_controller)
            return decision

    return FinalReportPasses


# --------------------------------------------------------------------------------------------------
# ASHA and none


def _make_asha(cfg: PipelineConfig) -> Any:
    """ASHA stops weak trials at rungs of ``grace_period * reduction_factor^k`` epochs. A grace period at or past
    the last epoch means no early stopping at all (ASHA itself refuses ``grace_period > max_t``)."""
    from ray.tune.schedulers import ASHAScheduler

    final_epoch = cfg.train.epochs
    return _final_report_passes(ASHAScheduler, final_epoch)(
        time_attr="progress",
        max_t=final_epoch,
        grace_period=min(cfg.tune.grace_period, final_epoch),
        reduction_factor=cfg.tune.reduction_factor,
    )


def _describe_asha(cfg: PipelineConfig) -> str:
    tune = cfg.tune
    if tune.grace_period < cfg.train.epochs:
        ranked, mode = ranking(cfg)
        return f"ASHA on {ranked.name} ({mode}) from epoch {tune.grace_period}"
    return f"no early stopping (tune.grace_period {tune.grace_period} >= train.epochs {cfg.train.epochs})"


ASHA = Scheduler(
    "asha",
    "stops weak trials early (tune.grace_period, tune.reduction_factor)",
    make=_make_asha,
    describe=_describe_asha,
)
NONE = Scheduler(
    "none",
    "runs every trial to the end",
    make=lambda cfg: None,
    describe=lambda cfg: "no early stopping (tune.scheduler none)",
)


# --------------------------------------------------------------------------------------------------
# Population based training

# Keys PBT may change in the middle of a run: the training loop reads them from the config as it goes, or
# (learning rates, betas) puts them into the optimizers it continues with.
PBT_MUTABLE = (
    "optim.lr_g",
    "optim.lr_d",
    "optim.beta1",
    "optim.beta2",
    "optim.lr_final_scale",
    "optim.r1_gamma",
    "train.real_label",
    "train.augment_p",
    "train.augment_target",
    "train.ema_decay",
    "train.top_k_final",
)
# Keys a PBT sweep may not even search: a trial that copies another continues that trial's step count, so
# different steps per epoch (or a different length) would repeat or skip its MLflow steps.
PBT_FIXED = ("train.batch_size", "train.epochs", "data.limit", "data.dataset")


def pbt_mutated_keys(cfg: PipelineConfig) -> list[str]:
    """The searched keys PBT perturbs: ``tune.pbt_mutate``, or every searched key it can change mid-run."""
    if cfg.tune.pbt_mutate is not None:
        return list(cfg.tune.pbt_mutate)
    return [key for key in cfg.tune.search_space if key in PBT_MUTABLE]


def _validate_pbt(cfg: PipelineConfig) -> None:
    tune = cfg.tune
    if tune.search_alg != "random":
        raise ConfigError(
            f"tune.search_alg: {tune.search_alg} with tune.scheduler=pbt; PBT draws its population at random and "
            "then evolves it: use tune.search_alg=random"
        )
    for key in tune.search_space:
        if key in PBT_FIXED:
            raise ConfigError(
                f"tune.search_space.{key}: cannot be searched with tune.scheduler=pbt (a trial that copies another "
                "continues its step count, so its MLflow steps would repeat); fix it, or use tune.scheduler=asha"
            )
    mutated = pbt_mutated_keys(cfg)
    for key in mutated:
        _check_mutated(key, tune.search_space)
    if not mutated:
        raise ConfigError(
            "tune.scheduler: pbt needs a searched key it can mutate, and tune.search_space has none; search at "
            f"least one of {', '.join(PBT_MUTABLE)}"
        )
    if not tune.pbt_factors or any(f <= 0 for f in tune.pbt_factors):
        raise ConfigError(f"tune.pbt_factors: {tune.pbt_factors} must be positive numbers, e.g. [0.8, 1.2]")
    if tune.pbt_interval % 1 and tune.report_every_steps is None:
        raise ConfigError(
            f"tune.pbt_interval: {tune.pbt_interval:g} epochs, but trials report only at epoch ends; set "
            "tune.report_every_steps (e.g. a quarter of an epoch's steps) or a whole number of epochs"
        )
    if tune.pbt_interval >= cfg.train.epochs:
        raise ConfigError(
            f"tune.pbt_interval: {tune.pbt_interval:g} epochs leaves no decision before the last of "
            f"train.epochs={cfg.train.epochs}; lower it"
        )


def _check_mutated(key: str, search_space: dict[str, Any]) -> None:
    if key.removeprefix("model.") in SHAPE_KEYS:
        raise ConfigError(
            f"tune.pbt_mutate: {key} changes the networks' shapes (a copied checkpoint would not fit them); "
            "search it, but leave it out of tune.pbt_mutate"
        )
    if key not in PBT_MUTABLE:
        raise ConfigError(
            f"tune.pbt_mutate: {key} cannot change in the middle of a run; PBT can mutate {', '.join(PBT_MUTABLE)}"
        )
    if key not in search_space:
        raise ConfigError(
            f"tune.pbt_mutate: {key} is not in tune.search_space; add it there (its range is what PBT "
            "perturbs within and resamples from)"
        )


def pbt_options(cfg: PipelineConfig) -> dict[str, Any]:
    """Ray's PopulationBasedTraining, synchronous: every trial reaches a decision point before the bottom
    quantile copies the top one, so a copy continues at the step its trial left (no MLflow step twice, no
    step skipped). A perturbed number is multiplied by one of ``tune.pbt_factors`` and clipped to its search
    range, or (``tune.pbt_resample_probability``) drawn afresh from it; a choice moves to a neighbour."""
    mutations: dict[str, dict[str, Any]] = {}
    bounds: dict[tuple[str, str], tuple[float, float]] = {}
    for dotted in pbt_mutated_keys(cfg):
        section, key = dotted.split(".")
        kind, args = spec_kind(cfg.tune.search_space[dotted])
        listed = kind in ("choice", "grid")
        mutations.setdefault(section, {})[key] = args if listed else tune_domain(kind, args)
        if not listed:
            bounds[(section, key)] = (args[0], args[1])

    def clip(config: dict[str, Any]) -> dict[str, Any]:
        for (section, key), (low, high) in bounds.items():
            config[section][key] = type(config[section][key])(min(max(config[section][key], low), high))
        return config

    return {
        "time_attr": "progress",
        "perturbation_interval": cfg.tune.pbt_interval,
        "hyperparam_mutations": mutations,
        "quantile_fraction": cfg.tune.pbt_quantile,
        "resample_probability": cfg.tune.pbt_resample_probability,
        "perturbation_factors": tuple(cfg.tune.pbt_factors),
        "custom_explore_fn": clip,
        "synch": True,
    }


def _make_pbt(cfg: PipelineConfig) -> Any:
    from ray.tune.schedulers import PopulationBasedTraining

    return _final_report_passes(PopulationBasedTraining, cfg.train.epochs)(**pbt_options(cfg))


def _describe_pbt(cfg: PipelineConfig) -> str:
    tune, (ranked, mode) = cfg.tune, ranking(cfg)
    return (
        f"PBT on {ranked.name} ({mode}) every {tune.pbt_interval:g} epoch(s), the bottom "
        f"{tune.pbt_quantile:g} copying the top and perturbing {', '.join(pbt_mutated_keys(cfg))}"
    )


@dataclass(frozen=True)
class Segment:
    """A stretch of training in one trial's run: steps after ``after`` up to ``until`` (None: the run's end)."""

    trial_id: str
    run_id: str
    after: int
    until: int | None

    def within(self, history: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """The (step, value) points of a metric's history that fall in this stretch, in order."""
        return [
            (step, value)
            for step, value in sorted(history)
            if step > self.after and (self.until is None or step <= self.until)
        ]


def exploits_of(tags: dict[str, str]) -> list[dict[str, Any]]:
    """A trial's exploits as its run's tags record them (EXPLOIT_TAG<step>), oldest first."""
    records = [json.loads(value) for key, value in tags.items() if key.startswith(EXPLOIT_TAG)]
    return sorted(records, key=lambda record: record["step"])


def lineage(parent: Any, trial_id: str, run_id: str, until: int | None = None) -> list[Segment]:
    """The runs whose training made ``run_id``'s weights at step ``until`` (None: its last), oldest first:
    before its last exploit up to then they are its donor's, and so on back to a trial's first step.
    ``parent`` is the sweep's tracker (it reaches the other runs of its store)."""
    earlier = [r for r in exploits_of(parent.run(run_id).tags()) if until is None or r["step"] <= until]
    if not earlier:
        return [Segment(trial_id, run_id, 0, until)]
    last = earlier[-1]
    before = lineage(parent, last["donor_trial"], last["donor_run_id"], last["step"])
    if until is not None and last["step"] >= until:
        return before
    return [*before, Segment(trial_id, run_id, last["step"], until)]


def _summarise_pbt(cfg: PipelineConfig, parent: Any, children: Sequence[Any], best: dict[str, Any] | None) -> Summary:
    """The number of exploits (the parent's ``pbt_exploits``) and the best trial's schedule along its lineage
    (``plots/pbt_schedule.png`` and ``pbt_schedule.md`` on the parent run)."""
    exploits = sum(len(exploits_of(child.tags)) for child in children)
    parent.log_metrics({"pbt_exploits": exploits}, step=0)
    parent.flush()
    if best is None or not best["run_id"]:
        return Summary(f"PBT: {exploits} exploit(s)")
    schedule = _log_schedule(cfg, parent, best)
    return Summary(f"PBT: {exploits} exploit(s); the best trial's schedule along its lineage:\n{schedule}")


def _log_schedule(cfg: PipelineConfig, parent: Any, best: dict[str, Any]) -> str:
    """The best trial's hyperparameters along its lineage, as a plot and a table on the parent run; the table."""
    keys = [dotted.split(".")[1] for dotted in pbt_mutated_keys(cfg)]
    lines = [
        "| steps | trial | " + " | ".join(keys) + f" | {ranking(cfg)[0].name} at the end |",
        "|" + "---|" * (len(keys) + 3),
    ]
    with parent.log_figure("plots/pbt_schedule.png", "global step", "value (log scale)") as ax:
        for n, seg in enumerate(lineage(parent, best["trial_id"], best["run_id"])):
            run = parent.run(seg.run_id)
            firsts = []
            for key in keys:
                points = seg.within(run.metric_history(key))
                firsts.append(f"{points[0][1]:.3g}" if points else "-")
                if points:
                    label = key if n == 0 else None
                    ax.plot(*zip(*points, strict=True), marker="o", color=f"C{keys.index(key)}", label=label)
            if n:
                ax.axvline(seg.after, color="grey", linestyle="--")
                ax.annotate(
                    f"from {seg.trial_id}",
                    (seg.after, 1),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    rotation=90,
                    va="top",
                )
            scores = seg.within(run.metric_history(ranking(cfg)[0].name))
            end = f"{scores[-1][1]:.3f}" if scores else "-"
            span = f"{seg.after}-{seg.until if seg.until is not None else 'end'}"
            lines.append(f"| {span} | {seg.trial_id} | " + " | ".join(firsts) + f" | {end} |")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    table = "\n".join(lines)
    parent.log_text(table + "\n", "pbt_schedule.md")
    return table


PBT = Scheduler(
    "pbt",
    "population based training: copies strong trials' weights into weak ones, perturbs their hyperparameters",
    make=_make_pbt,
    describe=_describe_pbt,
    validate=_validate_pbt,
    min_trials=2,
    too_few_trials="PBT evolves a population: use at least 2 trials (4 or more lets a quarter copy the best quarter)",
    needs_checkpoints=True,
    live_keys=pbt_mutated_keys,
    summarise=_summarise_pbt,
)

SCHEDULERS: dict[str, Scheduler] = {entry.name: entry for entry in (ASHA, PBT, NONE)}
