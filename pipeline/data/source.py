"""What the pipeline asks of the data a run trains on: one :class:`DataSource` per kind of data.

Everything outside pipeline.data that needs to know something about the data asks its source
(:func:`pipeline.data.kinds.source_of`): the config's rules for its keys, the driver's preparation, the workers'
batches, the evaluator's spec, whether scores can be measured on it, how a run records it (the MLflow dataset
input and the run's ``data_sha256`` tag), whether a resumed run still trains on the data it began with, and the
name the Model Registry files a generator under. A new kind of data is a subclass here and one entry in
pipeline.data.kinds.KINDS; nothing else branches on the kind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ConfigError, UserError
from pipeline.data.split import Split

if TYPE_CHECKING:
    import torch

    from pipeline.config.schema import DataConfig, PipelineConfig
    from pipeline.data.batches import Batches
    from pipeline.data.specs import DatasetSpec

Progress = Callable[[str], None]
# The fewest (training, held-out) images a folder without classes needs to be scored, measured with
# scripts/score_degradations.py --limit/--held-out (docs/scores.md): an extractor trained on 75 digits or 100 icons
# passes its gate and its scores order heavy blur, noise and collapse; 30 held-out images a side order those too
# (light blur needs a few hundred). 50 held out is also where a precision share's standard error is about 0.05.
SCORES_NEED = (100, 50)
DATA_TAG = "data_sha256"  # a run's tag: the digest of the data it began with (pipeline.data.source.DataRecord)


class DataError(UserError):
    """Data could not be prepared or read; the message says what was tried and how to fix it."""


def data_root(data: DataConfig) -> Path:
    """Where data and the evaluators trained on it are kept: ``data.root``, else :func:`default_root`."""
    return Path(data.root).expanduser().resolve() if data.root else default_root()


def default_root() -> Path:
    """$PIPELINE_DATA_ROOT, else the per-user cache directory."""
    env = os.environ.get("PIPELINE_DATA_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "gan-pipeline", "data").resolve()


@dataclass(frozen=True)
class DataRecord:
    """How a run records its training data: the MLflow dataset input (name, digest, where it is, its profile) and
    the run's tag :data:`DATA_TAG`, which a resume compares."""

    name: str
    digest: str
    source: str
    profile: dict[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        return {DATA_TAG: self.digest}


def check_counts(cfg: PipelineConfig, available: int) -> None:
    """``data.limit`` and ``train.batch_size`` against the ``available`` training images."""
    if cfg.data.limit is not None and cfg.data.limit > available:
        raise ConfigError(f"data.limit: {cfg.data.limit} exceeds the {available} training images; lower it")
    if cfg.data.limit is None and cfg.train.batch_size > available:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {available} training images; lower it"
        )
    if cfg.data.limit is not None and cfg.data.limit < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the training set "
            f"(data.limit={cfg.data.limit}); lower train.batch_size or raise data.limit"
        )


class DataSource:
    """One kind of data, for the ``DataConfig`` ``data``. A subclass gives :attr:`image_shape`, :meth:`read` and
    :meth:`spec`; every other question has an answer here that fits a set read whole into memory."""

    reads: tuple[str, ...] = ()  # the data.* keys this kind reads besides dataset, root and limit
    fixed: tuple[str, ...] = ()  # those of them a resumed run keeps (its checkpoint's networks are shaped by them)
    hold_out_more = "hold out more or add images"  # the fix when too few images are held out

    def __init__(self, data: DataConfig):
        self.data = data

    @property
    def name(self) -> str:
        return self.data.dataset

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, side, side) of its images, as the networks take them; known before preparing."""
        raise NotImplementedError

    def read(self, train: bool, progress: Progress, most: int | None) -> Split:
        """A split as it is (at least its first ``most`` images when given; more is allowed)."""
        raise NotImplementedError

    def spec(self) -> DatasetSpec:
        """Its spec as the evaluator is built and named by: shape, classes, counts, digest, accuracy gate (after
        :meth:`prepare`)."""
        raise NotImplementedError

    @property
    def location(self) -> str:
        """Where the prepared data is, for messages."""
        return self.describe()

    def check_settings(self, keys: dict[str, str] | None = None) -> None:
        """This kind's own settings (``keys``: the name each data key has where it was given, e.g. a flag)."""

    def known_count(self) -> int | None:
        """Training images, where known before preparing (the config then checks ``data.limit`` against them)."""
        return None

    def check(self, cfg: PipelineConfig) -> None:
        """The config's rules for this kind (the keys it reads; what the counts allow)."""
        count = self.known_count()
        if count is not None:
            check_counts(cfg, count)

    def check_early(self) -> None:
        """Before any work, whatever would make preparing fail (a place that cannot be written)."""

    def prepare(self, progress: Progress = print, maker: Any = None) -> int:
        """Make the data ready for workers on this node; return the number of training images. ``maker`` makes an
        image folder's shards (pipeline.data.shard_making.ShardMaker; default: local processes)."""
        return len(self.read(True, progress, None))

    def load(self, train: bool = True, progress: Progress = print, most: int | None = None) -> Split:
        """A split in memory, the training split cut to ``data.limit``; with ``most``, its first ``most`` images."""
        limit = self.data.limit if train else None
        wanted = min(n for n in (limit, most) if n is not None) if (limit, most) != (None, None) else None
        split = self.read(train, progress, wanted)
        if limit is not None and limit > len(split):
            raise DataError(f"data.limit: {limit} exceeds the {len(split)} training images; lower it")
        keep = len(split) if wanted is None else wanted
        return Split(split.images[:keep].contiguous(), split.labels[:keep].contiguous())

    def pinned(self) -> DataSource:
        """This source, bound to its data as prepared now (a folder's preparation: pipeline.data.folder)."""
        return self

    def batches(self, device: torch.device, progress: Progress = print) -> Batches:
        """A worker's training set, epoch by epoch (pipeline.data.batches): by default the whole (limited) training
        split in memory, on ``device``."""
        from pipeline.data.batches import InMemory

        split = self.load(True, progress)
        return InMemory(split.images, device, split.labels)

    def labelled(self) -> bool:
        """Whether it has classes to train a classifier on, and held-out images of each to test it (after
        :meth:`prepare`)."""
        spec = self.spec()
        return spec.num_classes >= 2 and spec.test_images >= 2 * spec.num_classes

    def scored_by(self) -> str:
        """The network that scores its images (``data.evaluator``; auto: ``classifier`` where it has classes, else
        ``rotation``, an extractor trained without labels): a DataError for a classifier of data without classes."""
        chosen = self.data.evaluator
        if chosen == "auto":
            return "classifier" if self.labelled() else "rotation"
        if chosen == "classifier" and not self.labelled():
            raise DataError(
                f"data.evaluator=classifier: {self.describe()} has no classes with held-out images of each to train "
                "a classifier on; use data.evaluator=auto (a feature extractor trained without labels)"
            )
        return chosen

    def scores_unavailable(self) -> str | None:
        """Why its images cannot be scored (None when they can): a feature space needs images to learn from
        and held-out images to compare with (:data:`SCORES_NEED`), unless a classifier of its classes scores it."""
        spec = self.spec()
        train, test = SCORES_NEED
        if self.scored_by() == "classifier" or (spec.train_images >= train and spec.test_images >= test):
            return None
        held = f"{self.describe()} holds out {spec.test_images} image(s)"
        if spec.num_classes >= 2 and self.data.evaluator != "rotation":
            held += f" for {spec.num_classes} classes (a classifier of them needs {2 * spec.num_classes})"
        return (
            f"{held} and has {spec.train_images} to learn from: too few to score it; a feature extractor needs at "
            f"least {train} to learn from and {test} held out; {self.hold_out_more}"
        )

    def describe(self) -> str:
        """The data in a few words, for messages."""
        return f"the dataset {self.name!r}"

    def evaluator_fix(self) -> str:
        """What to do when the evaluator trained on it misses its accuracy gate."""
        return "Check the data (python -m pipeline data prepare) and try again"

    def record(self) -> DataRecord:
        """How a run records its training split (after :meth:`prepare`)."""
        spec = self.spec()
        count = spec.train_images
        return DataRecord(
            self.name,
            spec.digest,
            self.describe(),
            {"sha256": spec.digest, "split": "train", "limit": self.data.limit, "num_images": self.trained(count)},
        )

    def trained(self, count: int) -> int:
        """How many of ``count`` training images a run trains on (``data.limit``)."""
        return min(count, self.data.limit or count)

    def check_resume(self, tags: dict[str, str], run: str) -> None:
        """A resumed run trains on the data it began with (its tag :data:`DATA_TAG`, where it has one)."""
        began = tags.get(DATA_TAG)
        if began is not None and began != self.record().digest:
            raise ConfigError(
                f"data.dataset: {self.describe()} is no longer the data run {run!r} began with (digest {began[:12]}); "
                "put it back as it was, or start a new run (another --name)"
            )
