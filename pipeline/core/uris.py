"""What a location may look like: MLflow tracking URIs and ``train.storage_path``, checked by their form alone.

A location that does not parse as what the user meant would go somewhere else without a word: ``127.0.0.1:5000``
(no scheme) is a local file store of that name to MLflow, ``s3:/bucket/runs`` (one slash) a local directory, and
under `ray job submit` both would live in a working directory that is thrown away. These checks run before anything is
written; reaching the place (a server, a bucket) is checked later, by pipeline.tracking.store and
pipeline.distributed.storage.
:func:`resolve_tracking_uri` says which store a run uses ($MLFLOW_TRACKING_URI, the config, the default).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.core.errors import ConfigError

# The stores MLflow 3 opens from a URI (a database scheme may name its driver: postgresql+psycopg2).
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
# The filesystems pyarrow (Ray's storage layer) opens from a URI; a plain path is local.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def _scheme(location: str) -> str | None:
    """The scheme before ``:`` (lower case, driver dropped), or None when the text has none."""
    found = _SCHEME.match(location)
    return found.group(1).lower().split("+")[0] if found else None


def tracking_uri_problem(uri: str, key: str) -> str | None:
    """Why ``uri`` (given as ``key``) is not an MLflow tracking URI, in one line with the fix; None when it is."""
    if uri in ("databricks", "databricks-uc"):  # MLflow's names for a Databricks workspace's default profile
        return None
    scheme = _scheme(uri)
    examples = "http://127.0.0.1:5000 (a server), sqlite:////abs/path/mlflow.db or file:///abs/path/mlruns"
    if scheme is None or (scheme not in TRACKING_SCHEMES and "://" not in uri):
        if re.fullmatch(r"[\w.-]+:\d+/?", uri):
            return f"{key}: {uri!r} has no scheme, so MLflow would make a local folder of that name; use http://{uri}"
        return (
            f"{key}: {uri!r} is a path, not a URI; say which store it is: {Path(uri).resolve().as_uri()} (a folder) "
            f"or sqlite:///{Path(uri).resolve()} (a database file)"
        )
    if scheme not in TRACKING_SCHEMES:
        known = ", ".join(TRACKING_SCHEMES)
        return f"{key}: {uri!r} has the unknown scheme {scheme!r}; use one of {known}, e.g. {examples}"
    if "://" not in uri:
        return f"{key}: {uri!r} needs '//' after '{scheme}:'; e.g. {examples}"
    return None


def storage_path_problem(path: str, key: str = "train.storage_path") -> str | None:
    """Why ``path`` is not a storage location (a local path or ``SCHEME://...``); None when it is."""
    scheme = _scheme(path)
    if scheme is None or ("://" not in path and scheme not in STORAGE_SCHEMES):  # a plain path
        return None
    if "://" not in path:
        rest = path[len(scheme) + 1 :].lstrip("/")
        return (
            f"{key}: {path!r} looks like a {scheme}: URI without '//' and would be a local directory; "
            f"use {scheme}://{rest}"
        )
    if scheme not in STORAGE_SCHEMES:
        known = ", ".join(STORAGE_SCHEMES)
        return f"{key}: {path!r} has the unknown scheme {scheme!r}; use a local path or one of {known}"
    place = path.split("://", 1)[1]
    if "@" in place.split("/", 1)[0]:  # s3://KEY:SECRET@bucket/...: pyarrow takes it, and it would be recorded
        bare = f"{scheme}://{place.split('@', 1)[1]}"
        return (
            f"{key}: {bare.replace('://', '://***@')!r} holds credentials before '@', which would be kept in the "
            f"run's params, tags and logs; give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and use {bare}"
        )
    return None


def resolve_tracking_uri(
    cfg_uri: str | None, project_root: Path, key: str = "tracking.uri", given_wins: bool = False
) -> str:
    """$MLFLOW_TRACKING_URI, else ``cfg_uri`` (given as ``key``; first when ``given_wins``: a command-line flag),
    else an absolute sqlite store in the project directory. A URI of the wrong form (no scheme, an unknown one)
    is a ConfigError naming where it came from."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri, key = (env, "$MLFLOW_TRACKING_URI") if env and not (given_wins and cfg_uri) else (cfg_uri, key)
    if not uri:
        return f"sqlite:///{(project_root / 'mlflow.db').resolve()}"
    problem = tracking_uri_problem(uri, key)
    if problem:
        raise ConfigError(problem)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative sqlite path depends on the working directory (lost under `ray job submit`).
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def local_store_dir(uri: str) -> Path | None:
    """The directory of a local sqlite/file store, where its artifacts go too; None for servers."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    return None


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def run_name_problem(name: str, flag: str) -> str | None:
    """Why ``name`` (given as ``flag``) cannot name a run or a sweep (a directory under ``train.storage_path``, an
    S3 prefix and an MLflow run name), in one line with the fix; None when it can."""
    if RUN_NAME.fullmatch(name) and ".." not in name:
        return None
    return (
        f"{flag}: {name!r} cannot name a run: use up to 128 letters, digits, '.', '_' and '-', starting with a "
        "letter or digit (it becomes a directory under train.storage_path and an MLflow run name)"
    )
