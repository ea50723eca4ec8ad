"""A folder of your own images (``data.dataset: images``) as a data source: prepared once into Parquet shards and
a manifest (pipeline.data.images), read back (pipeline.data.shards), streamed by workers or held in memory
(pipeline.data.batches). Its spec comes from the config (``data.path``, ``data.image_size``, ``data.channels``)
and, once prepared, its manifest (classes, counts, content digest)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.core.uris import storage_path_problem
from pipeline.data.pixels import background_hex
from pipeline.data.shards import ImageFolderError, Preparation, Prepared, iter_shards, read_manifest
from pipeline.data.source import DATA_TAG, DataRecord, DataSource, Progress
from pipeline.data.specs import DatasetSpec
from pipeline.data.split import Split

if TYPE_CHECKING:
    import torch

    from pipeline.config.schema import PipelineConfig
    from pipeline.data.batches import Batches

IMAGES = "images"  # data.dataset for a folder of your own images
IMAGE_SIZES = (32, 64, 128)  # the sides a folder is prepared at
EVALUATOR_GATE = 0.80  # the held-out accuracy a labelled folder's evaluator must reach
EVALUATOR_STEPS = 600  # and the steps it trains at least, however few images the folder has
EVALUATOR_IMAGES = (60_000, 10_000)  # and the most (training, test) images it reads, however many there are


def prepared_location(path: str, image_size: int, channels: int, chosen: str | None = None) -> str:
    """Where a folder's shards and manifest go: ``chosen``, else beside the folder (``<path>.prepared/<side>px-
    <channels>ch``), never inside it (it would read as a class); for a bucket's root, in its hidden ``.prepared/``
    folder."""
    if chosen:
        return chosen.rstrip("/")
    folder = path.rstrip("/")
    if "://" in folder and "/" not in folder.split("://", 1)[1]:  # a bucket's root: beside it is another bucket
        return f"{folder}/.prepared/{image_size}px-{channels}ch"  # hidden: the listing leaves it out
    return f"{folder}.prepared/{image_size}px-{channels}ch"


class FolderSource(DataSource):
    """A folder of images (a directory or ``s3://bucket/prefix``), one subfolder per class or none."""

    reads = ("path", "image_size", "channels", "prepared", "test_fraction", "background", "stream", "stream_above_mb")
    fixed = ("image_size", "channels")
    hold_out_more = "raise data.test_fraction or add images"
    began_with: str | None = None  # the manifest's digest a run began with (:meth:`pinned`)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.data.channels, self.data.image_size, self.data.image_size

    @property
    def path(self) -> str:
        """The folder, a local one made absolute."""
        path = self.data.path
        return path if "://" in path else str(Path(path).expanduser().resolve())

    @property
    def preparation(self) -> Preparation:
        data = self.data
        location = prepared_location(self.path, data.image_size, data.channels, data.prepared)
        return Preparation(
            self.path, location, data.image_size, data.channels, data.test_fraction, background_hex(data.background)
        )

    def describe(self) -> str:
        return f"the image folder {self.data.path}"

    @property
    def location(self) -> str:
        return self.preparation.location

    def check(self, cfg: PipelineConfig) -> None:
        """Its settings; its counts are in its manifest, checked once it is prepared."""
        self.check_settings()

    def check_settings(self, keys: dict[str, str] | None = None) -> None:
        """The folder's settings (``keys``: the name each has where it was given, e.g. a command-line flag)."""
        data = self.data
        names = ("path", "image_size", "channels", "prepared", "background")
        key = {name: (keys or {}).get(name, f"data.{name}") for name in names}
        if not data.path:
            raise ConfigError(f"{key['path']}: not set; images need the folder (a directory or s3://bucket/prefix)")
        if data.image_size not in IMAGE_SIZES:
            given = "not set" if data.image_size is None else data.image_size
            raise ConfigError(
                f"{key['image_size']}: {given}; images are prepared at one of {', '.join(map(str, IMAGE_SIZES))}"
            )
        if data.channels not in (1, 3):
            raise ConfigError(f"{key['channels']}: {data.channels}; use 1 (grey) or 3 (RGB)")
        try:
            background_hex(data.background)
        except ValueError as exc:
            raise ConfigError(f"{key['background']}: {exc}") from None
        problem = storage_path_problem(data.path, key["path"]) or (
            data.prepared and storage_path_problem(data.prepared, key["prepared"])
        )
        if problem:
            raise ConfigError(problem)

    def prepare(self, progress: Progress = print, maker: Any = None) -> int:
        from pipeline.data.images import prepare_folder

        return prepare_folder(self.preparation, progress, maker=maker).count("train")

    def prepared(self) -> Prepared:
        """The prepared folder (its manifest read); an ImageFolderError when it is not prepared for these settings."""
        job = self.preparation
        manifest = read_manifest(job.location)
        if manifest is None or (manifest["image_size"], manifest["channels"]) != (job.image_size, job.channels):
            raise ImageFolderError(
                f"data.path: {job.path!r} is not prepared at {job.image_size} px, {job.channels} channel(s) in "
                f"{job.location}; run: python -m pipeline data prepare --dataset images --path {job.path} "
                f"--image-size {job.image_size} --channels {job.channels}"
            )
        if self.began_with is not None and manifest.get("digest") != self.began_with:
            raise ImageFolderError(
                f"data.prepared: {job.location!r} was prepared again since the run began (its images' digest is now "
                f"{str(manifest.get('digest'))[:12]}, the run's {self.began_with[:12]}): a worker would train on other "
                "images; put the preparation back as it was, or start a new run (another --name)"
            )
        return Prepared(job.location, manifest)

    def pinned(self) -> FolderSource:
        """This source, bound to the preparation as it is now: every later read (each worker's start, a restart
        too) checks the manifest is still the one the run began with."""
        self.began_with = self.prepared().manifest["digest"]
        return self

    def read(self, train: bool, progress: Progress, most: int | None) -> Split:
        """The prepared split: uint8 images (N, C, H, W) and int64 labels (-1: unlabelled); with ``most``, only the
        shards that hold its first ``most`` images are read."""
        import torch

        prepared = self.prepared()
        parts = []
        for part in iter_shards(prepared, "train" if train else "test"):
            parts.append(part)
            if most is not None and sum(len(p[1]) for p in parts) >= most:
                break
        if not parts:
            return Split(torch.zeros((0, *prepared.image_shape), dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
        pixels, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return Split(torch.from_numpy(pixels), torch.from_numpy(labels))

    def batches(self, device: torch.device, progress: Progress = print) -> Batches:
        """The shards streamed (``data.stream``, or null and larger than ``data.stream_above_mb``), else the whole
        (limited) training split in memory."""
        from pipeline.data.batches import Streamed

        prepared = self.prepared()
        stream = Streamed(prepared.location, prepared.manifest, self.data.limit)
        pixels = len(stream) * int(np.prod(stream.image_shape))
        if self.data.stream or (self.data.stream is None and pixels > self.data.stream_above_mb << 20):
            progress(f"[data] streaming {len(stream)} training images from {prepared.location}")
            return stream
        return super().batches(device, progress)

    def spec(self) -> DatasetSpec:
        """Shape, classes, counts, the content's digest, and the accuracy its evaluator must reach."""
        prepared = self.prepared()
        return DatasetSpec(
            name=IMAGES,
            folder=self.path,
            image_size=self.data.image_size,
            channels=self.data.channels,
            num_classes=len(prepared.manifest["classes"]),
            train_images=prepared.count("train"),
            evaluator_min_accuracy=EVALUATOR_GATE,
            prepared=prepared.location,
            content_digest=prepared.manifest["digest"],
            evaluator_min_steps=EVALUATOR_STEPS,
            test_images=prepared.count("test"),
            evaluator_images=EVALUATOR_IMAGES,
        )

    def evaluator_fix(self) -> str:
        return (
            "Its classes must be told apart by their images: add images per class, score it without its classes "
            "by a feature extractor (data.evaluator=rotation: FID, KID, precision/recall, no IS), or train without "
            "scores (eval.every_epochs=0)"
        )

    def record(self) -> DataRecord:
        prepared = self.prepared()
        count, digest = prepared.count("train"), prepared.manifest["digest"]
        profile = {
            "sha256": digest,
            "split": "train",
            "limit": self.data.limit,
            "num_images": self.trained(count),
            "classes": len(prepared.manifest["classes"]),
        }
        return DataRecord(f"images:{self.data.path}", digest, prepared.location, profile)

    def check_resume(self, tags: dict[str, str], run: str) -> None:
        """Checked before preparing again could replace its shards: the folder's files and its preparation are the
        ones the run began with."""
        from pipeline.data.images import list_folder, settings

        began = tags.get(DATA_TAG)
        if began is None:  # a run from before the tag
            return
        job = self.preparation
        manifest = read_manifest(job.location) or {}
        listing = list_folder(job.path)
        wanted = settings(listing, job.image_size, job.channels, job.test_fraction, job.background)
        changed = [key for key, value in wanted.items() if key != "source_digest" and manifest.get(key) != value]
        if manifest.get("digest") == began and changed:  # preparing would replace what the run trains on
            raise ConfigError(
                f"data.path: run {run!r} trains on {job.path!r} as prepared with other settings ({', '.join(changed)}: "
                f"{', '.join(f'{manifest.get(k)!r} then, {wanted[k]!r} now' for k in changed)}); preparing it again "
                "would replace its images: set them as they were (format: prepared by an older version), or start a "
                "new run (another --name)"
            )
        if manifest.get("digest") == began and manifest.get("source_digest") == listing.digest:
            return
        raise ConfigError(
            f"data.path: {job.path!r} no longer holds the images run {run!r} began with (prepared content "
            f"{began[:12]}, in {job.location}); a resumed run would train on others: put the folder back as it was, "
            "or start a new run (another --name)"
        )
