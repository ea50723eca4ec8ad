"""A folder of your own images as a dataset: prepared once into compressed Parquet shards plus a manifest.

The folder (a directory or ``s3://bucket/prefix``) holds one subfolder per class, or only images (unlabelled).
Preparing decodes every image, centre-crops it to a square and resizes it to ``image_size`` (1 or 3 channels),
holds out a test split by a hash of each file's path (adding images never moves others between splits), and
writes shards of about :data:`SHARD_BYTES` of pixels each: a ``image`` column (the uint8 pixels, channels first)
and a ``label`` column (-1 without classes). The manifest, written last, lists the counts, the class names and
every shard with its SHA-256; it marks the preparation complete. Preparing again is a no-op while the folder's
listing (names and sizes) and the settings match. Images that do not decode are skipped and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from pipeline.core.claims import claimed
from pipeline.data.pixels import EXTENSIONS, UNDECODED, background_hex
from pipeline.data.shard_making import (
    DECODE_CHUNK,
    SHARD_BYTES,
    ShardMaker,
    ShardPlan,
    unwritable,
    write_file,
)
from pipeline.data.shards import (
    MANIFEST,
    ImageFolderError,
    Preparation,
    Prepared,
    filesystem,
    read_manifest,
)

FORMAT = 3  # the manifest's and shards' layout (3: images as a viewer shows them); another is prepared again
SKIPPED_LISTED = 20  # skipped files named in the manifest
PREPARING = ".preparing"  # the claim a preparation holds on its place (pipeline.core.claims)
SHARD_NAME = re.compile(r"(train|test)-[0-9a-f]{8}-[0-9]{5}\.parquet")  # what prepare_folder writes, all it deletes

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Listing:
    """The image files of a folder: relative paths and sizes (sorted), the class of each, the class names."""

    root: str
    files: list[tuple[str, int]]
    classes: list[str]  # empty: unlabelled
    mtimes: list[int] = field(default_factory=list)  # of ``files``, in ns: an image rewritten at the same size
    left_out: dict[str, int] = field(default_factory=dict)  # files of image formats not decoded here, by extension

    @property
    def digest(self) -> str:
        stamps = self.mtimes or [0] * len(self.files)
        listed = "".join(f"{rel}\t{size}\t{t}\n" for (rel, size), t in zip(self.files, stamps, strict=True))
        return hashlib.sha256(listed.encode()).hexdigest()


def list_folder(path: str) -> Listing:
    """The images under ``path``: one class per top-level subfolder, or none when the images lie at the top.
    Hidden files and folders are left out. A missing, unreadable or empty folder is an ImageFolderError."""
    import pyarrow.fs

    try:
        fs, root = filesystem(path)
        if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
            bucket = root.split("/")[0]
            if "://" in path and fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
                raise ImageFolderError(
                    f"data.path: {path!r}: the bucket {bucket!r} does not exist, or these credentials cannot see it; "
                    "check the path, AWS_ENDPOINT_URL and the AWS_* credentials"
                )
            what = "a file" if fs.get_file_info(root).type == pyarrow.fs.FileType.File else "nothing"
            raise ImageFolderError(f"data.path: {path!r} is not a folder ({what} there); check the path")
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    except ImageFolderError:
        raise
    except (OSError, ValueError) as exc:
        raise ImageFolderError(
            f"data.path: {path!r} cannot be read ({str(exc).splitlines()[0]}); check the path and, for s3://, "
            "AWS_ENDPOINT_URL and the AWS_* credentials"
        ) from None
    files, left_out = [], {}
    for info in infos:
        rel = PurePosixPath(info.path).relative_to(PurePosixPath(root)).as_posix()
        hidden = any(part.startswith(".") for part in rel.split("/"))
        suffix = PurePosixPath(rel).suffix.lower()
        if info.type != pyarrow.fs.FileType.File or hidden:
            continue
        if suffix in EXTENSIONS:
            files.append((rel, int(info.size), int(info.mtime_ns or 0)))
        elif suffix in UNDECODED:
            left_out[suffix] = left_out.get(suffix, 0) + 1
    files.sort()
    if not files:
        raise ImageFolderError(
            f"data.path: {path!r} holds no images ({', '.join(sorted(EXTENSIONS))}){left_out_note(left_out)}; put "
            "them there, one subfolder per class or all at the top"
        )
    nested = sorted({rel.split("/", 1)[0] for rel, *_ in files if "/" in rel})
    top = [rel for rel, *_ in files if "/" not in rel]
    if nested and top:
        raise ImageFolderError(
            f"data.path: {path!r} has images at its top ({top[0]}, ...) and in subfolders ({nested[0]}, ...); "
            "put every image in a class subfolder, or all at the top for an unlabelled folder"
        )
    sizes, mtimes = [(rel, size) for rel, size, _ in files], [t for *_, t in files]
    return Listing(root=path, files=sizes, classes=nested, mtimes=mtimes, left_out=left_out)


def left_out_note(left_out: dict[str, int]) -> str:
    """What a listing left out for its format (``, but 12 .heic file(s) ...``); empty when nothing was."""
    if not left_out:
        return ""
    counts = ", ".join(f"{n} {suffix}" for suffix, n in sorted(left_out.items()))
    return f", but {counts} file(s) in formats not decoded here; convert them to JPEG or PNG"


def held_out(rel: str, fraction: float) -> bool:
    """Whether the image at ``rel`` belongs to the test split: a hash of its path, so the split is stable."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) < fraction * 2**32


def settings(listing: Listing, image_size: int, channels: int, test_fraction: float, background: str) -> dict[str, Any]:
    """What a manifest must record for a preparation to be reused."""
    return {
        "format": FORMAT,
        "source_digest": listing.digest,
        "image_size": image_size,
        "channels": channels,
        "test_fraction": test_fraction,
        "background": background_hex(background),
    }


def _shards_present(location: str, manifest: dict[str, Any]) -> bool:
    import pyarrow.fs

    fs, base = filesystem(location)
    shards = [s for split in manifest["shards"].values() for s in split]
    infos = fs.get_file_info([f"{base}/{s['file']}" for s in shards])
    return all(i.type == pyarrow.fs.FileType.File and i.size == s["bytes"] for i, s in zip(infos, shards, strict=True))


def prepare_folder(
    job: Preparation, progress: Progress = print, workers: int | None = None, maker: ShardMaker | None = None
) -> Prepared:
    """Prepare ``job.path`` into shards and a manifest at ``job.location`` (a no-op when its manifest matches the
    folder and the settings); return it. The shards are made by ``maker`` (default: ``workers`` local decoding
    processes, one per CPU by default)."""
    listing = list_folder(job.path)
    if listing.left_out:
        progress(f"[data] {job.path}: {len(listing.files)} images{left_out_note(listing.left_out)} to train on them")
    wanted = settings(listing, job.image_size, job.channels, job.test_fraction, job.background)
    done = _prepared_already(job, wanted, progress)
    if done is not None:
        return done
    _check_writable(job.location)
    refused = (
        f"data.prepared: {job.location!r} is being prepared by another command ({{holder}}); wait for it to "
        "finish and run again (if none is running, it stopped without cleaning up: delete {path})"
    )
    try:
        with claimed(job.location, PREPARING, refused):  # one preparation of a place at a time
            # Another preparation may have finished while this one listed the folder.
            maker = maker or ShardMaker(workers)
            return _prepared_already(job, wanted, progress) or _prepare(job, listing, wanted, progress, maker)
    finally:
        _remove_if_empty(job.location)


def _prepared_already(job: Preparation, wanted: dict[str, Any], progress: Progress) -> Prepared | None:
    """The preparation at ``job.location`` when it matches ``wanted`` and its shards are there (said), else None."""
    old = read_manifest(job.location)
    if old and all(old.get(k) == v for k, v in wanted.items()) and _shards_present(job.location, old):
        progress(f"[data] {job.path}: prepared in {job.location} ({_counts_line(old)}); nothing to do")
        return Prepared(job.location, old)
    return None


def _prepare(
    job: Preparation, listing: Listing, wanted: dict[str, Any], progress: Progress, maker: ShardMaker
) -> Prepared:
    """Decode every image of ``listing`` into shards and write the manifest last (see prepare_folder)."""
    old = read_manifest(job.location)
    started = time.perf_counter()
    manifest: dict[str, Any] = {
        **wanted,
        "source": job.path,
        "classes": listing.classes,
        "shards": {"train": [], "test": []},
        "skipped": 0,
        "skipped_files": [],
    }
    progress(
        f"[data] preparing {len(listing.files)} images from {job.path} at {job.image_size}x{job.image_size}, "
        f"{job.channels} channel(s), {len(listing.classes) or 'no'} classes, into {job.location}"
    )
    plans = shard_plans(listing, job, wanted)
    for plan, (entry, skipped) in zip(plans, maker.make(listing, job, plans), strict=True):
        manifest["skipped"] += len(skipped)
        manifest["skipped_files"] = (manifest["skipped_files"] + skipped)[:SKIPPED_LISTED]
        if entry["rows"]:
            manifest["shards"][plan.split].append(entry)
        progress(f"[data] {plan.split} shard {plan.number + 1}: {entry['rows']} images ({_rate(manifest, started)})")
    if not manifest["shards"]["train"]:
        raise ImageFolderError(
            f"data.path: {job.path!r}: none of its {len(listing.files)} images decoded (e.g. "
            f"{'; '.join(manifest['skipped_files'][:2])}); check the files"
        )
    manifest["digest"] = hashlib.sha256(
        "".join(s["sha256"] for split in ("train", "test") for s in manifest["shards"][split]).encode()
    ).hexdigest()
    manifest["prepare_s"] = round(time.perf_counter() - started, 2)
    if not _shards_present(job.location, manifest):  # written by tasks on nodes whose disk this one does not see
        raise ImageFolderError(
            f"data.prepared: {job.location!r}: shards written by tasks on other nodes are not there as seen from this "
            "one: it is not one shared folder; prepare into s3://... (--out), or on this machine (--on local)"
        )
    write_file(job.location, MANIFEST, json.dumps(manifest, indent=1).encode())  # last: the preparation is complete
    if old:
        _remove_unlisted(job.location, old, manifest)
    progress(
        f"[data] {job.path}: ready in {job.location} ({_counts_line(manifest)}, {_rate(manifest, started)} on "
        f"{maker.finished()})"
    )
    return Prepared(job.location, manifest)


def shard_plans(listing: Listing, job: Preparation, wanted: dict[str, Any]) -> list[ShardPlan]:
    """The shards of a preparation: each split's images in one shuffled order (classes mixed within every shard),
    cut into shards of about :data:`SHARD_BYTES` of pixels, named by the settings' digest and their number."""
    key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:8]
    split_of = {rel: "test" if held_out(rel, job.test_fraction) else "train" for rel, _ in listing.files}
    order = np.random.default_rng(0).permutation(len(listing.files))
    per_shard = max(1, SHARD_BYTES // (job.channels * job.image_size**2))
    plans = []
    for split in ("train", "test"):
        rels = [listing.files[i][0] for i in order if split_of[listing.files[i][0]] == split]
        for number, start in enumerate(range(0, len(rels), per_shard)):
            rows = rels[start : start + per_shard]
            plans.append(ShardPlan(split, number, f"{split}-{key}-{number:05d}", rows, DECODE_CHUNK))
    return plans


def _remove_if_empty(location: str) -> None:
    """A local folder this preparation made and left empty (it failed before writing anything) goes again."""
    if "://" not in location:
        with contextlib.suppress(OSError):
            os.rmdir(filesystem(location)[1])


def _check_writable(location: str) -> None:
    """Before any decoding, a local place for the shards can be written (a probe file, removed again). An object
    store is not probed (a deleted probe would leave a folder marker behind): its first shard's write is the
    check, before which nothing is written."""
    if "://" in location:
        return
    fs, base = filesystem(location)
    try:
        os.makedirs(base, exist_ok=True)
        with fs.open_output_stream(f"{base}/.write-probe") as out:
            out.write(b"")
        fs.delete_file(f"{base}/.write-probe")
    except (OSError, ValueError) as exc:
        raise unwritable(location, exc) from None


def _remove_unlisted(location: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """The shards of an earlier preparation that the new manifest no longer lists: only files named as this
    module names shards (derived data), whatever else an old manifest may list."""
    fs, base = filesystem(location)
    kept = {s["file"] for split in new["shards"].values() for s in split}
    for split in old.get("shards", {}).values():
        for shard in split:
            name = str(shard.get("file", "")) if isinstance(shard, dict) else ""
            if SHARD_NAME.fullmatch(name) and name not in kept:
                with contextlib.suppress(OSError):
                    fs.delete_file(f"{base}/{name}")


def _counts_line(manifest: dict[str, Any]) -> str:
    counted = Prepared("", manifest)
    classes = len(manifest["classes"])
    return (
        f"{counted.count('train')} training and {counted.count('test')} test images, {classes or 'no'} classes, "
        f"{len(manifest['shards']['train']) + len(manifest['shards']['test'])} shard(s), "
        f"{manifest['skipped']} skipped"
    )


def _rate(manifest: dict[str, Any], started: float) -> str:
    counted = Prepared("", manifest)
    done = counted.count("train") + counted.count("test") + manifest["skipped"]
    return f"{done / max(time.perf_counter() - started, 1e-9):.0f} images/s"
