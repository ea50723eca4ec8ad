"""Which data source a config names (``data.dataset``): an IDX dataset of pipeline.data.specs.DATASETS, or one of
the other kinds in :data:`KINDS` (a folder of images). A new kind of data is a DataSource subclass and one entry
here; the config accepts its name and refuses, for any kind, a data key it does not read."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.core.errors import ConfigError
from pipeline.data.folder import IMAGES, FolderSource
from pipeline.data.idx import IdxSource
from pipeline.data.source import DataSource, Progress
from pipeline.data.specs import DATASETS, DEFAULT_DATASET
from pipeline.data.split import Split

if TYPE_CHECKING:
    from pipeline.config.schema import DataConfig, PipelineConfig

# data.dataset -> its source for a DataConfig (the IDX datasets are found in DATASETS)
KINDS: dict[str, Callable[[DataConfig], DataSource]] = {IMAGES: FolderSource}
COMMON_KEYS = ("dataset", "root", "limit", "flip", "evaluator")  # the data.* keys every kind reads

__all__ = ["DEFAULT_DATASET", "KINDS", "check_data", "load", "source_names", "source_of"]


def source_names() -> list[str]:
    """What ``data.dataset`` accepts."""
    return [*DATASETS, *KINDS]


def source_of(data: DataConfig) -> DataSource:
    """The source of the data ``data`` names; a ConfigError naming the ones there are otherwise."""
    if data.dataset in DATASETS:
        return IdxSource(data, DATASETS[data.dataset])
    if data.dataset in KINDS:
        return KINDS[data.dataset](data)
    raise ConfigError(f"data.dataset: {data.dataset!r} is not valid; expected one of {', '.join(source_names())}")


def check_data(cfg: PipelineConfig) -> None:
    """The data section's rules: a key the chosen kind does not read keeps its default, then the kind's own."""
    source = source_of(cfg.data)
    defaults = type(cfg.data)()
    for field in dataclasses.fields(cfg.data):
        key = field.name
        if key in COMMON_KEYS or key in source.reads or getattr(cfg.data, key) == getattr(defaults, key):
            continue
        kinds = (source_of(dataclasses.replace(cfg.data, dataset=name)) for name in source_names())
        readers = [kind.name for kind in kinds if key in kind.reads]
        raise ConfigError(
            f"data.{key}: set for data.dataset={cfg.data.dataset!r}, which does not read it; it is for "
            f"data.dataset={' or '.join(readers) or '?'}: remove it, or choose that dataset"
        )
    source.check(cfg)


def load(data: DataConfig, train: bool = True, progress: Progress = print, most: int | None = None) -> Split:
    """A split of the data ``data`` names, in memory (its source's :meth:`~pipeline.data.source.DataSource.load`)."""
    return source_of(data).load(train, progress, most)
