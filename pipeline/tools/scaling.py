"""When data parallelism pays: a model's measured step compute per image and gradient bytes per step, turned into
the predicted efficiency of N GPUs that all-reduce over NVLink or a network (``python -m pipeline bench
--scaling``; docs/SCALING.md holds a run and its assumptions).

Per step each worker computes ``batch / N`` images and the workers all-reduce the gradients of both networks
(DDP: D's once, after its fake-batch backward, G's once; fp32, as the parameters are). A ring all-reduce of S bytes
over N GPUs moves 2 (N - 1) / N * S bytes through each GPU's link and takes 2 (N - 1) latency hops:

    comm = 2 (N - 1) / N * S / bandwidth + 2 (N - 1) * latency

and the efficiency of N workers (each on its share of the global batch), against one GPU alone, is

    compute / (compute + comm)                               without overlap (the lower bound),
    compute / (compute + max(0, comm - backward))            with the all-reduce overlapped with the backward pass
                                                             (DDP's buckets; backward ~ 2/3 of a step's compute).

A GPU's compute per image is derived from a measured one: the H200's fp32 images/s on ``configs/mnist.yaml`` at
batch 1024 (docs/GPU.md, arithmetic-bound there) gives its achieved FLOP/s, and the model's FLOPs per image (torch's
FLOP counter, one real step) divided by that is its time. This machine's CPU step time is measured and shown too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import PROJECT_ROOT
from pipeline.config.load import load_config, with_overrides
from pipeline.config.schema import PipelineConfig
from pipeline.data.kinds import source_of

# Achieved all-reduce bus bandwidth (bytes/s) and latency per hop (s): assumptions, docs/SCALING.md says whence.
LINKS = {
    "NVLink": (360e9, 10e-6),
    "400 Gb/s": (45e9, 30e-6),
    "100 Gb/s": (11e9, 30e-6),
    "10 Gb/s": (1.1e9, 50e-6),
}
NVLINK_GPUS = 8  # GPUs one NVLink domain joins (a node); more cross the network
GPU_COUNTS = (2, 4, 8, 16)
BACKWARD_SHARE = 2 / 3  # of a step's compute: what an all-reduce can hide behind
# The reference GPU measurement: H200, fp32, configs/mnist.yaml, batch 1024, one-rank DDP (docs/GPU.md)
REFERENCE = {"gpu": "H200", "config": "configs/mnist.yaml", "batch": 1024, "images_per_s": 86_646}


@dataclass
class Measured:
    """What the model costs: FLOPs and this CPU's seconds per image, gradient bytes per step."""

    flops_per_image: float
    cpu_s_per_image: float
    gradient_bytes: int
    gpu_flops_per_s: float  # the reference GPU's achieved rate

    @property
    def gpu_s_per_image(self) -> float:
        return self.flops_per_image / self.gpu_flops_per_s


def gradient_bytes(cfg: PipelineConfig) -> int:
    """Bytes all-reduced per step: every parameter's fp32 gradient, of G and of D, once each."""
    import torch

    from pipeline.gan.models import build_models

    # A conditional GAN's embeddings, for the data's classes (their frequencies do not change the count).
    classes = torch.ones(max(2, source_of(cfg.data).spec().num_classes)) if cfg.model.conditional else None
    generator, discriminator = build_models(cfg.model, source_of(cfg.data).image_shape, classes)
    return 4 * sum(p.numel() for net in (generator, discriminator) for p in net.parameters() if p.requires_grad)


def cpu_seconds_per_image(cfg: PipelineConfig, batch: int, steps: int = 6) -> float:
    """This machine's seconds per image of a training step at ``batch`` (the median of ``steps`` after 2)."""
    from pipeline.data.split import Split
    from pipeline.gan.hooks import On
    from pipeline.gan.loop import train_gan

    shape = source_of(cfg.data).image_shape
    run = with_overrides(cfg, {"train.batch_size": batch, "train.epochs": 1, "eval.every_epochs": 0})
    count = batch * (steps + 2)
    fake = Split(torch.randint(0, 256, (count, *shape), dtype=torch.uint8), torch.zeros(count, dtype=torch.long))
    stamps: list[float] = []
    train_gan(run, fake, hooks=[On(step=lambda _: stamps.append(time.perf_counter()))])
    gaps = sorted(b - a for a, b in zip(stamps[2:], stamps[3:], strict=False))
    return gaps[len(gaps) // 2] / batch


def measure(cfg: PipelineConfig, batch: int) -> Measured:
    from pipeline.tools.bench import flops_per_image

    reference = load_config(Path(PROJECT_ROOT) / REFERENCE["config"], [f"train.batch_size={REFERENCE['batch']}"])
    return Measured(
        flops_per_image=flops_per_image(with_overrides(cfg, {"train.batch_size": batch})),
        cpu_s_per_image=cpu_seconds_per_image(cfg, batch),
        gradient_bytes=gradient_bytes(cfg),
        gpu_flops_per_s=flops_per_image(reference) * REFERENCE["images_per_s"],
    )


def allreduce_s(size: int, gpus: int, link: str) -> float:
    bandwidth, latency = LINKS[link]
    return 2 * (gpus - 1) / gpus * size / bandwidth + 2 * (gpus - 1) * latency


def efficiency(compute_s: float, comm_s: float, overlap: bool) -> float:
    exposed = max(0.0, comm_s - BACKWARD_SHARE * compute_s) if overlap else comm_s
    return compute_s / (compute_s + exposed)


def predictions(m: Measured, batch_per_gpu: int, s_per_image: float) -> dict[str, dict[int, tuple[float, float]]]:
    """link -> GPUs -> (efficiency without overlap, with overlap) at ``batch_per_gpu`` images per GPU per step;
    NVLink only up to :data:`NVLINK_GPUS`."""
    compute = batch_per_gpu * s_per_image
    table: dict[str, dict[int, tuple[float, float]]] = {}
    for link in LINKS:
        table[link] = {}
        for gpus in GPU_COUNTS:
            if link == "NVLink" and gpus > NVLINK_GPUS:
                continue
            comm = allreduce_s(m.gradient_bytes, gpus, link)
            table[link][gpus] = (efficiency(compute, comm, False), efficiency(compute, comm, True))
    return table


def scaling_report(cfg: PipelineConfig, batches: list[int], progress: Any = print) -> str:
    """The measurements and, for each per-GPU batch, the predicted efficiency table (markdown)."""
    progress(f"[scaling] measuring the model at batch {batches[0]} (FLOPs, CPU step, gradients)")
    m = measure(cfg, batches[0])
    shape = "x".join(map(str, source_of(cfg.data).image_shape))
    lines = [
        f"model: {shape} images, g_channels {cfg.model.g_channels}, d_channels {cfg.model.d_channels}, latent "
        f"{cfg.model.latent_dim}",
        f"- FLOPs per image (one training step): {m.flops_per_image / 1e9:.3f} GFLOP",
        f"- gradient bytes per step (G and D, fp32): {m.gradient_bytes / 2**20:.1f} MiB",
        f"- this CPU: {m.cpu_s_per_image * 1e3:.2f} ms per image (batch {batches[0]})",
        f"- {REFERENCE['gpu']}-derived: {m.gpu_s_per_image * 1e6:.1f} us per image ({REFERENCE['gpu']} fp32 at "
        f"{m.gpu_flops_per_s / 1e12:.1f} TFLOP/s achieved on {REFERENCE['config']}, batch {REFERENCE['batch']})",
        "",
    ]
    for batch in batches:
        table = predictions(m, batch, m.gpu_s_per_image)
        lines += [
            f"**{batch} images per GPU per step** (step compute {batch * m.gpu_s_per_image * 1e3:.2f} ms, "
            f"{REFERENCE['gpu']}-derived): efficiency without overlap / with the all-reduce overlapped",
            "",
            "| link | " + " | ".join(f"{g} GPUs" for g in GPU_COUNTS) + " |",
            "|---|" + "---|" * len(GPU_COUNTS),
        ]
        for link, row in table.items():
            cells = [f"{row[g][0]:.2f} / {row[g][1]:.2f}" if g in row else "-" for g in GPU_COUNTS]
            lines.append(f"| {link} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
