"""Typed, validated configuration: dataclasses, YAML loading and dotted ``key=value`` overrides.

Every default lives here, each with a one-line doc (``doc`` in the field's metadata). A YAML file lists
only what it changes. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
whose message names the key, the bad value and what is allowed; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.datasets import DEFAULT_DATASET, IMAGE_SIZES, dataset_names
from pipeline.errors import ConfigError
from pipeline.schedulers import DEFAULT_SCHEDULER, SCHEDULERS, scheduler_of
from pipeline.search_space import check_spec
from pipeline.validation import build_section, check_across_keys


def _f(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field with its doc and range checks (``gt``, ``ge``, ``le``, ``lt``) as metadata."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **checks})
    return field(default=default, metadata={"doc": doc, **checks})


@dataclass
class DataConfig:
    dataset: str = _f(
        DEFAULT_DATASET,
        f"which dataset to train on: {', '.join(dataset_names())} (a folder of your own)",
        one_of=dataset_names,
    )
    root: str | None = _f(None, "data directory; null = $PIPELINE_DATA_ROOT, else ~/.cache/gan-pipeline/data")
    limit: int | None = _f(None, "train on the first N training images only; null = all", ge=1)
    path: str | None = _f(None, "images only: the folder (a directory or s3://bucket/prefix), one subfolder per class")
    image_size: int | None = _f(None, f"images only: the side images are prepared at, one of {IMAGE_SIZES}")
    channels: int = _f(1, "images only: 1 (grey) or 3 (RGB)", ge=1, le=3)
    prepared: str | None = _f(None, "images only: where the prepared shards go; null = <path>.prepared/<side>px-<c>ch")
    test_fraction: float = _f(0.1, "images only: the share held out (by a hash of each path)", ge=0.0, lt=1.0)
    stream: bool | None = _f(
        None,
        "images only: each worker streams its part of the shards (a bounded buffer) instead of holding the whole "
        "set; null = stream when the training images pass data.stream_above_mb",
    )
    stream_above_mb: int = _f(1024, "images only: with data.stream null, stream sets above this many MB (pixels)", ge=0)


@dataclass
class ModelConfig:
    latent_dim: int = _f(100, "size of the generator's noise vector", ge=1)
    g_channels: int = _f(64, "generator width: channels of its last hidden layer", ge=1)
    g_extra_layers: int = _f(
        0, "3x3 conv layers the generator adds at half the image side (MNIST: 14x14) before its last layer", ge=0
    )
    d_channels: int = _f(64, "discriminator width: channels of its first layer", ge=1)
    d_norm: Literal["batch", "spectral", "none"] = _f(
        "batch", "discriminator normalisation: BatchNorm (the seed's), spectral norm on every layer, or none"
    )
    d_dropout: float = _f(0.0, "dropout after each hidden discriminator layer; 0 = off, e.g. 0.3", ge=0.0, lt=1.0)
    d_extra_layers: int = _f(
        0, "3x3 conv layers the discriminator adds at its smallest side (MNIST: 7x7) before its last layer", ge=0
    )
    sync_batchnorm: bool = _f(
        False,
        "with several workers, BatchNorm statistics over the global batch (SyncBatchNorm: one process's "
        "numbers); false = each worker normalises over its own shard (no extra all-reduce per layer)",
    )


@dataclass
class OptimConfig:
    lr_g: float = _f(2e-4, "generator Adam learning rate", gt=0.0)
    lr_d: float = _f(2e-4, "discriminator Adam learning rate", gt=0.0)
    beta1: float = _f(0.5, "Adam beta1 (both networks)", ge=0.0, lt=1.0)
    beta2: float = _f(0.999, "Adam beta2 (both networks)", ge=0.0, lt=1.0)
    lr_final_scale: float = _f(
        1.0,
        "both learning rates fall linearly to this fraction of their value by the last step; 1 = constant",
        ge=0.0,
        le=1.0,
    )
    fused: bool = _f(True, "Adam's fused kernel: one pass over all parameters; false = PyTorch's per-tensor loop")


@dataclass
class TrainConfig:
    epochs: int = _f(5, "passes over the (limited) training set", ge=1)
    batch_size: int = _f(128, "global batch size: split evenly across workers", ge=1)
    seed: int = _f(0, "seed for weights, shuffling and noise; same seed, same run", ge=0)
    g_fresh_noise: bool = _f(
        True, "generator step draws fresh noise (true) or reuses the D step's fakes (false, one G forward)"
    )
    ema_decay: float = _f(
        0.0,
        "exponential moving average of G's weights for sampling and evaluation; 0 = off, e.g. 0.999",
        ge=0.0,
        lt=1.0,
    )
    real_label: float = _f(1.0, "D's target for real images; 0.9 = one-sided label smoothing", gt=0.0, le=1.0)
    top_k_final: float = _f(
        1.0,
        "top-k generator training: G learns only from the fakes D rates most real, a share of each batch "
        "falling linearly from 1 to this by the last step; 1 = off, e.g. 0.5",
        gt=0.0,
        le=1.0,
    )
    precision: Literal["fp32", "bf16", "auto"] = _f(
        "fp32",
        "bf16 = bfloat16 autocast for forward passes; auto = bf16 where the device computes it natively (a GPU "
        "with bf16, a CPU with AVX512-BF16 or AMX, as Linux lists its flags), else fp32",
    )
    channels_last: bool = _f(False, "NHWC memory layout for images and conv weights")
    compile: bool = _f(False, "torch.compile G and D (first steps pay the compilation)")
    cuda_graphs: Literal["auto", "true", "false"] = _f(
        "false",
        "capture each training step (D and G updates) as a CUDA graph and replay it: one launch instead of "
        "hundreds (small models at small batches on a GPU); true = one-worker runs on a CUDA GPU, refused "
        "elsewhere; auto = where a run has one worker on a CUDA GPU, plain steps elsewhere",
    )
    storage_path: str | None = _f(
        None, "where Ray Train keeps runs and checkpoints; null = <project>/runs; shared storage on a cluster"
    )
    keep_checkpoints: int = _f(2, "latest checkpoints kept per run (Ray Train's num_to_keep)", ge=1)
    max_failures: int = _f(2, "worker-group restarts from the last checkpoint before a run fails", ge=0)


@dataclass
class EvalConfig:
    every_epochs: int = _f(1, "compute FID and Inception Score every N epochs (and after the last); 0 = never", ge=0)
    num_samples: int = _f(10_000, "generated images scored per evaluation", ge=2)


@dataclass
class ScalingConfig:
    num_workers: int = _f(
        1, "data-parallel workers (Ray Train); [min, max] makes a sweep's trials elastic (sets max_workers)", ge=1
    )
    max_workers: int | None = _f(
        None,
        "elastic trials: a sweep's trial grows to this many workers while CPUs/GPUs are free and shrinks back "
        "to num_workers when other trials need them; null = a fixed num_workers",
        ge=1,
    )
    elastic_grow_min_s: float = _f(
        60.0,
        "elastic trials: grow only when the training left would take at least this long at the trial's pace "
        "(growing restarts the trial's workers from a checkpoint, about one trial start)",
        ge=0.0,
    )
    cpus_per_worker: int | None = _f(
        None,
        "CPUs per worker, also its torch threads; null = local CPUs / num_workers, 1 in a sweep or on a cluster; "
        "[min, max] makes a sweep's one-worker CPU trials grow their threads (sets max_cpus_per_worker)",
        ge=1,
    )
    max_cpus_per_worker: int | None = _f(
        None,
        "a sweep's one-worker trials on CPUs: a trial's torch threads grow to this many while its node's CPUs are "
        "free (no restart) and fall back to cpus_per_worker when trials wait to start; null = fixed",
        ge=1,
    )
    use_gpu: Literal["auto", "true", "false"] = _f("auto", "auto = use GPUs when the cluster has them")
    gpus_per_worker: float = _f(
        1.0,
        "share of a GPU each worker reserves when GPUs are used; below 1 (e.g. 0.25) packs several one-worker "
        "trials onto one GPU (pays for small, launch-bound models: README 'Several trials per GPU')",
        gt=0.0,
        le=1.0,
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = _f(
        "PACK",
        "how Ray places a run's workers: PACK on as few nodes as fit, SPREAD over as many, STRICT_SPREAD one per node",
    )
    resource_wait_s: float = _f(
        600.0,
        "seconds a run waits for its workers' CPUs/GPUs (at the start, and for a lost node's replacement) "
        "before it fails",
        gt=0.0,
    )


@dataclass
class TuneConfig:
    name: str | None = _f(None, "sweep name: its directory under train.storage_path; null = <dataset>-sweep-<time>")
    num_samples: int = _f(4, "trials to sample (with grid axes: repeats of the whole grid)", ge=1)
    metric: Literal["fid", "inception_score"] = _f("fid", "what the sweep optimises and ASHA compares")
    mode: Literal["min", "max"] = _f("min", "min for fid, max for inception_score")
    search_alg: Literal["random", "optuna"] = _f("random", "random sampling, or Optuna's TPE")
    scheduler: str = _f(
        DEFAULT_SCHEDULER, "; ".join(f"{s.name} {s.doc}" for s in SCHEDULERS.values()), one_of=lambda: SCHEDULERS
    )
    report_every_steps: int | None = _f(
        None,
        "also report (FID and IS, a checkpoint) every N optimizer steps inside an epoch, so schedulers decide "
        "more often than once an epoch; null = at epoch ends only",
        ge=1,
    )
    grace_period: int = _f(1, "ASHA: epochs every trial runs before it may be stopped", ge=1)
    reduction_factor: int = _f(2, "ASHA: the best 1/N of trials go on at each rung", ge=2)
    pbt_interval: float = _f(
        1.0, "PBT: epochs of training between exploit/explore decisions (0.5 needs tune.report_every_steps)", gt=0.0
    )
    pbt_mutate: list[str] | None = _f(
        None,
        "PBT: the searched keys whose values are perturbed at each exploit; null = every searched optim.* and "
        "train.* key PBT can change mid-run (model.* and train.batch_size never)",
    )
    pbt_factors: list[float] = _f(
        [0.8, 1.2], "PBT: a perturbed number is multiplied by one of these (clipped to its search range)"
    )
    pbt_quantile: float = _f(
        0.25, "PBT: the bottom share of trials that copy one of the top share at each decision", gt=0.0, le=0.5
    )
    pbt_resample_probability: float = _f(
        0.25, "PBT: chance that a perturbed key is drawn afresh from its search range instead", ge=0.0, le=1.0
    )
    max_concurrent_trials: int | None = _f(None, "null = what the cluster's CPUs/GPUs allow for one trial", ge=1)
    search_space: dict[str, Any] = _f(
        {}, "dotted key -> {uniform|loguniform|randint: [low, high]} or {choice|grid: [values]}"
    )


@dataclass
class TrackingConfig:
    uri: str | None = _f(None, "MLflow tracking URI; $MLFLOW_TRACKING_URI wins; null = <project>/mlflow.db")
    experiment: str = _f("gan-pipeline", "MLflow experiment name")
    log_every: int = _f(50, "every N global steps, log the losses' mean over those N steps of every worker", ge=1)
    registered_model: str | None = _f(
        None,
        "Model Registry name for the best generator of each train/tune (alias `champion` = lowest FID); "
        "null = gan-<dataset>, '' = do not register",
    )
    system_metrics_s: float = _f(10.0, "seconds between MLflow system-metrics samples (CPU, memory, GPU); 0 off", ge=0)


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"data.dataset": "mnist", ...}``: every leaf under its dotted key."""
        return {
            f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()
        }


# --------------------------------------------------------------------------------------------------
# Building and validating


def build_config(raw: dict[str, Any]) -> PipelineConfig:
    """Validate a nested dict (as read from YAML) into a PipelineConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    for key in raw:
        if key not in sections:
            raise ConfigError(f"{key}: unknown section; sections are: {', '.join(sections)}")
    hints = typing.get_type_hints(PipelineConfig)
    cfg = PipelineConfig(**{name: build_section(name, hints[name], raw.get(name)) for name in sections})
    check_across_keys(cfg)
    if cfg.tune.search_space:
        _check_search_space(cfg)
        scheduler_of(cfg).validate(cfg)
    return cfg


def registered_model_name(cfg: PipelineConfig) -> str:
    """The Model Registry name the best generator goes to; '' when registration is off."""
    name = cfg.tracking.registered_model
    return f"gan-{cfg.data.dataset.replace('_', '-')}" if name is None else name


NOT_SEARCHABLE = ("tune", "tracking")


def _check_search_space(cfg: PipelineConfig) -> None:
    """Every searched key exists and is searchable; every spec is well formed and its values valid."""
    known = cfg.flat()
    for dotted, spec in cfg.tune.search_space.items():
        where = f"tune.search_space.{dotted}"
        if dotted not in known or dotted.split(".")[0] in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: not a searchable config key; use a dotted key such as optim.lr_g")
        kind, args = check_spec(where, spec, cfg.tune.search_alg)
        for value in args:
            try:
                with_overrides(cfg, {dotted: value, "tune.search_space": {}})
            except ConfigError as exc:
                raise ConfigError(f"{where}.{kind}: value {value!r} is invalid ({exc})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr_g=1e-3"`` -> ("optim.lr_g", 0.001). Values are read as YAML scalars."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set optim.lr_g=1e-3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return ".".join(parts), parsed


def set_dotted(raw: dict[str, Any], values: typing.Mapping[str, Any]) -> dict[str, Any]:
    """Set each ``section.key`` of ``values`` in the nested dict ``raw`` (as read from YAML); returns ``raw``.

    The one place dotted overrides are applied: ``--set``, search-space points, bench and sweep settings.
    """
    for dotted, value in values.items():
        section, key = dotted.split(".")
        target = raw.setdefault(section, {})
        if target is None:
            target = raw[section] = {}
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {target!r}")
        target[key] = value
    return raw


def with_overrides(cfg: PipelineConfig, values: typing.Mapping[str, Any]) -> PipelineConfig:
    """``cfg`` with each dotted key of ``values`` replaced, validated again like any config."""
    return build_config(set_dotted(cfg.to_dict(), values))


def trial_config(base: PipelineConfig, point: typing.Mapping[str, Any]) -> PipelineConfig:
    """The base config of a sweep with one point of its search space (dotted keys) applied, validated again."""
    return with_overrides(base, {**point, "tune.search_space": {}})


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass an existing YAML file, e.g. configs/mnist.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {str(p)!r}: malformed YAML{where}: {problem}; fix the file") from None
    return raw if raw is not None else {}


def load_config(path: str | os.PathLike[str] | None = None, overrides: typing.Iterable[str] = ()) -> PipelineConfig:
    """Defaults, then the YAML file (if any), then each ``section.key=value`` override, validated once."""
    raw = read_yaml(path) if path is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections at the top level")
    set_dotted(raw, dict(parse_override(text) for text in overrides))
    return build_config(raw)


def describe_fields() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every config key, in declaration order (for docs and `config keys`)."""
    rows = []
    defaults = PipelineConfig()
    for section in dataclasses.fields(PipelineConfig):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            rows.append(
                (
                    f"{section.name}.{f.name}",
                    getattr(getattr(defaults, section.name), f.name),
                    f.metadata["doc"],
                )
            )
    return rows
