"""`train_gan`: the DCGAN training loop. It knows nothing of Ray or MLflow.

Per batch (the seed's algorithm): the discriminator on real images (target 1) and on generated,
detached ones (target 0) with binary cross-entropy on logits; then the generator on generated images
with target 1; one Adam per network. The distributed adapter supplies a :class:`Runtime` (rank, world,
device, DDP wrapping); run in-process, the defaults describe one CPU process.
"""

from __future__ import annotations

import contextlib
import copy
import functools
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
from pipeline.models import Generator, build_models
from pipeline.tracking import NullTracker, Tracker

NUM_GRID_SAMPLES = 64  # an 8x8 grid from fixed noise


def _identity(module: nn.Module) -> nn.Module:
    return module


def _local_mean(values: torch.Tensor) -> torch.Tensor:
    return values


@dataclass
class Runtime:
    """Where this process trains and how it talks to the others (defaults: one CPU process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Wraps G and D for data parallelism (DDP); the identity when alone.
    wrap_model: Callable[[nn.Module], nn.Module] = _identity
    # Averages a tensor over all workers (epoch metrics); the identity when alone.
    mean_over_workers: Callable[[torch.Tensor], torch.Tensor] = _local_mean

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# report(epoch_metrics, checkpoint_state): called once per epoch by every worker, in step;
# checkpoint_state is the dict to save on rank 0 and None elsewhere.
EpochReport = Callable[[dict[str, float], dict[str, Any] | None], None]
StepCallback = Callable[[int, dict[str, float]], None]


class DivergedError(FloatingPointError):
    """A loss became NaN or infinite: the run cannot recover by itself (a retry would diverge again)."""

    def __init__(self, epoch: int, loss_d: float, loss_g: float):
        self.epoch = epoch
        super().__init__(
            f"training diverged at epoch {epoch} (loss_d={loss_d}, loss_g={loss_g}); "
            "lower optim.lr_g / optim.lr_d, or try train.real_label=0.9"
        )


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


def sampling_weights(state: dict[str, Any]) -> dict[str, Any]:
    """From a checkpoint, the generator weights to sample with: the EMA copy if the run kept one."""
    return state.get("generator_ema") or state["generator"]


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    return num_images // batch_size


def linear_schedule(final: float, step: int, total_steps: int) -> float:
    """1 at step 0, falling linearly to ``final`` at ``total_steps``; from the step alone, so a resumed run
    follows the same schedule."""
    return 1.0 - (1.0 - final) * step / total_steps


def most_real(logits: torch.Tensor, share: float) -> torch.Tensor:
    """Top-k training (Sinha et al. 2020): the ``share`` of D's logits for a batch of fakes that D rates most
    real, so the generator step drops the gradients of its worst-rated fakes; all of them when share >= 1."""
    k = max(1, round(len(logits) * share))
    return logits if k >= len(logits) else torch.topk(logits, k, sorted=False).values


def train_gan(
    cfg: PipelineConfig,
    data: Split,
    *,
    runtime: Runtime | None = None,
    tracker: Tracker | None = None,
    report: EpochReport | None = None,
    on_step: StepCallback | None = None,
    resume: dict[str, Any] | None = None,
    evaluator: Evaluator | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train G and D for ``cfg.train.epochs`` epochs (continuing from ``resume``, a checkpoint dict).

    ``evaluator`` (rank 0 only) scores ``cfg.eval.num_samples`` generated images every
    ``cfg.eval.every_epochs`` epochs and after the last; ``fid`` and ``inception_score`` join the report.
    """
    rt = runtime or Runtime()
    tracker = tracker or NullTracker()
    device = rt.device
    world = rt.world_size
    local_batch = cfg.train.batch_size // world
    num_steps = steps_per_epoch(len(data), cfg.train.batch_size)
    if num_steps < 1:
        raise ValueError(f"batch size {cfg.train.batch_size} exceeds the {len(data)} training images")

    # Same initial weights on every worker (DDP also broadcasts rank 0's at wrap time).
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
    # The EMA copy of G (if on) is what samples, evaluations and the logged model use.
    ema = EmaGenerator(generator, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    start_epoch, step = 0, 0
    if resume is not None:
        generator.load_state_dict(resume["generator"])
        discriminator.load_state_dict(resume["discriminator"])
        if ema is not None:
            ema.model.load_state_dict(resume.get("generator_ema") or resume["generator"])
        opt_g.load_state_dict(resume["opt_g"])
        opt_d.load_state_dict(resume["opt_d"])
        start_epoch, step = int(resume["epoch"]), int(resume["step"])
        torch.set_rng_state(resume["rng"]["torch"])
        if rt.is_main and start_epoch < cfg.train.epochs:
            log(f"resuming from epoch {start_epoch} (step {step})")
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    generator.to(memory_format=layout)
    discriminator.to(memory_format=layout)
    # Compile the inner modules and wrap those: checkpoints keep the plain modules' state_dict keys.
    compiled = torch.compile if cfg.train.compile else _identity
    gen_ddp = rt.wrap_model(compiled(generator))
    disc_ddp = rt.wrap_model(compiled(discriminator))
    autocast = functools.partial(
        torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"
    )
    # no_sync: D's gradients from the generator step are thrown away, and its real-batch gradients are
    # reduced together with the fake-batch ones: neither needs an all-reduce of its own.
    d_no_sync = getattr(disc_ddp, "no_sync", contextlib.nullcontext)

    images = data.images.to(device)
    sampler = DistributedSampler(
        range(len(data)), num_replicas=world, rank=rt.rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    ones = torch.ones(local_batch, device=device)
    real_targets = torch.full((local_batch,), cfg.train.real_label, device=device)
    zeros = torch.zeros(local_batch, device=device)
    sampler_g = ema.model if ema is not None else generator
    latent = cfg.model.latent_dim
    metrics: dict[str, float] = {}
    total_steps = num_steps * cfg.train.epochs
    base_lrs = ((opt_g, cfg.optim.lr_g), (opt_d, cfg.optim.lr_d))

    for epoch in range(start_epoch, cfg.train.epochs):
        gen_ddp.train()
        disc_ddp.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        noise_rng = epoch_noise_generator(cfg.train.seed, epoch, rt.rank, device)
        sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss_d, loss_g, d_real, d_fake
        started = time.perf_counter()
        for i in range(num_steps):
            real = to_model_range(images[order[i * local_batch : (i + 1) * local_batch]])
            real = real.contiguous(memory_format=layout)

            # Discriminator: real -> 1, fake -> 0. Backward after each forward keeps BatchNorm buffers
            # consistent under DDP; the first backward skips the all-reduce, the second reduces the sum.
            if cfg.optim.lr_final_scale < 1.0:
                scale = linear_schedule(cfg.optim.lr_final_scale, step, total_steps)
                for opt, base in base_lrs:
                    for group in opt.param_groups:
                        group["lr"] = base * scale
            opt_d.zero_grad(set_to_none=True)
            z = torch.randn(local_batch, latent, device=device, generator=noise_rng)
            with autocast(), torch.set_grad_enabled(not cfg.train.g_fresh_noise):
                fake = gen_ddp(z)
            with d_no_sync():
                with autocast():
                    real_logits = disc_ddp(real)
                    loss_real = F.binary_cross_entropy_with_logits(real_logits, real_targets)
                loss_real.backward()
            with autocast():
                fake_logits = disc_ddp(fake.detach())
                loss_fake = F.binary_cross_entropy_with_logits(fake_logits, zeros)
            loss_fake.backward()
            opt_d.step()

            # Generator: its fakes labelled real.
            opt_g.zero_grad(set_to_none=True)
            if cfg.train.g_fresh_noise:
                z = torch.randn(local_batch, latent, device=device, generator=noise_rng)
                with autocast():
                    fake = gen_ddp(z)
            with d_no_sync():
                with autocast():
                    fake_logits_g = disc_ddp(fake)
                    if cfg.train.top_k_final < 1.0:
                        share = linear_schedule(cfg.train.top_k_final, step, total_steps)
                        fake_logits_g = most_real(fake_logits_g, share)
                    loss_g = F.binary_cross_entropy_with_logits(fake_logits_g, ones[: len(fake_logits_g)])
                loss_g.backward()
            opt_g.step()
            step += 1
            if ema is not None:
                ema.update(generator, step)

            with torch.no_grad():
                values = torch.stack(
                    [
                        (loss_real + loss_fake).detach(),
                        loss_g.detach(),
                        torch.sigmoid(real_logits).mean(),
                        torch.sigmoid(fake_logits).mean(),
                    ]
                ).double()
                sums += values
            if on_step is not None or step % cfg.tracking.log_every == 0:
                step_metrics = dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), values.tolist(), strict=True))
                if on_step is not None:
                    on_step(step, step_metrics)
                if step % cfg.tracking.log_every == 0:
                    tracker.log_metrics(step_metrics, step=step)

        elapsed = time.perf_counter() - started
        means = rt.mean_over_workers(sums / num_steps).tolist()
        metrics = dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), means, strict=True))
        metrics.update(
            epoch=epoch + 1,
            step=step,
            epoch_time_s=elapsed,
            images_per_s=num_steps * cfg.train.batch_size / elapsed,
        )
        if not all(np.isfinite(metrics[k]) for k in ("loss_d", "loss_g")):
            # Every worker sees the same all-reduced means, so all of them stop here, together.
            raise DivergedError(epoch + 1, metrics["loss_d"], metrics["loss_g"])
        is_last = epoch + 1 == cfg.train.epochs
        every = cfg.eval.every_epochs
        if evaluator is not None and every and ((epoch + 1) % every == 0 or is_last):
            eval_started = time.perf_counter()
            samples = generate_images(sampler_g, cfg.eval.num_samples, cfg.model.latent_dim, cfg.train.seed, device)
            metrics.update(evaluator.score(samples))
            metrics["eval_time_s"] = time.perf_counter() - eval_started
        if rt.is_main:
            log(
                f"epoch {epoch + 1}/{cfg.train.epochs}  loss_d={metrics['loss_d']:.4f}  "
                f"loss_g={metrics['loss_g']:.4f}  D(x)={metrics['d_real']:.3f}  "
                f"D(G(z))={metrics['d_fake']:.3f}  {metrics['images_per_s']:.0f} img/s  ({elapsed:.1f}s)"
                + (
                    f"  FID={metrics['fid']:.2f}  IS={metrics['inception_score']:.2f} ({metrics['eval_time_s']:.1f}s)"
                    if "fid" in metrics
                    else ""
                )
            )
            epoch_keys = ("epoch_time_s", "images_per_s", "fid", "inception_score", "eval_time_s")
            tracker.log_metrics({k: metrics[k] for k in epoch_keys if k in metrics}, step=step)
            tracker.log_image_grid(
                sample_images(sampler_g, fixed_noise(cfg, device)), f"samples/epoch_{epoch + 1:03d}.png"
            )
        if report is not None:
            state = None
            if rt.is_main:
                state = {
                    "generator": generator.state_dict(),
                    "generator_ema": ema.model.state_dict() if ema is not None else None,
                    "discriminator": discriminator.state_dict(),
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "rng": {"torch": torch.get_rng_state()},
                    "config": cfg.to_dict(),
                }
            report(metrics, state)
        # Only now is this epoch's checkpoint safe: a restart resumes after these steps, never before.
        tracker.flush()

    return TrainResult(generator=sampler_g, metrics=metrics, epoch=max(start_epoch, cfg.train.epochs), step=step)
