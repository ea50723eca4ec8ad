"""The Model Registry: the logged generator as a model (a version per train or sweep, the ``champion`` alias on
the best score of the metric registry's champion metric, FID), and loading a generator back by its URI
(``runs:/``, ``models:/NAME@ALIAS``, ``models:/NAME/N``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.eval.metrics import CHAMPION_METRIC, Metric
from pipeline.tracking.store import (
    GENERATOR_FACTS,
    TrackingError,
    mlflow_client,
    using_tracking_uri,
)

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


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


# A version's model URI -> its scores by the current evaluator, as version tags (fid, inception_score,
# evaluator_sha256, eval_num_samples).
Rescore = Callable[[str], dict[str, str]]

# What two versions' FIDs must share to be compared: the data, the evaluator and the number of samples scored
# (FID's bias falls as the sample grows).
COMPARED_ON = ("dataset", "evaluator_sha256", "eval_num_samples")


def register_generator(
    uri: str,
    name: str,
    model_uri: str,
    tags: dict[str, str],
    rescore: Rescore | None = None,
    ranked: Metric = CHAMPION_METRIC,
) -> Registration:
    """Register ``model_uri`` as a new version of ``name`` with ``tags`` (``fid``, ``dataset``,
    ``evaluator_sha256``, ``eval_num_samples``, ...), then give it the ``champion`` alias if its FID beats the
    champion's.

    FIDs are compared only between versions that share :data:`COMPARED_ON`. A champion of the same dataset scored
    otherwise (another evaluator, another sample count, or before versions recorded them) is first re-scored by
    ``rescore`` (its generator is in the registry), the figure kept beside its own (tag ``fid.<sha12>.<n>``: its
    own tags stay what its run measured); without that evidence it keeps the alias.
    A champion of another dataset under the same name gives it up. Concurrent registrations (sweeps ending at
    once) converge: each writer sets the alias to the best version it can see, then reads again and repeats until
    the alias is where it should be, so the last writer always saw every version registered before its final
    check, and no later one can leave the alias on a worse model.
    """
    client = mlflow_client(uri)
    version = _new_version(client, name, model_uri, tags)
    previous = _champion(client, name)
    note, hold = "", False
    if (
        previous is not None
        and previous.tags.get("dataset") == tags.get("dataset")
        and not _comparable(previous, tags, ranked)
    ):
        note, hold = _rescore(client, name, previous, tags, rescore, ranked)
        previous = _champion(client, name)
    if not hold:
        _move_alias(client, name, tags, ranked)
    champion = _champion(client, name)
    score = float(tags[ranked.name])
    if champion is not None and str(champion.version) == str(version):
        before = _score_for(previous, tags, ranked) if previous is not None else None
        was = (
            f"version {previous.version} ({ranked.label} {before if before is None else f'{before:.3f}'})"
            if previous is not None
            else "no champion before"
        )
        outcome = f"champion moved to it from {was}"
    elif champion is not None:
        comparable = _score_for(champion, tags, ranked)
        outcome = (
            f"champion stays version {champion.version} ({ranked.label} {comparable:.3f} is better)"
            if comparable is not None
            else f"champion stays version {champion.version} ({ranked.label} {_float(champion.tags.get(ranked.name))}, "
            "not comparable)"
        )
    else:
        outcome = "no champion"
    message = (
        f"registered model {name!r} version {version} ({ranked.label} {score:.3f}); {note}{outcome}; "
        f"models:/{name}@{CHAMPION}"
    )
    return Registration(name, str(version), str(champion.version) if champion is not None else "", message)


def _new_version(client: Any, name: str, model_uri: str, tags: dict[str, str]) -> str:
    """``model_uri`` registered as a new version of ``name`` (the model made if need be); its number."""
    from mlflow.exceptions import MlflowException

    # The client API, not mlflow.register_model: that one sets the process-wide tracking URI (not thread-safe)
    # and prints to stderr.
    model_id = model_uri.rstrip("/").split("/")[-1]
    for attempt in range(3):
        try:
            logged = client.get_logged_model(model_id)
            with contextlib.suppress(MlflowException):  # it exists already (or another process just made it)
                client.create_registered_model(name)
            return str(
                client.create_model_version(
                    name, logged.artifact_location, run_id=logged.source_run_id, tags=tags, model_id=model_id
                ).version
            )
        except MlflowException:
            # A sqlite store read in the middle of another writer's transaction can miss a row; nothing was
            # created then. Rare, so try again a moment later.
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def score_key(tags: dict[str, str], ranked: Metric = CHAMPION_METRIC) -> str:
    """The version tag that holds a re-score by the evaluator and sample count of ``tags``: fid.<sha12>.<n>."""
    return f"{ranked.name}.{tags.get('evaluator_sha256', '')[:12]}.{tags.get('eval_num_samples', '')}"


def _rescore(
    client: Any, name: str, champion: Any, tags: dict[str, str], rescore: Rescore | None, ranked: Metric
) -> tuple[str, bool]:
    """Re-score ``champion`` the way ``tags`` were scored and record it on the version beside its own figures (tag
    :func:`score_key`): (a note for the log line, whether the alias must stay for want of evidence)."""
    was = f"evaluator {champion.tags.get('evaluator_sha256', '')[:12] or 'unknown'}, "
    was += f"{champion.tags.get('eval_num_samples') or 'unknown'} samples"
    held = f"champion version {champion.version} was scored otherwise ({was})"
    if rescore is None:
        return f"{held} and cannot be re-scored here; ", True
    try:
        fresh = rescore(f"models:/{name}/{champion.version}")
        client.set_model_version_tag(name, champion.version, score_key(fresh, ranked), fresh[ranked.name])
    except Exception as exc:  # noqa: BLE001 - whatever failed, the alias stays without evidence
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return f"{held} and could not be re-scored ({type(exc).__name__}: {reason}); ", True
    note = (
        f"champion version {champion.version} re-scored with evaluator {fresh['evaluator_sha256'][:12]} at "
        f"{fresh['eval_num_samples']} samples (was {was}, {ranked.label} {_float(champion.tags.get(ranked.name))}): "
        f"{ranked.label} {float(fresh[ranked.name]):.3f}; "
    )
    return note, score_key(fresh, ranked) != score_key(
        tags, ranked
    )  # another evaluator than this version's: still no comparison


def _move_alias(client: Any, name: str, tags: dict[str, str], ranked: Metric) -> None:
    """The alias onto the best version comparable with ``tags``, until a read shows it there (writers racing)."""
    from mlflow.exceptions import MlflowException

    for _ in range(20):
        current = _champion(client, name)
        best = _best_version(client, name, tags, ranked)
        if current is not None and (
            str(current.version) == str(best.version) or not _beats(best, current, tags, ranked)
        ):
            return
        with contextlib.suppress(MlflowException):  # two writers at once (a unique-key clash): read and try again
            client.set_registered_model_alias(name, CHAMPION, best.version)


def _champion(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _float(text: str | None) -> str:
    try:
        return f"{float(text or 'nan'):.3f}"
    except ValueError:
        return str(text)


def _score_for(version: Any, tags: dict[str, str], ranked: Metric) -> float | None:
    """``version``'s FID measured as ``tags`` were (same dataset, evaluator and sample count): its own, or a
    re-score recorded on it; None when it has none."""
    if version.tags.get("dataset") != tags.get("dataset"):
        return None
    own = all(version.tags.get(k) == tags.get(k) for k in COMPARED_ON)
    value = version.tags.get(ranked.name) if own else version.tags.get(score_key(tags, ranked))
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _comparable(version: Any, tags: dict[str, str], ranked: Metric) -> bool:
    return _score_for(version, tags, ranked) is not None


def _best_version(client: Any, name: str, tags: dict[str, str], ranked: Metric) -> Any:
    """The version with the lowest FID among those comparable with ``tags`` (the oldest of equals)."""
    versions = [v for v in client.search_model_versions(f"name = '{name}'") if _comparable(v, tags, ranked)]
    return min(versions, key=lambda v: (ranked.sort_key(_score_for(v, tags, ranked)), int(v.version)))


def _beats(candidate: Any, champion: Any, tags: dict[str, str], ranked: Metric) -> bool:
    """Whether ``candidate`` should take the alias from ``champion``: a strictly lower FID by the same evaluator
    and sample count, or a champion of another dataset (no comparison: the name's latest dataset wins). A
    champion of the same dataset without a comparable FID keeps it: no evidence."""
    if champion.tags.get("dataset") != tags.get("dataset"):
        return True
    held = _score_for(champion, tags, ranked)
    return held is not None and ranked.better(_score_for(candidate, tags, ranked), held)


def registered_model_name(cfg: PipelineConfig) -> str:
    """The Model Registry name a run's best generator goes to (``tracking.registered_model``, default
    ``gan-<dataset>``); '' when registration is off."""
    name = cfg.tracking.registered_model
    return f"gan-{cfg.data.dataset.replace('_', '-')}" if name is None else name
