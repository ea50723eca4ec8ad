"""`train_gan`: the DCGAN training loop. It knows nothing of Ray or MLflow.

Per batch (the seed's algorithm, pipeline.steps): the discriminator on real images (target 1) and on generated,
detached ones (target 0), then the generator on generated images with target 1; one Adam per network. The
distributed adapter supplies a :class:`~pipeline.steps.Runtime` (rank, world, device, DDP wrapping) and
:class:`LoopHooks` (tracker, evaluator, where reports go); run in-process, the defaults describe one CPU
process that reports nowhere. At each stop the loop hands its caller a typed :class:`Report`: an epoch's end,
a report inside an epoch, or a pause for an elastic resize.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.batches import Batches, InMemory, Plan
from pipeline.config import PipelineConfig
from pipeline.data import Split, to_model_range
from pipeline.metrics import Evaluator
from pipeline.models import Generator
from pipeline.sampling import fixed_noise, generate_images, sample_images
from pipeline.steps import GraphedStep, Nets, Runtime, StepTargets, TrainStep, uses_cuda_graphs
from pipeline.tracking import NullTracker, Tracker
from pipeline.train_state import TrainState

LOSS_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")  # the per-step figures, in this order
EPOCH_KEYS = ("epoch_time_s", "images_per_s", "fid", "inception_score", "eval_time_s", "lr_g", "lr_d")  # each report
TABLE_KEYS = ("epoch", "fid", "inception_score", "loss_d")  # first in each report: Tune's table shows these
DIVERGENCE_HINT = "lower optim.lr_g / optim.lr_d, or try train.real_label=0.9"


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over every process of the default process group (epoch metrics under DDP)."""
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


# --------------------------------------------------------------------------------------------------
# What the loop reports


@dataclass(frozen=True)
class Report:
    """What the loop hands its caller at a stop, on every worker in step: the interval's ``metrics`` (the loss
    means over all workers, step, progress, seconds; scores when evaluated) and, on rank 0, the ``checkpoint``
    dict to save (None elsewhere)."""

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


# In the dict Ray Train and Tune receive (ray.train.report, ray.tune.report), a report is its metrics plus these
# keys; to_result writes them and the two functions below read them, nowhere else.
RESULT_KIND = "report_kind"
RESULT_RESIZE_TO = "resize_to"


def to_result(report: Report) -> dict[str, Any]:
    """``report`` as the dict Ray receives. A diverged run's result carries the worst scores there are, FID
    infinite and IS 0: Tune requires the sweep's metric in every result, and must rank a diverged trial last."""
    result = {**report.metrics, RESULT_KIND: report.kind}
    if isinstance(report, Pause):
        result[RESULT_RESIZE_TO] = report.resize_to
    if isinstance(report, Diverged):
        result.update(fid=float("inf"), inception_score=0.0)
    return result


def result_kind(result: Mapping[str, Any]) -> str:
    """Which :class:`Report` a result Ray handed back was (``epoch`` for one without the key)."""
    return str(result.get(RESULT_KIND, EpochEnd.kind))


def result_resize_to(result: Mapping[str, Any]) -> int | None:
    """The worker count a paused run's result asks to continue with; None for every other result."""
    return int(result[RESULT_RESIZE_TO]) if result_kind(result) == Pause.kind else None


class DivergedError(FloatingPointError):
    """A loss became NaN or infinite: the run cannot recover by itself (a retry would diverge again)."""

    def __init__(self, epoch: int, loss_d: float, loss_g: float):
        self.epoch = epoch
        super().__init__(f"training diverged at epoch {epoch} (loss_d={loss_d}, loss_g={loss_g}); {DIVERGENCE_HINT}")


@dataclass
class TrainResult:
    generator: Generator  # unwrapped, on the training device; the EMA copy when train.ema_decay > 0
    metrics: dict[str, float]  # the last report's
    epoch: int  # epochs completed
    step: int  # optimizer steps completed
    state: TrainState = field(repr=False)  # the networks and optimizers as the run left them
    resize_to: int | None = None  # elastic: stopped inside an epoch to continue with this many workers


@dataclass
class LoopHooks:
    """What the loop tells the world and asks of it; every part optional (the defaults: a silent local run)."""

    tracker: Tracker = field(default_factory=NullTracker)  # per-step losses, epoch figures, sample grids
    evaluator: Evaluator | None = None  # scores cfg.eval.num_samples generated images when due (rank 0)
    report: Callable[[Report], None] | None = None  # every worker, in step, at each stop
    log: Callable[[str], None] = print  # rank 0's lines (epoch lines, resume notes)
    on_step: Callable[[int, dict[str, float]], None] | None = None  # (global step, the step's losses)
    on_resume: Callable[[TrainState], None] | None = None  # sees the state a resumed run continues from
    # (epoch, step within it, steps in it) after every step, without waiting for the device
    progress: Callable[[int, int, int], None] | None = None
    # (global step, steps left) -> a new worker count to pause for, or None to go on; asked inside epochs
    resize: Callable[[int, int], int | None] | None = None


# --------------------------------------------------------------------------------------------------
# The loop


def train_gan(
    cfg: PipelineConfig,
    data: Split | Batches,
    runtime: Runtime | None = None,
    hooks: LoopHooks | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train G and D for ``cfg.train.epochs`` epochs, continuing from ``resume`` (a checkpoint dict, which may
    have been taken inside an epoch). Reports go to ``hooks.report`` at every epoch's end, every
    ``tune.report_every_steps`` steps, and where ``hooks.resize`` asks for a new worker count: the run then
    returns with ``TrainResult.resize_to`` set, for the caller to continue with that many workers."""
    rt, hooks = runtime or Runtime(), hooks or LoopHooks()
    run = LoopRun.of(cfg, data, rt, hooks, resume)
    state, device = run.state, rt.device
    report: Report | None = None
    for epoch in range(state.epoch, cfg.train.epochs):
        # Shuffling and noise depend only on (seed, epoch): resuming at an epoch boundary is exact, and inside
        # an epoch too (the noise is drawn forward to the step, the epoch's loss sums come back).
        run.nets.generator.train()
        run.nets.discriminator.train()
        noise = epoch_noise_generator(cfg.train.seed, epoch, device)
        tally = Tally.start(run, epoch, noise)
        # closing: a streamed epoch's reader stops however the loop ends (a pause, an error)
        with contextlib.closing(run.data.epoch(epoch, tally.first, run.plan)) as batches:
            pause = run.train_epoch(batches, epoch, tally, noise)
        if pause is not None:
            return TrainResult(state.sampler, pause.metrics, state.epoch, state.step, state, pause.resize_to)
        report = run.close(tally, epoch, run.num_steps)
    return TrainResult(state.sampler, report.metrics if report else {}, state.epoch, state.step, state)


@dataclass
class Tally:
    """The epoch so far: its loss sums and training seconds (a checkpoint inside the epoch carries both)."""

    sums: torch.Tensor
    first: int  # the epoch's first step to train (0, or where a checkpoint inside it left off)
    earlier_s: float  # this epoch's training seconds before the current interval
    started: float  # when the current interval's steps began (perf_counter): reports and scoring are not steps

    @classmethod
    def start(cls, run: LoopRun, epoch: int, noise: torch.Generator) -> Tally:
        sums = torch.zeros(len(LOSS_KEYS), device=run.rt.device, dtype=torch.float64)
        first, earlier_s = run.state.step - epoch * run.num_steps, 0.0
        if first:  # a checkpoint from inside this epoch: the noise drawn forward to its step, its sums back
            draws = 2 if run.cfg.train.g_fresh_noise else 1
            for _ in range(first * draws):
                run.noise(noise)
            sums += torch.tensor(run.partial["sums"], device=run.rt.device, dtype=torch.float64)
            earlier_s = run.partial["elapsed_s"]
        return cls(sums, first, earlier_s, time.perf_counter())


@dataclass
class LoopRun:
    """One run of the loop: what it trains with (config, runtime, hooks, state and networks, the step, the data and
    its counts) and how it closes an interval (:meth:`close`, the one way out to its caller)."""

    cfg: PipelineConfig
    rt: Runtime
    hooks: LoopHooks
    state: TrainState
    nets: Nets
    step: Callable[..., torch.Tensor]
    data: Batches  # where each epoch's batches come from (in memory, or streamed)
    plan: Plan  # what they depend on besides the epoch
    num_steps: int  # per epoch
    total_steps: int
    partial: dict[str, Any] | None  # a resumed checkpoint's record of the epoch it was taken inside
    # The losses' sums since the tracker's last log, and how many steps they hold (on the device).
    window: torch.Tensor = field(init=False)
    window_steps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.window = torch.zeros(len(LOSS_KEYS), device=self.rt.device, dtype=torch.float64)

    @classmethod
    def of(
        cls, cfg: PipelineConfig, data: Split | Batches, rt: Runtime, hooks: LoopHooks, resume: dict[str, Any] | None
    ) -> LoopRun:
        """Refuse what cannot work before any work, then build networks and optimizers from the seed; a resumed
        run takes the checkpoint's weights and counters, and the config's learning rates and betas."""
        num_steps = steps_per_epoch(len(data), cfg.train.batch_size)
        if num_steps < 1:
            raise ValueError(f"batch size {cfg.train.batch_size} exceeds the {len(data)} training images")
        graphs = uses_cuda_graphs(cfg.train.cuda_graphs, rt)
        total_steps = num_steps * cfg.train.epochs
        state = TrainState.initial(cfg, rt.device)
        partial = None
        if resume is not None:
            partial = state.resume(resume, cfg, hooks.log if rt.is_main else None, total_steps)
            if hooks.on_resume is not None:
                hooks.on_resume(state)
        nets = Nets.wrap(state, cfg, rt, graphs)
        local_batch = cfg.train.batch_size // rt.world_size
        step: Callable[..., torch.Tensor] = TrainStep(nets, state, StepTargets.of(cfg, local_batch, rt.device))
        if graphs:
            step = GraphedStep(step, rt.device)
        source = InMemory(data.images, rt.device) if isinstance(data, Split) else data
        plan = Plan(cfg.train.seed, rt.rank, rt.world_size, local_batch, num_steps, rt.device)
        return cls(cfg, rt, hooks, state, nets, step, source, plan, num_steps, total_steps, partial)

    @property
    def local_batch(self) -> int:
        return self.plan.local_batch

    def train_epoch(
        self, batches: Iterator[torch.Tensor], epoch: int, tally: Tally, noise: torch.Generator
    ) -> Pause | None:
        """The epoch's steps from ``tally.first`` on, each reported to the hooks and counted in ``tally``; a pause
        (an elastic resize) ends it early, and is returned."""
        cfg, state, hooks = self.cfg, self.state, self.hooks
        for i in range(tally.first, self.num_steps):
            real = to_model_range(next(batches)).contiguous(memory_format=self.nets.layout)
            # Schedules follow the global step, not the epoch, so a resumed run follows them too.
            if cfg.optim.lr_final_scale < 1.0:
                scale = linear_schedule(cfg.optim.lr_final_scale, state.step, self.total_steps)
                state.set_learning_rates(cfg.optim.lr_g * scale, cfg.optim.lr_d * scale)
            share = linear_schedule(cfg.train.top_k_final, state.step, self.total_steps)
            z = self.noise(noise)
            z_g = self.noise(noise) if cfg.train.g_fresh_noise else None
            values = self.step(real, z, z_g, share).double()
            state.step += 1
            if state.ema is not None:
                state.ema.update(state.generator, state.step)
            if hooks.progress is not None:
                hooks.progress(epoch + 1, i + 1, self.num_steps)
            # Every step counts towards the epoch means and the tracker's next mean (every tracking.log_every).
            tally.sums += values
            self.log_step(values)
            if i + 1 < self.num_steps:
                report = self.stop_inside_epoch(tally, epoch, i + 1)
                if isinstance(report, Pause):
                    return report
        return None

    def noise(self, generator: torch.Generator) -> torch.Tensor:
        """The next global batch of noise, of which this worker keeps its rank's rows: N workers together use
        the noise one process would, so a run's numbers do not depend on how many workers share it."""
        rows = self.rt.rank * self.local_batch
        drawn = torch.randn(
            self.cfg.train.batch_size, self.cfg.model.latent_dim, device=self.rt.device, generator=generator
        )
        return drawn[rows : rows + self.local_batch]

    def log_step(self, values: torch.Tensor) -> None:
        """The step's losses to ``on_step`` (every step, this worker's); every ``tracking.log_every`` global steps
        the mean of every worker's steps since the last log to the tracker. Between logs the steps add up on the
        device: no host sync, and one all-reduce per log."""
        hooks, step = self.hooks, self.state.step
        self.window += values
        self.window_steps += 1
        if hooks.on_step is not None:
            hooks.on_step(step, dict(zip(LOSS_KEYS, values.tolist(), strict=True)))
        if step % self.cfg.tracking.log_every:
            return
        means = self.rt.mean_over_workers(self.window) / self.window_steps  # every worker, at the same steps
        self.window.zero_()
        self.window_steps = 0
        hooks.tracker.log_metrics(dict(zip(LOSS_KEYS, means.tolist(), strict=True)), step=step)

    def stop_inside_epoch(self, tally: Tally, epoch: int, done: int) -> Report | None:
        """After step ``done`` of an epoch (not its last): a pause if ``hooks.resize`` names a new worker count,
        a report if ``tune.report_every_steps`` says one is due, else None."""
        step, every = self.state.step, self.cfg.tune.report_every_steps
        target = self.hooks.resize(step, self.total_steps - step) if self.hooks.resize is not None else None
        if target is not None:
            return self.close(tally, epoch, done, resize_to=target)
        if every and step % every == 0:
            return self.close(tally, epoch, done)
        return None

    def close(self, tally: Tally, epoch: int, done: int, resize_to: int | None = None) -> Report:
        """End the interval after ``done`` steps of ``epoch``: means over all workers (who carry on from the same
        sums inside an epoch, as a resumed run would), scores when due, the lines and figures, then the report
        with its checkpoint, and the tracker's buffered steps once the report is out."""
        cfg, rt, state = self.cfg, self.rt, self.state
        inside = done < self.num_steps
        sums = rt.mean_over_workers(tally.sums)
        if inside:
            tally.sums = sums
        metrics = running_means(sums, done, epoch, state.step, self.num_steps)
        metrics["train_s"] = time.perf_counter() - tally.started
        elapsed = tally.earlier_s + metrics["train_s"]
        where = {"sums": sums.tolist(), "elapsed_s": elapsed} if inside else None
        if resize_to is not None:
            if rt.is_main:
                self.hooks.log(
                    f"[elastic] step {state.step}: {rt.world_size} -> {resize_to} worker(s); checkpoint, restart"
                )
            return self.emit(Pause(metrics, self._checkpoint(where), resize_to))
        if inside:
            tally.earlier_s = elapsed
        else:
            metrics.update(epoch=epoch + 1, epoch_time_s=elapsed, images_per_s=done * cfg.train.batch_size / elapsed)
            state.epoch = epoch + 1
        self.score_and_log(metrics, inside)
        report = self.emit((Interval if inside else EpochEnd)(metrics, self._checkpoint(where)))
        tally.started = time.perf_counter()
        return report

    def _checkpoint(self, where: dict[str, Any] | None) -> dict[str, Any] | None:
        return self.state.to_checkpoint(self.cfg, where) if self.rt.is_main else None

    def score_and_log(self, metrics: dict[str, Any], inside: bool) -> None:
        """FID and IS when due (every report inside an epoch; every ``eval.every_epochs`` epochs and after the
        last), the live learning rates; on rank 0 the line, the figures and (at an epoch's end) a sample grid."""
        cfg, state, hooks = self.cfg, self.state, self.hooks
        every = cfg.eval.every_epochs
        due = inside or (every and (state.epoch % every == 0 or state.epoch == cfg.train.epochs))
        if hooks.evaluator is not None and every and due:
            started = time.perf_counter()
            samples = generate_images(
                state.sampler, cfg.eval.num_samples, cfg.model.latent_dim, cfg.train.seed, self.rt.device
            )
            metrics.update(hooks.evaluator.score(samples))
            metrics["eval_time_s"] = time.perf_counter() - started
        metrics.update(state.learning_rates)
        if not self.rt.is_main:
            return
        hooks.log(report_line(metrics, cfg.train.epochs) if inside else epoch_line(metrics, cfg.train.epochs))
        figures = {k: metrics[k] for k in EPOCH_KEYS if k in metrics}
        # The epoch's means over every worker (so far, at a report inside it), beside the logged steps' means.
        figures |= {f"epoch_{k}": metrics[k] for k in LOSS_KEYS}
        hooks.tracker.log_metrics(figures, step=state.step)
        if not inside:
            grid = sample_images(state.sampler, fixed_noise(cfg.model.latent_dim, cfg.train.seed, self.rt.device))
            hooks.tracker.log_image_grid(grid, f"samples/epoch_{state.epoch:03d}.png")

    def emit(self, report: Report) -> Report:
        """The loop's one exit to its caller: ``hooks.report`` (Tune's status table shows a result's first keys:
        the ones a sweep is judged by come first), then the tracker's buffered steps. Only once the report, and
        its checkpoint, is out are those steps safe: a restart resumes after them, never before."""
        ordered = {key: report.metrics[key] for key in TABLE_KEYS if key in report.metrics} | report.metrics
        report = dataclasses.replace(report, metrics=ordered)
        if self.hooks.report is not None:
            self.hooks.report(report)
        self.hooks.tracker.flush()
        return report


def running_means(sums: torch.Tensor, steps: int, epoch: int, step: int, num_steps: int) -> dict[str, Any]:
    """The losses' means over ``steps`` steps of epoch ``epoch`` (0-based), or DivergedError if one is not
    finite; ``epoch`` (epochs completed), ``step`` and ``progress`` (epochs trained, a fraction inside one)."""
    metrics = dict(zip(LOSS_KEYS, (sums / steps).tolist(), strict=True))
    if not all(np.isfinite(metrics[k]) for k in ("loss_d", "loss_g")):
        raise DivergedError(epoch + 1, metrics["loss_d"], metrics["loss_g"])
    return {**metrics, "epoch": epoch, "step": step, "progress": round(step / num_steps, 6)}


def epoch_noise_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The epoch's noise, from (seed, epoch) alone: resuming at an epoch boundary is exact, and every worker
    draws the same global batches of noise (each keeps its rank's rows: see :meth:`LoopRun.noise`)."""
    value = int(np.random.SeedSequence([seed, epoch, 0]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(value)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    return num_images // batch_size


def linear_schedule(final: float, step: int, total_steps: int) -> float:
    """1 at step 0, falling linearly to ``final`` at ``total_steps``; from the step alone, so a resumed run
    follows the same schedule."""
    return 1.0 - (1.0 - final) * step / total_steps


def report_line(metrics: dict[str, float], epochs: int) -> str:
    """A report inside an epoch: where it is, the losses so far and the scores."""
    line = f"step {metrics['step']} (epoch {metrics['progress']:.2f}/{epochs})  loss_d={metrics['loss_d']:.4f}  "
    line += f"loss_g={metrics['loss_g']:.4f}"
    if "fid" in metrics:
        line += f"  FID={metrics['fid']:.2f}  IS={metrics['inception_score']:.2f} ({metrics['eval_time_s']:.1f}s)"
    return line


def epoch_line(metrics: dict[str, float], epochs: int) -> str:
    line = (
        f"epoch {metrics['epoch']}/{epochs}  loss_d={metrics['loss_d']:.4f}  loss_g={metrics['loss_g']:.4f}  "
        f"D(x)={metrics['d_real']:.3f}  D(G(z))={metrics['d_fake']:.3f}  {metrics['images_per_s']:.0f} img/s  "
        f"({metrics['epoch_time_s']:.1f}s)"
    )
    if "fid" in metrics:
        line += f"  FID={metrics['fid']:.2f}  IS={metrics['inception_score']:.2f} ({metrics['eval_time_s']:.1f}s)"
    return line
