"""One training step of the DCGAN: the discriminator on real (target 1) and detached generated images (target 0)
with binary cross-entropy on logits, then the generator on generated images with target 1, one Adam each; or the
same step with the hinge loss, and with D's R1 penalty on real images (pipeline.gan.losses).

:class:`Nets` holds G and D as the loop calls them (compiled, wrapped for data parallelism, in the run's
precision); :class:`TrainStep` is one step on them, and :class:`GraphedStep` the same step captured as a CUDA
graph and replayed (``train.cuda_graphs``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.config.schema import PipelineConfig
from pipeline.gan.augment import augment
from pipeline.gan.losses import d_fake_loss, d_real_loss, g_loss, r1_penalty
from pipeline.gan.models import identity, sync_batchnorm
from pipeline.gan.state import TrainState


@dataclass
class Runtime:
    """Where this process trains and how it talks to the others (defaults: one CPU process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Wraps G and D for data parallelism (DDP); the identity when alone.
    wrap_model: Callable[[nn.Module], nn.Module] = identity
    # Averages a tensor over all workers (epoch metrics); the identity when alone.
    mean_over_workers: Callable[[torch.Tensor], torch.Tensor] = identity

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over every process of the default process group (a Runtime's mean_over_workers under
    DDP)."""
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


@dataclass
class Nets:
    """G and D as the loop calls them: compiled and wrapped for data parallelism, in the run's precision."""

    generator: nn.Module
    discriminator: nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]
    d_no_sync: Callable[[], contextlib.AbstractContextManager]
    layout: torch.memory_format

    @classmethod
    def wrap(cls, state: TrainState, cfg: PipelineConfig, rt: Runtime, graphs: bool = False) -> Nets:
        """``graphs``: the steps will be captured as CUDA graphs (autocast then keeps no cast cache)."""
        layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        if cfg.model.sync_batchnorm and rt.world_size > 1:  # in place: the state's modules and optimizers go on
            sync_batchnorm(state.generator, rt.device)
            sync_batchnorm(state.discriminator, rt.device)
        state.generator.to(memory_format=layout)
        state.discriminator.to(memory_format=layout)
        # Compile the inner modules and wrap those: checkpoints keep the plain modules' state_dict keys.
        compiled = torch.compile if cfg.train.compile else identity
        generator = rt.wrap_model(compiled(state.generator))
        discriminator = rt.wrap_model(compiled(state.discriminator))
        autocast = functools.partial(
            torch.autocast,
            device_type=rt.device.type,
            dtype=torch.bfloat16,
            enabled=uses_bf16(cfg.train.precision, rt.device),
            cache_enabled=not graphs,  # a captured step must not keep casts from its capture
        )
        # no_sync: D's gradients from the generator step are thrown away, and its real-batch gradients are
        # reduced together with the fake-batch ones: neither needs an all-reduce of its own.
        d_no_sync = getattr(discriminator, "no_sync", contextlib.nullcontext)
        return cls(generator, discriminator, autocast, d_no_sync, layout)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run autocasts to bfloat16: ``bf16`` always, ``auto`` where ``device`` computes bf16 natively (a
    CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX: without either, bf16 runs slower than fp32)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_tile"} & cpu_flags())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as the Linux kernel lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split())


def uses_cuda_graphs(setting: str, rt: Runtime) -> bool:
    """Whether a run's steps are CUDA graphs: ``true`` (ValueError unless one worker on a CUDA GPU), ``auto``
    (where that holds; a GPU's launches bound this model at small batches), ``false``."""
    fits = rt.device.type == "cuda" and rt.world_size == 1
    if setting == "true" and not fits:
        raise ValueError(
            f"train.cuda_graphs: true, but this run trains on {rt.device.type} with {rt.world_size} worker(s); CUDA "
            "graphs need one worker on a CUDA GPU: set train.cuda_graphs to auto or false, or scaling.use_gpu=true "
            "and scaling.num_workers=1"
        )
    return setting != "false" and fits


def top_k_count(batch: int, share: float) -> int:
    """How many of a batch's ``batch`` fakes top-k training keeps at ``share`` (at least one)."""
    return max(1, round(batch * share))


def most_real(logits: torch.Tensor, share: float) -> torch.Tensor:
    """Top-k training (Sinha et al. 2020): the ``share`` of D's logits for a batch of fakes that D rates most
    real, so the generator step drops the gradients of its worst-rated fakes; all of them when share >= 1."""
    k = top_k_count(len(logits), share)
    return logits if k >= len(logits) else torch.topk(logits, k, sorted=False).values


@dataclass
class StepTargets:
    """The BCE targets of one worker's batch: D's for real and fake images, G's (allocated once)."""

    real: torch.Tensor
    fake: torch.Tensor
    generator: torch.Tensor

    @classmethod
    def of(cls, cfg: PipelineConfig, batch: int, device: torch.device) -> StepTargets:
        """D's targets (``train.real_label`` for real, 0 for fake) and G's (1) for a batch of ``batch``."""
        return cls(
            real=torch.full((batch,), cfg.train.real_label, device=device),
            fake=torch.zeros(batch, device=device),
            generator=torch.ones(batch, device=device),
        )


@dataclass
class TrainStep:
    """One training step on ``nets``, updating ``state``'s optimizers, towards ``targets``."""

    nets: Nets
    state: TrainState
    targets: StepTargets
    loss: str = "bce"  # model.loss (pipeline.gan.losses)
    r1_gamma: float = 0.0  # optim.r1_gamma: 0 = no R1 penalty
    r1_every: int = 16  # optim.r1_every: the penalty on every this many D steps (lazy), scaled by it
    augment_kinds: tuple[str, ...] = ()  # train.diffaugment: what D sees is augmented so (pipeline.gan.augment)
    augment_p: float = 1.0  # train.augment_p

    def seen(self, images: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """What D is shown of ``images``: DiffAugmented with ``draws`` where the run augments, else the images."""
        if draws is None:
            return images
        p = self.state.ada.p if self.state.ada is not None else self.augment_p
        return augment(images, draws, p, self.augment_kinds)

    @classmethod
    def of(cls, nets: Nets, state: TrainState, cfg: PipelineConfig, batch: int, device: torch.device) -> TrainStep:
        """The step ``cfg`` asks for, on a worker's batch of ``batch`` images."""
        targets = StepTargets.of(cfg, batch, device)
        kinds = cfg.train.diffaugment_kinds
        return cls(
            nets, state, targets, cfg.model.loss, cfg.optim.r1_gamma, cfg.optim.r1_every, kinds, cfg.train.augment_p
        )

    def __call__(
        self,
        real: torch.Tensor,
        z: torch.Tensor,
        z_g: torch.Tensor | None,
        share: float,
        draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """D learns real -> real, fake -> 0; then G learns from fresh fakes (from ``z_g``) or, when ``z_g`` is None,
        D's own, labelled real. ``draws``: DiffAugment's for the real images, D's fakes and G's (augmenting runs).
        ``labels``: a conditional GAN's classes of the real images, D's fakes and G's (whose noise carries them too).
        Returns (loss_d, loss_g, D(x), D(G(z))), detached, as one tensor."""
        real_draws, fake_draws, g_draws = draws if draws is not None else (None, None, None)
        real_labels, fake_labels, g_labels = labels if labels is not None else (None, None, None)
        fake, loss_d, d_real, d_fake = self.discriminator_step(
            real, z, keep_fake_graph=z_g is None, draws=(real_draws, fake_draws), labels=(real_labels, fake_labels)
        )
        if z_g is not None:
            with self.nets.autocast():
                fake = self.nets.generator(z_g)
        loss_g = self.generator_step(fake, share, g_draws, g_labels)
        return torch.stack([loss_d, loss_g, d_real, d_fake])

    def judge(self, images: torch.Tensor, draws: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        """D's logits for ``images`` as D is shown them (:meth:`seen`), of their classes where it is conditional."""
        shown = self.seen(images, draws)
        return self.nets.discriminator(shown) if labels is None else self.nets.discriminator(shown, labels)

    def discriminator_step(
        self,
        real: torch.Tensor,
        z: torch.Tensor,
        keep_fake_graph: bool,
        draws: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
        labels: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One D update: real images towards the real targets, G's fakes (detached) towards the fake ones.

        Returns the fakes (with G's graph if ``keep_fake_graph``, for a G step that reuses them) and, detached,
        D's loss, D(x) and D(G(z)). Backward after each forward keeps BatchNorm buffers consistent under DDP;
        the first backward skips the all-reduce, the second reduces the sum.
        """
        nets, opt_d = self.nets, self.state.opt_d
        opt_d.zero_grad(set_to_none=True)
        with nets.autocast(), torch.set_grad_enabled(keep_fake_graph):
            fake = nets.generator(z)
        # R1 on this step (lazy: every r1_every optimizer steps), its weight scaled by the interval.
        r1 = self.r1_gamma / 2 * self.r1_every if self.r1_gamma and self.state.step % self.r1_every == 0 else 0.0
        with nets.d_no_sync():
            if r1:
                real = real.detach().requires_grad_(True)
            with nets.autocast():
                # With R1, its gradient is taken at the unaugmented real images, through the augmentation.
                real_logits = self.judge(real, draws[0], labels[0])
                loss_real = d_real_loss(self.loss, real_logits, self.targets.real)
            if self.state.ada is not None:
                self.state.ada.observe(real_logits)
            (loss_real + r1 * r1_penalty(real_logits, real) if r1 else loss_real).backward()
        with nets.autocast():
            fake_logits = self.judge(fake.detach(), draws[1], labels[1])
            loss_fake = d_fake_loss(self.loss, fake_logits, self.targets.fake)
        loss_fake.backward()
        opt_d.step()
        with torch.no_grad():
            return fake, loss_real + loss_fake, torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean()

    def generator_step(
        self, fake: torch.Tensor, share: float, draws: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One G update: D's verdict on ``fake`` pushed towards "real"; with top-k training only the ``share`` of
        fakes D rates most real counts. Returns the loss, detached."""
        nets, opt_g = self.nets, self.state.opt_g
        opt_g.zero_grad(set_to_none=True)
        with nets.d_no_sync():
            with nets.autocast():
                logits = most_real(self.judge(fake, draws, labels), share)
                loss = g_loss(self.loss, logits, self.targets.generator[: len(logits)])
            loss.backward()
        opt_g.step()
        return loss.detach()


class GraphedStep:
    """A :class:`TrainStep` captured as a CUDA graph (``train.cuda_graphs``) and replayed: one launch per step
    instead of the few hundred kernels that bound a small model at a small batch.

    The first ``WARMUP`` steps run as they are, on a side stream (cuDNN's and the optimizers' lazy set-up must
    not happen inside a capture); then the whole step, both optimizer updates included, is captured once and
    each later step copies its batch and noise into the graph's inputs and replays it. The same numbers as the
    plain step: the noise is drawn outside, from the same generator, and the learning rates live in device
    tensors that the schedule fills. Top-k training changes k (a tensor shape) as its share falls: each new k
    gets a new capture. One process, one CUDA device: no DDP inside a graph.
    """

    WARMUP = 3

    def __init__(self, step: TrainStep, device: torch.device):
        self.step = step
        self.batch = len(step.targets.real)
        for optimizer in (step.state.opt_g, step.state.opt_d):
            for group in optimizer.param_groups:  # a checkpoint's groups say capturable=False and hold numbers
                group["capturable"] = True
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
            for entry in optimizer.state.values():  # a per-tensor Adam keeps its step counts on the CPU
                if "step" in entry:
                    entry["step"] = entry["step"].to(device=device, dtype=torch.float32)
        self.warm = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.k: int | None = None
        self.inputs: list[torch.Tensor] = []
        self.out: torch.Tensor | None = None

    def __call__(
        self, real: torch.Tensor, z: torch.Tensor, z_g: torch.Tensor | None, share: float, draws: None = None
    ) -> torch.Tensor:
        """``draws``: none (DiffAugment's draws are no graph input: an augmenting run is never graphed)."""
        if draws is not None:
            raise ValueError("a CUDA-graphed step takes no DiffAugment draws (config checks keep them apart)")
        k = top_k_count(self.batch, share)  # most_real's k: the one shape that changes between steps
        if self.warm < self.WARMUP:
            self.warm += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(real, z, z_g, share)
            torch.cuda.current_stream().wait_stream(side)
            return out
        given = [t for t in (real, z, z_g) if t is not None]
        if self.graph is None or k != self.k:
            self._capture(given, share, k)
        for static, value in zip(self.inputs, given, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.out

    def _capture(self, given: list[torch.Tensor], share: float, k: int) -> None:
        self.graph = self.out = None  # the previous capture's memory goes back before the next one takes its own
        for optimizer in (self.step.state.opt_g, self.step.state.opt_d):
            optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the capture, in its pool
        if not self.inputs:
            self.inputs = [t.clone() for t in given]
        real, z, *fresh = self.inputs  # fresh: G's own noise, when it draws its own
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA meanwhile
            self.out = self.step(real, z, *(fresh or [None]), share)
        self.graph, self.k = graph, k
