"""Checking a config: each YAML value against its field's type and range, then the rules across keys.

Every failure is a :class:`~pipeline.core.errors.ConfigError` whose message names the key, the bad value and what
is allowed. pipeline.config.schema owns the fields; the data section's rules are its data source's
(pipeline.data.kinds.check_data); a sweep's are pipeline.sweep.checks'.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import TYPE_CHECKING, Any, Literal

from pipeline.core.errors import ConfigError
from pipeline.core.uris import storage_path_problem, tracking_uri_problem
from pipeline.data.kinds import check_data

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


def describe_type(tp: Any) -> str:
    """What a field accepts, in words, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of ({describe_type(typing.get_args(tp)[0])})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce_scalar(value: Any, tp: Any) -> tuple[bool, Any]:
    """(True, the value in canonical form) when ``value`` is a ``tp`` (bool, int, float, str), else (False, None)."""
    if tp is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):  # YAML's true/false is neither a number nor a string here
        return False, None
    if tp is int:
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, int | float):
            return True, float(value)
        # PyYAML reads `1e-3` (no dot) as a string; accept what float() reads, nothing else.
        try:
            return isinstance(value, str), float(value)
        except (TypeError, ValueError):
            return False, None
    return tp is str and isinstance(value, str), value


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, arg)
            except ConfigError:
                pass
    elif origin is Literal:
        # YAML reads `true`/`false` as booleans; tri-state options spell them as strings.
        canon = str(value).lower() if isinstance(value, bool) else value
        if canon in typing.get_args(tp):
            return canon
    elif origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return value
    elif origin is None:
        ok, canon = _coerce_scalar(value, tp)
        if ok:
            return canon
    raise ConfigError(f"{key}: {value!r} is not valid; expected {describe_type(tp)}")


RANGE_CHECKS = (
    ("gt", lambda v, b: v > b, "> {}"),
    ("ge", lambda v, b: v >= b, ">= {}"),
    ("lt", lambda v, b: v < b, "< {}"),
    ("le", lambda v, b: v <= b, "<= {}"),
)


def check_value(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    """A field's range (``gt``, ``ge``, ``lt``, ``le``) and, for a name, its registry (``one_of``: the names)."""
    if "one_of" in meta and value is not None and value not in meta["one_of"]():
        raise ConfigError(f"{key}: {value!r} is not valid; expected one of {', '.join(meta['one_of']())}")
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    for name, test, words in RANGE_CHECKS:
        if name in meta and not test(value, meta[name]):
            raise ConfigError(f"{key}: {value!r} is out of range; must be {words.format(meta[name])}")


def split_range(raw: dict[str, Any], key: str, max_key: str) -> dict[str, Any]:
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


# Keys a section may give as [min, max]: the range's top goes to its own key.
RANGES = {"scaling": (("num_workers", "max_workers"), ("cpus_per_worker", "max_cpus_per_worker"))}


def build_section(name: str, cls: type, raw: Any) -> Any:
    """The dataclass ``cls`` (the config section ``name``) from its YAML mapping ``raw``, every value checked."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key; {name} has: {', '.join(known)}")
    for key, max_key in RANGES.get(name, ()):
        if isinstance(raw.get(key), list):
            raw = {**raw, **split_range(raw, key, max_key)}
    values = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        values[key] = coerce(dotted, value, hints[key])
        check_value(dotted, values[key], known[key].metadata)
    return cls(**values)


# --------------------------------------------------------------------------------------------------
# Rules across keys


def check_across_keys(cfg: PipelineConfig) -> None:
    """Every rule that ties one key to another (the data's size, the workers, the GPU options, names)."""
    check_data(cfg)
    _check_scaling(cfg)
    _check_threads_and_gpus(cfg)
    _check_gpu_options(cfg)
    _check_locations(cfg)
    name = cfg.tracking.registered_model
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(
            f"tracking.registered_model: {name!r} cannot be a model name in models:/NAME@champion; use letters, "
            "digits, '.', '_' and '-' (or '' not to register)"
        )


def _check_locations(cfg: PipelineConfig) -> None:
    """The tracking URI and the storage path by their form (a missing scheme or '//' would go somewhere else)."""
    problem = (cfg.tracking.uri and tracking_uri_problem(cfg.tracking.uri, "tracking.uri")) or (
        cfg.train.storage_path and storage_path_problem(cfg.train.storage_path)
    )
    if problem:
        raise ConfigError(problem)


def _check_scaling(cfg: PipelineConfig) -> None:
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} does not split evenly across scaling.num_workers="
            f"{cfg.scaling.num_workers}; use a multiple of {cfg.scaling.num_workers}"
        )
    high = cfg.scaling.max_workers
    if high is None:
        return
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


def most_workers(cfg: PipelineConfig) -> int:
    """The most workers one run of ``cfg`` can have (the top of an elastic range)."""
    return max(cfg.scaling.num_workers, cfg.scaling.max_workers or 0)


def _check_threads_and_gpus(cfg: PipelineConfig) -> None:
    most = most_workers(cfg)
    threads = cfg.scaling.max_cpus_per_worker
    if threads is not None and most > 1:
        raise ConfigError(
            f"scaling.max_cpus_per_worker: {threads} with up to {most} workers per run; growing threads is for "
            "one-worker trials (several workers grow by scaling.num_workers: [min, max]): set "
            "scaling.num_workers=1 or scaling.max_cpus_per_worker=null"
        )
    if threads is not None and (cfg.scaling.cpus_per_worker is None or threads < cfg.scaling.cpus_per_worker):
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


def _check_diffaugment(cfg: PipelineConfig) -> None:
    from pipeline.config.schema import DIFFAUGMENT_KINDS

    given = cfg.train.diffaugment.split(",") if cfg.train.diffaugment else []
    unknown = [kind for kind in given if kind not in DIFFAUGMENT_KINDS]  # an empty item ("color,") too
    if unknown or len(set(given)) != len(given):
        raise ConfigError(
            f"train.diffaugment: {cfg.train.diffaugment!r}; give each of {', '.join(DIFFAUGMENT_KINDS)} at most once, "
            "comma-separated (e.g. color,translation,cutout), or nothing for none"
        )
    if cfg.train.augment_target is not None and not given:
        raise ConfigError(
            f"train.augment_target: {cfg.train.augment_target:g} without train.diffaugment; it adapts the probability "
            "of DiffAugment's kinds: name them (e.g. train.diffaugment=color,translation,cutout) or unset it"
        )
    if cfg.train.augment_target is not None and cfg.train.augment_p == 1.0:
        raise ConfigError(
            f"train.augment_target: {cfg.train.augment_target:g} with train.augment_p at 1 (its default, every image "
            "augmented): ADA would start where it ends for a set D has memorised; set train.augment_p=0, where ADA "
            "starts (or the start you want, below 1)"
        )
    if given and cfg.train.cuda_graphs == "true":
        raise ConfigError(
            "train.cuda_graphs: true with train.diffaugment; its draws are no input of a captured graph: set "
            "train.cuda_graphs to auto (off with DiffAugment) or false"
        )


def _check_r1(cfg: PipelineConfig, most: int) -> None:
    """R1 needs D's second derivative: torch.compile's graphs and the all-reduce of BatchNorm statistics over
    workers have none."""
    gamma = cfg.optim.r1_gamma
    if gamma and cfg.train.compile:
        raise ConfigError(
            f"optim.r1_gamma={gamma:g} with train.compile=true; torch.compile does not support R1's double backward: "
            "set train.compile=false or optim.r1_gamma=0"
        )
    if gamma and cfg.model.sync_batchnorm and cfg.model.d_norm == "batch" and most > 1:
        raise ConfigError(
            f"optim.r1_gamma={gamma:g} with model.sync_batchnorm=true, a BatchNorm discriminator and up to {most} "
            "workers: the all-reduce of its statistics has no second derivative, so R1's gradient would be wrong; "
            "set model.d_norm=spectral (or none), model.sync_batchnorm=false, or optim.r1_gamma=0"
        )


def _check_gpu_options(cfg: PipelineConfig) -> None:
    graphs, most = cfg.train.cuda_graphs, most_workers(cfg)
    if graphs == "true" and most > 1:
        # A captured step would have to hold DDP's all-reduces too; one-worker runs are where launches bound.
        raise ConfigError(
            f"train.cuda_graphs: true with up to {most} workers per run; CUDA graphs replay one-worker "
            "steps only: set scaling.num_workers=1 (no range) or train.cuda_graphs=false"
        )
    if graphs == "true" and cfg.scaling.use_gpu == "false":
        raise ConfigError(
            "train.cuda_graphs: true with scaling.use_gpu=false; CUDA graphs need a GPU: set train.cuda_graphs=false "
            "or scaling.use_gpu to auto or true"
        )
    if graphs == "true" and cfg.optim.r1_gamma:
        # Lazy R1 runs on one step in r1_every: the steps differ, and one captured graph replays one of them.
        raise ConfigError(
            f"train.cuda_graphs: true with optim.r1_gamma={cfg.optim.r1_gamma:g}; a step with the lazy R1 penalty "
            "differs from the others, and a CUDA graph replays one step: set train.cuda_graphs to auto (off with "
            "R1) or false, or optim.r1_gamma=0"
        )
    _check_r1(cfg, most)
    _check_diffaugment(cfg)
    if cfg.model.conditional and graphs == "true":
        raise ConfigError(
            "train.cuda_graphs: true with model.conditional; its class draws are no input of a captured graph: set "
            "train.cuda_graphs to auto (off for a conditional GAN) or false"
        )
    if graphs != "false" and cfg.train.compile:
        raise ConfigError(
            f"train.cuda_graphs={graphs} with train.compile=true; choose one (torch.compile's own CUDA "
            "graphs come with mode='reduce-overhead'): set train.compile=false or train.cuda_graphs=false"
        )
