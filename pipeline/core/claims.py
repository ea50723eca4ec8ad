"""Claims: a file created only where none exists, atomically, on local disk (``O_CREAT | O_EXCL``) and on S3 (a
conditional put, ``If-None-Match: *``, which S3 and S3-compatible servers answer with 412 when the key exists).
Two commands that want the same thing at once (a run's name, a folder's preparation) cannot both get it: the
second is told who holds it. A claim records its holder (host, process, time): one left by a process of this host
that has ended is stale, and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from pipeline.core.errors import UserError
from pipeline.core.files import filesystem


class Claimed(UserError):
    """What was asked for is held by another command: the message names the holder and the fix."""


def holder() -> dict[str, object]:
    """Who makes a claim: this host, this process, now."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def create_exclusive(location: str, name: str, blob: bytes) -> bool:
    """Create ``location/name`` holding ``blob`` only if it does not exist, atomically: whether this call created
    it. ``location`` is a directory (made where missing) or an ``s3://`` URI; other object stores have no
    conditional write pyarrow offers, so there the check and the write are two steps (a narrow race)."""
    if "://" not in location:
        directory = Path(location).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as out:
            out.write(blob)
        return True
    if location.startswith("s3://"):
        return _s3_put_if_absent(location, name, blob)
    import pyarrow.fs

    fs, root = filesystem(location)
    if fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.NotFound:
        return False
    with fs.open_output_stream(f"{root}/{name}") as out:
        out.write(blob)
    return True


def _s3_put_if_absent(location: str, name: str, blob: bytes) -> bool:
    import boto3
    from botocore.exceptions import ClientError

    bucket, key = _s3_object(location, name)
    try:
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=blob, IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise
    return True


def _s3_object(location: str, name: str) -> tuple[str, str]:
    """(bucket, key) of ``name`` under the ``s3://`` URI ``location``."""
    parsed = urlparse(location)
    return parsed.netloc, f"{parsed.path.strip('/')}/{name}".lstrip("/")


def claim(location: str, name: str) -> bool:
    """Claim ``location/name`` for this process (:func:`create_exclusive` with :func:`holder`), taking over a stale
    claim: one this host's process left behind and that no longer runs (killed before it could release it)."""
    blob = json.dumps(holder()).encode()
    if create_exclusive(location, name, blob):
        return True
    if not is_stale(read_claim(location, name)):
        return False
    release(location, name)
    return create_exclusive(location, name, blob)


def is_stale(found: dict[str, object]) -> bool:
    """Whether a claim's holder is a process of this host that has ended."""
    if found.get("host") != socket.gethostname() or not isinstance(found.get("pid"), int):
        return False
    try:
        os.kill(int(found["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, as another user
        return False
    return False


def read_claim(location: str, name: str) -> dict[str, object]:
    """The holder a claim records (empty when it cannot be read)."""
    fs, base = filesystem(location)
    try:
        with fs.open_input_stream(f"{base}/{name}") as stream:
            found = json.loads(stream.read())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def release(location: str, name: str) -> None:
    """Remove a claim this process made (nothing when it is gone already). On S3 by the SDK: pyarrow's delete would
    leave a folder marker behind in the claim's place."""
    if location.startswith("s3://"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _s3_object(location, name)
        with contextlib.suppress(BotoCoreError, ClientError):
            boto3.client("s3").delete_object(Bucket=bucket, Key=key)
        return
    fs, base = filesystem(location)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(f"{base}/{name}")


@contextlib.contextmanager
def claimed(location: str, name: str, refused: str) -> Iterator[None]:
    """Hold the claim ``location/name`` while the block runs, then release it; :class:`Claimed` when another holds
    it, its message ``refused`` (formatted with ``holder``: who holds it, and ``path``: the claim's file)."""
    if not claim(location, name):
        found = read_claim(location, name)
        who = f"{found.get('host', '?')}, process {found.get('pid', '?')}, since {found.get('since', '?')}"
        raise Claimed(refused.format(holder=who, path=f"{location.rstrip('/')}/{name}"))
    try:
        yield
    finally:
        release(location, name)
