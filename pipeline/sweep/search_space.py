"""A sweep's search space: the YAML spec kinds (``tune.search_space``) and their Ray Tune domains.

``{loguniform: [low, high]}`` and its kin in the config become Tune's sampling domains here, and a point Tune
draws (nested by config section) turns back into dotted config keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.config.load import with_overrides
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig

# Each spec kind and how many values it takes (None: any number of them).
SEARCH_KINDS: dict[str, int | None] = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": None, "grid": None}


def spec_kind(spec: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """A (validated) spec's kind and its values: ``{"loguniform": [1e-4, 1e-2]}`` -> ("loguniform", [...])."""
    kind, args = next(iter(spec.items()))
    return kind, list(args)


def is_numeric_range(kind: str) -> bool:
    """Whether a spec kind draws from a numeric range (the others list their values)."""
    return SEARCH_KINDS[kind] == 2


def check_spec(where: str, spec: Any, search_alg: str) -> tuple[str, list[Any]]:
    """One spec's shape (its values are checked against the key's field elsewhere): its kind and values, or a
    ConfigError naming ``where`` (``tune.search_space.<key>``)."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
        raise ConfigError(
            f"{where}: {spec!r} is not a search spec; use one of {{{', '.join(SEARCH_KINDS)}: ...}}, "
            "e.g. {loguniform: [1.0e-5, 1.0e-2]}"
        )
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    if is_numeric_range(kind):
        _check_bounds(f"{where}.{kind}", kind, args)
    if kind == "grid" and search_alg == "optuna":
        raise ConfigError(f"{where}.grid: grid axes need tune.search_alg=random (Optuna samples, it cannot grid)")
    return kind, args


def _check_bounds(where: str, kind: str, args: list[Any]) -> None:
    if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: expected [low, high] numbers, got {args!r}")
    if not args[0] < args[1]:
        raise ConfigError(f"{where}: low {args[0]} must be below high {args[1]}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{where}: low {args[0]} must be > 0")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: bounds must be integers, got {args!r}")


def tune_domain(kind: str, args: list[Any]) -> Any:
    """Ray Tune's domain for one spec; ``randint``'s high is inclusive, as the YAML reads."""
    from ray import tune

    makers = {
        "uniform": lambda: tune.uniform(*args),
        "loguniform": lambda: tune.loguniform(*args),
        "randint": lambda: tune.randint(args[0], args[1] + 1),
        "choice": lambda: tune.choice(args),
        "grid": lambda: tune.grid_search(args),
    }
    return makers[kind]()


def tune_space(search_space: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``tune.search_space`` as a nested Ray Tune param space: {"optim": {"lr_g": tune.loguniform(...)}}."""
    space: dict[str, dict[str, Any]] = {}
    for dotted, spec in search_space.items():
        section, key = dotted.split(".")
        space.setdefault(section, {})[key] = tune_domain(*spec_kind(spec))
    return space


def flat_point(point: Mapping[str, Any]) -> dict[str, Any]:
    """Tune's nested point {"optim": {"lr_g": ...}} as dotted keys; anything else Tune adds is left out."""
    return {
        f"{section}.{key}": value
        for section, values in point.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def trial_count(num_samples: int, search_space: Mapping[str, Mapping[str, Any]]) -> int:
    """How many trials a sweep runs: ``num_samples`` repeats of every grid axis's values (Tune's grid search)."""
    count = num_samples
    for spec in search_space.values():
        kind, args = spec_kind(spec)
        if kind == "grid":
            count *= len(args)
    return count


def trial_config(base: PipelineConfig, point: Mapping[str, Any]) -> PipelineConfig:
    """The base config of a sweep with one point of its search space (dotted keys) applied, validated again."""
    return with_overrides(base, {**point, "tune.search_space": {}})
