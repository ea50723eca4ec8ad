"""What a sweep tells its user: the live trials table on the console, each trial's MLflow child run closed as
the trial ends, and the summary when the sweep ends (the parent run's best figures, plots and sample grid,
where the hardware's time went, the scheduler's own summary, the best generator registered).
"""

from __future__ import annotations

import collections
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.core.errors import first_line
from pipeline.core.secrets import masked_uri
from pipeline.distributed.lifecycle import RunFailed, finish_from_storage
from pipeline.distributed.registration import register_best
from pipeline.distributed.results import report_kind
from pipeline.eval.metrics import FID, INCEPTION_SCORE, METRICS
from pipeline.gan.reports import Diverged
from pipeline.sweep.accounting import SweepTime, TrialTime, sweep_time
from pipeline.sweep.schedulers import ranking, scheduler_of
from pipeline.sweep.search_space import flat_point, trial_config
from pipeline.tracking.registry import Registration
from pipeline.tracking.store import find_run
from pipeline.tracking.tracker import MLflowTracker, RunRecord, tracker_for

STATUS_MIN_GAP_S = 15.0


def print_line(line: str) -> None:
    """A line to stdout. Tune pickles the callbacks that print, and pickling ``print`` itself fails once Ray's
    tqdm_ray has replaced builtins.print (it does on the first worker line the driver shows); a module's function
    pickles by name."""
    print(line, flush=True)


def ended_status(last: dict[str, Any], final_epoch: int) -> str:
    """How a trial that ended without an error ended, from its last result (``diverged: 1`` in results that a
    resumed sweep's trials reported before the typed reports)."""
    if report_kind(last) is Diverged:
        return "diverged"
    return "finished" if int(last.get("epoch", 0)) >= final_epoch else "early_stopped"


class SweepStoreFailed(RunFailed):
    """The MLflow store failed in the sweep's own bookkeeping (a Tune callback): the sweep stops, resumable."""


_TRACKING_URIS: dict[str, str] = {}  # sweep name -> its tracking URI (a password in it stays out of Tune's files)


def sweep_tracking_uri(sweep: str) -> str:
    """The tracking URI of ``sweep``, as the driver holds it. A module function: a callback Tune pickles (by value,
    as it is made in a function) refers to it by name and holds no URI."""
    return _TRACKING_URIS[sweep]


def close_child_runs(uri: str, experiment: str, sweep: str, final_epoch: int) -> Any:
    """A Tune callback that ends each trial's MLflow child run when the trial ends, so its duration is the
    trial's: an early-stopped trial's run ends KILLED (tag ``status=early_stopped``), an errored one FAILED, a
    diverged one FAILED (tags ``status=diverged``, ``diverged_epoch``: Tune may stop it at that report, before its
    driver ends the run), a completed one is ended by its own driver. The end time is also kept as the tag
    ``trial_end_ms``, which the summary at the end of the sweep reuses whenever it ends a run again."""
    from ray.tune import Callback

    _TRACKING_URIS[sweep] = uri  # the driver's memory, not the callback: Tune pickles callbacks into tuner.pkl
    shown = masked_uri(uri)

    class CloseChildRuns(Callback):
        def _close(self, trial: Any, status: str | None, tags: dict[str, str]) -> None:
            uri = sweep_tracking_uri(sweep)
            try:
                run_id = find_run(uri, experiment, {"sweep": sweep, "trial_id": trial.trial_id})
                if run_id is None:
                    return
                now = int(time.time() * 1000)
                run = tracker_for(uri, run_id)
                run.set_tags({"trial_end_ms": str(now), **tags})
                if status is not None:
                    run.end(status, end_time_ms=now)
            except Exception as exc:  # noqa: BLE001 - whatever MLflow or its transport raised: one line
                reason = first_line(exc)
                raise SweepStoreFailed(
                    f"the MLflow store {shown} failed while sweep {sweep!r} closed trial {trial.trial_id}'s run "
                    f"({type(exc).__name__}: {reason[:200]})"
                ) from exc

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            last = trial.last_result or {}
            ended = ended_status(last, final_epoch)
            if ended == "early_stopped":
                self._close(trial, "KILLED", {"status": ended})
            elif ended == "diverged":
                self._close(trial, "FAILED", {"status": ended, "diverged_epoch": str(last.get("epoch", "?"))})
            else:
                self._close(trial, None, {})

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._close(trial, "FAILED", {"status": "failed"})

    return CloseChildRuns()


def sweep_status(cfg: PipelineConfig, progress: Callable[[str], None]) -> Any:
    """A Tune callback that prints the sweep's trials table (the final table's columns) when a trial starts,
    reports an epoch or ends, at most once every STATUS_MIN_GAP_S seconds (changes in between are printed
    together), and says where a failed trial's error is."""
    from ray.tune import Callback

    searched, metric = list(cfg.tune.search_space), ranking(cfg)[0].name
    cfg = cfg.without_secrets()  # the callback holds it, and Tune pickles callbacks into its records

    class SweepStatus(Callback):
        def __init__(self) -> None:
            self.started = time.monotonic()
            self.last_print = float("-inf")
            self.changed = False

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.changed = True

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.changed = True

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.changed = True

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.changed = True
            progress(f"[tune] trial {trial.trial_id} failed; its error: {trial.error_file}")

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if self.changed and time.monotonic() - self.last_print >= STATUS_MIN_GAP_S:
                self.changed, self.last_print = False, time.monotonic()
                rows = best_first(cfg, [live_row(cfg, trial, searched) for trial in trials])
                elapsed = int(time.monotonic() - self.started)
                counts = collections.Counter(r["status"] for r in rows)
                line = f"[tune] {elapsed // 60} min {elapsed % 60:02d} s: " + ", ".join(
                    f"{n} {status}" for status, n in sorted(counts.items())
                )
                if rows and rows[0][metric] is not None:
                    line += f"; best {metric} {rows[0][metric]:.3f} ({rows[0]['trial_id']})"
                progress(line)
                progress(format_rows(rows, searched))

    return SweepStatus()


def best_first(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials table rows, the best score first and those without a score last."""
    ranked, mode = ranking(cfg)
    sign, metric = (1 if mode == "min" else -1), ranked.name
    scored = sorted((r for r in rows if r[metric] is not None), key=lambda r: sign * r[metric])
    return scored + [r for r in rows if r[metric] is None]


def trial_row(
    trial_id: str | None, status: str, last: dict[str, Any], config: dict[str, Any], searched: list[str]
) -> dict[str, Any]:
    """One line of the trials table: the trial, how it stands, its last scores and its (current) point."""
    point = flat_point(config or {})
    return {
        "trial_id": trial_id,
        "status": status,
        "epochs": int(last.get("epoch", 0)),
        **{name: last.get(name) for name in METRICS},
        **{key: point.get(key) for key in searched},
    }


def live_row(cfg: PipelineConfig, trial: Any, searched: list[str]) -> dict[str, Any]:
    """A running sweep's trial as a row of the trials table."""
    last = trial.last_result or {}
    status = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "ERROR": "failed"}.get(trial.status)
    return trial_row(trial.trial_id, status or ended_status(last, cfg.train.epochs), last, trial.config, searched)


def fmt(value: Any) -> str:
    """A trials table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


def format_rows(rows: list[dict[str, Any]], searched: list[str]) -> str:
    """Trials table rows as a markdown table: FID and IS, and a column for each other metric some trial has a
    value of."""
    timed = any("train_s" in r for r in rows)  # a finished sweep's table: where each trial's time went
    always = (FID, INCEPTION_SCORE)
    shown = [m for m in METRICS.values() if m in always or any(fmt(r.get(m.name)) != "-" for r in rows)]
    labels = [metric.label for metric in shown]
    head = ["trial", *searched, "epochs", *labels, "status", *(["train s", "start s"] if timed else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["trial_id"],
            *(fmt(r[k]) for k in searched),
            str(r["epochs"]),
            *(fmt(r[metric.name]) for metric in shown),
            r["status"],
            *([f"{r['train_s']:.0f}", fmt(r["start_s"])] if timed else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# When the sweep ends


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    rows: list[dict[str, Any]]  # one per trial, best first
    best: dict[str, Any] | None
    registration: Registration | None = None  # the best trial's generator in the Model Registry
    time: SweepTime | None = None  # where the hardware's time went (this invocation's part of the sweep)
    scheduler_text: str | None = None  # what the scheduler adds after the trials table (PBT: its lineage)


@dataclass(frozen=True)
class SweepClock:
    """What the accounting needs besides the trials' reports: when this invocation's fit began and how long it
    ran, the cluster's CPUs (or GPUs) and each worker's share of them."""

    started_at: float
    wall_s: float
    capacity: float
    per_worker: float

    def trial(self, result: Any) -> TrialTime:
        """A trial's reports from this invocation (a resumed sweep counts the part it ran)."""
        frame = result.metrics_dataframe
        if frame is None or "timestamp" not in frame:
            return TrialTime.of([])
        return TrialTime.of(frame[frame["timestamp"] >= int(self.started_at)].to_dict("records"))


def summarise(cfg: PipelineConfig, name: str, parent: MLflowTracker, results: Any, clock: SweepClock) -> SweepOutcome:
    """Close each child run as its trial ended; give the parent the best trial's figures and plots, where the
    hardware's time went and the scheduler's summary; register the best generator."""
    children = {child.tags.get("trial_id"): child for child in parent.children()}
    searched = list(cfg.tune.search_space)
    rows, times = [], []
    for result in results:
        child = children.get(_trial_id(result))
        times.append(clock.trial(result))
        row = _trial_row(cfg, result, child, searched)
        row.update(train_s=times[-1].worker_s, start_s=times[-1].start_median_s)
        rows.append(row)
        if child is not None:
            _close_child(cfg, result, child, row["status"], parent.uri)
    spent = sweep_time(times, clock.wall_s, clock.capacity, clock.per_worker)
    parent.log_metrics(spent.metrics(), step=0)
    parent.flush()
    rows = best_first(cfg, rows)
    scored = [r for r in rows if r[ranking(cfg)[0].name] is not None]
    best = scored[0] if scored else None
    if best is not None:
        _log_best(cfg, parent, best, rows, searched)
    summary = scheduler_of(cfg).summarise(cfg, parent, [c for c in children.values() if c is not None], best)
    registration = _register_best_generator(cfg, parent.uri, scored, searched)
    parent.set_tags({"status": "finished"})
    parent.end("FINISHED")
    return SweepOutcome(name, parent.run_id, parent.uri, rows, best, registration, spent, summary.text)


def _register_best_generator(
    cfg: PipelineConfig, uri: str, scored: list[dict[str, Any]], searched: list[str]
) -> Registration | None:
    """Register the generator of the best trial that logged one (a trial stopped early logged none)."""
    for row in scored:
        model_uri = tracker_for(uri, row["run_id"]).tags().get("generator_model") if row["run_id"] else None
        if model_uri:
            return register_best(trial_config(cfg, {key: row[key] for key in searched}), uri, row["run_id"], model_uri)
    return None


def _trial_id(result: Any) -> str | None:
    """The trial's id: from its last metrics, else from its directory's name (a trial that never reported)."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(result.path or ""))
    return (result.metrics or {}).get("trial_id") or (found.group(1) if found else None)


def _trial_row(cfg: PipelineConfig, result: Any, child: RunRecord | None, searched: list[str]) -> dict[str, Any]:
    """A finished sweep's trial as a row of the trials table, with its MLflow run."""
    metrics = result.metrics or {}
    status = "failed" if result.error is not None else ended_status(metrics, cfg.train.epochs)
    row = trial_row(_trial_id(result), status, metrics, result.config, searched)
    return {"run_id": child.run_id if child else None, **row}


def _close_child(cfg: PipelineConfig, result: Any, child: RunRecord, status: str, uri: str) -> None:
    """End a trial's MLflow run with the status Tune gave the trial.

    Tune's verdict is the one that counts: a driver that Tune stopped may have seen its fit() fail on the way
    out and marked its run FAILED; the trial itself did not fail.
    """
    run = tracker_for(uri, child.run_id)
    ended = int(child.tags["trial_end_ms"]) if child.tags.get("trial_end_ms", "").isdigit() else None
    if status == "finished" and child.status != "FINISHED":
        # Training complete, final logging not (its driver ended first): do that logging here.
        train_run = child.tags.get("ray_train_run", "")
        in_trial = result if child.tags.get("trained_in") == "trial process" else None  # Tune's checkpoint
        finish_from_storage(trial_config(cfg, flat_point(result.config or {})), train_run, uri, run.run_id, in_trial)
        if ended is not None:
            run.end("FINISHED", end_time_ms=ended)  # when the trial ended, not now
    elif status == "early_stopped":
        run.set_tags({"status": status})
        if child.status != "KILLED":
            run.end("KILLED", end_time_ms=ended)
    elif status in ("failed", "diverged"):
        run.set_tags({"status": status})
        if child.status == "RUNNING":
            run.end("FAILED", end_time_ms=ended)


def _log_best(
    cfg: PipelineConfig, parent: MLflowTracker, best: dict[str, Any], rows: list[dict[str, Any]], searched: list[str]
) -> None:
    """The best trial's scores, point and last sample grid on the parent run, and the sweep's plots."""
    parent.log_metrics({f"best_{name}": float("nan") if best[name] is None else best[name] for name in METRICS}, step=0)
    parent.flush()
    parent.log_params({f"best_{key.split('.')[1]}": best[key] for key in searched})
    parent.set_tags({"best_run_id": best["run_id"] or "", "best_trial_id": best["trial_id"] or ""})
    if best["run_id"]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            grid = parent.run(best["run_id"]).download_last_artifact("samples", tmp)
            if grid is not None:
                final = os.path.join(tmp, "best_trial_samples.png")
                os.replace(grid, final)
                parent.log_artifact(final)
    _plot_sweep(parent, rows, searched, ranking(cfg)[0].name)


def _plot_sweep(parent: MLflowTracker, rows: list[dict[str, Any]], searched: list[str], metric: str) -> None:
    """The final metric against each searched key, and every trial's metric curve, as plots of the parent run."""
    for key in searched:
        points = [(r[key], r[metric]) for r in rows if r[metric] is not None and r[key] is not None]
        path = f"plots/{metric}_vs_{key.replace('.', '_')}.png"
        with parent.log_figure(path, key, f"final {metric}", size=(6, 4)) as ax:
            ax.scatter([p[0] for p in points], [p[1] for p in points])
            if key.startswith("optim.lr") and all(isinstance(p[0], int | float) and p[0] > 0 for p in points):
                ax.set_xscale("log")
    with parent.log_figure(f"plots/{metric}_curves.png", "global step", metric) as ax:
        for r in rows:
            history = sorted(parent.run(r["run_id"]).metric_history(metric)) if r["run_id"] else []
            if history:
                steps, values = zip(*history, strict=True)
                ax.plot(steps, values, marker="o", label=f"{r['trial_id']} ({r['status']})")
        ax.legend(fontsize=7)
