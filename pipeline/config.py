"""Typed, validated configuration: dataclasses, YAML loading and dotted ``key=value`` overrides.

Every default lives here, each with a one-line doc (``doc`` in the field's metadata). A YAML file lists
only what it changes. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
whose message names the key, the bad value and what is allowed; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class UserError(Exception):
    """A problem the user must fix (bad config, missing data, damaged file): one line, ready to print.

    The CLI prints it as ``error: ...`` and exits 2, without a traceback.
    """


class ConfigError(UserError, ValueError):
    """A configuration value, key or file is wrong; the message names the key and what is allowed."""


def make_writable_dir(path: Path, error: type[UserError], what: str, fix: str) -> None:
    """Create ``path`` (with parents) and check a file can be written in it, before any expensive work.

    An OSError becomes ``error`` with one line: "<what> '<path>' is not writable (<reason>); <fix>".
    """
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise error(f"{what} {str(path)!r} is not writable ({exc.strerror}); {fix}") from None


def _f(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field with its doc and range checks (``gt``, ``ge``, ``le``, ``lt``) as metadata."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **checks})
    return field(default=default, metadata={"doc": doc, **checks})


@dataclass
class DataConfig:
    dataset: Literal["mnist", "fashion_mnist"] = _f("mnist", "which dataset to train on")
    root: str | None = _f(None, "data directory; null = $PIPELINE_DATA_ROOT, else ~/.cache/gan-pipeline/data")
    limit: int | None = _f(None, "train on the first N training images only; null = all", ge=1)


@dataclass
class ModelConfig:
    latent_dim: int = _f(100, "size of the generator's noise vector", ge=1)
    g_channels: int = _f(64, "generator width: channels of its last hidden layer", ge=1)
    g_extra_layers: int = _f(0, "3x3 conv layers the generator adds at 14x14 before its last layer", ge=0)
    d_channels: int = _f(64, "discriminator width: channels of its first layer", ge=1)
    d_norm: Literal["batch", "spectral", "none"] = _f(
        "batch", "discriminator normalisation: BatchNorm (the seed's), spectral norm on every layer, or none"
    )
    d_dropout: float = _f(0.0, "dropout after each hidden discriminator layer; 0 = off, e.g. 0.3", ge=0.0, lt=1.0)
    d_extra_layers: int = _f(0, "3x3 conv layers the discriminator adds at 7x7 before its last layer", ge=0)


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
        "with bf16, a CPU with AVX512-BF16 or AMX), else fp32",
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
    scheduler: Literal["asha", "pbt", "none"] = _f(
        "asha",
        "asha stops weak trials early; pbt (population based training) copies strong trials' weights into weak "
        "ones and perturbs their hyperparameters; none runs every trial to the end",
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
    log_every: int = _f(50, "log per-step losses every N global steps", ge=1)
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


def _describe(tp: Any) -> str:
    """What a field accepts, in words, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of ({_describe(typing.get_args(tp)[0])})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
    elif origin is Literal:
        allowed = typing.get_args(tp)
        # YAML reads `true`/`false` as booleans; tri-state options spell them as strings.
        canon = str(value).lower() if isinstance(value, bool) else value
        if canon in allowed:
            return canon
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `1e-3` (no dot) as a string; accept what float() reads, nothing else.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif tp is str and isinstance(value, str) or origin is dict and isinstance(value, dict):
        return value
    raise ConfigError(f"{key}: {value!r} is not valid; expected {_describe(tp)}")


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    for name, test, words in (
        ("gt", lambda v, b: v > b, "> {}"),
        ("ge", lambda v, b: v >= b, ">= {}"),
        ("lt", lambda v, b: v < b, "< {}"),
        ("le", lambda v, b: v <= b, "<= {}"),
    ):
        if name in meta and not test(value, meta[name]):
            raise ConfigError(f"{key}: {value!r} is out of range; must be {words.format(meta[name])}")


def _range(raw: dict[str, Any], key: str, max_key: str) -> dict[str, Any]:
    """``scaling.<key>: [min, max]`` (elastic trials: ``num_workers``, or ``cpus_per_worker`` for threads), stored
    as key=min and max_key=max."""
    given = raw[key]
    if len(given) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in given):
        raise ConfigError(f"scaling.{key}: {given!r}; give one number or [min, max], e.g. [1, 4]")
    low, high = given
    if low > high:
        raise ConfigError(f"scaling.{key}: [{low}, {high}]; min must not exceed max, e.g. [{high}, {low}]")
    if raw.get(max_key) not in (None, high):
        raise ConfigError(f"scaling.{key}: [{low}, {high}] with scaling.{max_key}={raw[max_key]}; give the range once")
    return {key: low, max_key: high}


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key; {name} has: {', '.join(known)}")
    values = {}
    if name == "scaling" and isinstance(raw.get("num_workers"), list):
        raw = {**raw, **_range(raw, "num_workers", "max_workers")}
    if name == "scaling" and isinstance(raw.get("cpus_per_worker"), list):
        raw = {**raw, **_range(raw, "cpus_per_worker", "max_cpus_per_worker")}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        coerced = _coerce(dotted, value, hints[key])
        _check_range(dotted, coerced, known[key].metadata)
        values[key] = coerced
    return cls(**values)


def build_config(raw: dict[str, Any]) -> PipelineConfig:
    """Validate a nested dict (as read from YAML) into a PipelineConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    for key in raw:
        if key not in sections:
            raise ConfigError(f"{key}: unknown section; sections are: {', '.join(sections)}")
    hints = typing.get_type_hints(PipelineConfig)
    cfg = PipelineConfig(**{name: _build_section(name, hints[name], raw.get(name)) for name in sections})
    _cross_checks(cfg)
    if cfg.tune.search_space:
        _check_search_space(cfg)
        if cfg.tune.scheduler == "pbt":
            _check_pbt(cfg)
    return cfg


TRAIN_IMAGES = {"mnist": 60_000, "fashion_mnist": 60_000}


def _cross_checks(cfg: PipelineConfig) -> None:
    available = TRAIN_IMAGES[cfg.data.dataset]
    if cfg.data.limit is not None and cfg.data.limit > available:
        raise ConfigError(f"data.limit: {cfg.data.limit} exceeds the {available} training images; lower it")
    if cfg.data.limit is None and cfg.train.batch_size > available:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {available} training images; lower it"
        )
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} does not split evenly across scaling.num_workers="
            f"{cfg.scaling.num_workers}; use a multiple of {cfg.scaling.num_workers}"
        )
    high = cfg.scaling.max_workers
    if high is not None:
        if high < cfg.scaling.num_workers:
            raise ConfigError(
                f"scaling.max_workers: {high} is below scaling.num_workers={cfg.scaling.num_workers} (the minimum); "
                f"raise it or set it to null for a fixed size"
            )
        odd = [w for w in range(cfg.scaling.num_workers, high + 1) if cfg.train.batch_size % w]
        if odd:
            even = math.lcm(*range(cfg.scaling.num_workers, high + 1))
            raise ConfigError(
                f"train.batch_size: {cfg.train.batch_size} does not split evenly across {odd[0]} workers, a size "
                f"the elastic range scaling.num_workers=[{cfg.scaling.num_workers}, {high}] can take; use a batch "
                f"size every size in the range divides (e.g. {even * 16}) or a narrower range"
            )
    most = max(cfg.scaling.num_workers, cfg.scaling.max_workers or 0)
    threads = cfg.scaling.max_cpus_per_worker
    if threads is not None:
        if most > 1:
            raise ConfigError(
                f"scaling.max_cpus_per_worker: {threads} with up to {most} workers per run; growing threads is for "
                "one-worker trials (several workers grow by scaling.num_workers: [min, max]): set "
                "scaling.num_workers=1 or scaling.max_cpus_per_worker=null"
            )
        if cfg.scaling.cpus_per_worker is None or threads < cfg.scaling.cpus_per_worker:
            raise ConfigError(
                f"scaling.max_cpus_per_worker: {threads} needs scaling.cpus_per_worker (the minimum) at or below it; "
                f"give both as scaling.cpus_per_worker=[1, {threads}]"
            )
    if cfg.scaling.gpus_per_worker < 1.0 and most > 1:
        # Ray would place two workers of one run on one GPU, where NCCL refuses to start ("Duplicate GPU").
        raise ConfigError(
            f"scaling.gpus_per_worker: {cfg.scaling.gpus_per_worker:g} with up to {most} workers per run; a shared "
            "GPU holds one-worker runs only (NCCL needs a GPU per rank): set scaling.num_workers=1 (no range) to "
            "pack several trials per GPU, or scaling.gpus_per_worker=1"
        )
    if cfg.train.cuda_graphs == "true" and most > 1:
        # A captured step would have to hold DDP's all-reduces too; one-worker runs are where launches bound.
        raise ConfigError(
            f"train.cuda_graphs: true with up to {most} workers per run; CUDA graphs replay one-worker steps only: "
            "set scaling.num_workers=1 (no range) or train.cuda_graphs=false"
        )
    if cfg.train.cuda_graphs == "true" and cfg.scaling.use_gpu == "false":
        raise ConfigError(
            "train.cuda_graphs: true with scaling.use_gpu=false; CUDA graphs need a GPU: set train.cuda_graphs=false "
            "or scaling.use_gpu to auto or true"
        )
    if cfg.train.cuda_graphs != "false" and cfg.train.compile:
        raise ConfigError(
            f"train.cuda_graphs={cfg.train.cuda_graphs} with train.compile=true; choose one (torch.compile's own CUDA "
            "graphs come with mode='reduce-overhead'): set train.compile=false or train.cuda_graphs=false"
        )
    if cfg.data.limit is not None and cfg.data.limit < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the training set "
            f"(data.limit={cfg.data.limit}); lower train.batch_size or raise data.limit"
        )
    name = cfg.tracking.registered_model
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(
            f"tracking.registered_model: {name!r} cannot be a model name in models:/NAME@champion; use letters, "
            "digits, '.', '_' and '-' (or '' not to register)"
        )


def registered_model_name(cfg: PipelineConfig) -> str:
    """The Model Registry name the best generator goes to; '' when registration is off."""
    name = cfg.tracking.registered_model
    return f"gan-{cfg.data.dataset.replace('_', '-')}" if name is None else name


SEARCH_KINDS = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": None, "grid": None}
NOT_SEARCHABLE = ("tune", "tracking")


def _check_search_space(cfg: PipelineConfig) -> None:
    """Every searched key exists and is searchable; every spec is well formed and its values valid."""
    space = cfg.tune.search_space
    known = cfg.flat()
    for dotted, spec in space.items():
        where = f"tune.search_space.{dotted}"
        if dotted not in known or dotted.split(".")[0] in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: not a searchable config key; use a dotted key such as optim.lr_g")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise ConfigError(
                f"{where}: {spec!r} is not a search spec; use one of {{{', '.join(SEARCH_KINDS)}: ...}}, "
                "e.g. {loguniform: [1.0e-5, 1.0e-2]}"
            )
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
        if SEARCH_KINDS[kind] == 2:
            if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{where}.{kind}: expected [low, high] numbers, got {args!r}")
            if not args[0] < args[1]:
                raise ConfigError(f"{where}.{kind}: low {args[0]} must be below high {args[1]}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}.loguniform: low {args[0]} must be > 0")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}.randint: bounds must be integers, got {args!r}")
        if kind == "grid" and cfg.tune.search_alg == "optuna":
            raise ConfigError(f"{where}.grid: grid axes need tune.search_alg=random (Optuna samples, it cannot grid)")
        for value in args:
            try:
                with_overrides(cfg, {dotted: value, "tune.search_space": {}})
            except ConfigError as exc:
                raise ConfigError(f"{where}.{kind}: value {value!r} is invalid ({exc})") from None


# Keys PBT may change in the middle of a run: the training loop reads them from the config as it goes, or
# (learning rates, betas) puts them into the optimizers it continues with.
PBT_MUTABLE = (
    "optim.lr_g",
    "optim.lr_d",
    "optim.beta1",
    "optim.beta2",
    "optim.lr_final_scale",
    "train.real_label",
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


def _check_pbt(cfg: PipelineConfig) -> None:
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
        if key.startswith("model."):
            raise ConfigError(
                f"tune.pbt_mutate: {key} changes the networks' shapes (a copied checkpoint would not fit them); "
                "search it, but leave it out of tune.pbt_mutate"
            )
        if key not in PBT_MUTABLE:
            raise ConfigError(
                f"tune.pbt_mutate: {key} cannot change in the middle of a run; PBT can mutate {', '.join(PBT_MUTABLE)}"
            )
        if key not in tune.search_space:
            raise ConfigError(
                f"tune.pbt_mutate: {key} is not in tune.search_space; add it there (its range is what PBT "
                "perturbs within and resamples from)"
            )
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
