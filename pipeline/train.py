"""`train_gan`: the DCGAN training loop. It knows nothing of Ray or MLflow.

Per batch (the seed's algorithm): the discriminator on real images (target 1) and on generated,
detached ones (target 0) with binary cross-entropy on logits; then the generator on generated images
with target 1; one Adam per network. The distributed adapter supplies a :class:`Runtime` (rank, world,
device, DDP wrapping); run in-process, the defaults describe one CPU process. :class:`TrainState` is
what a run continues from, and the one place that knows the checkpoint's layout.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from pipeline.config import PipelineConfig
from pipeline.data import Split, to_model_range
from pipeline.metrics import Evaluator
from pipeline.models import Generator, build_models, identity
from pipeline.tracking import NullTracker, Tracker

NUM_GRID_SAMPLES = 64  # an 8x8 grid from fixed noise
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


# report(metrics, checkpoint_state): called by every worker, in step, at each epoch's end (and every
# tune.report_every_steps steps); checkpoint_state is the dict to save on rank 0 and None elsewhere.
EpochReport = Callable[[dict[str, float], dict[str, Any] | None], None]
StepCallback = Callable[[int, dict[str, float]], None]
ProgressCallback = Callable[[int, int, int], None]  # (epoch, step within the epoch, steps in the epoch)
ResizeCallback = Callable[[int, int], int | None]  # (step, steps left) -> new worker count, or None to go on


class DivergedError(FloatingPointError):
    """A loss became NaN or infinite: the run cannot recover by itself (a retry would diverge again)."""

    def __init__(self, epoch: int, loss_d: float, loss_g: float):
        self.epoch = epoch
        super().__init__(f"training diverged at epoch {epoch} (loss_d={loss_d}, loss_g={loss_g}); {DIVERGENCE_HINT}")


class EmaGenerator:
    """An exponential moving average of G's weights; BatchNorm statistics are copied from G.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the average does not
    drag the random initial weights along for thousands of steps.
    """

    def __init__(self, generator: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), list(generator.parameters()), 1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), generator.buffers(), strict=True):
            mine.copy_(theirs)


@dataclass
class TrainResult:
    generator: Generator  # unwrapped, on the training device; the EMA copy when train.ema_decay > 0
    metrics: dict[str, float]  # the last epoch's
    epoch: int  # epochs completed
    step: int  # optimizer steps completed
    resize_to: int | None = None  # elastic: stopped inside an epoch to continue with this many workers


@dataclass
class TrainState:
    """What a run continues from: both networks, their optimizers, G's EMA copy and the counters.

    :meth:`to_checkpoint` and :meth:`load_checkpoint` are the checkpoint format; checkpoint.py writes and
    reads the file.
    """

    generator: Generator
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EmaGenerator | None
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed

    @classmethod
    def initial(cls, cfg: PipelineConfig, device: torch.device) -> TrainState:
        """Fresh networks from ``train.seed`` (the same weights on every worker), one Adam each, the EMA copy."""
        torch.manual_seed(cfg.train.seed)
        generator, discriminator = build_models(cfg.model)
        generator.to(device)
        discriminator.to(device)
        # The fused kernel: the same Adam, 6x faster than PyTorch's CPU default (a Python loop over tensors).
        adam = functools.partial(
            torch.optim.Adam, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=True if cfg.optim.fused else None
        )
        opt_g = adam(generator.parameters(), lr=cfg.optim.lr_g)
        opt_d = adam(discriminator.parameters(), lr=cfg.optim.lr_d)
        ema = EmaGenerator(generator, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        return cls(generator, discriminator, opt_g, opt_d, ema)

    @property
    def sampler(self) -> nn.Module:
        """The generator that samples, is evaluated and is logged: the EMA copy when the run keeps one."""
        return self.ema.model if self.ema is not None else self.generator

    def set_learning_rates(self, lr_g: float, lr_d: float) -> None:
        for optimizer, lr in ((self.opt_g, lr_g), (self.opt_d, lr_d)):
            for group in optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):  # a captured step reads it from device memory
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr

    def apply_optim(self, cfg: PipelineConfig) -> None:
        """The config's learning rates and betas into both optimizers (a checkpoint's optimizer state carries its
        own: a run continued with other values, as PBT's perturbed trials are, must train with the new ones)."""
        self.set_learning_rates(cfg.optim.lr_g, cfg.optim.lr_d)
        for optimizer in (self.opt_g, self.opt_d):
            for group in optimizer.param_groups:
                group["betas"] = (cfg.optim.beta1, cfg.optim.beta2)

    @property
    def learning_rates(self) -> dict[str, float]:
        """The live learning rates, as the optimizers hold them."""
        return {"lr_g": float(self.opt_g.param_groups[0]["lr"]), "lr_d": float(self.opt_d.param_groups[0]["lr"])}

    def fingerprint(self) -> str:
        """SHA-256 of the networks' weights (G, D and G's EMA copy): equal fingerprints, equal networks."""
        return weights_digest(
            self.generator.state_dict(),
            self.discriminator.state_dict(),
            self.ema.model.state_dict() if self.ema is not None else None,
        )

    def to_checkpoint(self, cfg: PipelineConfig, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint dict; ``partial`` is the epoch's progress when it is taken inside an epoch."""
        return {
            "epoch_partial": partial,
            "generator": self.generator.state_dict(),
            "generator_ema": self.ema.model.state_dict() if self.ema is not None else None,
            "discriminator": self.discriminator.state_dict(),
            "opt_g": portable(self.opt_g.state_dict()),
            "opt_d": portable(self.opt_d.state_dict()),
            "epoch": self.epoch,
            "step": self.step,
            "rng": {"torch": torch.get_rng_state()},
            "config": cfg.to_dict(),
        }

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, a dict :meth:`to_checkpoint` made (a run without EMA has no EMA weights)."""
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        if self.ema is not None:
            self.ema.model.load_state_dict(self.sampling_weights(state))
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])

    def resume(
        self, checkpoint: dict[str, Any], cfg: PipelineConfig, log: Callable[[str], None] | None, total_steps: int
    ) -> dict[str, Any] | None:
        """Continue from ``checkpoint`` with the config's learning rates and betas (told to ``log``, with the rates
        that changed, unless the run is done); returns its record of the epoch it was taken inside (None at an
        epoch's end)."""
        self.load_checkpoint(checkpoint)
        before = self.learning_rates
        self.apply_optim(cfg)
        if log is not None and self.step < total_steps:
            log(f"resuming from epoch {self.epoch} (step {self.step})")
            if before != self.learning_rates and cfg.optim.lr_final_scale == 1.0:
                changes = ", ".join(f"{k} {before[k]:.3g} -> {v:.3g}" for k, v in self.learning_rates.items())
                log(f"learning rates from the config: {changes}")
        return checkpoint.get("epoch_partial")

    @staticmethod
    def sampling_weights(state: dict[str, Any]) -> dict[str, Any]:
        """From a checkpoint, the generator weights to sample with: the EMA copy if the run kept one."""
        return state.get("generator_ema") or state["generator"]


def portable(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's state_dict as every run can load it: a CUDA-graphed run's learning rates (device tensors)
    as numbers and its ``capturable`` flag off (a CPU run cannot load a capturable Adam)."""
    for group in optimizer_state["param_groups"]:  # state_dict() made these dicts: the live groups are untouched
        group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return optimizer_state


def weights_digest(*state_dicts: dict[str, torch.Tensor] | None) -> str:
    """SHA-256 over the tensors of ``state_dicts`` in order (None counts as an empty one)."""
    digest = hashlib.sha256()
    for weights in state_dicts:
        for name, tensor in (weights or {}).items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX). On a CPU without either, bf16 trained the
    configs/local.yaml networks 2.6x slower than fp32 (34 vs 90 images/s on one core)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent means "no"
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


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


def epoch_noise_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Noise depends only on (seed, epoch, rank), so resuming at an epoch boundary is exact."""
    value = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(value)


def fixed_noise(cfg: PipelineConfig, device: torch.device) -> torch.Tensor:
    """The same 64 latent vectors for every sample grid of a run."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed + 12345)
    return torch.randn(NUM_GRID_SAMPLES, cfg.model.latent_dim, generator=gen).to(device)


@torch.no_grad()
def sample_images(generator: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Generate in eval mode (BatchNorm running statistics) as uint8 (N, 28, 28) on the CPU.

    A generator loaded from MLflow (a torch.export program) was exported in eval mode and refuses
    mode switches; it is called as it is.
    """
    switch = isinstance(generator, Generator)
    was_training = generator.training
    if switch:
        generator.eval()
    try:
        out = generator(z)
    finally:
        if switch:
            generator.train(was_training)
    return out.squeeze(1).add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def generate_images(
    generator: nn.Module, num: int, latent_dim: int, seed: int, device: torch.device, batch: int = 1000
) -> torch.Tensor:
    """``num`` uint8 images from noise seeded by ``seed`` (the same noise at every evaluation of a run)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 54321)
    chunks = []
    for start in range(0, num, batch):
        z = torch.randn(min(batch, num - start), latent_dim, generator=gen).to(device)
        chunks.append(sample_images(generator, z))
    return torch.cat(chunks)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    return num_images // batch_size


def linear_schedule(final: float, step: int, total_steps: int) -> float:
    """1 at step 0, falling linearly to ``final`` at ``total_steps``; from the step alone, so a resumed run
    follows the same schedule."""
    return 1.0 - (1.0 - final) * step / total_steps


def top_k_count(batch: int, share: float) -> int:
    """How many of a batch's ``batch`` fakes top-k training keeps at ``share`` (at least one)."""
    return max(1, round(batch * share))


def most_real(logits: torch.Tensor, share: float) -> torch.Tensor:
    """Top-k training (Sinha et al. 2020): the ``share`` of D's logits for a batch of fakes that D rates most
    real, so the generator step drops the gradients of its worst-rated fakes; all of them when share >= 1."""
    k = top_k_count(len(logits), share)
    return logits if k >= len(logits) else torch.topk(logits, k, sorted=False).values


def discriminator_step(
    nets: Nets,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
    real_targets: torch.Tensor,
    fake_targets: torch.Tensor,
    keep_fake_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One D update: real images towards ``real_targets``, G's fakes (detached) towards ``fake_targets``.

    Returns the fakes (with G's graph if ``keep_fake_graph``, for a G step that reuses them) and, detached,
    D's loss, D(x) and D(G(z)). Backward after each forward keeps BatchNorm buffers consistent under DDP;
    the first backward skips the all-reduce, the second reduces the sum.
    """
    opt_d.zero_grad(set_to_none=True)
    with nets.autocast(), torch.set_grad_enabled(keep_fake_graph):
        fake = nets.generator(z)
    with nets.d_no_sync():
        with nets.autocast():
            real_logits = nets.discriminator(real)
            loss_real = F.binary_cross_entropy_with_logits(real_logits, real_targets)
        loss_real.backward()
    with nets.autocast():
        fake_logits = nets.discriminator(fake.detach())
        loss_fake = F.binary_cross_entropy_with_logits(fake_logits, fake_targets)
    loss_fake.backward()
    opt_d.step()
    with torch.no_grad():
        return fake, loss_real + loss_fake, torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean()


def generator_step(
    nets: Nets, opt_g: torch.optim.Optimizer, fake: torch.Tensor, targets: torch.Tensor, share: float
) -> torch.Tensor:
    """One G update: D's verdict on ``fake`` pushed towards ``targets`` ("real"); with top-k training only the
    ``share`` of fakes D rates most real counts. Returns the loss, detached."""
    opt_g.zero_grad(set_to_none=True)
    with nets.d_no_sync():
        with nets.autocast():
            logits = most_real(nets.discriminator(fake), share)
            loss = F.binary_cross_entropy_with_logits(logits, targets[: len(logits)])
        loss.backward()
    opt_g.step()
    return loss.detach()


@dataclass
class StepTargets:
    """The BCE targets of one worker's batch: D's for real and fake images, G's (allocated once)."""

    real: torch.Tensor
    fake: torch.Tensor
    generator: torch.Tensor


def train_step(
    nets: Nets,
    state: TrainState,
    real: torch.Tensor,
    z: torch.Tensor,
    z_g: torch.Tensor | None,
    targets: StepTargets,
    share: float,
) -> torch.Tensor:
    """One training step: D learns real -> real, fake -> 0; then G learns from fresh fakes (from ``z_g``) or, when
    ``z_g`` is None, D's own, labelled real. Returns (loss_d, loss_g, D(x), D(G(z))), detached, as one tensor."""
    fake, loss_d, d_real, d_fake = discriminator_step(
        nets, state.opt_d, real, z, targets.real, targets.fake, keep_fake_graph=z_g is None
    )
    if z_g is not None:
        with nets.autocast():
            fake = nets.generator(z_g)
    loss_g = generator_step(nets, state.opt_g, fake, targets.generator, share)
    return torch.stack([loss_d, loss_g, d_real, d_fake])


class GraphedStep:
    """:func:`train_step` captured as a CUDA graph (``train.cuda_graphs``) and replayed: one launch per step
    instead of the few hundred kernels that bound a small model at a small batch.

    The first ``WARMUP`` steps run as they are, on a side stream (cuDNN's and the optimizers' lazy set-up must
    not happen inside a capture); then the whole step, both optimizer updates included, is captured once and
    each later step copies its batch and noise into the graph's inputs and replays it. The same numbers as the
    plain step: the noise is drawn outside, from the same generator, and the learning rates live in device
    tensors that the schedule fills. Top-k training changes k (a tensor shape) as its share falls: each new k
    gets a new capture. One process, one CUDA device: no DDP inside a graph.
    """

    WARMUP = 3

    def __init__(self, nets: Nets, state: TrainState, targets: StepTargets, device: torch.device):
        self.nets, self.state, self.targets = nets, state, targets
        self.batch = len(targets.real)
        for optimizer in (state.opt_g, state.opt_d):
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

    def __call__(self, real: torch.Tensor, z: torch.Tensor, z_g: torch.Tensor | None, share: float) -> torch.Tensor:
        k = top_k_count(self.batch, share)  # most_real's k: the one shape that changes between steps
        if self.warm < self.WARMUP:
            self.warm += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = train_step(self.nets, self.state, real, z, z_g, self.targets, share)
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
        for optimizer in (self.state.opt_g, self.state.opt_d):
            optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the capture, in its pool
        if not self.inputs:
            self.inputs = [t.clone() for t in given]
        real, z, *fresh = self.inputs  # fresh: G's own noise, when it draws its own
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA meanwhile
            self.out = train_step(self.nets, self.state, real, z, *(fresh or [None]), self.targets, share)
        self.graph, self.k = graph, k


def train_gan(
    cfg: PipelineConfig,
    data: Split,
    *,
    runtime: Runtime | None = None,
    tracker: Tracker | None = None,
    report: EpochReport | None = None,
    on_step: StepCallback | None = None,
    resume: dict[str, Any] | None = None,
    on_resume: Callable[[TrainState], None] | None = None,
    evaluator: Evaluator | None = None,
    log: Callable[[str], None] = print,
    progress: ProgressCallback | None = None,
    resize: ResizeCallback | None = None,
) -> TrainResult:
    """Train G and D for ``cfg.train.epochs`` epochs (continuing from ``resume``, a checkpoint dict, which may
    have been taken inside an epoch; ``on_resume`` then sees the state it continues from).

    ``resize`` (elastic trials), asked by every worker after each step inside an epoch, may name a new worker
    count: the run then reports a checkpoint of this step (``resize_to`` among the metrics, no evaluation) and
    returns with ``TrainResult.resize_to`` set, for the caller to continue with that many workers.

    ``evaluator`` (rank 0 only) scores ``cfg.eval.num_samples`` generated images every
    ``cfg.eval.every_epochs`` epochs, after the last and at every report inside an epoch
    (``cfg.tune.report_every_steps``); ``fid`` and ``inception_score`` join the report.
    ``progress`` is told of every step without waiting for the device (it costs no synchronisation).
    """
    rt = runtime or Runtime()
    tracker = tracker or NullTracker()
    device, latent = rt.device, cfg.model.latent_dim
    local_batch = cfg.train.batch_size // rt.world_size
    num_steps = steps_per_epoch(len(data), cfg.train.batch_size)
    if num_steps < 1:
        raise ValueError(f"batch size {cfg.train.batch_size} exceeds the {len(data)} training images")
    graphs = uses_cuda_graphs(cfg.train.cuda_graphs, rt)  # before any work: ``true`` where it cannot be is refused
    total_steps = num_steps * cfg.train.epochs
    every = cfg.tune.report_every_steps

    # Networks and optimizers from the seed; a resumed run then takes the checkpoint's weights and counters,
    # and the config's learning rates and betas.
    state = TrainState.initial(cfg, device)
    partial = None
    if resume is not None:
        partial = state.resume(resume, cfg, log if rt.is_main else None, total_steps)
        if on_resume is not None:
            on_resume(state)
    nets = Nets.wrap(state, cfg, rt, graphs)

    # The images stay on the device; each worker takes its own shard of one shuffled order per epoch.
    images = data.images.to(device)
    sampler = DistributedSampler(
        range(len(data)), num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    targets = StepTargets(
        real=torch.full((local_batch,), cfg.train.real_label, device=device),
        fake=torch.zeros(local_batch, device=device),
        generator=torch.ones(local_batch, device=device),
    )
    step: Callable[..., torch.Tensor] = functools.partial(train_step, nets, state, targets=targets)
    if graphs:
        step = GraphedStep(nets, state, targets, device)
    draws_per_step = 2 if cfg.train.g_fresh_noise else 1
    metrics: dict[str, float] = {}

    for epoch in range(state.epoch, cfg.train.epochs):
        # Shuffling and noise depend only on (seed, epoch, rank): resuming at an epoch boundary is exact, and
        # inside an epoch too (the noise is drawn forward to the step, the epoch's loss sums come back).
        nets.generator.train()
        nets.discriminator.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        noise = epoch_noise_generator(cfg.train.seed, epoch, rt.rank, device)
        sums = torch.zeros(len(LOSS_KEYS), device=device, dtype=torch.float64)
        first, earlier_s = state.step - epoch * num_steps, 0.0
        if first:  # a checkpoint from inside this epoch
            for _ in range(first * draws_per_step):
                torch.randn(local_batch, latent, device=device, generator=noise)
            sums += torch.tensor(partial["sums"], device=device, dtype=torch.float64)
            earlier_s = partial["elapsed_s"]
        # The steps' seconds (earlier_s: this epoch's before the current report interval), not the reports'.
        started = time.perf_counter()
        for i in range(first, num_steps):
            real = to_model_range(images[order[i * local_batch : (i + 1) * local_batch]])
            real = real.contiguous(memory_format=nets.layout)
            # Schedules follow the global step, not the epoch, so a resumed run follows them too.
            if cfg.optim.lr_final_scale < 1.0:
                scale = linear_schedule(cfg.optim.lr_final_scale, state.step, total_steps)
                state.set_learning_rates(cfg.optim.lr_g * scale, cfg.optim.lr_d * scale)
            top_k_share = linear_schedule(cfg.train.top_k_final, state.step, total_steps)

            z = torch.randn(local_batch, latent, device=device, generator=noise)
            z_g = torch.randn(local_batch, latent, device=device, generator=noise) if cfg.train.g_fresh_noise else None
            values = step(real=real, z=z, z_g=z_g, share=top_k_share).double()
            state.step += 1
            if state.ema is not None:
                state.ema.update(state.generator, state.step)
            if progress is not None:
                progress(epoch + 1, i + 1, num_steps)

            # Every step counts towards the epoch means; the tracker gets every tracking.log_every-th.
            sums += values
            if on_step is not None or state.step % cfg.tracking.log_every == 0:
                step_metrics = dict(zip(LOSS_KEYS, values.tolist(), strict=True))
                if on_step is not None:
                    on_step(state.step, step_metrics)
                if state.step % cfg.tracking.log_every == 0:
                    tracker.log_metrics(step_metrics, step=state.step)
            if resize is not None and i + 1 < num_steps:
                target = resize(state.step, total_steps - state.step)
                if target is not None:
                    sums = rt.mean_over_workers(sums)
                    metrics = _running_means(sums, i + 1, epoch, state.step, num_steps)
                    metrics.update(train_s=time.perf_counter() - started, resize_to=target)
                    where = {"sums": sums.tolist(), "elapsed_s": earlier_s + metrics["train_s"]}
                    if rt.is_main:
                        log(f"[elastic] step {state.step}: {rt.world_size} -> {target} worker(s); checkpoint, restart")
                    if report is not None:
                        report(metrics, state.to_checkpoint(cfg, where) if rt.is_main else None)
                    tracker.flush()
                    return TrainResult(state.sampler, metrics, state.epoch, state.step, resize_to=target)
            if every and state.step % every == 0 and i + 1 < num_steps:
                # A report inside the epoch: the means so far (over all workers, who then carry on from the
                # same sums, as a resumed run would), scores and a checkpoint that can continue from here.
                sums = rt.mean_over_workers(sums)
                metrics = _running_means(sums, i + 1, epoch, state.step, num_steps)
                metrics["train_s"] = time.perf_counter() - started
                earlier_s += metrics["train_s"]
                where = {"sums": sums.tolist(), "elapsed_s": earlier_s}
                end_interval(
                    cfg,
                    state,
                    metrics,
                    rt=rt,
                    evaluator=evaluator,
                    tracker=tracker,
                    report=report,
                    log=log,
                    partial=where,
                )
                started = time.perf_counter()

        # Means over all workers: every worker sees the same values, so all of them stop together on NaN.
        metrics = _running_means(rt.mean_over_workers(sums), num_steps, epoch, state.step, num_steps)
        metrics["train_s"] = time.perf_counter() - started
        elapsed = earlier_s + metrics["train_s"]
        metrics.update(epoch=epoch + 1, epoch_time_s=elapsed, images_per_s=num_steps * cfg.train.batch_size / elapsed)
        state.epoch = epoch + 1
        end_interval(cfg, state, metrics, rt=rt, evaluator=evaluator, tracker=tracker, report=report, log=log)

    return TrainResult(generator=state.sampler, metrics=metrics, epoch=state.epoch, step=state.step)


def _running_means(sums: torch.Tensor, steps: int, epoch: int, step: int, num_steps: int) -> dict[str, float]:
    """The losses' means over ``steps`` steps of epoch ``epoch`` (0-based), or DivergedError if one is not
    finite; ``epoch`` (epochs completed), ``step`` and ``progress`` (epochs trained, a fraction inside one)."""
    metrics = dict(zip(LOSS_KEYS, (sums / steps).tolist(), strict=True))
    if not all(np.isfinite(metrics[k]) for k in ("loss_d", "loss_g")):
        raise DivergedError(epoch + 1, metrics["loss_d"], metrics["loss_g"])
    return {**metrics, "epoch": epoch, "step": step, "progress": round(step / num_steps, 6)}


def end_interval(
    cfg: PipelineConfig,
    state: TrainState,
    metrics: dict[str, float],
    *,
    rt: Runtime,
    evaluator: Evaluator | None,
    tracker: Tracker,
    report: EpochReport | None,
    log: Callable[[str], None],
    partial: dict[str, Any] | None = None,
) -> None:
    """After an epoch (or, with ``partial`` = the epoch's progress, a report inside one): FID and IS when due
    (added to ``metrics``); on rank 0 the log line, the metrics and (at an epoch's end) a sample grid; the
    report with the checkpoint; then the tracker's buffered steps."""
    every = cfg.eval.every_epochs
    due = partial is not None or (every and (state.epoch % every == 0 or state.epoch == cfg.train.epochs))
    if evaluator is not None and every and due:
        started = time.perf_counter()
        samples = generate_images(state.sampler, cfg.eval.num_samples, cfg.model.latent_dim, cfg.train.seed, rt.device)
        metrics.update(evaluator.score(samples))
        metrics["eval_time_s"] = time.perf_counter() - started
    metrics.update(state.learning_rates)
    if rt.is_main:
        log(epoch_line(metrics, cfg.train.epochs) if partial is None else report_line(metrics, cfg.train.epochs))
        tracker.log_metrics({k: metrics[k] for k in EPOCH_KEYS if k in metrics}, step=state.step)
        if partial is None:
            grid = sample_images(state.sampler, fixed_noise(cfg, rt.device))
            tracker.log_image_grid(grid, f"samples/epoch_{state.epoch:03d}.png")
    if report is not None:
        # Tune's status table shows the first few keys of a trial's result: the ones a sweep is judged by.
        ordered = {key: metrics[key] for key in TABLE_KEYS if key in metrics} | metrics
        report(ordered, state.to_checkpoint(cfg, partial) if rt.is_main else None)
    # Only now is this checkpoint safe: a restart resumes after these steps, never before.
    tracker.flush()


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
