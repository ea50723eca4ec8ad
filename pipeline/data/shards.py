"""A prepared image folder, read back: its manifest and its shards, each checked by SHA-256. pipeline.data.images
writes what this reads; pipeline.data.folder and pipeline.data.batches read through it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.files import filesystem, read_retried

MANIFEST = "manifest.json"


class ImageFolderError(UserError):
    """An image folder that cannot be prepared or read: the message names it and the fix."""


@dataclass(frozen=True)
class Preparation:
    """What to prepare: the folder, where its shards go, the side and channels, the held-out fraction."""

    path: str
    location: str
    image_size: int
    channels: int
    test_fraction: float
    background: str = "white"  # what transparent areas are composited on (pipeline.data.pixels)


@dataclass
class Prepared:
    """A prepared folder: where its manifest is, and the manifest."""

    location: str
    manifest: dict[str, Any]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.manifest["channels"], self.manifest["image_size"], self.manifest["image_size"]

    def count(self, split: str) -> int:
        return sum(shard["rows"] for shard in self.manifest["shards"][split])


def read_manifest(location: str) -> dict[str, Any] | None:
    """The manifest at ``location``, or None when there is none (not prepared, or not completely); an
    ImageFolderError for a ``manifest.json`` that is not a prepared folder's (nothing there is touched), and
    :class:`Unavailable` when it cannot be read through retries (a passing fault is no missing preparation)."""
    fs, base = filesystem(location)
    try:
        what = f"the manifest {location.rstrip('/')}/{MANIFEST}"
        blob = read_retried(fs, f"{base}/{MANIFEST}", what, final=(FileNotFoundError,))
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not {"format", "shards", "image_size", "channels"} <= set(manifest):
        raise ImageFolderError(
            f"data.prepared: {location!r} holds a {MANIFEST} that is not a prepared image folder's; choose another "
            "place for the shards (--out, data.prepared)"
        )
    return manifest


def read_shard(
    location: str, shard: dict[str, Any], image_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One shard as (uint8 images (N, C, H, W), int64 labels), its SHA-256 checked first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, base = filesystem(location)
    blob = read_retried(fs, f"{base}/{shard['file']}", f"{location}/{shard['file']}", final=(FileNotFoundError,))
    if hashlib.sha256(blob).hexdigest() != shard["sha256"]:
        raise ImageFolderError(
            f"{location}/{shard['file']} fails its SHA-256 check (changed or corrupted); prepare again: "
            "python -m pipeline data prepare --dataset images ..."
        )
    table = pq.read_table(pa.BufferReader(blob))
    return pixels_of(table.column("image").combine_chunks(), image_shape), table.column("label").to_numpy().astype(
        np.int64
    )


def pixels_of(column: Any, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A binary column of equal-sized images as one uint8 array (N, C, H, W), without a copy per image."""
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(len(column), *image_shape)


def iter_shards(prepared: Prepared, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for shard in prepared.manifest["shards"][split]:
        yield read_shard(prepared.location, shard, prepared.image_shape)
