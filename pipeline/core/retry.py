"""Reads a passing fault should not fail (S3 throttling, a network reset, a busy NFS server): retried with
exponential backoff, and, when every try failed, an error that says the thing is unavailable and to retry, never
that it is broken."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.core.errors import UserError

T = TypeVar("T")
TRIES = 4  # waits of 0.5, 1 and 2 s between them: 3.5 s for a fault to pass
FIRST_WAIT_S = 0.5


class Unavailable(UserError, OSError):
    """A read that failed every try: the message names the thing and says to retry when it is reachable."""


def retried(
    read: Callable[[], T],
    what: str,
    *,
    transient: tuple[type[BaseException], ...] = (OSError,),
    final: tuple[type[BaseException], ...] = (),
    tries: int = TRIES,
    first_wait_s: float | None = None,
) -> T:
    """``read()``, tried up to ``tries`` times while it raises one of ``transient`` (but not ``final``: a missing
    file is an answer, not a fault), waiting ``first_wait_s`` and doubling between tries; :class:`Unavailable`
    naming ``what`` when every try failed. ``first_wait_s``: :data:`FIRST_WAIT_S` unless given."""
    first_wait_s = FIRST_WAIT_S if first_wait_s is None else first_wait_s
    for attempt in range(tries):
        try:
            return read()
        except final:
            raise
        except transient as exc:
            if attempt == tries - 1:
                reason = str(exc).splitlines()[0] if str(exc) else ""
                raise Unavailable(
                    f"{what} is unavailable: {tries} reads failed ({type(exc).__name__}: {reason[:200]}); "
                    "nothing was changed: retry when it is reachable"
                ) from exc
            time.sleep(first_wait_s * 2**attempt)
    raise AssertionError("unreachable")
