"""Files as the pipeline reads them: through pyarrow's filesystems (a directory or a URI), checked by SHA-256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def filesystem(location: str) -> tuple[Any, str]:
    """pyarrow's filesystem for a directory or URI, and the path on it."""
    import pyarrow.fs

    if "://" not in location:
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    return pyarrow.fs.FileSystem.from_uri(location)


def write_whole(location: str, name: str, blob: bytes) -> None:
    """Write ``name`` under ``location`` whole: a local file through a temporary name (its directory made where
    missing), an object in one put. Raises what the filesystem raises."""
    fs, base = filesystem(location)
    if "://" not in location:
        os.makedirs(base, exist_ok=True)
        tmp = f"{base}/.{name}.part"
        with open(tmp, "wb") as out:
            out.write(blob)
        os.replace(tmp, f"{base}/{name}")
        return
    with fs.open_output_stream(f"{base}/{name}") as out:
        out.write(blob)


def read_retried(fs: Any, path: str, what: str, final: tuple[type[BaseException], ...] = ()) -> bytes:
    """The whole file ``path`` on ``fs``, read through passing faults (pipeline.core.retry; ``what`` names it in
    the Unavailable error, ``final`` are the answers not retried, such as FileNotFoundError)."""
    from pipeline.core.retry import retried

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return retried(read, what, final=final)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
