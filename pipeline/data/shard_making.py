"""How a prepared folder's shards are made: the plan of each shard, the decoding of its images in chunks (each
file read through retries; one that does not decode skipped), and the shard written whole as Parquet with its
manifest entry. :class:`ShardMaker` does the work in local processes; pipeline.distributed.prepare_tasks does the
same work as Ray tasks across a cluster (the same shards, byte for byte). pipeline.data.images lists the folder and
writes the manifest around them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Protocol

from pipeline.core.files import read_retried, write_whole
from pipeline.core.retry import Unavailable, retried
from pipeline.data.pixels import decode
from pipeline.data.shards import ImageFolderError, Preparation, filesystem

SHARD_BYTES = 64 << 20  # pixels per shard before compression
GROUP_BYTES = 4 << 20  # pixels per Parquet row group: what a streaming worker reads at once
DECODE_CHUNK = 64  # images a decoding process takes at once


class Folder(Protocol):
    """What making shards needs of a listing: where the files are, and the class names (empty: unlabelled)."""

    root: str
    classes: list[str]


def label_of(classes: list[str], rel: str) -> int:
    """The class of the image at ``rel`` (its top-level folder's place among ``classes``); -1 without classes."""
    return classes.index(rel.split("/", 1)[0]) if classes else -1


@dataclass(frozen=True)
class ShardPlan:
    """One shard to make: its split, its number in the split, its file's name (no suffix), its images in order."""

    split: str
    number: int
    name: str
    rels: list[str]
    chunk: int = DECODE_CHUNK  # images a decoding task takes at once (the plan carries it to every process)

    @property
    def chunks(self) -> list[list[str]]:
        """The images as the decoding tasks take them."""
        return [self.rels[i : i + self.chunk] for i in range(0, len(self.rels), self.chunk)]


class ShardMaker:
    """How a preparation's shards are made: :meth:`make` yields each plan's (manifest entry, files skipped), in
    order. This one decodes in a pool of local processes, one shard at a time; pipeline.distributed.prepare_tasks
    makes them as Ray tasks across a cluster."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1

    def make(
        self, listing: Folder, job: Preparation, plans: list[ShardPlan]
    ) -> Iterator[tuple[dict[str, Any], list[str]]]:
        with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) as pool:
            for plan in plans:
                futures = [pool.submit(decode_chunk, listing.root, chunk, job) for chunk in plan.chunks]
                yield shard_from_chunks(job, listing.classes, plan, [f.result() for f in futures])

    def finished(self) -> str:
        """What the last line says of where the work ran."""
        return f"{self.workers} local process(es)"


def decode_chunk(root: str, rels: list[str], job: Preparation) -> tuple[list[int], bytes, list[str]]:
    """One process's share: (the positions that decoded, their pixels concatenated, 'path: why' of the others).
    A file that cannot be read (after retries) fails the preparation; only one read whole that does not decode
    is skipped."""
    fs, base = filesystem(root)
    kept, pixels, skipped = [], [], []
    for i, rel in enumerate(rels):
        blob = read_image_file(fs, base, rel, root)
        try:
            pixels.append(decode(blob, rel, job.image_size, job.channels, job.background))
            kept.append(i)
        except Exception as exc:  # a file that does not decode (truncated, not an image, too large) is skipped
            why = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "the file", str(exc))  # no address: the same every time
            skipped.append(f"{rel}: {type(exc).__name__}: {why[:120]}")
    return kept, b"".join(p.tobytes() for p in pixels), skipped


def read_image_file(fs: Any, base: str, rel: str, root: str) -> bytes:
    """The bytes of the image ``rel`` under ``root``, retried through passing faults; an ImageFolderError naming
    it when it stays unreadable (S3 throttling, a network reset or a permission is no broken image)."""
    try:
        return read_retried(fs, f"{base}/{rel}", f"{root.rstrip('/')}/{rel}")
    except Unavailable as exc:
        raise ImageFolderError(
            f"data.path: {exc}. The preparation stopped before writing its manifest, so nothing is recorded as "
            "skipped: fix access to the file (or remove it) and prepare again"
        ) from None


def shard_from_chunks(
    job: Preparation, classes: list[str], plan: ShardPlan, decoded: list[tuple[list[int], bytes, list[str]]]
) -> tuple[dict[str, Any], list[str]]:
    """``plan``'s decoded chunks (each :func:`decode_chunk`'s answer, in order) written as one Parquet shard: its
    manifest entry, and the files skipped."""
    images, labels, skipped = [], [], []
    one = job.channels * job.image_size**2
    for chunk, (kept, pixels, failed) in zip(plan.chunks, decoded, strict=True):
        images += [pixels[j * one : (j + 1) * one] for j in range(len(kept))]
        labels += [label_of(classes, chunk[i]) for i in kept]
        skipped += failed
    return write_shard(job.location, f"{plan.name}.parquet", images, labels), skipped


def write_shard(location: str, file: str, images: list[bytes], labels: list[int]) -> dict[str, Any]:
    """Images (each its uint8 pixels, channels first) and labels as one zstd Parquet shard under ``location``, in
    row groups of about :data:`GROUP_BYTES`; its manifest entry (rows, bytes, SHA-256, each group's rows and the
    SHA-256 of its pixels). Nothing is written for no images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int32())})
    sink = pa.BufferOutputStream()
    group = max(1, GROUP_BYTES // max(len(images[0]) if images else 1, 1))  # what a streaming worker reads
    pq.write_table(table, sink, compression="zstd", row_group_size=group)
    blob = sink.getvalue().to_pybytes()
    if images:
        write_file(location, file, blob)
    starts = range(0, len(images), group)
    return {
        "file": file,
        "rows": len(images),
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "groups": [len(images[i : i + group]) for i in starts],
        "group_sha256": [hashlib.sha256(b"".join(images[i : i + group])).hexdigest() for i in starts],
    }


def write_file(location: str, name: str, blob: bytes) -> None:
    """Write a file under ``location`` whole: a local one through a temporary name, an object in one put, tried
    again through passing faults (a 503, a reset: the same bytes, so a second put is harmless)."""
    try:
        if "://" in location:
            retried(lambda: write_whole(location, name, blob), f"{location.rstrip('/')}/{name}", final=(ValueError,))
        else:
            write_whole(location, name, blob)
    except (OSError, ValueError) as exc:  # Unavailable is an OSError
        raise unwritable(location, exc) from None


def unwritable(location: str, exc: BaseException) -> ImageFolderError:
    return ImageFolderError(
        f"data.prepared: {location!r} cannot be written ({str(exc).splitlines()[0]}); choose a writable place with "
        "--out (data.prepared)"
    )
