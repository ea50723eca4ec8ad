"""The errors a user can fix, and the writable-directory check that raises them before any expensive work."""

from __future__ import annotations

import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem the user must fix (bad config, missing data, damaged file): one line, ready to print.

    The CLI prints it as ``error: ...`` and exits 2, without a traceback.
    """


class ConfigError(UserError, ValueError):
    """A configuration value, key or file is wrong; the message names the key and what is allowed."""


class PrivateApiChanged(AssertionError):
    """A private Ray or MLflow API the project relies on is gone or changed (an upgrade); the message names it."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none: an error in one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_writable_dir(path: Path, error: type[UserError], what: str, fix: str) -> None:
    """Create ``path`` (with parents) and check a file can be written in it, before any expensive work.

    An OSError becomes ``error`` with one line: "<what> '<path>' is not writable (<reason>); <fix>".
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise error(f"{what} {str(path)!r} is not writable ({exc.strerror}); {fix}") from None
