"""What the loop hands its caller: a typed :class:`Report` at each stop (an epoch's end, a report inside an epoch,
a pause for an elastic resize, a divergence), the :class:`TrainResult` it returns, and the console lines of a
report."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from pipeline.gan.state import TrainState

LOSS_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")  # the per-step figures, in this order
DIVERGENCE_HINT = "lower optim.lr_g / optim.lr_d, or try train.real_label=0.9"


@dataclass(frozen=True)
class Report:
    """What the loop hands its caller at a stop, on every worker in step: the interval's ``metrics`` (the loss
    means over all workers, step, progress, seconds; scores when scored) and, on rank 0, the ``checkpoint`` dict to
    save (None elsewhere)."""

    metrics: dict[str, Any]
    checkpoint: dict[str, Any] | None
    kind: ClassVar[str] = "report"


@dataclass(frozen=True)
class EpochEnd(Report):
    """An epoch is done (scored when ``eval.every_epochs`` says so)."""

    kind: ClassVar[str] = "epoch"


@dataclass(frozen=True)
class Interval(Report):
    """A report inside an epoch (``tune.report_every_steps``), scored, with a checkpoint that continues exactly."""

    kind: ClassVar[str] = "interval"


@dataclass(frozen=True)
class Pause(Report):
    """An elastic run stops inside an epoch, unscored, to continue from this checkpoint with ``resize_to``
    workers."""

    resize_to: int = 0
    kind: ClassVar[str] = "pause"


@dataclass(frozen=True)
class Diverged(Report):
    """A loss became NaN or infinite in epoch ``metrics["epoch"]``: the run's last report (no checkpoint)."""

    kind: ClassVar[str] = "diverged"

    @classmethod
    def at(cls, epoch: int) -> Diverged:
        return cls({"epoch": epoch, "progress": epoch}, None)


REPORTS: dict[str, type[Report]] = {cls.kind: cls for cls in (EpochEnd, Interval, Pause, Diverged)}


class DivergedError(FloatingPointError):
    """A loss became NaN or infinite: the run cannot recover by itself (a retry would diverge again)."""

    def __init__(self, epoch: int, loss_d: float, loss_g: float):
        self.epoch = epoch
        super().__init__(f"training diverged at epoch {epoch} (loss_d={loss_d}, loss_g={loss_g}); {DIVERGENCE_HINT}")


@dataclass
class TrainResult:
    generator: nn.Module  # unwrapped, on the training device; the EMA copy when train.ema_decay > 0
    metrics: dict[str, float]  # the last report's
    epoch: int  # epochs completed
    step: int  # optimizer steps completed
    state: TrainState = field(repr=False)  # the networks and optimizers as the run left them
    resize_to: int | None = None  # elastic: stopped inside an epoch to continue with this many workers


def report_line(metrics: Mapping[str, Any], epochs: int, scores: Callable[[Mapping[str, Any]], str]) -> str:
    """A report inside an epoch: where it is, the losses so far and the scores (``scores`` says them)."""
    line = f"step {metrics['step']} (epoch {metrics['progress']:.2f}/{epochs})  loss_d={metrics['loss_d']:.4f}  "
    line += f"loss_g={metrics['loss_g']:.4f}"
    return line + scored(metrics, scores)


def epoch_line(metrics: Mapping[str, Any], epochs: int, scores: Callable[[Mapping[str, Any]], str]) -> str:
    line = (
        f"epoch {metrics['epoch']}/{epochs}  loss_d={metrics['loss_d']:.4f}  loss_g={metrics['loss_g']:.4f}  "
        f"D(x)={metrics['d_real']:.3f}  D(G(z))={metrics['d_fake']:.3f}  {metrics['images_per_s']:.0f} img/s  "
        f"({metrics['epoch_time_s']:.1f}s)"
    )
    return line + scored(metrics, scores)


def scored(metrics: Mapping[str, Any], scores: Callable[[Mapping[str, Any]], str]) -> str:
    """The scores' part of a line, and how long scoring took, when the report was scored."""
    return f"  {scores(metrics)} ({metrics['eval_time_s']:.1f}s)" if "eval_time_s" in metrics else ""
