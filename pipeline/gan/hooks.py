"""What the loop tells the world and asks of it: the one :class:`Hook` protocol, and :class:`Scorer`.

The loop calls every hook it is given, in order, at each event: a resumed state, every optimizer step, the figures
to record, the sample grid, a line to print, every report (the report path's first hop), and the question whether
to pause for another worker count. A hook overrides what it needs; :class:`On` makes one of plain functions (tests,
scripts). Everything a run adds to the loop is a hook: the worker's report to Ray, the tracker's logging, the
progress bar, a PBT copy's record, an elastic trial's threads or resize poll, a tool's step timing or fault drill.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipeline.gan.reports import LOSS_KEYS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.gan.reports import Report
    from pipeline.gan.state import TrainState


@dataclass(frozen=True)
class Step:
    """One optimizer step done on this worker (``rank``): the global step (1-based), its epoch (1-based), its index
    in the epoch (1-based) and the epoch's steps, and the worker's losses on the device (reading them waits for the
    device)."""

    rank: int
    number: int
    epoch: int
    index: int
    per_epoch: int
    losses: torch.Tensor  # (loss_d, loss_g, d_real, d_fake), detached

    def loss_values(self) -> dict[str, float]:
        """This worker's losses of the step as numbers (a host sync)."""
        return dict(zip(LOSS_KEYS, self.losses.tolist(), strict=True))


class Hook:
    """A listener of the loop: every method does nothing until a subclass says otherwise. Methods marked rank 0
    are called on rank 0 only; the others on every worker."""

    def on_resume(self, state: TrainState) -> None:
        """The state a resumed run continues from (its weights, counters, learning rates)."""

    def on_step(self, step: Step) -> None:
        """After every optimizer step, without waiting for the device."""

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0: figures to record at ``step`` (the losses' means every tracking.log_every steps; each report's)."""

    def on_samples(self, images: torch.Tensor, name: str) -> None:
        """Rank 0: an epoch's sample grid (uint8 images from the run's fixed noise), named samples/epoch_001.png."""

    def on_line(self, line: str) -> None:
        """Rank 0: a line for the console (an epoch's figures, a resume, a pause)."""

    def figures(self) -> dict[str, float]:
        """Figures this hook adds to the next report's metrics (asked just before it)."""
        return {}

    def on_report(self, report: Report) -> None:
        """Every report, on every worker in step: where the report leaves the loop."""

    def resize(self, step: int, steps_left: int) -> int | None:
        """Asked inside epochs: a new worker count to pause for, or None to go on."""
        return None

    def preempted(self, step: int) -> str | None:
        """Asked after every step on every worker, in step: a preemption notice (the run checkpoints at once), or
        None to go on."""
        return None


@dataclass
class On(Hook):
    """A hook of plain functions: ``On(report=reports.append, line=print)``."""

    report: Callable[[Report], None] | None = None
    line: Callable[[str], None] | None = None
    step: Callable[[Step], None] | None = None
    resize_to: Callable[[int, int], int | None] | None = None
    resume: Callable[[TrainState], None] | None = None

    def on_resume(self, state: TrainState) -> None:
        if self.resume is not None:
            self.resume(state)

    def on_report(self, report: Report) -> None:
        if self.report is not None:
            self.report(report)

    def on_line(self, line: str) -> None:
        if self.line is not None:
            self.line(line)

    def on_step(self, step: Step) -> None:
        if self.step is not None:
            self.step(step)

    def resize(self, step: int, steps_left: int) -> int | None:
        return self.resize_to(step, steps_left) if self.resize_to is not None else None


class Hooks(Hook):
    """Several hooks as one: each event goes to every hook in order; the first that asks for a resize decides, and any
    notice of preemption."""

    def __init__(self, hooks: Sequence[Hook]):
        self.hooks = list(hooks)

    def on_resume(self, state: TrainState) -> None:
        for hook in self.hooks:
            hook.on_resume(state)

    def on_step(self, step: Step) -> None:
        for hook in self.hooks:
            hook.on_step(step)

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        for hook in self.hooks:
            hook.on_metrics(metrics, step)

    def on_samples(self, images: torch.Tensor, name: str) -> None:
        for hook in self.hooks:
            hook.on_samples(images, name)

    def on_line(self, line: str) -> None:
        for hook in self.hooks:
            hook.on_line(line)

    def figures(self) -> dict[str, float]:
        return {key: value for hook in self.hooks for key, value in hook.figures().items()}

    def on_report(self, report: Report) -> None:
        for hook in self.hooks:
            hook.on_report(report)

    def resize(self, step: int, steps_left: int) -> int | None:
        return next((n for hook in self.hooks if (n := hook.resize(step, steps_left)) is not None), None)

    def preempted(self, step: int) -> str | None:
        notices = [hook.preempted(step) for hook in self.hooks]  # every hook asked: each may be a collective
        return next((notice for notice in notices if notice), None)


class Scorer(Protocol):
    """Scores a generator when a report is due (rank 0): its scores by name, and how a console line says them
    (pipeline.eval.scoring.Scorer is the run's)."""

    def __call__(self, generator: nn.Module, device: torch.device) -> dict[str, float]: ...

    def describe(self, scores: Mapping[str, float]) -> str: ...
