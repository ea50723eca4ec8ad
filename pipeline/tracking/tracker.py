"""A run's tracker: what the pipeline records into one MLflow run (:class:`MLflowTracker`), its no-op twin
(:class:`NullTracker`: workers other than rank 0, runs without tracking), and :func:`tracker_for`, the one place a
tracker of a run is made.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.core.pictures import figure, save_image_grid
from pipeline.core.secrets import masked_uri
from pipeline.tracking.outage import END_PATIENCE_S, KEEPING_LIMITS, PATIENCE_EVERY_S, KeptWrites, StoreUnreachable
from pipeline.tracking.store import GENERATOR_FACTS, bound_http_client, mlflow_client, using_tracking_uri


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_dir: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def flush(self) -> None: ...
    def finish(self) -> None: ...
    def unsent(self) -> list[list[Any]]: ...
    def carry(self, points: list[list[Any]]) -> None: ...
    def metric_history(self, key: str) -> list[tuple[int, float]]: ...
    def tags(self) -> dict[str, str]: ...


class NullTracker:
    """Accepts every call and records nothing (non-zero ranks, and runs without tracking)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_dir: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def unsent(self) -> list[list[Any]]:
        return []

    def carry(self, points: list[list[Any]]) -> None:
        pass

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []

    def tags(self) -> dict[str, str]:
        return {}


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as a search found it."""

    run_id: str
    status: str  # RUNNING, FINISHED, FAILED or KILLED
    tags: dict[str, str]


# A run's count of metric points computed again after a restart and not written twice (MLflowTracker.flush).
REPLAYED_TAG = "replayed_steps"


class MLflowTracker:
    """Logs into one existing MLflow run (by id).

    Step metrics are buffered and written by :meth:`flush`, which the trainer calls after each report's
    checkpoint is saved (before it in a sweep's trial, where Tune may end the trial at the report). Rank 0 of a
    training run (``keep_while_away``) keeps metrics, grids and tags while the store does not answer and sends them,
    in order, at the first flush it answers again (pipeline.tracking.outage); :meth:`finish` waits for that at the
    run's end. A run restarted from an earlier checkpoint than the one its metrics reached (the driver killed
    between the two) recomputes steps that are already logged; resuming is exact, so
    their values are the same, and a step already in a metric's history is not written again (metric
    histories never hold a step twice), only counted in the tag ``replayed_steps``.
    """

    def __init__(self, uri: str, run_id: str, keep_while_away: bool = False):
        self.uri = uri
        self.run_id = run_id
        self.client = mlflow_client(uri)
        if keep_while_away:  # this process is a training run's rank 0: its writes give up sooner (they are kept)
            bound_http_client(KEEPING_LIMITS)
        self.kept = KeptWrites(uri, keep_while_away)
        self._pending: list[Any] = []
        self._carried: list[Any] = []  # points a checkpoint carried over a restart: sent unless the run has them
        self._logged_through: dict[str, int] = {}  # metric key -> last step already in the run

    def log_params(self, params: dict[str, Any], untagged: Collection[str] = ()) -> None:
        """Log parameters; MLflow params are immutable, so a value changed on resume becomes a tag (except the
        ``untagged`` keys, whose later values the run records otherwise)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])
        changed = {
            f"resumed_with.{k}": str(v)
            for k, v in params.items()
            if k in existing and existing[k] != str(v) and k not in untagged
        }
        self.set_tags(changed)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        """Write what is kept and the buffered metrics, each step once; at rank 0 of a training run, while the store
        does not answer, keep them (one line when it goes away, one when it is back). Points at a step the run already
        holds (a restart from an earlier checkpoint than its metrics reached) are not written again; their count is
        added to the run's tag ``replayed_steps``, so a run (and a test) can see that it happened."""
        kept = self.kept
        if kept.down and not kept.replay():
            return
        was_down, points = kept.down, len(self._pending)
        try:
            self._send_pending()
        except Exception as exc:
            if not kept.absorbs(exc):
                raise
            kept.went_away(exc)
            return
        if was_down:
            kept.came_back(points)

    def unsent(self) -> list[list[Any]]:
        """The metric points not yet in the store, as [key, value, timestamp, step]: a checkpoint carries them, so
        that a restart from it (a crash after the checkpoint, before the flush; one during an outage) loses none."""
        return [[m.key, m.value, m.timestamp, m.step] for m in self._carried + self._pending]

    def carry(self, points: list[list[Any]]) -> None:
        """Points a resumed run's checkpoint carried (:meth:`unsent`): sent with the next flush, each one the run does
        not already hold (not counted as replayed: the run computes them no more)."""
        from mlflow.entities import Metric

        self._carried.extend(Metric(str(k), float(v), int(t), int(step)) for k, v, t, step in points)

    def _send_carried(self) -> None:
        for key in {m.key for m in self._carried}:  # (a store away raises here: the points stay carried)
            if key not in self._logged_through:
                history = self.client.get_metric_history(self.run_id, key)
                self._logged_through[key] = max((m.step for m in history), default=-1)
        carried, self._carried = self._carried, []
        self._pending[:0] = [m for m in carried if m.step > self._logged_through[m.key]]

    def _send_pending(self) -> None:
        if self._carried:
            self._send_carried()
        fresh, replayed, through = [], 0, dict(self._logged_through)
        for metric in self._pending:
            if metric.key not in through:
                history = self.client.get_metric_history(self.run_id, metric.key)
                through[metric.key] = self._logged_through[metric.key] = max((m.step for m in history), default=-1)
            if metric.step > through[metric.key]:
                fresh.append(metric)
                through[metric.key] = metric.step
            else:
                replayed += 1
        self._pending = fresh
        if replayed:
            self.kept.send(lambda: self._add_replayed(replayed))
        while self._pending:  # a batch at a time, each forgotten once the store has it
            batch = self._pending[:1000]
            self.client.log_batch(self.run_id, metrics=batch)
            for metric in batch:
                self._logged_through[metric.key] = max(self._logged_through.get(metric.key, -1), metric.step)
            self._pending = self._pending[len(batch) :]

    def _add_replayed(self, count: int) -> None:
        before = int(self.client.get_run(self.run_id).data.tags.get(REPLAYED_TAG, "0"))
        self.client.set_tag(self.run_id, REPLAYED_TAG, str(before + count))

    def finish(self, patience_s: float = END_PATIENCE_S, every_s: float = PATIENCE_EVERY_S) -> None:
        """The run's end on its rank 0: everything written, waiting up to ``patience_s`` for a store that is away
        (asking every ``every_s``); :class:`StoreUnreachable`, saying what was not recorded, past that."""
        deadline = time.monotonic() + patience_s
        self.flush()
        while self.kept.down:
            if time.monotonic() >= deadline:
                raise StoreUnreachable(
                    f"the tracking store {masked_uri(self.uri)} did not answer for {patience_s:.0f} s at the run's "
                    f"end: {len(self._pending)} metric point(s) and {len(self.kept.writes)} other record(s) of run "
                    f"{self.run_id} were not recorded (its checkpoints are saved)"
                )
            time.sleep(every_s)
            self.flush()

    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None:
        directory, _, name = artifact_path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            save_image_grid(images, os.path.join(tmp, name))
            self.log_artifact(os.path.join(tmp, name), directory or None)

    def log_artifact(self, local_path: str, artifact_dir: str | None = None) -> None:
        """Log the file ``local_path`` (kept, a copy of it, while the store is away)."""

        def write(path: str) -> Any:
            return lambda: self.client.log_artifact(self.run_id, path, artifact_dir)

        self.kept.send(write(local_path), (local_path,), lambda copies: write(copies[0]))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.kept.send(lambda key=key, value=value: self.client.set_tag(self.run_id, key, str(value)))

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def status(self) -> str:
        """RUNNING, FINISHED, FAILED or KILLED, as the store has it now."""
        return self.client.get_run(self.run_id).info.status

    def reopen(self) -> None:
        """Mark a finished or failed run RUNNING again (it is being resumed)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def children(self) -> list[RunRecord]:
        """The runs whose parent is this one (a sweep's trials), as they are now."""
        runs = self.client.search_runs(
            [self.experiment_id()], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'"
        )
        return [RunRecord(run.info.run_id, run.info.status, dict(run.data.tags)) for run in runs]

    def download_last_artifact(self, artifact_dir: str, dest: str) -> str | None:
        """The last (by name) artifact under ``artifact_dir``, downloaded into ``dest``; None if there is none."""
        paths = sorted(a.path for a in self.client.list_artifacts(self.run_id, artifact_dir))
        return self.client.download_artifacts(self.run_id, paths[-1], dest) if paths else None

    def log_generator(self, generator: torch.nn.Module, facts: dict[str, Any], scores: Sequence[str] = ()) -> str:
        """Log G as the MLflow PyTorch model ``generator`` (pt2 format: loads without unpickling code) carrying
        ``facts`` (its ``latent_dim``, image shape, dataset, network) as the model's metadata, and link the run's
        last value of each metric in ``scores`` to it, so the UI's model list shows and sorts them. Returns the
        model's URI (``models:/m-...``)."""
        import mlflow
        from mlflow.entities import Metric

        generator = generator.cpu().eval()
        example = np.random.default_rng(0).standard_normal((4, facts["latent_dim"])).astype(np.float32)
        if facts.get("class_weights"):  # a conditional G's input carries each row's class as one last column
            classes = np.arange(4, dtype=np.float32)[:, None] % len(facts["class_weights"])
            example = np.concatenate([example, classes], axis=1)
        with using_tracking_uri(self.uri), mlflow.start_run(run_id=self.run_id):
            # The requirements named, not inferred: MLflow would load the model in a new Python process to see
            # what it imports (seconds of each run's end) and find torch, which these pins say.
            info = mlflow.pytorch.log_model(
                generator,
                name="generator",
                input_example=example,
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                metadata={GENERATOR_FACTS: facts},
            )
        linked = []
        for key in scores:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                last = max(history, key=lambda m: m.step)
                # The same key, value, step and time as in the run: MLflow keeps the run's history as it was
                # and records the point for the model too.
                linked.append(Metric(key, last.value, last.timestamp, last.step, model_id=info.model_id))
        if linked:
            self.client.log_batch(self.run_id, metrics=linked)
        return info.model_uri

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any]) -> None:
        """Record the run's training data as an MLflow dataset input (the UI's Dataset column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest[:36],  # MLflow's limit; the full digest is in the profile
            source_type="s3" if source.startswith("s3://") else "local",
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile, sort_keys=True),
        )
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception as exc:  # noqa: BLE001 - MLflow wraps the database's error in its own
            # Two runs logging the same new dataset at once (a sweep's trials): MLflow's sqlite store checks
            # for the dataset, then inserts it, and the second insert fails. The dataset exists now: again.
            if "UNIQUE constraint failed" not in str(exc):
                raise
            self.client.log_inputs(self.run_id, datasets=inputs)

    def run(self, run_id: str) -> MLflowTracker:
        """A tracker of another run in the same store."""
        return tracker_for(self.uri, run_id)

    @contextlib.contextmanager
    def log_figure(
        self, artifact_path: str, xlabel: str, ylabel: str, size: tuple[float, float] = (7, 4)
    ) -> Iterator[Any]:
        """A matplotlib axes to draw on, logged as the PNG ``artifact_path`` (e.g. ``plots/x.png``) when the
        block ends."""
        directory, _, name = artifact_path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            with figure(os.path.join(tmp, name), xlabel, ylabel, size) as ax:
                yield ax
            self.client.log_artifact(self.run_id, os.path.join(tmp, name), directory or None)

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the artifact ``artifact_file`` of the run."""
        self.client.log_text(self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED", end_time_ms: int | None = None) -> None:
        """Close the run with ``status`` at ``end_time_ms`` (default now)."""
        self.flush()
        self.client.set_terminated(self.run_id, status=status, end_time=end_time_ms)


def tracker_for(uri: str | None, run_id: str | None, keep_while_away: bool = False) -> MLflowTracker | NullTracker:
    """The tracker of the MLflow run ``run_id`` in the store ``uri``; a NullTracker without one. ``keep_while_away``:
    a training run's rank 0, whose writes wait for a store that does not answer (pipeline.tracking.outage)."""
    if uri is None or run_id is None:
        return NullTracker()
    return MLflowTracker(uri, run_id, keep_while_away)
