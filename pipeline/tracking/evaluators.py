"""The evaluator everyone on a tracking store shares: one per dataset, registered as the model
``evaluator-<dataset>`` by the first run that needs it (its files the artifacts of a run in the experiment
:data:`EVALUATOR_EXPERIMENT`, the version tagged with their checksums), downloaded by every later run on any host,
checked against those checksums and cached by checksum. FIDs from different hosts then compare.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from filelock import FileLock

from pipeline.core.files import file_sha256
from pipeline.data.kinds import source_of
from pipeline.data.source import data_root
from pipeline.data.specs import DatasetSpec
from pipeline.eval.evaluator import (
    EVALUATOR_FILES,
    EVALUATOR_VERSION,
    Evaluator,
    EvaluatorError,
    cache_dir,
    evaluator_kind,
    get_evaluator,
    load_cached,
)
from pipeline.eval.inception import (
    PUBLISHED_PREFIX,
    RESIZE,
    WEIGHTS_FILE,
    Inception,
    InceptionError,
    cached_weights,
    check_digest,
    fetch_weights,
    keep,
)
from pipeline.tracking.store import TrackingError, get_or_create_experiment, mlflow_client

if TYPE_CHECKING:
    from pipeline.config.schema import DataConfig, PipelineConfig

EVALUATOR_EXPERIMENT = "gan-pipeline-evaluators"  # where each registered evaluator's files are a run's artifacts
EVALUATOR_ARTIFACTS = "evaluator"


@dataclass(frozen=True)
class SharedVersion:
    """A registered evaluator version: its model name and number, tags (checksums, accuracy) and files' run."""

    name: str
    version: str
    tags: dict[str, str]
    run_id: str


def shared_evaluator_version(uri: str, name: str, match: dict[str, str]) -> SharedVersion | None:
    """The first version (the lowest number) of the registered model ``name`` whose tags hold ``match``: every
    host asking the same store gets the same one, also when two registered at once. None if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        versions = mlflow_client(uri).search_model_versions(f"name = '{name}'")  # none yet: []
    except MlflowException as exc:
        raise TrackingError(
            f"the MLflow store {uri} cannot list the {name} versions ({str(exc).splitlines()[0]}); check that it "
            "is up and tracking.uri / MLFLOW_TRACKING_URI"
        ) from None
    fitting = [v for v in versions if all(v.tags.get(k) == value for k, value in match.items())]
    if not fitting:
        return None
    first = min(fitting, key=lambda v: int(v.version))
    return SharedVersion(name, str(first.version), dict(first.tags), str(first.run_id))


def register_evaluator(uri: str, name: str, files: list[Path], tags: dict[str, str]) -> None:
    """``files`` (weights, statistics, metadata) as the artifacts of a run in :data:`EVALUATOR_EXPERIMENT`, and
    that run as a new version of the registered model ``name`` with ``tags``."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    experiment_id = get_or_create_experiment(client, EVALUATOR_EXPERIMENT, uri)
    run_id = client.create_run(experiment_id, run_name=name, tags={"kind": "evaluator", **tags}).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            shutil.copy2(path, tmp)
        client.log_artifacts(run_id, tmp, EVALUATOR_ARTIFACTS)
    client.set_terminated(run_id)
    with contextlib.suppress(MlflowException):  # it exists already (or another host just made it)
        client.create_registered_model(name, description="The evaluator every run on this store scores with")
    client.create_model_version(name, f"runs:/{run_id}/{EVALUATOR_ARTIFACTS}", run_id=run_id, tags=tags)


def download_evaluator(uri: str, shared: SharedVersion, into: Path) -> Path:
    """The files of ``shared`` downloaded into the directory ``into``; returns the folder holding them."""
    return Path(mlflow_client(uri).download_artifacts(shared.run_id, EVALUATOR_ARTIFACTS, str(into)))


def shared_evaluator(data: DataConfig, uri: str, progress: Callable[[str], None] = print) -> Evaluator:
    """The evaluator of ``data``'s dataset that every run on the tracking store ``uri`` uses: the first version of
    ``evaluator-<dataset>`` registered there for this dataset's files and this evaluator's version. With none,
    this host's own (cached, or trained now) is registered first. A downloaded one is checked against the
    checksums it was registered with and cached under the data root by checksum."""
    spec = source_of(replace(data, limit=None)).spec()
    name = spec.evaluator_name
    kind = evaluator_kind(source_of(replace(data, limit=None)))
    match = {"dataset_sha256": spec.digest, "evaluator_version": str(EVALUATOR_VERSION), "evaluator_kind": kind}
    directory = cache_dir(data, spec)
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".shared.lock"), timeout=3600):
        shared = shared_evaluator_version(uri, name, match)
        if shared is None:
            own = get_evaluator(data, progress)
            meta = json.loads((directory / "meta.json").read_text())
            tags = {
                **match,
                "dataset": spec.key,
                "weights_sha256": own.checksum,
                "stats_sha256": meta["stats_sha256"],
                "test_accuracy": repr(own.test_accuracy),
            }
            register_evaluator(uri, name, [directory / f for f in EVALUATOR_FILES], tags)
            shared = shared_evaluator_version(uri, name, match)  # the first registered, if two hosts raced
            progress(f"[eval] registered this host's {spec.key} evaluator as {name} in {uri}")
        return _shared_copy(directory, spec, uri, shared, progress)


def _shared_copy(
    directory: Path, spec: DatasetSpec, uri: str, shared: SharedVersion, progress: Callable[[str], None]
) -> Evaluator:
    """The evaluator ``shared`` from this host's cache (its own, or a copy kept by checksum), else downloaded,
    verified and cached."""
    checksum = shared.tags["weights_sha256"]
    where = f"{shared.name} version {shared.version} in {uri}"
    kept = directory / f"sha256-{checksum}"
    for candidate in (directory, kept):
        cached = load_cached(candidate, spec)
        if cached is not None and cached.checksum == checksum:
            return cached
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        files = download_evaluator(uri, shared, Path(tmp))
        got = {
            key: file_sha256(files / f)
            for key, f in (("weights_sha256", "evaluator.pt"), ("stats_sha256", "test_stats.npz"))
        }
        wrong = [key for key, value in got.items() if shared.tags.get(key) != value]
        if wrong:
            raise EvaluatorError(
                f"the shared {spec.key} evaluator ({where}) does not match its registered {', '.join(wrong)}: "
                "its files were changed after registration; delete that model version so that the next run "
                "registers a good one"
            )
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(files, kept)
    evaluator = load_cached(kept, spec)
    if evaluator is None:
        raise EvaluatorError(f"the shared {spec.key} evaluator ({where}) cannot be loaded from {kept}")
    progress(
        f"[eval] {spec.key} evaluator: {where} (sha256 {checksum[:12]}, {evaluator.describe()}), verified and "
        f"cached in {kept}"
    )
    return evaluator


# ------------------------------------------------------------------------------------------- Inception weights

INCEPTION_MODEL = "inception-v3-tf-fid"  # the registered model the weights are shared as


def shared_inception(cfg: PipelineConfig, uri: str | None, progress: Callable[[str], None] = print) -> dict | None:
    """With ``eval.inception_weights`` set, the Inception FID's payload for workers (weights, digest, resize, the
    test split's statistics), or None with one line saying why and how to provide the weights. The weights are
    those kept on this host, else the store's (checked against the pin), else fetched as the setting says and
    then registered in the store ``uri`` (once they have loaded into the network)."""
    setting = cfg.eval.inception_weights
    if not setting:
        return None
    cache, expected = data_root(cfg.data) / "inception", cfg.eval.inception_sha256
    try:
        found = cached_weights(cache, expected) or (_stored_inception(uri, expected, cache) if uri else None)
        weights, digest = found or fetch_weights(setting, expected, cache, progress)
        mu, sigma = _inception_reference(cfg, weights, digest, progress)  # fails on weights of another network
        original = cache / f"original-{digest}.pth"
        if uri and original.is_file() and _inception_version(uri, digest) is None:
            register_evaluator(uri, INCEPTION_MODEL, [original], {"sha256": digest, "resize": RESIZE})
            progress(f"[eval] registered the Inception weights (sha256 {digest[:12]}) as {INCEPTION_MODEL} in {uri}")
    except Exception as exc:  # noqa: BLE001 - whatever failed, the run goes on without the Inception FID
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        progress(
            f"[eval] Inception FID: off ({reason}); everything else is scored. The weights: the path or URL of "
            f"{WEIGHTS_FILE} in eval.inception_weights, or 'download'"
        )
        return None
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {"weights": state, "sha256": digest, "resize": RESIZE, "mu": mu, "sigma": sigma}


def _inception_version(uri: str, digest: str | None, prefix: str = "") -> SharedVersion | None:
    """The store's first version of the Inception weights with ``digest`` (or, None, any whose digest starts with
    ``prefix``); None when there is none (or no such model yet)."""
    from mlflow.exceptions import MlflowException

    if digest is not None:
        return shared_evaluator_version(uri, INCEPTION_MODEL, {"sha256": digest})
    try:
        versions = mlflow_client(uri).search_model_versions(f"name = '{INCEPTION_MODEL}'")
    except MlflowException:
        return None
    fitting = [v for v in versions if v.tags.get("sha256", "").startswith(prefix)]
    first = min(fitting, key=lambda v: int(v.version), default=None)
    return None if first is None else SharedVersion(INCEPTION_MODEL, str(first.version), dict(first.tags), first.run_id)


def _stored_inception(uri: str, expected: str | None, cache: Path) -> tuple[Path, str] | None:
    """The store's copy of the weights: the original file, checked against the pin like a user's file, then kept
    (loaded with ``weights_only=True`` and saved again) in ``cache``; None when the store has none."""
    shared = _inception_version(uri, expected, "" if expected else PUBLISHED_PREFIX)
    if shared is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        folder = download_evaluator(uri, shared, Path(tmp))
        files = list(folder.glob("original-*.pth"))
        if len(files) != 1:
            raise InceptionError(f"{INCEPTION_MODEL} version {shared.version} in {uri} holds no weights file")
        digest = file_sha256(files[0])
        where = f"{INCEPTION_MODEL} version {shared.version} in {uri}"
        if digest != shared.tags.get("sha256"):
            raise InceptionError(f"{where} does not match its registered SHA-256: its file was changed")
        check_digest(digest, expected, where)
        kept = keep(files[0], digest, cache)
        os.replace(files[0], cache / f"original-{digest}.pth")
    return kept, digest


def _inception_reference(
    cfg: PipelineConfig, weights: Path, digest: str, progress: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray]:
    """The test split's Inception statistics (up to ``eval.inception_samples`` images), cached beside the data's
    evaluator by the weights' digest, the resize protocol and the count."""
    source = source_of(replace(cfg.data, limit=None))
    spec = source.spec()
    count = cfg.eval.inception_samples
    path = cache_dir(cfg.data, spec) / f"inception-{digest[:12]}-{RESIZE}-{count}.npz"
    inception = Inception(weights, digest)  # loads the weights into the network first: another network fails here
    if path.is_file():
        with np.load(path, allow_pickle=False) as saved:
            return saved["mu"], saved["sigma"]
    test = source.load(False, progress, count).images[:count]
    progress(f"[eval] the test split's Inception statistics ({len(test)} images; once, cached in {path.parent})")
    inception.reference(test)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, mu=inception.mu, sigma=inception.sigma)
    tmp.replace(path)
    return inception.mu, inception.sigma
