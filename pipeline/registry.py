"""The logged generator as a model: the Model Registry (a version per train or sweep, the ``champion`` alias on
the best FID) and loading a generator back by its URI (``runs:/``, ``models:/NAME@ALIAS``, ``models:/NAME/N``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.tracking import GENERATOR_FACTS, TrackingError, mlflow_client, using_tracking_uri


def generator_uri(run_id: str | None, model: str | None) -> str:
    """The model URI that ``sample``/``evaluate`` load: ``--model`` as given, or ``--run-id``'s ``generator``."""
    if model:
        if not model.startswith(("models:/", "runs:/")):
            raise TrackingError(
                f"--model {model!r}: give models:/NAME@ALIAS (e.g. models:/gan-mnist@champion), models:/NAME/VERSION "
                "or runs:/RUN_ID/generator"
            )
        return model
    return f"runs:/{run_id}/generator"


def load_generator(uri: str, model_uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The generator at ``model_uri`` (``runs:/ID/generator``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
    or a logged model's ``models:/m-...``) and its facts: ``latent_dim``, ``dataset`` and, for a model that
    carries them, ``image_shape`` and ``network``. They come from the model's own metadata; a model logged
    before models carried them falls back on the params of the run that trained it (``facts_from`` says which).
    A clear error if anything is missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    try:
        run_id = _source_run(client, model_uri)
    except MlflowException as exc:
        raise TrackingError(
            f"{model_uri}: no such registered model, version or alias in {uri} ({str(exc).splitlines()[0]}); "
            f"list them in the UI's Models tab (`mlflow ui --backend-store-uri {uri}`) or check MLFLOW_TRACKING_URI"
        ) from None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(
            f"no MLflow run {run_id!r} in {uri}; list runs with `mlflow ui --backend-store-uri {uri}` "
            "or check MLFLOW_TRACKING_URI"
        ) from None
    try:
        with using_tracking_uri(uri):
            model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
            metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    except (MlflowException, OSError) as exc:
        raise TrackingError(
            f"{model_uri}: no loadable generator ({str(exc).splitlines()[0]}); did that training finish?"
        ) from None
    if GENERATOR_FACTS in metadata:
        return model, {**metadata[GENERATOR_FACTS], "facts_from": "model metadata"}
    params = run.data.params
    return model, {
        "latent_dim": int(params["latent_dim"]),
        "dataset": params.get("dataset"),
        "facts_from": "run params",
    }


def _source_run(client: Any, model_uri: str) -> str:
    """The id of the run that logged the model at ``model_uri``."""
    path = model_uri.split(":/", 1)[1].strip("/")
    if model_uri.startswith("runs:/"):
        return path.split("/", 1)[0]
    if "@" in path:
        name, alias = path.split("@", 1)
        return client.get_model_version_by_alias(name, alias).run_id
    if path.startswith("m-") and "/" not in path:
        return client.get_logged_model(path).source_run_id
    name, _, version = path.rpartition("/")
    return client.get_model_version(name, version).run_id


# ------------------------------------------------------------------------------------------- Model Registry

CHAMPION = "champion"


@dataclass(frozen=True)
class Registration:
    """A generator registered as a model version, and where the ``champion`` alias stands afterwards."""

    name: str
    version: str
    champion: str  # the version that holds the alias now
    message: str  # one line for the log: registered, and whether the champion moved


def register_generator(uri: str, name: str, model_uri: str, tags: dict[str, str]) -> Registration:
    """Register ``model_uri`` as a new version of ``name`` with ``tags`` (``fid``, ``dataset``,
    ``evaluator_sha256``, ...), then give it the ``champion`` alias if its FID beats the champion's.

    FIDs are compared only among versions with the same dataset and evaluator; a champion scored by another
    evaluator (or dataset) is not comparable, and the alias goes to the best version of the new one's dataset
    and evaluator. Concurrent registrations
    (sweeps ending at once) converge: each writer sets the alias to the best version it can see, then reads
    again and repeats until the alias is where it should be, so the last writer always saw every version
    registered before its final check, and no later one can leave the alias on a worse model.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    # The client API, not mlflow.register_model: that one sets the process-wide tracking URI (not thread-safe)
    # and prints to stderr.
    model_id = model_uri.rstrip("/").split("/")[-1]
    for attempt in range(3):
        try:
            logged = client.get_logged_model(model_id)
            with contextlib.suppress(MlflowException):  # it exists already (or another process just made it)
                client.create_registered_model(name)
            version = client.create_model_version(
                name, logged.artifact_location, run_id=logged.source_run_id, tags=tags, model_id=model_id
            ).version
            break
        except MlflowException:
            # A sqlite store read in the middle of another writer's transaction can miss a row; nothing was
            # created then. Rare, so try again a moment later.
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
    previous = _champion(client, name)
    for _ in range(20):
        current = _champion(client, name)
        best = _best_version(client, name, tags)
        if current is not None and (str(current.version) == str(best.version) or not _beats(best, current, tags)):
            break
        with contextlib.suppress(MlflowException):  # two writers at once (a unique-key clash): read and try again
            client.set_registered_model_alias(name, CHAMPION, best.version)
    champion = _champion(client, name)
    fid = float(tags["fid"])
    if champion is not None and str(champion.version) == str(version):
        was = (
            f"version {previous.version} (FID {float(previous.tags.get('fid', 'nan')):.3f})"
            if previous is not None
            else "no champion before"
        )
        outcome = f"champion moved to it from {was}"
    elif champion is not None:
        outcome = (
            f"champion stays version {champion.version} (FID {float(champion.tags.get('fid', 'nan')):.3f}"
            f"{' is better' if _comparable(champion, tags) else ''})"
        )
    else:
        outcome = "no champion"
    message = f"registered model {name!r} version {version} (FID {fid:.3f}); {outcome}; models:/{name}@{CHAMPION}"
    return Registration(name, str(version), str(champion.version) if champion is not None else "", message)


def _champion(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _comparable(version: Any, tags: dict[str, str]) -> bool:
    return all(version.tags.get(k) == tags.get(k) for k in ("dataset", "evaluator_sha256")) and "fid" in version.tags


def _fid(version: Any) -> float:
    try:
        return float(version.tags["fid"])
    except (KeyError, ValueError):
        return float("inf")


def _best_version(client: Any, name: str, tags: dict[str, str]) -> Any:
    """The version with the lowest FID among those comparable with ``tags`` (the oldest of equals)."""
    versions = [v for v in client.search_model_versions(f"name = '{name}'") if _comparable(v, tags)]
    return min(versions, key=lambda v: (_fid(v), int(v.version)))


def _beats(candidate: Any, champion: Any, tags: dict[str, str]) -> bool:
    """Whether ``candidate`` should take the alias from ``champion``: a strictly lower FID, or a champion that
    cannot be compared (another dataset or evaluator)."""
    return not _comparable(champion, tags) or _fid(candidate) < _fid(champion)
