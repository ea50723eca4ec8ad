"""A report in Ray's terms, and the driver's end of the report path.

The loop's typed report (pipeline.gan.reports) leaves a worker as the dict Ray Train and Tune receive
(``ray.train.report``, ``ray.tune.report``): its metrics, with the scores first (Tune's status table shows a
result's first keys), plus :data:`RESULT_KIND` (and a pause's worker count). :func:`to_result` writes that
encoding and :func:`report_kind` / :func:`result_resize_to` read it; nothing else does. :class:`Reports` is where
every report of a run arrives on the driver, whichever executor ran its workers: the last one decides how the run
ended (a divergence is one typed report, end to end).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pipeline.eval.metrics import METRICS, worst_scores
from pipeline.gan.reports import REPORTS, Diverged, EpochEnd, Pause, Report

RESULT_KIND = "report_kind"
RESULT_RESIZE_TO = "resize_to"
FIRST_KEYS = ("epoch", *METRICS, "loss_d")  # first in each result: Tune's table shows these


def to_result(report: Report) -> dict[str, Any]:
    """``report`` as the dict Ray receives. A diverged run's result carries every metric at its worst: Tune requires
    the sweep's metric in every result, and must rank a diverged trial last."""
    metrics = report.metrics | (worst_scores() if isinstance(report, Diverged) else {})
    result = {key: metrics[key] for key in FIRST_KEYS if key in metrics} | metrics | {RESULT_KIND: report.kind}
    if isinstance(report, Pause):
        result[RESULT_RESIZE_TO] = report.resize_to
    return result


def report_kind(result: Mapping[str, Any]) -> type[Report]:
    """Which report a result Ray handed back was (an epoch's end for one without the key; a diverged run's for a
    result a sweep saved before the typed reports, ``diverged: 1``)."""
    if result.get("diverged"):
        return Diverged
    return REPORTS.get(str(result.get(RESULT_KIND, EpochEnd.kind)), EpochEnd)


def result_resize_to(result: Mapping[str, Any]) -> int | None:
    """The worker count a paused run's result asks to continue with; None for every other result."""
    return int(result[RESULT_RESIZE_TO]) if report_kind(result) is Pause else None


Handoff = Callable[[dict[str, Any], Any], None]  # (a report's result, its Ray checkpoint or None)


class Reports:
    """The driver's end of a run's report path: each report's result (and checkpoint) as it arrives, handed on to
    ``then`` (a sweep's trial: to Tune); the last is kept, and says how the run ended."""

    def __init__(self, then: Handoff | None = None):
        self.then = then
        self.last: dict[str, Any] | None = None

    def __call__(self, result: dict[str, Any], checkpoint: Any) -> None:
        self.last = result
        if self.then is not None:
            self.then(result, checkpoint)

    @property
    def diverged(self) -> bool:
        return self.last is not None and report_kind(self.last) is Diverged
