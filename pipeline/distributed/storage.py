"""Where runs live: a local directory or an object store (``s3://BUCKET/PREFIX``), checked before any work.

Ray Train and Tune read and write checkpoints and experiment state under ``train.storage_path`` through
pyarrow's filesystems, on every node. For ``s3://`` the AWS SDK's standard variables are all they need
(``AWS_ENDPOINT_URL`` for an S3-compatible server, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``); no node then needs a path that another node wrote.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline import PROJECT_ROOT
from pipeline.config.schema import PipelineConfig
from pipeline.core.errors import UserError, make_writable_dir
from pipeline.core.files import filesystem, read_retried, write_whole
from pipeline.core.retry import retried
from pipeline.distributed.ray_runtime import (
    TRAIN_RECORD,
    latest_recorded_checkpoint,
    latest_recorded_result,
    record_without_latest,
    recorded_before,
)


class StorageError(UserError):
    """``train.storage_path`` cannot be used: unreachable, missing, refused or not writable."""


def storage_root(cfg: PipelineConfig) -> str:
    """Where Ray keeps runs: a URI (``s3://...``) as given, a local path made absolute (a relative one would
    follow the working directory, which `ray job submit` throws away)."""
    path = cfg.train.storage_path
    if path and "://" in path:
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve() if path else PROJECT_ROOT / "runs")


def run_location(cfg: PipelineConfig, name: str) -> str:
    return f"{storage_root(cfg)}/{name}"


def local_dir(location: str) -> Path | None:
    """The local directory of a storage location; None for remote storage (s3://, gs://, ...)."""
    return None if "://" in location else Path(location)


def check_storage(cfg: PipelineConfig) -> None:
    """Fail fast, with the fix, when runs could not be written under ``train.storage_path``."""
    root = storage_root(cfg)
    directory = local_dir(root)
    if directory is not None:
        make_writable_dir(directory, StorageError, "train.storage_path:", "choose a writable directory")
    elif root.startswith("s3://"):
        _check_s3_bucket(root)


def exists(location: str) -> bool:
    """Whether anything is stored at ``location`` (a run's or a sweep's directory)."""
    directory = local_dir(location)
    if directory is not None:
        return directory.exists()
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


@contextlib.contextmanager
def resume_checkpoint_file(location: str, filename: str) -> Iterator[tuple[Path, str] | None]:
    """``filename`` of the checkpoint that Ray Train resumes the run at ``location`` from: (a local file, where it
    is stored). A remote file is copied into a temporary directory, removed afterwards. None when Ray would
    start the run afresh (no recorded checkpoint)."""

    name = latest_recorded_checkpoint(_train_record(location))
    if not name:
        yield None
        return
    directory = local_dir(location)
    if directory is not None:
        yield directory / name / filename, str(directory / name / filename)
        return
    source = f"{location}/{name}/{filename}"
    fs, root = filesystem(location)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / filename

        def copy() -> None:
            with fs.open_input_stream(f"{root}/{name}/{filename}") as remote, open(local, "wb") as out:
                shutil.copyfileobj(remote, out)

        # A missing file is reported as such by whoever loads it (nothing copied, nothing there); a passing fault
        # is retried, and one that lasts is Unavailable, not "not found".
        with contextlib.suppress(FileNotFoundError):
            retried(copy, f"checkpoint {source!r}", final=(FileNotFoundError,))
        yield local, source


def _train_record(location: str) -> bytes:
    """Ray Train's record of the run at ``location`` (empty when there is none yet)."""
    fs, root = filesystem(location)
    return _train_record_in(fs, root, location)


def _train_record_in(fs: Any, root: str, shown: str) -> bytes:
    try:  # a passing fault must not read as "no record": the run would start over
        what = f"Ray Train's record {shown}/{TRAIN_RECORD}"
        return read_retried(fs, f"{root}/{TRAIN_RECORD}", what, final=(FileNotFoundError,))
    except FileNotFoundError:  # no record yet
        return b""


def fall_back_to_previous_checkpoint(location: str) -> str | None:
    """Make the checkpoint Ray Train kept before its latest the one the run at ``location`` resumes from (the
    latest is damaged or gone): Ray's record is rewritten, its former self kept beside it as
    ``<record>.before-fallback-<UTC time>`` (a second fallback keeps its own) and the checkpoints left where they are.
    The checkpoint's directory name; None when the record keeps no other."""
    record = _train_record(location)
    change = record_without_latest(record)
    if change is None:
        return None
    when = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    write_whole(location, f"{TRAIN_RECORD}.before-fallback-{when}", record)
    write_whole(location, TRAIN_RECORD, change[0])
    return change[1]


def kept_before(fs: Any, run_dir: str, damaged: str) -> str | None:
    """The checkpoint Ray Train's record in ``run_dir`` (a path on the pyarrow filesystem ``fs``, as a Ray
    Checkpoint names its parent) kept before ``damaged``, a directory name there; None when it keeps none before
    it or does not keep ``damaged``. Nothing is rewritten (a run restarting inside Ray Train reads its checkpoints
    from Ray, not from the record)."""
    return recorded_before(_train_record_in(fs, run_dir, run_dir), damaged)


def recorded_progress(location: str) -> tuple[int, int] | None:
    """(epochs completed, step) of the checkpoint a restart of the run at ``location`` begins from: the latest that
    Ray Train's record names; None when it names none (the run starts over)."""
    metrics = latest_recorded_result(_train_record(location)).get("metrics") or {}
    if "step" not in metrics:
        return None
    return int(metrics.get("epoch", 0)), int(metrics["step"])


def _check_s3_bucket(root: str) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    bucket = urlparse(root).netloc
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    where = f"train.storage_path: {root!r} on {endpoint}"
    # One quick attempt: a wrong endpoint should fail here in seconds, not after the SDK's retries.
    client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=bucket)
    except (NoCredentialsError, PartialCredentialsError):
        raise StorageError(
            f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_DEFAULT_REGION) "
            "for the driver and every node"
        ) from None
    except EndpointConnectionError:
        raise StorageError(
            f"{where}: the S3 endpoint is unreachable; check AWS_ENDPOINT_URL (an S3-compatible server) or the network"
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(
                f"{where}: bucket {bucket!r} does not exist; create it or fix train.storage_path"
            ) from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
            raise StorageError(
                f"{where}: the S3 endpoint refused these credentials for bucket {bucket!r} ({code}); check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            ) from None
        raise StorageError(f"{where}: bucket {bucket!r} cannot be used ({code}: {exc})") from None
    except BotoCoreError as exc:
        raise StorageError(f"{where}: {exc}; check AWS_ENDPOINT_URL and the AWS_* credentials") from None
