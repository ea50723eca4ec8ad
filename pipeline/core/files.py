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


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
