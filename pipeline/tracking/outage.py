"""A tracking store that stops answering while a run trains (a server restarted, a network cut, a database failover)
costs the run nothing: what the run writes is kept (:class:`KeptWrites`) and sent, in order, once the store answers
again; one line says when it went away and one when it came back. A write that fails for another reason (a bad
value, a permission) is raised as before.

MLflow's HTTP client is bounded on purpose (:data:`HTTP_LIMITS`, :data:`KEEPING_LIMITS`): its defaults (120 s per
request, 7 retries with backoff 2) hold a training step for over ten minutes before anyone hears of a fault.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pipeline.core.secrets import masked_uri

# Set where a process makes its MLflow client unless the environment says otherwise (pipeline.tracking.store): a
# request given up after 20 s without an answer, tried 6 times about 0, 4, 8, 16 and 32 s apart, so that a driver's
# write outlives a server's restart (about a minute).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
}
# A training run's rank 0 keeps what the store does not take (KeptWrites), so it gives up sooner and trains on: tried
# 3 times about 0 and 2 s apart (a refused store in about 3 s, a hung one in about 60 s, once per report).
KEEPING_LIMITS = {**HTTP_LIMITS, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# How long a run's end waits for a store that is away to take the writes it kept, asking every PATIENCE_EVERY_S.
END_PATIENCE_S = 600.0
PATIENCE_EVERY_S = 15.0


# Answers that mean "not now" rather than "no": a request timed out, too many requests, a proxy with no server behind
# it, a server unavailable or timing out upstream.
PASSING_STATUSES = frozenset({408, 429, 502, 503, 504})
PASSING_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"})


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store did not answer (refused, reset, timed out, retries used up) or answered "not
    now" (:data:`PASSING_STATUSES`), as opposed to answering no (a login refused, a bad value, a server error)."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: BaseException | None = exc
    for _ in range(16):  # an exception's chain of causes, not followed round a cycle
        if seen is None:
            return False
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        if isinstance(seen, MlflowException):
            # MLflow's REST client wraps connection faults, timeouts and used-up retries in these messages
            message = str(seen.message)
            if message.startswith("API request to ") and (
                " failed with exception " in message or " failed with timeout exception " in message
            ):
                return True
            code = re.search(r" failed with error code (\d+) ", message)
            status = int(code.group(1)) if code else seen.get_http_status_code()
            if status in PASSING_STATUSES or seen.error_code in PASSING_CODES:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


class StoreUnreachable(RuntimeError):
    """The store stayed away past a run's patience; the message says what was not recorded."""


class KeptWrites:
    """The writes a run made while its store was away, in order, each a function that sends it; files they send
    copied aside (the caller's copy may be gone by then). ``say`` prints the two lines of an outage. Not ``keeping``
    (every process but a training run's rank 0), a write is made at once and its failure raised."""

    def __init__(self, uri: str, keeping: bool, say: Callable[[str], None] = print):
        self.uri, self.keeping, self.say = uri, keeping, say
        self.writes: list[Callable[[], None]] = []
        self.down_since: float | None = None
        self.folder: str | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def absorbs(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a store away that this run waits out (else the caller raises it)."""
        return self.keeping and unreachable(exc)

    def send(self, write: Callable[[], None], files: tuple[str, ...] = (), rebuild: Any = None) -> None:
        """``write()`` now, or kept for later while the store is away (``files`` copied aside first, and the
        write made again by ``rebuild(copies)``)."""
        if not self.down:
            try:
                write()
                return
            except Exception as exc:
                if not self.absorbs(exc):
                    raise
                self.went_away(exc)
        if files:
            copies = tuple(self.keep_file(path) for path in files)
            write = rebuild(copies)
        self.writes.append(write)

    def keep_file(self, path: str) -> str:
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="gan-pipeline-unsent-")
        copy = os.path.join(tempfile.mkdtemp(dir=self.folder), os.path.basename(path))
        shutil.copyfile(path, copy)
        return copy

    def went_away(self, exc: BaseException) -> None:
        """The store did not answer: one line, the first time."""
        if self.down_since is None:
            self.down_since = time.monotonic()
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            self.say(
                f"[mlflow] the tracking store {masked_uri(self.uri)} does not answer ({reason}); training goes on "
                "and its records are kept, to be sent when the store is back"
            )

    def replay(self) -> bool:
        """Send the kept writes in order, stopping at the first the store does not take; True once all are sent."""
        while self.writes:
            try:
                self.writes[0]()
            except Exception as exc:
                if not unreachable(exc):
                    raise
                return False
            self.writes.pop(0)
        return True

    def came_back(self, metrics: int) -> None:
        if self.down_since is not None:
            away = time.monotonic() - self.down_since
            self.say(
                f"[mlflow] the tracking store {masked_uri(self.uri)} answers again after {away:.0f} s; "
                f"the {metrics} metric point(s) and other records kept meanwhile are sent"
            )
        self.down_since = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
