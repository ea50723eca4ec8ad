"""Building a config: YAML files, dotted ``key=value`` overrides, and the one function that applies them.

Defaults first, then the YAML file (which lists only what it changes), then each override; the result is checked
once (pipeline.config.checks): unknown keys, wrong types, out-of-range values and broken rules across keys raise
a :class:`~pipeline.core.errors.ConfigError` whose message names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.checks import build_section, check_across_keys
from pipeline.config.schema import PipelineConfig
from pipeline.core.errors import ConfigError


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
    return cfg


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
    """(dotted key, default, doc) for every config key, in declaration order (`config --keys`, docs/config.md)."""
    rows = []
    defaults = PipelineConfig()
    for section in dataclasses.fields(PipelineConfig):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            default = getattr(getattr(defaults, section.name), f.name)
            rows.append((f"{section.name}.{f.name}", default, f.metadata["doc"]))
    return rows
