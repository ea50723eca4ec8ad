"""Secrets kept out of records and the console: a tracking URI's password (``postgresql://user:PASSWORD@host``),
AWS keys and MLflow credentials never reach a checkpoint, a param, a tag or a printed line; where a URI is shown,
its password is ``***``.

Records mask what they store (:func:`masked_uri` on ``tracking.uri``); the console is masked as a whole: the
driver's and each worker's stdout and stderr pass through :class:`Redacting`, which replaces every URI password
and every credential the environment holds, whoever printed it (our lines, MLflow's errors, Ray's forwarding).
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
from typing import Any, TextIO
from urllib.parse import unquote

MASK = "***"
# Variables whose values are credentials (the AWS SDK's, MLflow's basic auth and token).
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
MIN_SECRET = 8  # shorter values (a test server's "testing") would mask ordinary words
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<password>[^@\s/]+)@")


def masked_uri(uri: str | None) -> str | None:
    """``uri`` with the password of its user info replaced by ``***`` (``postgresql://u:***@db/mlflow``)."""
    return uri if uri is None else _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", uri)


def environment_secrets() -> list[str]:
    """The credentials this process's environment holds (values of :data:`SECRET_VARIABLES`, and the passwords of
    URIs in ``MLFLOW_TRACKING_URI``), long enough to mask safely."""
    values = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    values += [m["password"] for m in _USERINFO.finditer(os.environ.get("MLFLOW_TRACKING_URI", ""))]
    found = {v for value in values for v in (value, unquote(value)) if len(v) >= MIN_SECRET}
    return sorted(found, key=len, reverse=True)  # the longest first: one that holds another is masked whole


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every URI password and every one of ``secrets`` replaced by ``***``."""
    text = masked_uri(text)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class Redacting(io.TextIOBase):
    """A text stream that writes through to ``stream`` with secrets masked (:func:`redact`), line by line (a secret
    split across two writes of one line is still masked)."""

    def __init__(self, stream: TextIO, secrets: list[str]):
        self.stream, self.secrets, self.pending = stream, secrets, ""
        self.lock = threading.Lock()  # Ray's log thread prints beside the main thread

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            if "\n" in self.pending:
                done, self.pending = self.pending.rsplit("\n", 1)
                self.stream.write(redact(done + "\n", self.secrets))
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.pending:
                self.stream.write(redact(self.pending, self.secrets))
                self.pending = ""
            self.stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def redact_console() -> None:
    """Mask secrets in everything this process prints from now on (idempotent)."""
    secrets = environment_secrets()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, Redacting):
            stream.secrets = secrets
        elif stream is not None:
            setattr(sys, name, Redacting(stream, secrets))
