"""`train_gan`: the DCGAN training loop. It knows nothing of Ray or MLflow.

Per batch (the seed's algorithm, pipeline.gan.steps): the discriminator on real images (target 1) and on generated,
detached ones (target 0), then the generator on generated images with target 1; one Adam per network. Its caller
supplies a :class:`~pipeline.gan.steps.Runtime` (rank, world, device, DDP wrapping), the hooks that hear what it
does (pipeline.gan.hooks) and a scorer; run in-process with none of them, it is one silent CPU process. At each stop
the loop hands its hooks a typed report (pipeline.gan.reports): an epoch's end, a report inside an epoch, or a pause
for an elastic resize.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config.schema import PipelineConfig
from pipeline.data.batches import Batches, InMemory, Plan
from pipeline.data.split import Split, to_model_range
from pipeline.gan import augment, views
from pipeline.gan.hooks import Hook, Hooks, Scorer, Step
from pipeline.gan.models import with_classes
from pipeline.gan.reports import (
    LOSS_KEYS,
    DivergedError,
    EpochEnd,
    Interval,
    Pause,
    Report,
    TrainResult,
    epoch_line,
    report_line,
)
from pipeline.gan.sampling import grid_noise, sample_images
from pipeline.gan.state import TrainState
from pipeline.gan.steps import GraphedStep, Nets, Runtime, TrainStep, uses_cuda_graphs

# Recorded at each report, with the scores.
EPOCH_KEYS = ("epoch_time_s", "images_per_s", "eval_time_s", "lr_g", "lr_d", "augment_p", "augment_r_t")


# --------------------------------------------------------------------------------------------------
# The loop


def mirrored(real: torch.Tensor, draws: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """A worker's ``real`` images, each mirrored left-right where its draw (of the global batch's ``draws``) is under
    one half. Worker ``rank`` of ``world`` keeps every ``world``-th draw from its rank on: in memory, the sampler
    deals a global batch's images to the workers in turn, so N workers flip the images one process would (streamed
    shares have no one-process order: each worker's flips are still fair and its own)."""
    mirror = draws[rank::world] < 0.5
    return torch.where(mirror[:, None, None, None], real.flip(3), real)


def train_gan(
    cfg: PipelineConfig,
    data: Split | Batches,
    runtime: Runtime | None = None,
    hooks: Sequence[Hook] = (),
    resume: dict[str, Any] | None = None,
    scorer: Scorer | None = None,
) -> TrainResult:
    """Train G and D for ``cfg.train.epochs`` epochs, continuing from ``resume`` (a checkpoint dict, which may
    have been taken inside an epoch). Reports go to the hooks at every epoch's end, every
    ``tune.report_every_steps`` steps, and where a hook asks for a new worker count: the run then returns with
    ``TrainResult.resize_to`` set, for the caller to continue with that many workers. ``scorer`` scores the
    sampling generator when ``eval.every_epochs`` says so (rank 0)."""
    rt = runtime or Runtime()
    run = LoopRun.of(cfg, data, rt, Hooks(hooks), resume, scorer)
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
        with contextlib.closing(run.data.epoch(epoch, tally.first, run.plan, tally.worlds)) as batches:
            pause = run.train_epoch(batches, epoch, tally, noise)
        if pause is not None:
            return TrainResult(state.sampler, pause.metrics, state.epoch, state.step, state, pause.resize_to)
        report = run.close(tally, epoch, run.num_steps)
    if report is not None and rt.is_main:  # a run that trained to its end: is it copying its training images?
        run.hooks.on_samples(run.nearest_grid(), "samples/nearest_training.png")
    return TrainResult(state.sampler, report.metrics if report else {}, state.epoch, state.step, state)


@dataclass
class Tally:
    """The epoch so far: its loss sums and training seconds (a checkpoint inside the epoch carries both)."""

    sums: torch.Tensor
    first: int  # the epoch's first step to train (0, or where a checkpoint inside it left off)
    worlds: list[tuple[int, int]]  # the epoch's worker counts, each from its first step (pipeline.data.batches)
    earlier_s: float  # this epoch's training seconds before the current interval
    started: float  # when the current interval's steps began (perf_counter): reports and scoring are not steps

    @classmethod
    def start(cls, run: LoopRun, epoch: int, noise: torch.Generator) -> Tally:
        sums = torch.zeros(len(LOSS_KEYS), device=run.rt.device, dtype=torch.float64)
        first, earlier_s = run.state.step - epoch * run.num_steps, 0.0
        worlds = [(run.rt.world_size, 0)]
        if first:  # a checkpoint from inside this epoch: the steps' draws made again up to it, its sums back
            for _ in range(first):
                run.draws(noise)
            sums += torch.tensor(run.partial["sums"], device=run.rt.device, dtype=torch.float64)
            earlier_s = run.partial["elapsed_s"]
            # The worker counts it ran with (a checkpoint from before they were kept: this one's count throughout)
            worlds = [(int(n), int(at)) for n, at in run.partial.get("worlds", worlds)]
            if worlds[-1][0] != run.rt.world_size:  # resumed or resized with another count: from here on
                worlds.append((run.rt.world_size, first))
        return cls(sums, first, worlds, earlier_s, time.perf_counter())


@dataclass
class LoopRun:
    """One run of the loop: what it trains with (config, runtime, hooks, state and networks, the step, the data and
    its counts) and how it closes an interval (:meth:`close`, the one way out to its caller)."""

    cfg: PipelineConfig
    rt: Runtime
    hooks: Hooks
    scorer: Scorer | None
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
    def of(  # noqa: PLR0913 - the loop's own arguments, once
        cls,
        cfg: PipelineConfig,
        data: Split | Batches,
        rt: Runtime,
        hooks: Hooks,
        resume: dict[str, Any] | None,
        scorer: Scorer | None,
    ) -> LoopRun:
        """Refuse what cannot work before any work, then build networks and optimizers from the seed; a resumed
        run takes the checkpoint's weights and counters, and the config's learning rates and betas."""
        num_steps = steps_per_epoch(len(data), cfg.train.batch_size)
        if num_steps < 1:
            raise ValueError(f"batch size {cfg.train.batch_size} exceeds the {len(data)} training images")
        # A lazy R1 step differs from the others, and DiffAugment's draws are no graph input: neither is captured.
        # So are a conditional GAN's class draws.
        varied = cfg.optim.r1_gamma or cfg.train.diffaugment_kinds or cfg.model.conditional
        graphs = uses_cuda_graphs(cfg.train.cuda_graphs, rt) and not varied
        total_steps = num_steps * cfg.train.epochs
        source = InMemory(data.images, rt.device, data.labels) if isinstance(data, Split) else data
        weights = class_weights(cfg, source)
        state = TrainState.initial(cfg, source.image_shape, rt.device, weights)
        partial = None
        if resume is not None:
            partial = state.resume(resume, cfg, hooks.on_line if rt.is_main else None, total_steps)
            hooks.on_resume(state)
        nets = Nets.wrap(state, cfg, rt, graphs)
        local_batch = cfg.train.batch_size // rt.world_size
        step: Callable[..., torch.Tensor] = TrainStep.of(nets, state, cfg, local_batch, rt.device)
        if graphs:
            step = GraphedStep(step, rt.device)
        plan = Plan(cfg.train.seed, rt.rank, rt.world_size, local_batch, num_steps, rt.device, cfg.model.conditional)
        return cls(cfg, rt, hooks, scorer, state, nets, step, source, plan, num_steps, total_steps, partial)

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
            real, labels = next(batches) if self.plan.labels else (next(batches), None)
            real = to_model_range(real).contiguous(memory_format=self.nets.layout)
            # Schedules follow the global step, not the epoch, so a resumed run follows them too.
            if cfg.optim.lr_final_scale < 1.0:
                scale = linear_schedule(cfg.optim.lr_final_scale, state.step, self.total_steps)
                state.set_learning_rates(cfg.optim.lr_g * scale, cfg.optim.lr_d * scale)
            share = linear_schedule(cfg.train.top_k_final, state.step, self.total_steps)
            z, z_g, flips, augments, classes = self.draws(noise)
            if flips is not None:
                real = mirrored(real, flips, self.rt.rank, self.rt.world_size)
            if classes is not None:  # a conditional GAN: the real images' classes, and the fakes' in their noise
                z, z_g = with_classes(z, classes[0]), with_classes(z_g, classes[1]) if z_g is not None else None
                values = self.step(real, z, z_g, share, augments, (labels, *classes)).double()
            else:
                values = self.step(real, z, z_g, share, augments).double()
            state.step += 1
            if state.ada is not None and state.step % augment.ADA_INTERVAL == 0:
                state.ada.adjust(self.rt.mean_over_workers)
            if state.ema is not None:
                state.ema.update(state.generator, state.step)
            hooks.on_step(Step(self.rt.rank, state.step, epoch + 1, i + 1, self.num_steps, values))
            # Every step counts towards the epoch means and the next logged mean (every tracking.log_every).
            tally.sums += values
            self.log_step(values)
            notice = hooks.preempted(state.step)  # at an epoch's end its own report checkpoints
            if i + 1 < self.num_steps:
                report = self.stop_inside_epoch(tally, epoch, i + 1, notice)
                if isinstance(report, Pause):
                    return report
        return None

    def noise(self, generator: torch.Generator) -> torch.Tensor:
        """The next global batch of noise, of which this worker keeps its rank's rows: N workers together use
        the noise one process would, so a run's numbers do not depend on how many workers share it."""
        drawn = torch.randn(
            self.cfg.train.batch_size, self.cfg.model.latent_dim, device=self.rt.device, generator=generator
        )
        return self.rows(drawn)

    def rows(self, drawn: torch.Tensor) -> torch.Tensor:
        """This worker's rows of a global batch's draws for generated images (see :meth:`noise`)."""
        first = self.rt.rank * self.local_batch
        return drawn[first : first + self.local_batch]

    def draws(self, generator: torch.Generator) -> tuple[Any, ...]:
        """One step's random draws, in order (a run resumed inside an epoch makes them again up to its step): D's
        noise, G's own (``train.g_fresh_noise``), the global batch's flip draws (``data.flip``), DiffAugment's
        for the real images, D's fakes and G's (``train.diffaugment``; this worker's rows of the global batch's) and a
        conditional GAN's classes of D's fakes and G's (from the training set's class frequencies)."""
        cfg, rt = self.cfg, self.rt
        z = self.noise(generator)
        z_g = self.noise(generator) if cfg.train.g_fresh_noise else None
        flips = augments = None
        if cfg.data.flip:
            flips = torch.rand(cfg.train.batch_size, device=rt.device, generator=generator)
        if cfg.train.diffaugment_kinds:
            rows = rt.rank * self.local_batch
            real, fake, own = (augment.draw(cfg.train.batch_size, rt.device, generator) for _ in range(3))
            # Real rows as the sampler deals them to the workers, generated ones as the noise is cut (see noise).
            mine = slice(rows, rows + self.local_batch)
            augments = (real[rt.rank :: rt.world_size], fake[mine], own[mine])
        classes = None
        if cfg.model.conditional:
            weights = self.state.generator.class_weights
            fake, own = (
                self.rows(torch.multinomial(weights, cfg.train.batch_size, True, generator=generator)) for _ in range(2)
            )
            classes = (fake, own if cfg.train.g_fresh_noise else fake)
        return z, z_g, flips, augments, classes

    def nearest_grid(self) -> torch.Tensor:
        """A few samples of the sampling generator, each beside its nearest training images (pipeline.gan.views):
        of the whole set in memory, or of this worker's first rows of a streamed epoch (views.NEAREST_POOL)."""
        if isinstance(self.data, InMemory):
            training = self.data.images
        else:  # images alone, whatever the run's batches carry
            with contextlib.closing(self.data.epoch(0, 0, dataclasses.replace(self.plan, labels=False))) as batches:
                wanted = -(-views.NEAREST_POOL // self.local_batch)
                training = torch.cat([batch.cpu() for batch, _ in zip(batches, range(wanted), strict=False)])
        cfg = self.cfg
        return views.nearest_grid(self.state.sampler, training, cfg.model.latent_dim, cfg.train.seed, self.rt.device)

    def log_step(self, values: torch.Tensor) -> None:
        """Every ``tracking.log_every`` global steps, the mean of every worker's steps since the last log to the
        hooks (rank 0). Between logs the steps add up on the device: no host sync, and one all-reduce per log."""
        step = self.state.step
        self.window += values
        self.window_steps += 1
        if step % self.cfg.tracking.log_every:
            return
        means = self.rt.mean_over_workers(self.window) / self.window_steps  # every worker, at the same steps
        self.window.zero_()
        self.window_steps = 0
        if self.rt.is_main:
            self.hooks.on_metrics(dict(zip(LOSS_KEYS, means.tolist(), strict=True)), step=step)

    def stop_inside_epoch(self, tally: Tally, epoch: int, done: int, notice: str | None = None) -> Report | None:
        """After step ``done`` of an epoch (not its last): a pause if ``hooks.resize`` names a new worker count,
        a report if ``tune.report_every_steps`` says one is due or a preemption ``notice`` came, else None."""
        step, every = self.state.step, self.cfg.tune.report_every_steps
        target = self.hooks.resize(step, self.total_steps - step)
        if target is not None:
            return self.close(tally, epoch, done, resize_to=target)
        if notice or (every and step % every == 0):
            return self.close(tally, epoch, done)
        return None

    def close(self, tally: Tally, epoch: int, done: int, resize_to: int | None = None) -> Report:
        """End the interval after ``done`` steps of ``epoch``: means over all workers (who carry on from the same
        sums inside an epoch, as a resumed run would), scores when due, the lines and figures, then the report
        with its checkpoint, and the tracker's buffered steps once the report is out."""
        cfg, rt, state = self.cfg, self.rt, self.state
        inside = done < self.num_steps
        sums = rt.mean_over_workers(tally.sums)
        if state.ada is not None:  # every worker goes on from the same sums, the ones the checkpoint keeps
            state.ada.share(rt.mean_over_workers)
        if inside:
            tally.sums = sums
        metrics = running_means(sums, done, epoch, state.step, self.num_steps)
        metrics["train_s"] = time.perf_counter() - tally.started
        elapsed = tally.earlier_s + metrics["train_s"]
        where = {"sums": sums.tolist(), "elapsed_s": elapsed, "worlds": tally.worlds} if inside else None
        if resize_to is not None:
            if rt.is_main:
                self.hooks.on_line(
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
        """Scores when due (every report inside an epoch; every ``eval.every_epochs`` epochs and after the last),
        the live learning rates; on rank 0 the line, the figures and (at an epoch's end) a sample grid."""
        cfg, state, hooks = self.cfg, self.state, self.hooks
        every = cfg.eval.every_epochs
        due = inside or (every and (state.epoch % every == 0 or state.epoch == cfg.train.epochs))
        scores: dict[str, float] = {}
        if self.scorer is not None and every and due:
            started = time.perf_counter()
            scores = self.scorer(state.sampler, self.rt.device)
            metrics.update(scores, eval_time_s=time.perf_counter() - started)
        metrics.update(state.learning_rates)
        if state.ada is not None:
            metrics.update(augment_p=float(state.ada.p), augment_r_t=float(state.ada.r_t))
        if not self.rt.is_main:
            return
        describe = self.scorer.describe if self.scorer is not None else _no_scores
        line = report_line if inside else epoch_line
        hooks.on_line(line(metrics, cfg.train.epochs, describe))
        # The report's figures and scores, and the epoch's means over every worker (so far, at a report inside it),
        # beside the logged steps' means.
        figures = {k: metrics[k] for k in EPOCH_KEYS if k in metrics} | scores
        figures |= {f"epoch_{k}": metrics[k] for k in LOSS_KEYS}
        hooks.on_metrics(figures, step=state.step)
        if not inside:
            noise = grid_noise(state.sampler, cfg.model.latent_dim, cfg.train.seed, self.rt.device)
            grid = sample_images(state.sampler, noise)
            hooks.on_samples(grid, f"samples/epoch_{state.epoch:03d}.png")

    def emit(self, report: Report) -> Report:
        """The loop's one exit to its caller: every hook hears the report, with the figures the hooks add to it.
        A hook that records steps writes them once the report (and its checkpoint) is out: a restart resumes
        after them, never before."""
        report = dataclasses.replace(report, metrics={**report.metrics, **self.hooks.figures()})
        self.hooks.on_report(report)
        return report


def _no_scores(metrics: Any) -> str:
    return ""


def running_means(sums: torch.Tensor, steps: int, epoch: int, step: int, num_steps: int) -> dict[str, Any]:
    """The losses' means over ``steps`` steps of epoch ``epoch`` (0-based), or DivergedError if one is not
    finite; ``epoch`` (epochs completed), ``step`` and ``progress`` (epochs trained, a fraction inside one)."""
    metrics = dict(zip(LOSS_KEYS, (sums / steps).tolist(), strict=True))
    if not all(np.isfinite(metrics[k]) for k in ("loss_d", "loss_g")):
        raise DivergedError(epoch + 1, metrics["loss_d"], metrics["loss_g"])
    return {**metrics, "epoch": epoch, "step": step, "progress": round(step / num_steps, 6)}


def class_weights(cfg: PipelineConfig, data: Batches) -> torch.Tensor | None:
    """A conditional GAN's class frequencies of the training set (float64 on the CPU, one per class of the data's
    spec); None for an unconditional one. A ConfigError for data without classes."""
    if not cfg.model.conditional:
        return None
    from pipeline.core.errors import ConfigError
    from pipeline.data.kinds import source_of

    counts, classes = data.class_counts(), source_of(cfg.data).spec().num_classes
    if classes < 2 or int(counts.sum()) == 0:
        raise ConfigError(
            f"model.conditional: true, but {cfg.data.dataset} {cfg.data.path or ''} has no classes to condition on "
            "(a folder needs one subfolder per class); set model.conditional=false"
        )
    counts = torch.nn.functional.pad(counts, (0, max(0, classes - len(counts))))
    return counts.double() / counts.sum()


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
